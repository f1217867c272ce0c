"""A QLoRA layer's forward + backward on the GPU: NF4 base weight through our kernels against the
same LoRA layer on a frozen bf16 weight, same run.

    PYTHONPATH=. python -m benchmarks.qlora_layer [--check] [--rows 4096]

    y = x @ W.T + s * (x @ A.T) @ B.T      r = 16, s = alpha / r = 2, bf16, W frozen
    backward: dx (through W: g @ W, and through the adapter), dA, dB; no gradient for W

The LoRA part is plain torch here (no lora/ or quant/ import); the NF4 base is a small
autograd.Function over kernels.matmul_nf4 / matmul_nf4_t (what quant.Linear4bit calls), and over
each large-M strategy alone. Ratio = bf16 LoRA time / QLoRA time (target >= 0.95). The "graphed"
columns time the same forward + backward captured in a CUDA graph on both sides (as the trainer
runs it, lora/graphs.py): GPU time without the Python and launch cost of each call. Markdown
table to stdout and, when OUT is set, to $OUT/qlora_layer.md.
"""
import argparse
import sys

import torch
import triton
from triton.testing import do_bench

import kernels
from benchmarks.report import publish
from benchmarks.nf4_matmul import random_nf4_weight
from kernels import nf4_matmul
from kernels.nf4_dequant import dequantize_nf4

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K) = (out_features, in_features)
RANK, ALPHA = 16, 32

BASES = {  # name: (x @ W.T, g @ W)
    "dispatch": (kernels.matmul_nf4, kernels.matmul_nf4_t),
    "fused": (nf4_matmul.matmul_nf4_fused, nf4_matmul.matmul_nf4_t_fused),
    "dequantize": (nf4_matmul.matmul_nf4_dequantize, nf4_matmul.matmul_nf4_t_dequantize),
}


class NF4Base(torch.autograd.Function):
    """x @ W.T for a frozen NF4 W: the backward returns the input gradient g @ W only."""

    @staticmethod
    def forward(ctx, x, packed, state, forward_fn, backward_fn):
        ctx.packed, ctx.state, ctx.backward_fn = packed, state, backward_fn
        return forward_fn(x, packed, state)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_fn(grad, ctx.packed, ctx.state), None, None, None, None


def lora(x, base, lora_a, lora_b):
    """base(x) + (alpha / r) * B(A x)."""
    return base(x) + (ALPHA / RANK) * ((x @ lora_a.T) @ lora_b.T)


def graphed(step, tensors) -> torch.cuda.CUDAGraph:
    """`step` captured in a CUDA graph after a warm-up; its gradients accumulate into `tensors`'
    .grad in place on every replay (the values do not matter for timing)."""
    for t in tensors:
        t.grad = torch.zeros_like(t)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: autotuning and lazy set-up happen outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare outputs and gradients with bf16 LoRA")
    parser.add_argument("--rows", type=int, default=4096, help="M, rows of x (default 4096)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    header = (f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
              f"LoRA r={RANK}, alpha={ALPHA}, bf16, M={args.rows}, forward + backward (dx, dA, dB)")
    print(header)
    torch.manual_seed(0)
    failures, lines = [], []
    m = args.rows
    for n_rows, n_cols in SHAPES:
        packed, state, _ = random_nf4_weight(n_rows, n_cols, bnb=None)
        state = kernels.prepare(packed, state)  # checked once, as quant.Linear4bit keeps it
        weight = dequantize_nf4(packed, state, torch.bfloat16)  # frozen bf16 W, the same numbers
        x = torch.randn(m, n_cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        lora_a = (torch.randn(RANK, n_cols, device="cuda") / n_cols ** 0.5).bfloat16().requires_grad_()
        lora_b = (torch.randn(n_rows, RANK, device="cuda") * 0.01).bfloat16().requires_grad_()
        grad_y = torch.randn(m, n_rows, device="cuda", dtype=torch.bfloat16)
        bases = {"bf16": lambda t: t @ weight.T}
        for name, (forward_fn, backward_fn) in BASES.items():
            bases[name] = (lambda t, f=forward_fn, b=backward_fn: NF4Base.apply(t, packed, state, f, b))

        def step(base):
            lora(x, base, lora_a, lora_b).backward(grad_y)

        if args.check:
            results = {}
            for name, base in bases.items():
                x.grad = lora_a.grad = lora_b.grad = None
                y = lora(x, base, lora_a, lora_b)
                y.backward(grad_y)
                results[name] = (y.detach(), x.grad, lora_a.grad, lora_b.grad)
            for name in BASES:
                errors = [relative_error(got, want) for got, want in zip(results[name], results["bf16"])]
                ok = max(errors) <= 1e-2
                print(f"  check {name} {n_rows}x{n_cols}: relative error y, dx, dA, dB = "
                      + ", ".join(f"{e:.1e}" for e in errors) + ("" if ok else "  FAIL"))
                if not ok:
                    failures.append(f"{name} {n_rows}x{n_cols}")
        times = {name: do_bench(lambda b=base: step(b), grad_to_none=[x, lora_a, lora_b], return_mode="median")
                 for name, base in bases.items()}
        replays = {name: graphed(lambda b=bases[name]: step(b), [x, lora_a, lora_b]) for name in ("bf16", "dispatch")}
        graph_times = {name: do_bench(g.replay, return_mode="median") for name, g in replays.items()}
        line = (f"| {n_rows} x {n_cols} | {m} | {times['bf16']:.3f} | {times['dispatch']:.3f} | "
                f"**{times['bf16'] / times['dispatch']:.3f}** | {times['bf16'] / times['fused']:.3f} | "
                f"{times['bf16'] / times['dequantize']:.3f} | {graph_times['bf16']:.3f} | "
                f"{graph_times['dispatch']:.3f} | **{graph_times['bf16'] / graph_times['dispatch']:.3f}** |")
        del replays
        print(line, flush=True)
        lines.append(line)
        del packed, state, weight, x, lora_a, lora_b, grad_y
        torch.cuda.empty_cache()

    report = "\n".join([
        f"{header}\n",
        "times in ms (median); ratio = bf16 LoRA time / QLoRA time (target >= 0.95)\n",
        "| N x K | M | bf16 LoRA | QLoRA (dispatch) | ratio | ratio, fused | ratio, dequantize+cuBLAS "
        "| graphed bf16 LoRA | graphed QLoRA | graphed ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *lines,
    ])
    if failures:
        report += f"\n\nCHECK FAILURES: {', '.join(failures)}"
    publish("qlora_layer", report)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

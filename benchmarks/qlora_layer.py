"""A QLoRA layer's forward + backward on the GPU: lora.LoRALinear over a 4-bit quant.Linear4bit
against the same LoRALinear over a frozen bf16 nn.Linear holding the same numbers, same run.

    PYTHONPATH=. python -m benchmarks.qlora_layer [--check] [--rows 4096] [--layout rows]

    y = x @ W.T + s * (x @ A.T) @ B.T      r = 16, s = alpha / r = 2, bf16, W frozen
    backward: dx (through W: g @ W, and through the adapter), dA, dB; no gradient for W

"layer" columns: our layer as users run it (lora/function.py: one autograd node; with the 4-bit
base the input gradient is g @ (W + s B A), Note [merged input gradient]). "autograd" columns: the
same math as four autograd nodes in plain torch (the base through kernels.matmul_nf4 /
matmul_nf4_t, as quant.Linear4bit calls them), the way the layer ran before lora/function.py.
Ratio = bf16 time / 4-bit time (target >= 0.95); each time is the median of 3 rounds that
interleave all columns. "graphed": forward + backward captured in a CUDA graph on both sides (as
the trainer runs it, lora/graphs.py), so GPU time without the Python and launch cost of each call.
"W us" / "W + s B A us": the 4-bit base's dequantization alone and with the adapter merged
(kernels/nf4_lowrank_mma.py), L2 cleared; "tiles": the merged weight by the Triton tile kernel of
kernels/nf4_lowrank.py (its fastest config), which it replaces for 16-bit outputs. Markdown table
to stdout and, when OUT is set, to $OUT/qlora_layer.md.
"""
import argparse
import statistics
import sys

import torch
import torch.nn as nn
import triton
from triton.testing import do_bench

import kernels
import quant
from benchmarks.report import publish
from kernels import nf4_lowrank
from kernels.launch import cold_graph_bench
from lora import LoRALinear

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K) = (out_features, in_features)
RANK, ALPHA = 16, 32
ROUNDS = 3  # each time is the median of ROUNDS medians


class NF4Base(torch.autograd.Function):
    """x @ W.T for a frozen NF4 W: the backward returns the input gradient g @ W only."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return kernels.matmul_nf4(x, layer.weight, layer.kernel_weight())

    @staticmethod
    def backward(ctx, grad):
        return kernels.matmul_nf4_t(grad, ctx.layer.weight, ctx.layer.kernel_weight()), None


def autograd_lora(x, base, lora_a, lora_b):
    """base(x) + (alpha / r) * B(A x), four autograd nodes."""
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


def layers(n_rows: int, n_cols: int, tiled: bool = True) -> tuple[LoRALinear, LoRALinear]:
    """(LoRA over bf16 nn.Linear, LoRA over Linear4bit): the same W numbers, the same adapters; tiled:
    the 4-bit codes in the kernels' tile order (quant/linear.py Note [tiled codes on the GPU])."""
    weight = torch.randn(n_rows, n_cols, device="cuda", dtype=torch.bfloat16) * 0.02
    base4 = quant.Linear4bit.from_weight(weight, compute_dtype=torch.bfloat16)
    base4.tile_codes(tiled)
    base16 = nn.Linear(n_cols, n_rows, bias=False, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        base16.weight.copy_(base4.dequantize(torch.bfloat16))
    pair = []
    for base in (base16, base4):
        base.requires_grad_(False)
        layer = LoRALinear(base, r=RANK, alpha=ALPHA, dtype=torch.bfloat16)
        pair.append(layer)
    lora_a = torch.randn(RANK, n_cols, device="cuda") / n_cols ** 0.5
    lora_b = torch.randn(n_rows, RANK, device="cuda") * 0.01
    with torch.no_grad():
        for layer in pair:
            layer.lora_A.weight.copy_(lora_a)
            layer.lora_B.weight.copy_(lora_b)
    return pair[0], pair[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare outputs and gradients with the bf16 layer")
    parser.add_argument("--rows", type=int, default=4096, help="M, rows of x (default 4096)")
    parser.add_argument("--layout", choices=("tiles", "rows"), default="tiles",
                        help="the 4-bit codes in the kernels' tile order (Linear4bit's default on a GPU) or in "
                             "bitsandbytes' row order")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    header = (f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
              f"LoRA r={RANK}, alpha={ALPHA}, bf16, M={args.rows}, forward + backward (dx, dA, dB), "
              f"codes in {args.layout}")
    print(header)
    torch.manual_seed(0)
    failures, lines = [], []
    m = args.rows
    for n_rows, n_cols in SHAPES:
        layer16, layer4 = layers(n_rows, n_cols, args.layout == "tiles")
        x = torch.randn(m, n_cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad_y = torch.randn(m, n_rows, device="cuda", dtype=torch.bfloat16)
        weight16 = layer16.base_layer.weight
        steps = {  # name: (step, tensors with gradients)
            "layer bf16": (lambda: layer16(x).backward(grad_y), [x, *layer16.parameters()]),
            "layer nf4": (lambda: layer4(x).backward(grad_y), [x, *layer4.parameters()]),
            "autograd bf16": (lambda: autograd_lora(x, lambda t: t @ weight16.T, layer16.lora_A.weight,
                                                    layer16.lora_B.weight).backward(grad_y), [x, *layer16.parameters()]),
            "autograd nf4": (lambda: autograd_lora(x, lambda t: NF4Base.apply(t, layer4.base_layer),
                                                   layer4.lora_A.weight, layer4.lora_B.weight).backward(grad_y),
                             [x, *layer4.parameters()]),
        }
        if args.check:
            results = {}
            for name, (step, tensors) in steps.items():
                tensors = [t for t in tensors if t.requires_grad]
                for t in tensors:
                    t.grad = None
                step()
                results[name] = [t.grad.clone() for t in tensors]
            want = results["layer bf16"]
            # dx against float64 from the exact NF4 values: the merged weight's rounding against W's alone
            lora_a, lora_b = (w.detach().double() for w in (layer4.lora_A.weight, layer4.lora_B.weight))
            exact = grad_y.double() @ (layer4.base_layer.dequantize(torch.float32).double()
                                       + layer4.scaling * lora_b @ lora_a)
            print(f"  check dx {n_rows}x{n_cols} against float64: layer bf16 "
                  f"{relative_error(results['layer bf16'][0], exact):.1e}, layer nf4 "
                  f"{relative_error(results['layer nf4'][0], exact):.1e}")
            del exact
            for name in ("layer nf4", "autograd bf16", "autograd nf4"):
                errors = [relative_error(got, w) for got, w in zip(results[name], want)]
                ok = max(errors) <= 1e-2
                print(f"  check {name} {n_rows}x{n_cols}: relative error of dx, dA, dB against layer bf16 = "
                      + ", ".join(f"{e:.1e}" for e in errors) + ("" if ok else "  FAIL"))
                if not ok:
                    failures.append(f"{name} {n_rows}x{n_cols}")
        rounds = {name: ([], []) for name in steps}
        for _ in range(ROUNDS):  # interleaved, so that clock drift during the run hits every column alike
            for name, (step, tensors) in steps.items():
                tensors = [t for t in tensors if t.requires_grad]
                rounds[name][0].append(do_bench(step, grad_to_none=tensors, return_mode="median"))
                graph = graphed(step, tensors)  # captured anew: it writes into the .grad tensors it was given
                rounds[name][1].append(do_bench(graph.replay, return_mode="median"))
                del graph
        times = {name: statistics.median(eager) for name, (eager, _) in rounds.items()}
        graph_times = {name: statistics.median(replayed) for name, (_, replayed) in rounds.items()}
        base4, lora4 = layer4.base_layer, layer4
        dequant_us = 1000 * cold_graph_bench(lambda: base4.dequantize(torch.bfloat16))
        lowrank_us = 1000 * cold_graph_bench(lambda: base4.dequantize_lowrank(lora4.lora_B.weight, lora4.lora_A.weight,
                                                                               lora4.scaling, torch.bfloat16))
        tiles_us = 1000 * min(cold_graph_bench(lambda c=c: nf4_lowrank.dequantize_nf4_lowrank(
            base4.weight, base4.kernel_weight(), lora4.lora_B.weight, lora4.lora_A.weight, lora4.scaling,
            torch.bfloat16, config=c)) for c in nf4_lowrank._CONFIGS)
        t, g = times, graph_times
        line = (f"| {n_rows} x {n_cols} | {m} | {t['layer bf16']:.3f} | {t['layer nf4']:.3f} | "
                f"**{t['layer bf16'] / t['layer nf4']:.3f}** | {g['layer bf16']:.3f} | {g['layer nf4']:.3f} | "
                f"**{g['layer bf16'] / g['layer nf4']:.3f}** | {g['autograd bf16']:.3f} | {g['autograd nf4']:.3f} | "
                f"{g['autograd bf16'] / g['autograd nf4']:.3f} | {g['autograd bf16'] / g['layer nf4']:.3f} | "
                f"{dequant_us:.1f} | {lowrank_us:.1f} | {tiles_us:.1f} |")
        print(line, flush=True)
        lines.append(line)
        del layer16, layer4, base4, lora4, x, grad_y, steps, weight16
        torch.cuda.empty_cache()

    report = "\n".join([
        f"{header}\n",
        "times in ms (median); ratio = bf16 time / 4-bit time (target >= 0.95)\n",
        "| N x K | M | layer bf16 | layer QLoRA | ratio | graphed layer bf16 | graphed layer QLoRA | graphed ratio "
        "| graphed autograd bf16 | graphed autograd QLoRA | autograd ratio | autograd bf16 / layer QLoRA "
        "| W us | W + s B A us | W + s B A tiles us |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *lines,
    ])
    if failures:
        report += f"\n\nCHECK FAILURES: {', '.join(failures)}"
    publish("qlora_layer", report)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

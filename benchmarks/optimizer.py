"""Optimizer step time and GPU memory for the LoRA parameters of Llama-3.1-8B, against torch.

    PYTHONPATH=. python -m benchmarks.optimizer [--steps 50] [--warmup 5] [--budget-mib 64]

The parameters: r=16 adapters on q, k, v, o, gate, up, down of 32 layers (hidden 4096, kv 1024,
intermediate 14336): 448 fp32 tensors, 41.9M parameters, with fixed random gradients. For each
optimizer: the median step time over --steps steps after --warmup (CUDA events around step(),
which include any time the GPU waits for the CPU), the wall time per step of the whole loop, the
GPU memory the optimizer adds once its state exists (memory_allocated after the warm-up minus
before it was built, with parameters and gradients already there), the peak during the timed
steps, and the largest difference of the parameters from torch's fused AdamW after the same steps.
A paged step moves the whole state to the GPU and back, so the table also gives the PCIe bound:
state bytes / pinned copy bandwidth measured in this run. Writes the table to $OUT/optimizer.md
when OUT is set.
"""
import argparse
import gc
import platform
import statistics
import time

import torch
import torch.nn as nn

import lora.optim
from benchmarks.report import publish

LAYERS, HIDDEN, KV, INTERMEDIATE, R = 32, 4096, 1024, 14336, 16
PROJECTIONS = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, KV), "v": (HIDDEN, KV), "o": (HIDDEN, HIDDEN),
               "gate": (HIDDEN, INTERMEDIATE), "up": (HIDDEN, INTERMEDIATE), "down": (INTERMEDIATE, HIDDEN)}


def lora_shapes() -> list[tuple[int, int]]:
    """(r, in) for lora_A and (out, r) for lora_B of every projection of every layer."""
    return [shape for _ in range(LAYERS) for n_in, n_out in PROJECTIONS.values()
            for shape in ((R, n_in), (n_out, R))]


def fresh_parameters(seed: int = 0) -> list[nn.Parameter]:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    params = []
    for shape in lora_shapes():
        p = nn.Parameter(torch.randn(shape, device="cuda", generator=generator) * 0.02)
        p.grad = torch.randn(shape, device="cuda", generator=generator) * 1e-3
        params.append(p)
    return params


def measure(make_optimizer, steps: int, warmup: int) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    params = fresh_parameters()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    opt = make_optimizer(params)
    for _ in range(warmup):
        opt.step()
    torch.cuda.synchronize()
    state = torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(steps)]
    start = time.perf_counter()
    for begin, end in events:
        begin.record()
        opt.step()
        end.record()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps * 1e3
    result = dict(
        ms=statistics.median(b.elapsed_time(e) for b, e in events), wall_ms=wall, state=state,
        peak=torch.cuda.max_memory_allocated() - base,
        final=torch.cat([p.detach().reshape(-1) for p in params]).cpu(),
        host=opt.state_bytes()["host"] if isinstance(opt, lora.optim.AdamW) else 0,
        slots=opt.state_bytes()["device"] if isinstance(opt, lora.optim.AdamW) and opt.paged else None,
    )
    del opt, params
    return result


def pinned_bandwidth(nbytes: int = 256 << 20) -> tuple[float, float]:
    """(host->device, device->host) GB/s of one pinned copy of nbytes, best of 5."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    rates = []
    for dst, src in ((device, host), (host, device)):
        best = float("inf")
        for _ in range(5):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            torch.cuda.synchronize()
            best = min(best, begin.elapsed_time(end) / 1e3)
        rates.append(nbytes / best / 1e9)
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--budget-mib", type=int, default=64, help="page_budget_bytes of the paged runs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.optimizer needs a CUDA GPU")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed (the optimizer falls back to torch ops)"
    n_params = sum(a * b for a, b in lora_shapes())
    budget = args.budget_mib << 20
    lr = dict(lr=2e-4, weight_decay=0.01)
    paging = dict(paged=True, page_budget_bytes=budget)
    configs = {
        "torch AdamW fused=True": lambda ps: torch.optim.AdamW(ps, fused=True, **lr),
        "torch AdamW foreach=True": lambda ps: torch.optim.AdamW(ps, foreach=True, **lr),
        "ours 32-bit": lambda ps: lora.optim.AdamW(ps, **lr),
        "ours 8-bit": lambda ps: lora.optim.AdamW(ps, state_bits=8, **lr),
        "ours 32-bit paged": lambda ps: lora.optim.AdamW(ps, **paging, **lr),
        "ours 8-bit paged": lambda ps: lora.optim.AdamW(ps, state_bits=8, **paging, **lr),
        # A budget that holds the whole state: every page stays resident and nothing crosses PCIe.
        "ours 32-bit paged, 512 MiB budget": lambda ps: lora.optim.AdamW(
            ps, paged=True, page_budget_bytes=512 << 20, **lr),
    }
    h2d, d2h = pinned_bandwidth()
    results = {name: measure(make, args.steps, args.warmup) for name, make in configs.items()}
    fused = results["torch AdamW fused=True"]

    lines = [
        f"# Optimizer step, Llama-3.1-8B LoRA r={R} ({len(lora_shapes())} fp32 tensors, "
        f"{n_params / 1e6:.1f}M parameters)",
        "",
        f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton_version}, "
        f"python {platform.python_version()}; {args.steps} steps after {args.warmup} warm-up; "
        f"pinned copies {h2d:.1f} GB/s host->device, {d2h:.1f} GB/s device->host; "
        f"paged budget {args.budget_mib} MiB",
        "",
        "| optimizer | step ms (median) | wall ms/step | vs torch fused | state MiB on GPU | peak MiB | "
        "host MiB | max abs diff vs fused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        diff = (r["final"] - fused["final"]).abs().max().item()
        lines.append(f"| {name} | {r['ms']:.3f} | {r['wall_ms']:.3f} | {r['ms'] / fused['ms']:.2f}x | "
                     f"{r['state'] / 2**20:.1f} | {r['peak'] / 2**20:.1f} | {r['host'] / 2**20:.1f} | "
                     f"{diff:.2e} |")
    lines.append("")
    for bits in ("32-bit", "8-bit"):
        paged, unpaged = results[f"ours {bits} paged"], results[f"ours {bits}"]
        bound = max(paged["host"] / (h2d * 1e9), paged["host"] / (d2h * 1e9)) * 1e3
        lines.append(
            f"- {bits} paged: {paged['ms'] / unpaged['ms']:.2f}x the unpaged step (target <= 1.5x); "
            f"PCIe bound {bound:.3f} ms (state {paged['host'] / 2**20:.0f} MiB each way), "
            f"step / bound = {paged['ms'] / bound:.2f}; working set {paged['slots'] / 2**20:.1f} MiB "
            f"of slots, {paged['state'] / 2**20:.1f} MiB measured, peak {paged['peak'] / 2**20:.1f} MiB, "
            f"budget {args.budget_mib} MiB: {'within' if max(paged['state'], paged['peak']) <= budget else 'OVER'}")
    roomy = results["ours 32-bit paged, 512 MiB budget"]
    lines.append(f"- 32-bit paged with a 512 MiB budget (the state fits): {roomy['ms'] / results['ours 32-bit']['ms']:.2f}x "
                 f"the unpaged step, {roomy['host'] / 2**20:.0f} MiB left in host memory")
    ours32 = results["ours 32-bit"]
    lines.append(f"- unpaged 32-bit vs torch fused: {ours32['ms'] / fused['ms']:.2f}x (target <= 1.0x); "
                 f"8-bit state is {results['ours 8-bit']['state'] / max(ours32['state'], 1):.2f} of 32-bit")
    publish("optimizer", "\n".join(lines))


if __name__ == "__main__":
    main()

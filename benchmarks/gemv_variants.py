"""The small-M NF4 GEMV's variants on the GPU, against torch bf16 `x @ W.T`: which lookup, which tile.

    PYTHONPATH=. python3 -m benchmarks.gemv_variants [--shapes 4096x4096,...] [--no-configs]

For each W of N x K (bf16 x, NF4 + double quant, blocksize 64) and M in (1, 16):
    torch        x @ W.T on the bf16 weight (cuBLAS)
    M = 1:       each code lookup of kernels/nf4_gemv.py (GEMV_LOOKUPS: "prmt" and "prmt_bf16"
                 in-register tables, "nibble" 16-entry float32 table, "byte" 256-entry pair table),
                 autotuned ("auto") and with each of its configs forced (BLOCK_N x BLOCK_K / warps)
    M = 16:      the GEMV's tensor-core path, "prmt", "prmt_bf16" and "nibble" (float32 gather)
    both:        the first lookup autotuned with split-K 4, and "dispatch" (kernels.matmul_nf4)
Times are medians of triton.testing.do_bench (L2 cleared before each run, so W streams from HBM),
with small warmup / rep counts so the whole run takes a few minutes. Every variant's output is
first compared with the fp64 product (bf16 tolerance 8e-3 of |x| @ |W|.T); a failure is marked in
the table and makes the exit status 1. GB/s counts the bytes that must move: packed W, block
statistics, x and y. The table goes to stdout and, when OUT is set, to $OUT/gemv_variants.md.
"""
import argparse
import sys

import torch
import triton
from triton.testing import do_bench

import kernels
from benchmarks.nf4_matmul import BLOCKSIZE, RTOL_BF16, exact_product, random_nf4_weight, weight_bytes
from benchmarks.report import publish
from kernels import nf4_gemv, nf4_matmul, reference
from kernels.nf4_tiles import interpreting

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]  # (N, K)
DEVICE = "cuda"


def median_us(fn) -> float:
    return do_bench(fn, warmup=5, rep=20, return_mode="median") * 1e3


def max_error(got: torch.Tensor, exact) -> float:
    want, bound = exact
    return ((got.double() - want).abs() / bound).max().item()


def fixed_config(x2d: torch.Tensor, weight, config: triton.Config, lookup: str):
    """A launcher of the kernel with `config` forced (split 1, no bias): what
    nf4_matmul.matmul_nf4_gemv launches, minus the autotuner."""
    m, n, k = x2d.shape[0], weight.n_rows, weight.n_cols
    out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)  # (M, N)
    grid = (triton.cdiv(n, config.kwargs["BLOCK_N"]), 1)

    def launch():
        nf4_gemv._gemv_kernel[grid](
            x2d, weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, weight.offset, weight.code,
            weight.byte_code, weight.code_planes, out, out, m, n, k, k // 8, x2d.stride(0), out.stride(0),
            BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=weight.double_quant, OFFSET_IS_POINTER=weight.offset_is_pointer,
            HAS_BIAS=False, SPLIT=1, M_PAD=1 if m == 1 else nf4_gemv.GEMV_M_MAX, LOOKUP=lookup,
            IN_REGISTERS=not interpreting(), **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        return out
    return launch


def config_name(config: triton.Config) -> str:
    return f"{config.kwargs['BLOCK_N']}x{config.kwargs['BLOCK_K']}/{config.num_warps}w"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="NxK,NxK,...")
    parser.add_argument("--no-configs", action="store_true", help="time the autotuned kernels only")
    parser.add_argument("--rows", default="1,16", help="M values, e.g. 1 or 1,16")
    parser.add_argument("--lookups", help="only these lookups, e.g. prmt_bf16")
    parser.add_argument("--extra-configs", default="",
                        help="more forced M = 1 configs to time, rows x K per chunk / warps: 4x1024/4,8x512/2")
    args = parser.parse_args()
    extra = [triton.Config({"BLOCK_N": int(c.split("x")[0]), "BLOCK_K": int(c.split("x")[1].split("/")[0])},
                           num_warps=int(c.split("/")[1]), num_stages=1) for c in filter(None, args.extra_configs.split(","))]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = ["| N x K | M | variant | torch us | us | speedup | GB/s | max err |", "|---|---|---|---|---|---|---|---|"]
    failures = []
    for n, k in shapes:
        packed, state, _ = random_nf4_weight(n, k, None)
        weight = kernels.prepare(packed, state)
        w_bf16 = reference.dequantize_nf4(packed, state, torch.bfloat16)  # (N, K): torch's operand
        w_f32 = reference.dequantize_nf4(packed, state, torch.float32)
        for m in (int(v) for v in args.rows.split(",")):
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            exact = exact_product(x, w_f32.T)
            moved = weight_bytes(state) + 2 * m * (n + k)
            torch_us = median_us(lambda: x @ w_bf16.T)
            variants = {}
            lookups, configs = ((nf4_gemv.GEMV_LOOKUPS, nf4_gemv._FMA_CONFIGS + extra) if m == 1
                                else (("prmt", "prmt_bf16", "nibble"), nf4_gemv._DOT_CONFIGS))
            if args.lookups:
                lookups = tuple(v for v in lookups if v in args.lookups.split(","))
            for lookup in lookups:
                variants[f"{lookup} auto"] = (lambda lookup=lookup: nf4_matmul.matmul_nf4_gemv(
                    x, packed, weight, lookup=lookup))
                if not args.no_configs:
                    for config in configs:
                        variants[f"{lookup} {config_name(config)}"] = fixed_config(x, weight, config, lookup)
            # split-K: partial sums added atomically into a zeroed float32 y, then cast (two more launches)
            variants[f"{lookups[0]} auto split 4"] = lambda: nf4_matmul.matmul_nf4_gemv(
                x, packed, weight, split_k=4, lookup=lookups[0])
            variants["dispatch"] = lambda: kernels.matmul_nf4(x, packed, weight)
            for name, fn in variants.items():
                error = max_error(fn(), exact)
                status = "" if error <= RTOL_BF16 else " FAIL"
                if status:
                    failures.append(f"{n}x{k} M={m} {name}")
                us = median_us(fn)
                rows.append(f"| {n}x{k} | {m} | {name} | {torch_us:.1f} | {us:.1f} | {torch_us / us:.2f} | "
                            f"{moved / us / 1e3:.0f} | {error:.1e}{status} |")
                print(rows[-1], flush=True)
        del w_bf16, w_f32
        torch.cuda.empty_cache()
    note = (f"\nbf16, NF4 + double quant (blocksize {BLOCKSIZE}); GEMV_LOOKUP = {nf4_gemv.GEMV_LOOKUP!r}; "
            f"{torch.cuda.get_device_name()}; failures: {failures or 'none'}")
    publish("gemv_variants", "\n".join(rows) + note)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

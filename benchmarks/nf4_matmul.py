"""NF4 matmul on the GPU: our kernels against torch bf16 `x @ W.T` and bitsandbytes, same run.

    PYTHONPATH=. python -m benchmarks.nf4_matmul [--quick] [--check] [--shapes 4096x4096,...] [--rows 1,16]

For each W of N x K and each M (rows of x), bf16 throughout, the median time over many runs
(triton.testing.do_bench, which clears L2 before every run, so small M streams W from HBM):
    torch   x @ W.T on the bf16 weight (cuBLAS)
    ours    kernels.matmul_nf4 (what quant.Linear4bit calls: dispatch by M), on the codes in the
            kernels' tile order (--layout tiles, the default: kernels/nf4_tiles.py Note [tiled codes],
            what quant.Linear4bit holds on a GPU) or in bitsandbytes' row order (--layout rows)
    gemv    the CUDA-core GEMV (M <= 16), small (tensor-core tiles with BLOCK_M = 16, M <= 64),
    fused (large tensor-core tiles, W in registers), dequant (W to a bf16 scratch buffer, then
    cuBLAS): every strategy at every M, to set the dispatch constants of kernels/nf4_matmul.py
    bnb     bitsandbytes.matmul_4bit, NF4 + double quant, when bitsandbytes imports
Speedups are torch time / that time. Rates: GB/s of the bytes that must move (packed W + block
stats + x + y) for M <= 64, TFLOP/s (2*M*N*K) for larger M. Then g @ W (the backward product) at
the same M, against bitsandbytes' backward (W dequantized, then a matmul), and the dequantization
kernel alone (GB/s of packed W + stats + the bf16 output). For M <= 16, the read floors
(benchmarks/read_floor.py: one kernel that only reads as many bytes as the 4-bit weight, its
statistics, or as the bf16 weight; same timing) and the ceiling they set: torch's time / the
4-bit floor bounds the speedup of any kernel that reads W once (x and y, at most 3% of the bytes
at M = 16, are left out, so the bound is a little loose).
At M <= 16 a call's host time can exceed what do_bench's L2 clearing hides, and the table then
times the host (our dispatch took ~80 us per call on the lent H100 machine in run 106 of
benchmarks/RESULTS.md, and was host-bound there; 41 us since the direct launch, run 111, and 31.5
without the scratch tensor, run 124, against torch's 17-22): --graphed replays the calls from a CUDA
graph and times the GPU alone.
--check compares every output with the fp64 product (and dequantization with the reference, bit
for bit) before timing. The markdown tables go to stdout and, when OUT is set, $OUT/nf4_matmul.md.
"""
import argparse
import sys
import time
from dataclasses import dataclass

import torch
import triton
from triton.testing import do_bench

import kernels
from benchmarks.read_floor import read_floor_us
from benchmarks.report import publish
from kernels import nf4_matmul, reference
from kernels.launch import cold_graph_bench
from kernels.nf4_dequant import dequantize_nf4

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]  # (N, K)
QUICK_SHAPES = [(4096, 4096), (4096, 14336)]
ROWS = [1, 16, 64, 4096]
GEMV_MAX_ROWS = nf4_matmul.GEMV_M_MAX  # the streaming kernel takes at most this many rows
SMALL_PATH_MAX_ROWS = 64  # beyond this the small-M tiles are pointless to time
MMA_ROWS_MAX = 16  # the decode sizes the read-floor table covers
BLOCKSIZE = 64
RTOL_BF16 = 8e-3  # W and y each rounded to bf16 once: <= 2 * 2^-8 of |x| @ |W|.T


@dataclass
class State:
    """The attributes kernels read (quant.QuantState has the same ones)."""
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    offset: torch.Tensor | float
    code: torch.Tensor
    blocksize: int
    shape: tuple[int, int]


def _bitsandbytes():
    try:
        import bitsandbytes
        return bitsandbytes
    except Exception:  # not installed, or installed without a working CUDA build
        return None


def random_nf4_weight(n_rows: int, n_cols: int, bnb):
    """(packed, state, bnb_state or None): bitsandbytes' own quantization of a random bf16 W when
    available (so both libraries multiply the same numbers), else random codes and scales."""
    if bnb is not None:
        w = torch.randn(n_rows, n_cols, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, qs = bnb.functional.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True,
                                                  quant_type="nf4")
        state = State(absmax=qs.absmax, nested_absmax=qs.state2.absmax, nested_code=qs.state2.code,
                      offset=qs.offset, code=qs.code, blocksize=qs.blocksize, shape=(n_rows, n_cols))
        return packed, state, qs
    numel = n_rows * n_cols
    nblocks = numel // BLOCKSIZE
    packed = torch.randint(0, 256, (numel // 2, 1), dtype=torch.uint8, device="cuda")
    state = State(absmax=torch.randint(0, 256, (nblocks,), dtype=torch.uint8, device="cuda"),
                  nested_absmax=torch.rand((nblocks + 255) // 256, device="cuda") * 0.01,
                  nested_code=torch.sort(torch.rand(256, device="cuda") * 2 - 1).values,
                  offset=torch.tensor(0.02, device="cuda"), code=torch.tensor(_NF4, device="cuda"),
                  blocksize=BLOCKSIZE, shape=(n_rows, n_cols))
    return packed, state, None


_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0]


def weight_bytes(state: State) -> int:
    """Bytes of packed W and its block statistics."""
    n_rows, n_cols = state.shape
    stats = state.absmax.numel() * state.absmax.element_size()
    if state.nested_absmax is not None:
        stats += state.nested_absmax.numel() * 4 + 256 * 4
    return (n_rows * n_cols + 1) // 2 + stats + 16 * 4


def median_us(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def graphed_us(fn) -> float | None:
    """GPU time per call with L2 cleared, calls replayed from a CUDA graph (kernels/launch.py): no host
    launch cost. None when `fn` cannot be captured."""
    try:
        return cold_graph_bench(fn) * 1e3
    except RuntimeError:
        torch.cuda.synchronize()
        return None


def exact_product(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a @ b, |a| @ |b|) in fp64 on the GPU: the reference and the scale of its rounding errors."""
    a64, b64 = a.double(), b.double()
    return a64 @ b64, (a64.abs() @ b64.abs()).clamp_min(1e-30)


def check(name: str, got: torch.Tensor, exact: tuple[torch.Tensor, torch.Tensor], failures: list) -> None:
    """got ~= a @ b within RTOL_BF16 of |a| @ |b|."""
    want, bound = exact
    error = ((got.double() - want).abs() / bound).max().item()
    status = "ok" if error <= RTOL_BF16 else "FAIL"
    print(f"  check {name}: max error {error:.2e} x |a|@|b| ({status})")
    if status != "ok":
        failures.append(name)


def measure(runs: dict, operands, label: str, graphed: bool, dispatch_only: bool, failures: list) -> tuple[dict, dict]:
    """(times in us, speedups against runs["torch"]) of every run that is not None (with dispatch_only,
    of torch, ours and bnb only), each first checked against the fp64 product of `operands` (a, b)
    when given."""
    if dispatch_only:
        runs = {name: (fn if name in ("torch", "ours", "bnb") else None) for name, fn in runs.items()}
    if operands is not None:
        exact = exact_product(*operands)
        for name, fn in runs.items():
            if fn is not None:
                check(f"{label} {name}", fn(), exact, failures)
        del exact
    timer = graphed_us if graphed else median_us
    times = {name: (timer(fn) if fn is not None else None) for name, fn in runs.items()}
    return times, {name: (times["torch"] / t if t else None) for name, t in times.items()}


def rate_of(m: int, n_rows: int, n_cols: int, wbytes: int, us: float | None) -> str:
    """GB/s of the bytes that must move (W, its statistics, the input and the output) at small M,
    TFLOP/s above; "-" when the call could not be timed (us None)."""
    if us is None:
        return "-"
    if m <= SMALL_PATH_MAX_ROWS:
        return f"{(wbytes + (m * n_cols + m * n_rows) * 2) / us / 1e3:.0f} GB/s"
    return f"{2 * m * n_rows * n_cols / us / 1e6:.0f} TFLOP/s"


def fmt(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def launch_overhead(n_rows: int = 4096, n_cols: int = 4096, calls: int = 300) -> str:
    """Per-call cost at M = 1 when calls are issued back to back (the larger of host and GPU time),
    against the GPU time alone: where the first is larger, the host (Python, Triton's launcher)
    limits small products, not the kernel."""
    packed, raw_state, _ = random_nf4_weight(n_rows, n_cols, None)
    state = kernels.prepare(packed, raw_state)
    w = dequantize_nf4(packed, state, torch.bfloat16)
    x = torch.randn(1, n_cols, device="cuda", dtype=torch.bfloat16)
    runs = {"torch x @ W.T": lambda: x @ w.T,
            "ours (prepared)": lambda: kernels.matmul_nf4(x, packed, state),
            "ours (unprepared)": lambda: kernels.matmul_nf4(x, packed, raw_state),
            "empty_like (one launch)": lambda: torch.empty_like(x).zero_()}
    lines = [f"launch overhead at M = 1, {n_rows} x {n_cols}: us per call", "",
             "| call | back to back | GPU only (do_bench) |", "|---|---|---|"]
    for name, fn in runs.items():
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / calls * 1e6
        gpu = do_bench(fn, warmup=25, rep=100, return_mode="median", grad_to_none=None) * 1e3
        lines.append(f"| {name} | {wall:.1f} | {gpu:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_SHAPES} at M = 1, 16, 4096")
    parser.add_argument("--check", action="store_true", help="compare every output with the reference first")
    parser.add_argument("--shapes", help="N x K list, e.g. 4096x4096,14336x4096")
    parser.add_argument("--rows", help="M list, e.g. 1,16,64,4096")
    parser.add_argument("--overhead", action="store_true", help="also time the per-call launch overhead at M = 1")
    parser.add_argument("--graphed", action="store_true",
                        help="time every implementation by CUDA-graph replay (GPU time only) instead of do_bench")
    parser.add_argument("--dispatch-only", action="store_true",
                        help="time torch, ours (the dispatch) and bitsandbytes only, not each strategy")
    parser.add_argument("--layout", choices=("tiles", "rows"), default="tiles",
                        help="our packed codes in the kernels' tile order (kernels/nf4_tiles.py Note [tiled codes], "
                             "as quant.Linear4bit holds them on a GPU) or in bitsandbytes' row order")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rows = [1, 16, 4096] if args.quick else ROWS
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    if args.rows:
        rows = [int(v) for v in args.rows.split(",")]
    bnb = _bitsandbytes()
    header = (f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
              f"bitsandbytes {bnb.__version__ if bnb else 'not installed'}; NF4 + double quant, "
              f"blocksize {BLOCKSIZE}, bf16, our codes in {args.layout}; "
              f"timing: {'CUDA-graph replay' if args.graphed else 'do_bench'}; dispatch: "
              f"SMALL_M_MAX={nf4_matmul.SMALL_M_MAX}, LARGE_M_STRATEGY={nf4_matmul.LARGE_M_STRATEGY!r}, "
              f"LARGE_M_STRATEGY_T={nf4_matmul.LARGE_M_STRATEGY_T!r}")
    print(header)
    torch.manual_seed(0)
    failures: list[str] = []
    forward_rows, backward_rows, dequant_rows, floor_rows = [], [], [], []
    for n_rows, n_cols in shapes:
        bnb_packed, raw_state, bnb_state = random_nf4_weight(n_rows, n_cols, bnb)
        tiled = args.layout == "tiles"
        packed = kernels.tile_codes(bnb_packed, raw_state) if tiled else bnb_packed  # ours; bitsandbytes' in rows
        state = kernels.prepare(packed, raw_state, tiled=tiled)  # checked once, as quant.Linear4bit keeps it
        w = dequantize_nf4(packed, state, torch.bfloat16)  # (N, K), the torch baseline's weight
        wbytes = weight_bytes(raw_state)
        if args.check:
            same = torch.equal(w, reference.dequantize_nf4(bnb_packed, raw_state, torch.bfloat16))
            print(f"  check dequantize {n_rows}x{n_cols}: {'bit-exact' if same else 'FAIL'}")
            if not same:
                failures.append(f"dequantize {n_rows}x{n_cols}")
        timer = graphed_us if args.graphed else median_us
        t = timer(lambda: dequantize_nf4(packed, state, torch.bfloat16))
        floor_4bit, floor_bf16 = read_floor_us(wbytes, timer), read_floor_us(w.numel() * 2, timer)
        dequant_rows.append(f"| {n_rows} x {n_cols} | {t:.1f} | {(wbytes + w.numel() * 2) / t / 1e3:.0f} |")
        for m in rows:
            x = torch.randn(m, n_cols, device="cuda", dtype=torch.bfloat16)
            runs = {
                "torch": lambda: x @ w.T,
                "ours": lambda: kernels.matmul_nf4(x, packed, state),
                "gemv": (lambda: nf4_matmul.matmul_nf4_gemv(x, packed, state)) if m <= GEMV_MAX_ROWS else None,
                "small": (lambda: nf4_matmul.matmul_nf4_small_m(x, packed, state)) if m <= SMALL_PATH_MAX_ROWS else None,
                "fused": lambda: nf4_matmul.matmul_nf4_fused(x, packed, state),
                "dequant": lambda: nf4_matmul.matmul_nf4_dequantize(x, packed, state),
                "bnb": (lambda: bnb.matmul_4bit(x, bnb_packed.t(), quant_state=bnb_state)) if bnb_state is not None
                else None,
            }
            times, speedup = measure(runs, (x, w.T) if args.check else None, f"{n_rows}x{n_cols} M={m}", args.graphed,
                                     args.dispatch_only, failures)
            rate = rate_of(m, n_rows, n_cols, wbytes, times["ours"])
            line = (f"| {n_rows} x {n_cols} | {m} | {times['torch']:.1f} | {fmt(times['ours'])} | "
                    f"**{fmt(speedup['ours'], '.2f')}** | {fmt(speedup['gemv'], '.2f')} | "
                    f"{fmt(speedup['small'], '.2f')} | "
                    f"{fmt(speedup['fused'], '.2f')} | "
                    f"{fmt(speedup['dequant'], '.2f')} | {fmt(times['bnb'])} | {fmt(speedup['bnb'], '.2f')} | {rate} |")
            print(line, flush=True)
            forward_rows.append(line)
            if m <= MMA_ROWS_MAX:
                ceiling = times["torch"] / floor_4bit
                floor_rows.append(f"| {n_rows} x {n_cols} | {m} | {floor_bf16:.1f} | {times['torch']:.1f} | "
                                  f"{floor_4bit:.1f} | {ceiling:.2f} | {times['ours']:.1f} | {speedup['ours']:.2f} | "
                                  f"{speedup['ours'] / ceiling:.0%} |")
        for m in rows:
            g = torch.randn(m, n_rows, device="cuda", dtype=torch.bfloat16)
            runs = {
                "torch": lambda: g @ w,
                "ours": lambda: kernels.matmul_nf4_t(g, packed, state),
                "fused": (lambda: nf4_matmul.matmul_nf4_t_fused(g, packed, state)) if m > SMALL_PATH_MAX_ROWS else None,
                "dequant": lambda: nf4_matmul.matmul_nf4_t_dequantize(g, packed, state),
                # bitsandbytes' backward of matmul_4bit: W dequantized, then a matmul
                "bnb": (lambda: g @ bnb.functional.dequantize_4bit(bnb_packed, bnb_state)) if bnb_state is not None
                else None,
            }
            times, speedup = measure(runs, (g, w) if args.check else None, f"g@W {n_rows}x{n_cols} M={m}",
                                     args.graphed, args.dispatch_only, failures)
            rate = rate_of(m, n_rows, n_cols, wbytes, times["ours"])
            line = (f"| {n_rows} x {n_cols} | {m} | {times['torch']:.1f} | {fmt(times['ours'])} | "
                    f"**{fmt(speedup['ours'], '.2f')}** | {fmt(speedup['fused'], '.2f')} | "
                    f"{fmt(speedup['dequant'], '.2f')} | "
                    f"{fmt(times['bnb'])} | {fmt(speedup['bnb'], '.2f')} | {rate} |")
            print(line, flush=True)
            backward_rows.append(line)
        del packed, bnb_packed, state, bnb_state, w
        torch.cuda.empty_cache()

    report = "\n".join([
        f"{header}\n",
        "x @ W.T: times in us (median, L2 cleared), speedup = torch bf16 time / time\n",
        "| N x K | M | torch bf16 | ours | ours x | GEMV x | small-M x | fused x | dequant+cuBLAS x | bnb | bnb x | ours rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *forward_rows,
        "\ng @ W (input gradient): times in us, speedup = torch bf16 `g @ W` time / time\n",
        "| N x K | M | torch bf16 | ours | ours x | fused x | dequant+cuBLAS x | bnb | bnb x | ours rate |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *backward_rows,
        "\ndequantize_nf4 alone (to bf16), same timing: time in us, GB/s of packed W + stats + bf16 output\n",
        "| N x K | us | GB/s |",
        "|---|---|---|",
        *dequant_rows,
        ("\nread floors at small M: us to read the bf16 W or the 4-bit W (+ stats) in one kernel, same timing; "
         "ceiling = torch / 4-bit floor\n"),
        "| N x K | M | read bf16 W | torch bf16 | read 4-bit W | ceiling x | ours | ours x | ours x / ceiling |",
        "|---|---|---|---|---|---|---|---|---|",
        *floor_rows,
    ])
    if args.overhead:
        report += "\n\n" + launch_overhead()
    if failures:
        report += f"\n\nCHECK FAILURES: {', '.join(failures)}"
    publish("nf4_matmul", report)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

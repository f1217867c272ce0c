"""NF4 matmuls: y = x @ W.T (+ bias) and its input gradient g @ W, with W (N, K) stored in NF4.

Tensor-core kernel (both directions; forward shown, g @ W swaps the roles of N and K):

    for each program (n-tile, m-tile, split) (in parallel, grouped for L2 reuse):
        acc = zeros(BLOCK_N, BLOCK_M)                                   float32, holds y.T
        for k0 in this split's chunks of K:
            w  = nf4_tile(rows n-tile, columns k0 : k0 + BLOCK_K)       (BLOCK_N, BLOCK_K), registers only
            xt = x[m-tile, k0 : k0 + BLOCK_K].T                         (BLOCK_K, BLOCK_M)
            acc = tl.dot(w.to(x.dtype), xt, acc)
        y[m-tile, n-tile] = acc.T + bias      (SPLIT > 1: atomic add into a zeroed float32 y)

Dispatch by M = rows of x (x flattened to (M, K)); the constants below were set from H100
measurements (benchmarks/nf4_matmul.py prints every strategy at every M; benchmarks/RESULTS.md):

    M <= MMA_M_MAX       the tensor-core streaming kernel of kernels/nf4_mma.py (inline PTX: one
                         warp per 16 rows, mma.m16n8k16 on codes looked up in registers) for 16-bit x
                         on CUDA, blocksizes that are multiples of 32 and packed codes on 16 bytes
                         (mma_fits)
    M <= GEMV_M_MAX      otherwise the streaming kernel of kernels/nf4_gemv.py (FMA at M = 1, tensor
                         cores with x padded to 16 rows above; float32 x, other blocksizes, the CPU
                         interpreter), for rows holding whole blocks; its code lookup is
                         nf4_gemv.GEMV_LOOKUP (M = 1) / GEMV_DOT_LOOKUP (M > 1)
    M <= WGMMA_M_MAX     on Hopper with tiled codes of 64-column blocks and 16-bit x (wgmma_fits): the
                         faster, timed once per shape and power-of-two range of M, of the wgmma kernel
                         of kernels/nf4_wgmma.py (W decoded in registers; its tile and split of K
                         timed too) and dequantization + cuBLAS (Note [medium M])
    larger M             LARGE_M_STRATEGY: "dequantize" (W to a scratch buffer by
                         kernels/nf4_dequant.py, then cuBLAS) or "fused" (the kernel above)
    other weights        (K not a multiple of the blocksize) dequantize + cuBLAS at every M

g @ W (the input gradient, M = rows of g): for M <= MMA_T_M_MAX the transposed streaming kernel of
kernels/nf4_mma_t.py (bfloat16 g, blocksize and K multiples of 64, even N: mma_t_fits), otherwise
up to SMALL_M_MAX the small-M tiles of the kernel above, then LARGE_M_STRATEGY_T.

Every function takes `(packed, state)`, where `state` may also be the `NF4Weight` that
`kernels.prepare(packed, state)` returns: quant.Linear4bit prepares once and keeps it, so a call
does no checking or reshaping on the host (at M = 1 a 4096 x 4096 product is a few microseconds
of GPU time: host work per call shows directly).

Note [W as the left operand]
    The kernel computes y.T = W @ x.T: the dequantized tile is tl.dot's left operand. Hopper's
    wgmma reads its left operand from registers and only the right one from shared memory, so
    the tile unpacked in registers can go straight into the tensor cores, and at small M the
    tiny x.T becomes the narrow N side of the instruction (wgmma allows N = 16) instead of
    padding M to 64. Whether Triton keeps the operand in registers is its choice; the layout
    gives it the option.

Note [two strategies for large M]
    At large M the matmul is compute-bound. The fused kernel never writes W out, but unpacks each
    W tile once per m-tile: N*K*M/BLOCK_M unpacks against 2*M*N*K tensor-core flops. Compiled
    for sm_90 (tests/kernels/test_compile_sm90.py compiles without a GPU; its PTX can be
    counted), the 128 x 128 x 64 config spends ~16 instructions per unpacked weight: word load
    and shift-mask, the code gather staged through shared memory by the pipeliner, the scale
    multiply, and a double-quant decode that Triton re-materializes in every thread instead of
    once per (row, block); the small-M tiles spend ~9. At M = 4096 and BLOCK_M = 128 that is
    more issue slots than the MMAs take, so the kernel matches cuBLAS only once the unpacking is
    cheaper and overlaps the asynchronous wgmma: BLOCK_M = 256 halves it; post-scaling (dot on
    the codes, scale the BLOCK_N x BLOCK_M partial product once per block when BLOCK_K <=
    blocksize; cheap at small M, where the product is small) removes the multiply and the
    decode. "dequantize" writes W in bf16 once (4096 x 4096: 42 MB moved, ~15 us) and then runs
    cuBLAS at full speed: its overhead is 2.5 bytes per weight against 2*M flops per weight, so
    about 0.92x of bf16 at M = 4096 whatever N and K, falling as 1/M.
    Both are kept and benchmarked, and the constants pick; the transposed product has its own
    constant because its tile shapes differ.

Note [medium M]
    Dequantization + cuBLAS writes W in 16 bits and reads it back whatever M, so at M = 65-512 it
    took 0.45-0.68x of torch's bf16 product (H100, run 206, benchmarks/RESULTS.md). The wgmma kernel
    of kernels/nf4_wgmma.py never writes W but decodes it once per 128 or 256 rows of x, so it wins
    there when its tiles (and parts of K) fill the GPU and loses at large M (Note [where it pays]
    there). Which is faster depends on N, K and M in ways a threshold would not capture, so the
    first call for a (power-of-two range of M, N, K, dtype, bias) key times the candidates
    (_wgmma_candidates) with cold_graph_bench and keeps the fastest (KERNELS_TUNE=0, or a call
    during CUDA-graph capture: the estimate of _estimated_us instead).

Note [split-K for small M]
    The small-M tensor-core kernel has cdiv(N, BLOCK_N) programs; when that is fewer than
    SPLIT_MIN_PROGRAMS, the K loop is split over several programs whose partial sums are added
    atomically into a zeroed float32 output, then cast (two extra small launches). BLOCK_N is
    autotuned after the split is chosen, so the estimate uses a typical BLOCK_N
    (SPLIT_ROWS_TENSOR_CORES). The streaming GEMV needs no split: its tiles are a few rows tall.
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import nf4_gemv
from kernels.launch import Tuned, candidates, choose_config
from kernels.nf4_dequant import dequantize_nf4
from kernels.nf4_gemv import GEMV_BLOCKSIZE_MAX, GEMV_LOOKUPS, GEMV_M_MAX, gemv_dot, gemv_fma
from kernels.nf4_mma import MMA_M_MAX, MmaConfig, mma_fits, mma_gemv
from kernels.nf4_mma_t import MMA_T_M_MAX, MmaTConfig, mma_gemv_t, mma_t_fits
from kernels.nf4_tiles import NF4Weight, interpreting, nf4_tile, nf4_weight, on_device, split_range, store_output
from kernels.nf4_wgmma import WgmmaConfig, split_fits, wgmma_fits, wgmma_matmul

__all__ = ["matmul_nf4", "matmul_nf4_mma", "matmul_nf4_wgmma", "matmul_nf4_gemv", "matmul_nf4_small_m",
           "matmul_nf4_fused", "matmul_nf4_dequantize", "matmul_nf4_t", "matmul_nf4_t_mma", "matmul_nf4_t_small_m",
           "matmul_nf4_t_fused", "matmul_nf4_t_dequantize", "split_for_small_m"]

# Dispatch (see the module docstring). Set from H100 measurements.
SMALL_M_MAX = GEMV_M_MAX      # M at or below: the streaming kernel
LARGE_M_STRATEGY = "dequantize"    # x @ W.T above SMALL_M_MAX: "fused" or "dequantize"
LARGE_M_STRATEGY_T = "dequantize"  # g @ W above SMALL_M_MAX: "fused" or "dequantize"

WGMMA_M_MAX = 1024  # M at or below (above MMA_M_MAX): the wgmma kernel or dequantization, timed (Note [medium M])

# Split-K at small M (Note [split-K for small M]).
SPLIT_MIN_PROGRAMS = 132      # tensor-core tiles: at least one program per H100 SM
SPLIT_ROWS_TENSOR_CORES = 64  # typical BLOCK_N (BLOCK_K for g @ W) of the small-M tensor-core tiles
SPLIT_MAX = 16
SPLIT_MIN_REDUCE = 256        # at least this much of the reduced dimension per split

_M_BUCKET_MAX = 4096          # autotuning keys on next_power_of_2(M), capped here

_SMALL_M_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": n, "BLOCK_K": k, "GROUP": 1}, num_warps=4, num_stages=s)
    for n in (64, 128) for k in (64, 128, 256) for s in (3, 5)
]
_LARGE_M_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP": 8}, num_warps=w, num_stages=s)
    for n, m, k, w, s in (
        (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (256, 64, 64, 8, 4), (64, 256, 64, 8, 4),
    )
]
# g @ W: BLOCK_K tiles the output columns, BLOCK_N is the reduction chunk (roles of N and K swap).
_SMALL_M_T_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": n, "BLOCK_K": k, "GROUP": 1}, num_warps=4, num_stages=s)
    for k in (64, 128) for n in (64, 128, 256) for s in (3, 5)
]
_LARGE_M_T_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP": 8}, num_warps=w, num_stages=s)
    for k, m, n, w, s in (
        (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (256, 64, 64, 8, 4), (64, 256, 64, 8, 4),
    )
]
# Under the interpreter: one config each, small tiles (odd test shapes still cross tile edges).
_SMALL_M_INTERPRETER = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP": 1})
_LARGE_M_INTERPRETER = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP": 2})
_T_INTERPRETER = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP": 2})
_T_SMALL_M_INTERPRETER = triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP": 1})

_KEY = ["N", "K", "M_BUCKET", "SPLIT", "BLOCKSIZE", "WHOLE_BLOCKS", "DOUBLE_QUANT"]


@triton.jit
def _grouped(pid, num_pid_w, num_pid_m, GROUP: tl.constexpr):
    """Program id -> (tile along W's output side, tile along M), walking GROUP W-tiles at a time
    down all m-tiles, so programs that run together share W tiles and x tiles in L2."""
    per_group = GROUP * num_pid_m
    first = (pid // per_group) * GROUP
    size = tl.minimum(num_pid_w - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _matmul_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr, bias_ptr, out_ptr,
    # sizes and strides (M_BUCKET = next_power_of_2(M), capped: only an autotuning key)
    M, N, K, row_bytes, stride_xm, stride_om, M_BUCKET,
    # weight format
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, OFFSET_IS_POINTER: tl.constexpr,
    WHOLE_BLOCKS: tl.constexpr, TILED: tl.constexpr,
    # problem
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """out (M, N) = x (M, K) @ W.T (+ bias), computed as W @ x.T (Note [W as the left operand])."""
    pid_n, pid_m = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP)
    pid_split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm  # (BLOCK_M,)
    first, last = split_range(tl.cdiv(K, BLOCK_K), pid_split, SPLIT)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y.T
    for chunk in range(first, last):
        k0 = chunk * BLOCK_K
        w = nf4_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
                     offs_n, k0, N, K, row_bytes, BLOCKSIZE, DOUBLE_QUANT, OFFSET_IS_POINTER, WHOLE_BLOCKS,
                     TILED, BLOCK_N, BLOCK_K)  # (BLOCK_N, BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_rows[None, :] + offs_k[:, None],
                     mask=(offs_k < K)[:, None] & (offs_m < M)[None, :], other=0.0)  # (BLOCK_K, BLOCK_M)
        acc = tl.dot(w.to(x_ptr.dtype.element_ty), xt, acc, input_precision=DOT_PRECISION)
    store_output(acc, offs_m[None, :], offs_n[:, None], out_ptr, stride_om, bias_ptr, M, N, pid_split,
                 HAS_BIAS, SPLIT)


@triton.jit
def _matmul_t_kernel(
    # pointers
    g_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr, out_ptr,
    # sizes and strides (M_BUCKET = next_power_of_2(M), capped: only an autotuning key)
    M, N, K, row_bytes, stride_gm, stride_om, M_BUCKET,
    # weight format
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, OFFSET_IS_POINTER: tl.constexpr,
    WHOLE_BLOCKS: tl.constexpr, TILED: tl.constexpr,
    # problem
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # meta-parameters: BLOCK_K tiles the output columns, BLOCK_N is the reduction chunk
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """out (M, K) = g (M, N) @ W, computed as W.T @ g.T with the W tile transposed in registers."""
    pid_k, pid_m = _grouped(tl.program_id(0), tl.cdiv(K, BLOCK_K), tl.cdiv(M, BLOCK_M), GROUP)
    pid_split = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    g_rows = g_ptr + offs_m.to(tl.int64) * stride_gm  # (BLOCK_M,)
    first, last = split_range(tl.cdiv(N, BLOCK_N), pid_split, SPLIT)
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)  # out.T
    for chunk in range(first, last):
        offs_n = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
        w = nf4_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
                     offs_n, pid_k * BLOCK_K, N, K, row_bytes, BLOCKSIZE, DOUBLE_QUANT, OFFSET_IS_POINTER,
                     WHOLE_BLOCKS, TILED, BLOCK_N, BLOCK_K)  # (BLOCK_N, BLOCK_K)
        gt = tl.load(g_rows[None, :] + offs_n[:, None],
                     mask=(offs_n < N)[:, None] & (offs_m < M)[None, :], other=0.0)  # (BLOCK_N, BLOCK_M)
        acc = tl.dot(tl.trans(w.to(g_ptr.dtype.element_ty)), gt, acc, input_precision=DOT_PRECISION)
    store_output(acc, offs_m[None, :], offs_k[:, None], out_ptr, stride_om, out_ptr, M, K, pid_split,
                 False, SPLIT)


def _autotuned(kernel, configs, interpreter_config):
    return triton.autotune(configs=[interpreter_config] if interpreting() else candidates(configs), key=_KEY,
                           reset_to_zero=["out_ptr"])(kernel)


_GEMV_FMA, _GEMV_DOT = Tuned(gemv_fma), Tuned(gemv_dot)  # tuned once per key, then launched directly
_matmul_small_m = _autotuned(_matmul_kernel, _SMALL_M_CONFIGS, _SMALL_M_INTERPRETER)
_matmul_large_m = _autotuned(_matmul_kernel, _LARGE_M_CONFIGS, _LARGE_M_INTERPRETER)
_matmul_t_small_m = _autotuned(_matmul_t_kernel, _SMALL_M_T_CONFIGS, _T_SMALL_M_INTERPRETER)
_matmul_t_large_m = _autotuned(_matmul_t_kernel, _LARGE_M_T_CONFIGS, _T_INTERPRETER)


# ----------------------------------------------------------------------------- checks and launches

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def split_for_small_m(n_out: int, n_reduce: int, units: int, units_wanted: int) -> int:
    """How many programs share the reduction at small M (Note [split-K for small M]): enough for
    `units_wanted` parallel units when the outputs alone give `units`, within SPLIT_MAX and at
    least SPLIT_MIN_REDUCE of the reduction per split."""
    if units >= units_wanted:
        return 1
    return max(1, min(SPLIT_MAX, triton.cdiv(units_wanted, units), n_reduce // SPLIT_MIN_REDUCE))


def _flat_input(x: torch.Tensor, width: int, name: str, what: str) -> torch.Tensor:
    """x (..., width) as a row-major (M, width) view (copied only if its last dim is strided)."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name}: input must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != width:
        raise ValueError(f"{name}: input of shape {tuple(x.shape)} must end in {width} ({what})")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"{name}: Triton kernels need CUDA tensors, got {x.device}; "
                         "use kernels.reference on the CPU")
    x2d = x if x.dim() == 2 else x.reshape(-1, width)
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def _weight_args(weight: NF4Weight) -> tuple:
    return weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, weight.offset, weight.code


def _weight_meta(weight: NF4Weight) -> dict:
    return dict(BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=weight.double_quant,
                OFFSET_IS_POINTER=weight.offset_is_pointer, WHOLE_BLOCKS=weight.whole_blocks, TILED=weight.tiled)


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(m), _M_BUCKET_MAX)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # float32 inputs: no TF32 rounding


def _new_output(m: int, width: int, dtype: torch.dtype, device, split: int) -> torch.Tensor:
    if split > 1:
        return torch.zeros((m, width), dtype=torch.float32, device=device)  # atomic partial sums
    return torch.empty((m, width), dtype=dtype, device=device)


def _finish(out: torch.Tensor, dtype: torch.dtype, lead_shape, width: int) -> torch.Tensor:
    return out.to(dtype).view(*lead_shape, width)


def _check_split(split: int) -> None:
    if not isinstance(split, int) or split < 1:
        raise ValueError(f"matmul_nf4: the number of splits must be an int >= 1, got {split!r}")


def _check_bias(bias: torch.Tensor | None, n_out: int, device) -> None:
    if bias is None:
        return
    if bias.shape != (n_out,):
        raise ValueError(f"matmul_nf4: bias must have shape ({n_out},), got {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"matmul_nf4: bias is on {bias.device}, the input is on {device}")


def _forward_input(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None, name: str) -> torch.Tensor:
    """x as a checked (M, K) view for x @ W.T, the bias checked too; `name` heads the errors."""
    x2d = _flat_input(x, weight.n_cols, name, "in_features of the NF4 weight")
    _check_bias(bias, weight.n_rows, x.device)
    return x2d


def _forward(x, packed, state, bias, split, kernel_kind: str, lookup: str | None = None) -> torch.Tensor:
    """Launch x @ W.T on kernel_kind "gemv" (M <= GEMV_M_MAX), "small" or "large" (tensor-core tiles).
    lookup: the GEMV's code lookup (kernels/nf4_gemv.py); None: _gemv_lookup's choice."""
    weight = nf4_weight(packed, state, x.device)
    x2d = _forward_input(x, weight, bias, "matmul_nf4")
    m, n, k = x2d.shape[0], weight.n_rows, weight.n_cols
    if kernel_kind == "gemv":
        if not _gemv_fits(weight):
            raise ValueError(f"matmul_nf4_gemv: rows of W must hold whole blocks of at most {GEMV_BLOCKSIZE_MAX} "
                             f"(K % blocksize == 0), got K = {k}, blocksize = {weight.blocksize}")
        if m > GEMV_M_MAX:
            raise ValueError(f"matmul_nf4_gemv: takes at most {GEMV_M_MAX} rows of x, got {m}")
        split = 1 if split is None else split
        if m == 1 and x2d.data_ptr() % 8:  # the M = 1 kernel reads 16-bit x 8 bytes at a time
            x2d = x2d.clone()
    elif split is None:
        split = split_for_small_m(n, k, triton.cdiv(n, SPLIT_ROWS_TENSOR_CORES), SPLIT_MIN_PROGRAMS)
    _check_split(split)
    out = _new_output(m, n, x.dtype, x.device, split)
    if m > 0:
        with on_device(x.device):
            if kernel_kind == "gemv":
                kernel = _GEMV_FMA if m == 1 else _GEMV_DOT
                lookup = _gemv_lookup(lookup, x.dtype, m)
                key = (n, k, split, weight.blocksize, weight.double_quant, lookup, x.dtype, bias is not None,
                       weight.tiled)
                kernel(key, lambda c: (triton.cdiv(n, c["BLOCK_N"]), split),
                       x2d, *_weight_args(weight), weight.byte_code, weight.code_planes, out if bias is None else bias,
                       out, m, n, k, k // 8, x2d.stride(0), out.stride(0), BLOCKSIZE=weight.blocksize,
                       DOUBLE_QUANT=weight.double_quant, OFFSET_IS_POINTER=weight.offset_is_pointer,
                       HAS_BIAS=bias is not None, SPLIT=split, M_PAD=1 if m == 1 else GEMV_M_MAX,
                       LOOKUP=lookup, IN_REGISTERS=not interpreting(), TILED=weight.tiled)
            else:
                args = (x2d, *_weight_args(weight), out if bias is None else bias, out,
                        m, n, k, weight.row_bytes, x2d.stride(0), out.stride(0))
                meta = dict(**_weight_meta(weight), HAS_BIAS=bias is not None, SPLIT=split)
                kernel = _matmul_small_m if kernel_kind == "small" else _matmul_large_m
                grid = lambda c: (triton.cdiv(n, c["BLOCK_N"]) * triton.cdiv(m, c["BLOCK_M"]), split)
                kernel[grid](*args, **meta, M_BUCKET=_m_bucket(m), DOT_PRECISION=_dot_precision(x.dtype))
    return _finish(out, x.dtype, x.shape[:-1], n)


def _gemv_lookup(lookup: str | None, dtype: torch.dtype, m: int) -> str:
    """The GEMV's code lookup: `lookup` if given, else nf4_gemv.GEMV_LOOKUP (M = 1) or GEMV_DOT_LOOKUP,
    except that float32 x takes the exact float32 values (the "prmt" tables round them) and
    float16 x the float16 table ("prmt", 2^-12) rather than the bfloat16 one (2^-8)."""
    if lookup is None:
        lookup = nf4_gemv.GEMV_LOOKUP if m == 1 else nf4_gemv.GEMV_DOT_LOOKUP
        if dtype == torch.float32 and lookup.startswith("prmt"):
            lookup = "nibble"
        elif dtype == torch.float16 and lookup == "prmt_bf16":
            lookup = "prmt"
    if lookup not in GEMV_LOOKUPS:
        raise ValueError(f"matmul_nf4_gemv: lookup must be one of {GEMV_LOOKUPS}, got {lookup!r}")
    return lookup


def _gemv_fits(weight: NF4Weight) -> bool:
    return weight.whole_blocks and weight.blocksize <= GEMV_BLOCKSIZE_MAX


def _transposed(g, packed, state, split, kernel_kind: str) -> torch.Tensor:
    """Launch g @ W on kernel_kind "small" or "large"."""
    weight = nf4_weight(packed, state, g.device)
    g2d = _flat_input(g, weight.n_rows, "matmul_nf4_t", "out_features of the NF4 weight")
    m, n, k = g2d.shape[0], weight.n_rows, weight.n_cols
    if split is None:
        split = split_for_small_m(k, n, triton.cdiv(k, SPLIT_ROWS_TENSOR_CORES), SPLIT_MIN_PROGRAMS)
    _check_split(split)
    out = _new_output(m, k, g.dtype, g.device, split)
    if m > 0:
        kernel = _matmul_t_small_m if kernel_kind == "small" else _matmul_t_large_m
        grid = lambda c: (triton.cdiv(k, c["BLOCK_K"]) * triton.cdiv(m, c["BLOCK_M"]), split)
        with on_device(g.device):
            kernel[grid](g2d, *_weight_args(weight), out, m, n, k, weight.row_bytes, g2d.stride(0),
                         out.stride(0), **_weight_meta(weight), SPLIT=split, M_BUCKET=_m_bucket(m),
                         DOT_PRECISION=_dot_precision(g.dtype))
    return _finish(out, g.dtype, g.shape[:-1], k)


# ----------------------------------------------------------------------------- public functions

def matmul_nf4(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias): (..., K) -> (..., N) in x's dtype, dispatched by M (module docstring)."""
    weight = nf4_weight(packed, state, x.device)
    m = math.prod(x.shape[:-1])
    if m <= MMA_M_MAX and _mma_runs(x, weight):
        y = _mma_forward(_forward_input(x, weight, bias, "matmul_nf4"), weight, bias, None)
        return y.view(*x.shape[:-1], weight.n_rows)
    if m <= SMALL_M_MAX and _gemv_fits(weight):
        return matmul_nf4_gemv(x, packed, weight, bias)
    if m <= WGMMA_M_MAX and _wgmma_runs(x, weight):
        y = _medium_m_forward(_forward_input(x, weight, bias, "matmul_nf4"), packed, weight, bias)
        return y.view(*x.shape[:-1], weight.n_rows)
    if not weight.whole_blocks:
        return matmul_nf4_dequantize(x, packed, weight, bias)
    return _LARGE_M[LARGE_M_STRATEGY][0](x, packed, weight, bias)


def matmul_nf4_gemv(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None = None,
                    split_k: int | None = None, lookup: str | None = None) -> torch.Tensor:
    """The streaming kernel of kernels/nf4_gemv.py for M <= GEMV_M_MAX rows of x: FMA at M = 1,
    tensor cores above. Rows of W must hold whole blocks of at most GEMV_BLOCKSIZE_MAX. split_k
    None: no split (the (BLOCK_N rows) tiles already give enough programs; see Note [GEMV tile]).
    lookup: one of GEMV_LOOKUPS, None for the module's choice (_gemv_lookup)."""
    return _forward(x, packed, state, bias, split_k, "gemv", lookup)


def matmul_nf4_mma(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None = None,
                   config: MmaConfig | None = None) -> torch.Tensor:
    """The tensor-core streaming kernel of kernels/nf4_mma.py for M <= MMA_M_MAX rows of 16-bit x on
    CUDA, W with blocksize % 32 == 0 and K % blocksize == 0. config: None times nf4_mma's configs
    once per shape and keeps the fastest."""
    weight = nf4_weight(packed, state, x.device)
    x2d = _forward_input(x, weight, bias, "matmul_nf4_mma")
    if not _mma_runs(x, weight):
        raise ValueError(f"matmul_nf4_mma: needs float16 or bfloat16 x on CUDA (got {x.dtype} on {x.device}), "
                         f"blocksize % 32 == 0 and K % blocksize == 0 (got blocksize {weight.blocksize}, "
                         f"K {weight.n_cols}) and packed codes starting on 16 bytes")
    if x2d.shape[0] > MMA_M_MAX:
        raise ValueError(f"matmul_nf4_mma: takes at most {MMA_M_MAX} rows of x, got {x2d.shape[0]}")
    return _mma_forward(x2d, weight, bias, config).view(*x.shape[:-1], weight.n_rows)


def _mma_forward(x2d: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None,
                 config: MmaConfig | None) -> torch.Tensor:
    """(M, N) = x2d (M, K) @ W.T (+ bias) once the inputs are checked (by matmul_nf4 or matmul_nf4_mma)."""
    if x2d.data_ptr() % 16 or x2d.stride(0) % 8:  # the kernel reads x 16 bytes at a time
        x2d = x2d.clone(memory_format=torch.contiguous_format)
    out = torch.empty((x2d.shape[0], weight.n_rows), dtype=x2d.dtype, device=x2d.device)
    if x2d.shape[0] > 0:
        with on_device(x2d.device):
            mma_gemv(x2d, weight, bias, out, config)
    return out


def _mma_runs(x: torch.Tensor, weight: NF4Weight) -> bool:
    return (x.is_cuda and not interpreting() and x.dtype in (torch.float16, torch.bfloat16)
            and mma_fits(weight.blocksize, weight.n_cols, weight.packed.data_ptr()))


def matmul_nf4_wgmma(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None = None,
                     config: WgmmaConfig | None = None) -> torch.Tensor:
    """x @ W.T on the wgmma kernel of kernels/nf4_wgmma.py (any M; wgmma_fits must hold: Hopper, tiled
    codes of 64-column blocks, 16-bit x). config None: the fastest of _wgmma_candidates, timed once per
    shape and power-of-two range of M."""
    weight = nf4_weight(packed, state, x.device)
    x2d = _forward_input(x, weight, bias, "matmul_nf4_wgmma")
    if not _wgmma_runs(x, weight):
        raise ValueError(f"matmul_nf4_wgmma: needs 16-bit x on a Hopper GPU (got {x.dtype} on {x.device}), tiled "
                         f"codes (got tiled={weight.tiled}) with blocksize 64 (got {weight.blocksize}) and K % 64 == 0 "
                         f"(got {weight.n_cols})")
    x2d = _tma_rows(x2d)
    if config is None:
        config = _medium_m_choice(x2d, packed, weight, bias, wgmma_only=True)
    with on_device(x.device):
        return wgmma_matmul(x2d, weight, bias, config).view(*x.shape[:-1], weight.n_rows)


def _wgmma_runs(x: torch.Tensor, weight: NF4Weight) -> bool:
    return x.is_cuda and not interpreting() and wgmma_fits(weight, x.device, x.dtype)


def _tma_rows(x2d: torch.Tensor) -> torch.Tensor:
    """x2d, copied if TMA cannot read its rows (16-byte aligned start and row stride)."""
    if x2d.data_ptr() % 16 or (x2d.stride(0) * x2d.element_size()) % 16 or x2d.stride(1) != 1:
        return x2d.clone(memory_format=torch.contiguous_format)
    return x2d


_MEDIUM_M_CHOSEN: dict[tuple, object] = {}


def _wgmma_candidates(m: int, n: int, k: int, sms: int) -> list[WgmmaConfig]:
    """The wgmma kernel's configs timed for M = m (Note [medium M]): 128 rows of x per program with one
    warpgroup (64 rows of W; three programs fit an SM), and above 128 rows of x also 256 with two or
    one (3 stages, two programs per SM); parts of K (128 rows only) while the programs stay within three
    per SM and a part keeps 8 steps or more. H100, run 207: one warpgroup took 0.83-0.99x the time of
    two at 128 rows of x, 0.83-1.87x at 256."""
    configs = [WgmmaConfig(128, 1, warps=4)]
    if m > 128:
        configs += [WgmmaConfig(256, 1, warps=8), WgmmaConfig(256, 1, warps=4, stages=3)]
    tiles = triton.cdiv(n, 64) * triton.cdiv(m, 128)
    configs += [WgmmaConfig(128, split, warps=4) for split in (2, 4, 8)
                if tiles * split <= 3 * sms and k // 64 >= 8 * split and split_fits(split, k)]
    return configs


def _estimated_us(config, m: int, n: int, k: int, sms: int) -> float:
    """Microseconds a medium-M candidate takes on an H100, by the measurements of runs 204-207: a wgmma
    step of 64 columns 0.8 us (128 rows of x, one warpgroup, three programs per SM) or 0.95 us (256, two
    warpgroups, one per SM) per wave of programs; dequantization at 2.3 TB/s for 2.5 bytes per weight,
    then cuBLAS at 800 TFLOP/s, plus 3 us."""
    if config == "dequantize":
        return n * k * 2.5 / 2.3e6 + 2 * m * n * k / 8e8 + 3
    programs = triton.cdiv(n, 16 * config.warps) * triton.cdiv(m, config.block_x) * config.split
    per_sm, step_us = (3, 0.8) if config.block_x == 128 else (1, 0.95)
    waves = triton.cdiv(programs, per_sm * sms)
    return waves * triton.cdiv(k // 64, config.split) * step_us + (1.5 if config.split > 1 else 0)


def _medium_m_choice(x2d: torch.Tensor, packed: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None,
                     wgmma_only: bool = False):
    """The fastest medium-M candidate for this call's key (Note [medium M]): a WgmmaConfig or "dequantize"."""
    m, n, k = x2d.shape[0], weight.n_rows, weight.n_cols
    key = (_m_bucket(m), n, k, x2d.dtype, bias is not None, weight.double_quant, wgmma_only, x2d.device)
    chosen = _MEDIUM_M_CHOSEN.get(key)
    if chosen is not None:
        return chosen
    sms = torch.cuda.get_device_properties(x2d.device).multi_processor_count
    configs = _wgmma_candidates(m, n, k, sms) + ([] if wgmma_only else ["dequantize"])

    def launch(config):
        if config == "dequantize":
            return matmul_nf4_dequantize(x2d, packed, weight, bias)
        return wgmma_matmul(x2d, weight, bias, config)

    with on_device(x2d.device):
        return choose_config(_MEDIUM_M_CHOSEN, key, lambda: configs,
                             lambda: min(configs, key=lambda c: _estimated_us(c, m, n, k, sms)), launch)


def _medium_m_forward(x2d: torch.Tensor, packed: torch.Tensor, weight: NF4Weight,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """(M, N) = x2d @ W.T (+ bias) for MMA_M_MAX < M <= WGMMA_M_MAX on Hopper (Note [medium M])."""
    x2d = _tma_rows(x2d)
    config = _medium_m_choice(x2d, packed, weight, bias)
    if config == "dequantize":
        return matmul_nf4_dequantize(x2d, packed, weight, bias)
    with on_device(x2d.device):
        return wgmma_matmul(x2d, weight, bias, config)


def matmul_nf4_small_m(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None = None,
                       split_k: int | None = None) -> torch.Tensor:
    """Tensor-core tiles with BLOCK_M = 16 (any M works; tuned for M <= SMALL_M_MAX).
    split_k None: Note [split-K for small M]."""
    return _forward(x, packed, state, bias, split_k, "small")


def matmul_nf4_fused(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None = None,
                     split_k: int = 1) -> torch.Tensor:
    """The fused large-M strategy: tensor-core tiles, W dequantized in registers only."""
    return _forward(x, packed, state, bias, split_k, "large")


def matmul_nf4_dequantize(x: torch.Tensor, packed: torch.Tensor, state,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The other large-M strategy: W to a scratch buffer in x's dtype, then cuBLAS."""
    _forward_input(x, nf4_weight(packed, state, x.device), bias, "matmul_nf4")
    return F.linear(x, dequantize_nf4(packed, state, x.dtype), None if bias is None else bias.to(x.dtype))


def matmul_nf4_t(g: torch.Tensor, packed: torch.Tensor, state) -> torch.Tensor:
    """g @ W: (..., N) -> (..., K) in g's dtype (the input gradient of x @ W.T), dispatched by M."""
    m = math.prod(g.shape[:-1])
    if m <= SMALL_M_MAX:
        weight = nf4_weight(packed, state, g.device)
        if 0 < m <= MMA_T_M_MAX and _mma_t_runs(g, weight):
            g2d = _flat_input(g, weight.n_rows, "matmul_nf4_t", "out_features of the NF4 weight")
            return _mma_t_forward(g2d, weight, None).view(*g.shape[:-1], weight.n_cols)
        return matmul_nf4_t_small_m(g, packed, weight)
    return _LARGE_M[LARGE_M_STRATEGY_T][1](g, packed, state)


def matmul_nf4_t_mma(g: torch.Tensor, packed: torch.Tensor, state, config: MmaTConfig | None = None) -> torch.Tensor:
    """g @ W on the tensor-core streaming kernel of kernels/nf4_mma_t.py: at most MMA_T_M_MAX rows of
    bfloat16 g on CUDA, blocksize and K multiples of 64, even N. config: None times
    nf4_mma_t.MMA_T_CONFIGS once per shape and keeps the fastest."""
    weight = nf4_weight(packed, state, g.device)
    g2d = _flat_input(g, weight.n_rows, "matmul_nf4_t_mma", "out_features of the NF4 weight")
    if not _mma_t_runs(g, weight):
        raise ValueError(f"matmul_nf4_t_mma: needs bfloat16 g on CUDA (got {g.dtype} on {g.device}), blocksize and "
                         f"K multiples of 64 and even N (got blocksize {weight.blocksize}, N {weight.n_rows}, "
                         f"K {weight.n_cols}) and packed codes starting on 16 bytes")
    if not 0 < g2d.shape[0] <= MMA_T_M_MAX:
        raise ValueError(f"matmul_nf4_t_mma: takes 1 to {MMA_T_M_MAX} rows of g, got {g2d.shape[0]}")
    return _mma_t_forward(g2d, weight, config).view(*g.shape[:-1], weight.n_cols)


def _mma_t_runs(g: torch.Tensor, weight: NF4Weight) -> bool:
    return (g.is_cuda and not interpreting() and g.dtype == torch.bfloat16
            and mma_t_fits(weight.blocksize, weight.n_rows, weight.n_cols, weight.packed.data_ptr()))


def _mma_t_forward(g2d: torch.Tensor, weight: NF4Weight, config: MmaTConfig | None) -> torch.Tensor:
    """(M, K) = g2d (M, N) @ W once the inputs are checked (by matmul_nf4_t or matmul_nf4_t_mma)."""
    if g2d.data_ptr() % 4 or g2d.stride(0) % 2:  # the kernel reads g two values at a time
        g2d = g2d.clone(memory_format=torch.contiguous_format)
    with on_device(g2d.device):
        return mma_gemv_t(g2d, weight, config)


def matmul_nf4_t_small_m(g: torch.Tensor, packed: torch.Tensor, state, split_n: int | None = None) -> torch.Tensor:
    """g @ W with small-M tiles; the reduction over N is split when K alone gives too few programs."""
    return _transposed(g, packed, state, split_n, "small")


def matmul_nf4_t_fused(g: torch.Tensor, packed: torch.Tensor, state, split_n: int = 1) -> torch.Tensor:
    """g @ W with large tensor-core tiles, W dequantized in registers only."""
    return _transposed(g, packed, state, split_n, "large")


def matmul_nf4_t_dequantize(g: torch.Tensor, packed: torch.Tensor, state) -> torch.Tensor:
    """g @ W with W dequantized to a scratch buffer in g's dtype, then cuBLAS."""
    weight = nf4_weight(packed, state, g.device)
    _flat_input(g, weight.n_rows, "matmul_nf4_t", "out_features of the NF4 weight")
    return g @ dequantize_nf4(packed, state, g.dtype)


_LARGE_M = {  # strategy name: (x @ W.T, g @ W)
    "fused": (matmul_nf4_fused, matmul_nf4_t_fused),
    "dequantize": (matmul_nf4_dequantize, matmul_nf4_t_dequantize),
}

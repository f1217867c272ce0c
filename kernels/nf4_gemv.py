"""Small-M NF4 matmul on CUDA cores: y = x @ W.T for a few rows of x (decode), streaming W once.

    for each program (row m of x, n-tile, k-split) (in parallel; the rows of one tile run together):
        acc = zeros(BLOCK_N, BLOCK_K)                                  float32, reduced after the loop
        for k0 in this split's chunks of K (software-pipelined loads):
            w = nf4_tile(rows n-tile, columns k0 : k0 + BLOCK_K)        (BLOCK_N, BLOCK_K) float32
            acc += w * x[m, None, k0 : k0 + BLOCK_K]                    FMA, no tensor cores
        y[m, n-tile] = sum(acc, axis=1) + bias   (SPLIT > 1: atomic add into a zeroed float32 y)

At M <= 4 the work per weight is a few FMAs, so the kernel is bound by the bytes of W (4.13 bits
per weight with double quant), the cost of unpacking them (Note [code lookup] in nf4_tiles.py),
and by keeping enough loads in flight: the K loop is a `tl.range` with num_stages, which lets
Triton pipeline loads of a loop that has no tl.dot. The accumulator keeps the tile's shape and
layout, so the loop body has no reduction and the unpacked tile never changes layout.

Each program handles one row of x. The rows are the fastest grid axis, so the M programs of an
n-tile start together: the first reads W from HBM and the others find it in L2, and each row
unpacks it again, which is cheap next to HBM at these M. Larger M goes to the tensor-core kernel
(kernels/nf4_matmul.py), where one unpacked W tile serves a 16-row block of x.
"""
import triton
import triton.language as tl

from kernels.nf4_tiles import interpreting, nf4_tile, store_output

__all__ = ["gemv_kernel"]

_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k, "NUM_STAGES": s}, num_warps=w)
    for n, k in ((4, 1024), (8, 512), (8, 1024), (16, 256), (16, 512), (32, 256))
    for w in (4, 8)
    for s in (1, 3)
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_K": 128, "NUM_STAGES": 1}, num_warps=4)


@triton.autotune(configs=[_INTERPRETER_CONFIG] if interpreting() else _CONFIGS,
                 key=["N", "K", "SPLIT", "BLOCKSIZE", "WHOLE_BLOCKS", "DOUBLE_QUANT"],
                 reset_to_zero=["out_ptr"])
@triton.jit
def gemv_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr, bias_ptr, out_ptr,
    # sizes and strides
    M, N, K, row_bytes, stride_xm, stride_om,
    # weight format
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, OFFSET_IS_POINTER: tl.constexpr,
    WHOLE_BLOCKS: tl.constexpr,
    # problem
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    chunks = tl.cdiv(K, BLOCK_K)
    chunks_per_split = tl.cdiv(chunks, SPLIT)
    first = pid_k * chunks_per_split
    last = tl.minimum(first + chunks_per_split, chunks)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for chunk in tl.range(first, last, num_stages=NUM_STAGES):
        k0 = chunk * BLOCK_K
        w = nf4_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
                     offs_n, k0, N, K, row_bytes, BLOCKSIZE, DOUBLE_QUANT, OFFSET_IS_POINTER, WHOLE_BLOCKS,
                     BLOCK_N, BLOCK_K)  # (BLOCK_N, BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)  # (BLOCK_K,)
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1)  # (BLOCK_N,)
    store_output(y[None, :], m + tl.zeros((1, 1), dtype=tl.int32), offs_n[None, :], out_ptr, stride_om,
                 bias_ptr, M, N, pid_k, HAS_BIAS, SPLIT)

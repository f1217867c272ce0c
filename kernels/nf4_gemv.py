"""Small-M NF4 matmul on CUDA cores: y = x @ W.T for a few rows of x (decode), streaming W once.

    for each program (n-tile, k-split) (in parallel):
        acc = zeros(BLOCK_M, BLOCK_N)                                  float32
        for k0 in this split's chunks of K (software-pipelined loads):
            w = nf4_tile(rows n-tile, columns k0 : k0 + BLOCK_K)        (BLOCK_N, BLOCK_K) float32
            x = x[:, k0 : k0 + BLOCK_K]                                 (BLOCK_M, BLOCK_K) float32
            acc += sum_k x[:, None, :] * w[None, :, :]                  FMA reduction, no tensor cores
        y[:, n-tile] = acc + bias           (SPLIT > 1: atomic add into a zeroed float32 y)

At M <= 4 the work per weight is a few FMAs, so the kernel is bound by the bytes of W (4.13 bits
per weight with double quant), the cost of unpacking them (Note [code lookup] in nf4_tiles.py),
and by keeping enough loads in flight: the K loop is a `tl.range` with num_stages, which lets
Triton pipeline loads of a loop that has no tl.dot. Larger M goes to the tensor-core kernel
(kernels/nf4_matmul.py), where the same W tile feeds tl.dot.
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
                 key=["N", "K", "BLOCK_M", "SPLIT", "BLOCKSIZE", "WHOLE_BLOCKS", "DOUBLE_QUANT"],
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
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_m = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    chunks = tl.cdiv(K, BLOCK_K)
    chunks_per_split = tl.cdiv(chunks, SPLIT)
    first = pid_k * chunks_per_split
    last = tl.minimum(first + chunks_per_split, chunks)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for chunk in tl.range(first, last, num_stages=NUM_STAGES):
        k0 = chunk * BLOCK_K
        w = nf4_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
                     offs_n, k0, N, K, row_bytes, BLOCKSIZE, DOUBLE_QUANT, OFFSET_IS_POINTER, WHOLE_BLOCKS,
                     BLOCK_N, BLOCK_K)  # (BLOCK_N, BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)  # (BLOCK_M, BLOCK_N)
    store_output(acc, offs_m[:, None], offs_n[None, :], out_ptr, stride_om, bias_ptr, M, N, pid_k,
                 HAS_BIAS, SPLIT)

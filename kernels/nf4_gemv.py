"""Small-M NF4 matmul on CUDA cores: y = x @ W.T for a few rows of x (decode), streaming W once.

    for each program (row m of x, n-tile, k-split) (in parallel; the rows of one tile run together):
        acc = zeros(BLOCK_N)                                            float32
        for k0 in this split's chunks of K (software-pipelined loads):
            codes = code[nibbles of W[n-tile, k0 : k0 + BLOCK_K]]       (BLOCK_K, BLOCK_N), one column per row of W
            partial[b, n] = sum_{k in block b} codes[k, n] * x[m, k]    FMA chains inside each thread
            acc += sum_b partial[b, :] * scale[n-tile, b]               one scale per (row, block)
        y[m, n-tile] = acc + bias        (SPLIT > 1: atomic add into a zeroed float32 y)

At M = 1 the work per weight is one FMA, so the kernel is bound by the bytes of W (4.13 bits
per weight with double quant) and by the instructions that unpack them; see Note [GEMV tile].
The K loop is a `tl.range` with num_stages, which lets Triton pipeline loads of a loop with no
tl.dot.

Note [GEMV tile]
    The tile is built K-major, (BLOCK_K, BLOCK_N): Triton gives the code gather a layout with the
    threads along the fastest axis, so each thread owns whole columns, that is, runs of K within
    one row of W. Then a block's partial sum is an FMA chain inside one thread, and the block
    scale is needed once per (row, block) by one thread: the double-quant decode is not repeated
    per weight, and no per-weight multiply by the scale is left (post-scaling: sum_k c_k s x_k =
    s sum_k c_k x_k). Compiled for sm_90, that is ~8 instructions per weight (word load, shift
    and mask, table gather, FMA, x convert), against ~27 for the (BLOCK_N, BLOCK_K) tile with
    the scale applied per weight, whose scale decode Triton re-materializes in every thread. The
    next steps are the gather (see Note [code lookup] in nf4_tiles.py) and the x convert
    (halved when a thread owns two columns, BLOCK_N = 2 * threads). The kernel needs rows that
    hold whole blocks (Note [two tile layouts]); other weights take the tensor-core kernel.

Since a thread owns whole rows of W, a grid without split-K has only N threads (4096 for a
4096-row W): too few loads in flight to stream HBM. The K loop is therefore split over enough
programs to reach GEMV_MIN_THREADS (kernels/nf4_matmul.py, Note [split-K for small M]).

Each program handles one row of x. The rows are the fastest grid axis, so the M programs of an
n-tile start together: the first reads W from HBM and the others find it in L2; each row unpacks
it again, which is cheap next to HBM at these M. Larger M goes to the tensor-core kernel
(kernels/nf4_matmul.py), where one unpacked W tile serves a 16-row block of x.
"""
import triton
import triton.language as tl

from kernels.nf4_tiles import block_scale, interpreting, nibble_shifts, store_output

__all__ = ["gemv_kernel"]

_CONFIGS = [  # a thread owns BLOCK_N / (32 * num_warps) columns (rows of W)
    triton.Config({"BLOCK_N": n, "BLOCK_K": k, "NUM_STAGES": s}, num_warps=w)
    for n, k, w in ((32, 128, 1), (64, 64, 2), (128, 64, 4), (128, 128, 4), (256, 64, 8), (512, 64, 8))
    for s in (1, 3)
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_K": 128, "NUM_STAGES": 1}, num_warps=4)


@triton.jit
def _tile_times_x(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
                  offs_n, k0, x, N, K, row_bytes,
                  BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, OFFSET_IS_POINTER: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_k W[offs_n, k0 + k] * x[k], (BLOCK_N,) float32, rows holding whole blocks (Note [GEMV tile])."""
    row_in = offs_n < N
    WORDS: tl.constexpr = BLOCK_K // 8  # 8 codes per 32-bit word
    row_words = row_bytes // 4
    offs_word = k0 // 8 + tl.arange(0, WORDS)  # (BLOCK_K/8,)
    rows = packed_ptr.to(tl.pointer_type(tl.int32)) + offs_n.to(tl.int64) * row_words  # (BLOCK_N,)
    words = tl.load(rows[None, :] + offs_word[:, None], mask=(offs_word < row_words)[:, None] & row_in[None, :],
                    other=0)  # (BLOCK_K/8, BLOCK_N)
    nibbles = (words[:, :, None] >> nibble_shifts()[None, None, :]) & 0xF  # (BLOCK_K/8, BLOCK_N, 8)
    nibbles = tl.reshape(tl.permute(nibbles, (0, 2, 1)), (BLOCK_K, BLOCK_N))  # k = 8 * word + j
    products = tl.load(code_ptr + nibbles) * x[:, None]  # (BLOCK_K, BLOCK_N)
    blocks_per_row = K // BLOCKSIZE
    if BLOCK_K >= BLOCKSIZE:
        NB: tl.constexpr = BLOCK_K // BLOCKSIZE
        partial = tl.sum(tl.reshape(products, (NB, BLOCKSIZE, BLOCK_N)), axis=1)  # (NB, BLOCK_N)
        col_block = k0 // BLOCKSIZE + tl.arange(0, NB)  # (NB,)
        scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                            offs_n[None, :] * blocks_per_row + col_block[:, None],
                            (col_block < blocks_per_row)[:, None] & row_in[None, :],
                            DOUBLE_QUANT, OFFSET_IS_POINTER)  # (NB, BLOCK_N)
        result = tl.sum(partial * scale, axis=0)
    else:  # the tile lies inside one block of each row
        scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                            offs_n * blocks_per_row + k0 // BLOCKSIZE, row_in, DOUBLE_QUANT, OFFSET_IS_POINTER)
        result = tl.sum(products, axis=0) * scale
    return result


@triton.autotune(configs=[_INTERPRETER_CONFIG] if interpreting() else _CONFIGS,
                 key=["N", "K", "SPLIT", "BLOCKSIZE", "DOUBLE_QUANT"],
                 reset_to_zero=["out_ptr"])
@triton.jit
def gemv_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr, bias_ptr, out_ptr,
    # sizes and strides
    M, N, K, row_bytes, stride_xm, stride_om,
    # weight format (rows hold whole blocks: NF4Weight.whole_blocks)
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, OFFSET_IS_POINTER: tl.constexpr,
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
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for chunk in tl.range(first, last, num_stages=NUM_STAGES):
        k0 = chunk * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)  # (BLOCK_K,)
        acc += _tile_times_x(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
                             offs_n, k0, x, N, K, row_bytes, BLOCKSIZE, DOUBLE_QUANT, OFFSET_IS_POINTER,
                             BLOCK_N, BLOCK_K)
    store_output(acc[None, :], m + tl.zeros((1, 1), dtype=tl.int32), offs_n[None, :], out_ptr, stride_om,
                 bias_ptr, M, N, pid_k, HAS_BIAS, SPLIT)

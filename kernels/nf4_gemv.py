"""Small-M NF4 matmul: y = x @ W.T for M <= 16 rows of x (decode), streaming W from HBM once.

    for each program (n-tile, k-split) (in parallel):
        for k0 in this split's chunks of K:
            words = W_packed[n-tile, k0/8 : (k0 + BLOCK_K)/8]          int32, K-contiguous: coalesced
            M = 1:   for each byte b of the words (4 per word, unrolled):
                         hi, lo = byte_code[byte]                       both values of the byte, one 8-byte load
                         part  += hi * x[2 byte] + lo * x[2 byte + 1]   (BLOCK_N, NB, WPB) partial sums
                     acc += part * scale[n-tile, block]                 post-scaling, once per word
            M > 1:   acc += tl.dot(code[nibbles] * scale, x[:, k0 : k0 + BLOCK_K].T)   x padded to 16 rows
        y[:, n-tile] = sum(acc) (+ bias)     (SPLIT > 1: atomic add into a zeroed float32 y)

Note [GEMV tile]
    The words are a (BLOCK_N rows, NB blocks, WPB words per block) tile: the K axis, contiguous
    in memory, is the fast axis of the loads, and the block scale indexes by (row, block) and
    broadcasts over the words of the block without a reshape. At M = 1 the kernel never builds a
    4-D nibble tensor (that costs Triton a shared-memory layout conversion per tile): it walks the
    4 bytes of each word with static shifts, and looks a byte up in a 256-entry table of value
    pairs (`byte_code`, 2 KB, L1-resident; kernels.prepare builds it once per weight): one gather
    per two weights instead of one per weight. The products are summed per word in float32 and
    multiplied by the block's scale once per word (sum_k c_k s x_k = s sum_k c_k x_k), so the
    double-quant decode is per (row, block). Compiled for sm_90 that is ~4.2 SASS instructions
    per weight (byte permute, 64-bit address, 8-byte gather, two FMAs), with a thread holding
    several rows so each x value it loads serves all of them. For 2 <= M <= 16 the tile goes to
    tl.dot against x padded to 16 rows: memory-bound either way, and the tensor cores keep the
    per-weight work flat in M.

Needs rows that hold whole blocks (K % blocksize == 0, blocksize >= 8: Note [two tile layouts]);
other weights take the dequantize + matmul path (kernels/nf4_matmul.py).
"""
import triton
import triton.language as tl

from kernels.nf4_tiles import block_scale, interpreting, split_range, store_output

__all__ = ["gemv_fma", "gemv_dot", "GEMV_M_MAX", "GEMV_BLOCKSIZE_MAX"]

GEMV_M_MAX = 16  # rows of x the kernel takes (the tensor-core operand is padded to this)
GEMV_BLOCKSIZE_MAX = 256  # BLOCK_K of every config is at least this: a tile holds whole blocks

_FMA_CONFIGS = [  # a thread holding several rows loads each x value once for all of them
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=1)
    for n, k, w in ((16, 256, 2), (32, 256, 2), (64, 256, 4), (32, 512, 4))
]
_DOT_CONFIGS = [  # tl.dot needs 16 rows at least
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for n, k, w, s in ((16, 256, 4, 1), (32, 256, 4, 3), (64, 256, 8, 3))
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4, num_stages=1)


@triton.jit
def _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rows, block, N, K,
            BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, OFFSET_IS_POINTER: tl.constexpr):
    """float32 scales of blocks `block` (NB,) of `rows` (BLOCK_N,): (BLOCK_N, NB), zero outside W."""
    blocks_per_row = K // BLOCKSIZE
    mask = (rows < N)[:, None] & (block < blocks_per_row)[None, :]
    scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                        rows[:, None] * blocks_per_row + block[None, :], mask, DOUBLE_QUANT, OFFSET_IS_POINTER)
    return tl.where(mask, scale, 0.0)


@triton.jit
def _gemv_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr, byte_code_ptr,
    bias_ptr, out_ptr,
    # sizes and strides
    M, N, K, stride_xm, stride_om,
    # weight format (rows hold whole blocks)
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, OFFSET_IS_POINTER: tl.constexpr,
    # problem: M_PAD is 1 (FMA path) or 16 (tensor cores, M <= 16)
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, M_PAD: tl.constexpr,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    NB: tl.constexpr = BLOCK_K // BLOCKSIZE  # blocks per row in a tile
    WPB: tl.constexpr = BLOCKSIZE // 8  # 32-bit words per block
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_words = K // 8
    word_rows = packed_ptr.to(tl.pointer_type(tl.int32)) + rows.to(tl.int64)[:, None, None] * row_words
    first, last = split_range(tl.cdiv(K, BLOCK_K), pid_k, SPLIT)
    word_in_tile = tl.arange(0, NB)[:, None] * WPB + tl.arange(0, WPB)[None, :]  # (NB, WPB)
    if M_PAD == 1:
        # Note [register double buffering]: the words and scales of chunk i + 1 are loaded before
        # chunk i is multiplied, so a chunk's loads are in flight during the previous one's math.
        acc = tl.zeros((BLOCK_N, NB, WPB), dtype=tl.float32)  # one partial sum per word of the tile
        end_word = tl.minimum(row_words, last * (BLOCK_K // 8))  # this split's words end here
        word = first * (BLOCK_K // 8) + word_in_tile  # (NB, WPB)
        words = tl.load(word_rows + word[None, :, :], mask=(rows < N)[:, None, None]
                        & (word < end_word)[None, :, :], other=0)  # (BLOCK_N, NB, WPB) int32
        scale = _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rows,
                        first * NB + tl.arange(0, NB), N, K, BLOCKSIZE, DOUBLE_QUANT, OFFSET_IS_POINTER)
        for chunk in range(first, last):
            next_word = word + BLOCK_K // 8
            next_words = tl.load(word_rows + next_word[None, :, :], mask=(rows < N)[:, None, None]
                                 & (next_word < end_word)[None, :, :], other=0)
            next_scale = _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rows,
                                 (chunk + 1) * NB + tl.arange(0, NB), N, K, BLOCKSIZE, DOUBLE_QUANT,
                                 OFFSET_IS_POINTER)  # (BLOCK_N, NB); zero past the row
            dot8 = tl.zeros((BLOCK_N, NB, WPB), dtype=tl.float32)
            for b in tl.static_range(4):  # byte b of a word holds elements 8*word + 2b (high), 2b + 1
                pair = tl.load(byte_code_ptr.to(tl.pointer_type(tl.int64)) + ((words >> (8 * b)) & 0xFF))
                hi = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)  # (BLOCK_N, NB, WPB)
                lo = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
                x_pair = x_ptr + word * 8 + 2 * b  # (NB, WPB)
                x_hi = tl.load(x_pair, mask=word < row_words, other=0.0).to(tl.float32)
                x_lo = tl.load(x_pair + 1, mask=word < row_words, other=0.0).to(tl.float32)
                dot8 += hi * x_hi[None, :, :]  # two FMAs
                dot8 += lo * x_lo[None, :, :]
            acc += dot8 * scale[:, :, None]  # post-scaling: sum_k c_k s x_k = s sum_k c_k x_k
            word, words, scale = next_word, next_words, next_scale
        y = tl.sum(tl.sum(acc, axis=2), axis=1)  # (BLOCK_N,)
        store_output(y[:, None], tl.zeros((1, 1), dtype=tl.int32), rows[:, None], out_ptr, stride_om,
                     bias_ptr, M, N, pid_k, HAS_BIAS, SPLIT)
    else:
        offs_m = tl.arange(0, M_PAD)  # (M_PAD,)
        offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        j = tl.arange(0, 8)
        shifts = 8 * (j // 2) + 4 - 4 * (j % 2)  # element order within a little-endian word
        acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)  # y.T
        for chunk in range(first, last):
            k0 = chunk * BLOCK_K
            word = k0 // 8 + word_in_tile  # (NB, WPB)
            words = tl.load(word_rows + word[None, :, :], mask=(rows < N)[:, None, None]
                            & (word < row_words)[None, :, :], other=0)  # (BLOCK_N, NB, WPB) int32
            nibbles = (words[:, :, :, None] >> shifts[None, None, None, :]) & 0xF  # (BLOCK_N, NB, WPB, 8)
            scale = _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rows,
                            k0 // BLOCKSIZE + tl.arange(0, NB), N, K, BLOCKSIZE, DOUBLE_QUANT,
                            OFFSET_IS_POINTER)  # (BLOCK_N, NB)
            w = tl.load(code_ptr + nibbles) * scale[:, :, None, None]
            w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(x_ptr.dtype.element_ty)
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + (k0 + offs_k)[:, None],
                         mask=(offs_m < M)[None, :] & (k0 + offs_k < K)[:, None], other=0.0)  # (BLOCK_K, M_PAD)
            acc = tl.dot(w, xt, acc)
        store_output(acc, offs_m[None, :], rows[:, None], out_ptr, stride_om, bias_ptr, M, N, pid_k,
                     HAS_BIAS, SPLIT)


def _autotuned(configs):
    return triton.autotune(configs=[_INTERPRETER_CONFIG] if interpreting() else configs,
                           key=["N", "K", "SPLIT", "BLOCKSIZE", "DOUBLE_QUANT"],
                           reset_to_zero=["out_ptr"])(_gemv_kernel)


gemv_fma = _autotuned(_FMA_CONFIGS)  # launch with M_PAD=1
gemv_dot = _autotuned(_DOT_CONFIGS)  # launch with M_PAD=16

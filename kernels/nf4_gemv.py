"""Small-M NF4 matmul: y = x @ W.T for M <= 16 rows of x (decode), streaming W from HBM once.

kernels.matmul_nf4 takes this kernel where the tensor-core one of kernels/nf4_mma.py does not apply:
float32 x, blocksizes that are not multiples of 32, and the CPU interpreter (which cannot run that
kernel's per-lane PTX). On the H100 the nf4_mma kernel is 1.1-1.4x faster at M = 1 and 2.3-4.4x at
M = 16 (benchmarks/RESULTS.md).

    for each program (n-tile, k-split) (in parallel):
        for k0 in this split's chunks of K (the next chunk's words loaded before this one's math):
            words = W_packed[n-tile, k0/8 : (k0 + BLOCK_K)/8]          int32, K-contiguous: 16-byte loads
            M = 1:   c_0..c_7 = values of the 8 codes of each word     LOOKUP (Note [prmt lookup])
                     part  = sum_j c_j * x[8 word + j]                  (BLOCK_N, NB, WPB) partial sums
                     acc  += part * scale[n-tile, block]                post-scaling, once per word
            M > 1:   x padded to 16 rows; "prmt" lookups: one dot per element j of the words
                         acc += tl.dot(c_j * scale, x[:, 8 word + j].T)                  j = 0..7
                     others: acc += tl.dot(code[nibbles] * scale, x[:, k0 : k0 + BLOCK_K].T)
        y[:, n-tile] = sum(acc) (+ bias)     (SPLIT > 1: atomic add into a zeroed float32 y)

Note [GEMV tile]
    The words are a (BLOCK_N rows, NB blocks, WPB words per block) tile: the K axis, contiguous
    in memory, is the fast axis of the loads, and the block scale indexes by (row, block) and
    broadcasts over the words of the block without a reshape. At M = 1 the kernel never builds a
    4-D nibble tensor (that costs Triton a shared-memory layout conversion per tile): it takes
    the 8 codes of each word with static shifts, sums the products per word in float32 and
    multiplies by the block's scale once per word (sum_k c_k s x_k = s sum_k c_k x_k), so the
    double-quant decode is per (row, block). A thread holds several rows, so each x value it
    loads (two 8-byte loads per word of x) serves all of them. Long chunks (BLOCK_K up to 2048)
    spread a row over many threads, which gives 4096 x 4096 enough threads without a split-K
    (whose zeroed float32 output and final cast are two more launches). For 2 <= M <= 16 the
    tile goes to tl.dot against x padded to 16 rows: memory-bound either way, and the tensor
    cores keep the per-weight work flat in M.

Note [prmt lookup]
    At 3 TB/s an H100 SM must turn ~25 weights per clock into products, with 128 instruction
    issues per clock: ~5 instructions per weight in all. The lookups (LOOKUP; SASS instructions
    per weight in the M = 1 loop of the best configs, compiled for sm_90 offline):
      "byte"       a 256-entry table of value pairs (2 KB): one 8-byte gather per two weights, but
                   a warp's 32 random bytes hit ~14 L1 lines, so each gather costs ~14 L1
                   wavefronts: bound by L1, not HBM (4.2 instructions).
      "nibble"     the 16-entry float32 `code` (64 bytes, one L1 line): one gather per weight, one
                   wavefront per warp, plus its 64-bit address (6.9).
      "prmt"       no memory at all: the 16 values in float16 are split into a low-byte and a
                   high-byte plane of 16 bytes, four registers each (NF4Weight.code_planes). One
                   PTX prmt (byte permute) looks up 4 codes in 8 entries of a plane; its 3-bit
                   selectors are the nibbles & 7, and bit 3 picks the entries 0-7 or 8-15 result
                   by a lop3 blend with a byte mask (itself one prmt). Two more prmts pair the
                   planes into float16 pairs, cvt makes them exact float32, and the FMAs are
                   float32 (5.9). The values are the code rounded to float16 (<= 2^-12 relative).
      "prmt_bf16"  the same lookup, but the planes hold the top half h of a float32 whose low half
                   is 16 copies of h's sign bit, so one prmt (its sign mode fills the low bytes)
                   makes each float32 and no cvt is needed (5.4). The values are within bfloat16
                   rounding of the code (<= 2^-8 relative, as bitsandbytes' bf16 dequantization).
    float32 x takes "nibble" (exact values). The CPU interpreter cannot run PTX: there the "prmt"
    lookups compute the same values from the planes with integer ops (IN_REGISTERS False), so
    the rest of the kernel and the planes are still tested on the CPU. ptxas keeps uniform values
    in uniform registers and copies them into ordinary ones before every prmt (one more
    instruction per 2 weights), so each lane reads its own copy of the planes. At 2 <= M <= 16
    the "prmt" lookups feed tl.dot, one dot per element j of the words (the dot sums over K, so
    the 8 interleaved column sets need no interleaving): 7.5-10 instructions per weight against
    10-14 for the float32 gather, most of the rest being the operand's trip through shared memory.

Needs rows that hold whole blocks (K % blocksize == 0, blocksize >= 8: Note [two tile layouts]);
other weights take the dequantize + matmul path (kernels/nf4_matmul.py).
"""
import triton
import triton.language as tl

from kernels.launch import candidates, cold_graph_bench
from kernels.nf4_tiles import block_scale, code_offset, interpreting, split_range, store_output

__all__ = ["gemv_fma", "gemv_dot", "GEMV_M_MAX", "GEMV_BLOCKSIZE_MAX", "GEMV_LOOKUP", "GEMV_DOT_LOOKUP", "GEMV_LOOKUPS"]

GEMV_M_MAX = 16  # rows of x the kernel takes (the tensor-core operand is padded to this)
GEMV_BLOCKSIZE_MAX = 256  # BLOCK_K of every config is at least this: a tile holds whole blocks

# How the kernel turns a 4-bit code into its value (Note [prmt lookup]): GEMV_LOOKUP at M = 1,
# GEMV_DOT_LOOKUP for 2 <= M <= 16 (there "nibble" and "byte" both mean the float32 gather), for
# float16 / bfloat16 x; float32 x always takes "nibble" (exact float32 values). The dispatch
# reads these at every call; set from H100 measurements (benchmarks/gemv_variants.py).
GEMV_LOOKUPS = ("prmt", "prmt_bf16", "nibble", "byte")
GEMV_LOOKUP = "prmt_bf16"  # H100, run 11: 1.4-2.0x torch at M = 1 with the best config; "prmt" within 5%,
GEMV_DOT_LOOKUP = "prmt_bf16"  # "nibble" 0.7-0.9x, "byte" 0.8-1.0x. float16 x takes "prmt" (its exact table)

_FMA_CONFIGS = [  # (rows, K per chunk, warps): the winners of a 13-tile sweep on the five Llama shapes (run 14)
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=1)
    for n, k, w in ((16, 1024, 4), (8, 1024, 4), (16, 1024, 8))
]
_DOT_CONFIGS = [  # tl.dot needs 16 rows at least
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for n, k, w, s in ((16, 256, 4, 1), (32, 256, 4, 3), (64, 256, 8, 3), (128, 256, 8, 3), (64, 512, 8, 3))
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4, num_stages=1)

# Group A (selector = low half of the word) holds elements 1, 0, 3, 2 in prmt bytes 0..3, group B
# (high half) elements 5, 4, 7, 6: byte i of the word is element 2i (high nibble), 2i + 1 (low).
# The blend masks (byte k = 0xFF where bit 3 of nibble k is set) come from a prmt of the word
# shifted right by 3 (19 for group B): selector nibble k then has that bit as its bit 0, and the
# other 3 bits are don't-cares, since every byte j of 0xFF00FF00:0xFF00FF00 is 0xFF for odd j
# and 0x00 for even j, and prmt's sign mode (selector bit 3) replicates that byte's top bit.
# lop3 0xD8 is (l0 & ~m) | (l1 & m). float16: selector 0x5140 packs (lo0, hi0, lo1, hi1), a pair
# of float16s. Filled bfloat16: 0x40CC puts (fill, fill, lo0, hi0), fill = sign mode on hi0 (0xC).
_PRMT_LOOKUP = """
    prmt.b32 l0, ${p0}, ${p1}, {s};
    prmt.b32 l1, ${p2}, ${p3}, {s};
    lop3.b32 wl, l0, l1, {m}, 0xD8;
    prmt.b32 h0, ${p4}, ${p5}, {s};
    prmt.b32 h1, ${p6}, ${p7}, {s};
    lop3.b32 wh, h0, h1, {m}, 0xD8;"""


def prmt_lookup(selector: str, mask: str, first_plane: int, plane_stride: int = 1) -> str:
    """PTX: the low bytes (wl) and high bytes (wh) of the 4 codes whose nibbles (& 7) are in the low
    16 bits of register `selector`, blended by `mask`; the 8 planes are operands $first_plane,
    $first_plane + plane_stride, ... Also used by kernels/nf4_mma.py (Note [pair lookup]) and
    kernels/nf4_wgmma.py."""
    return _PRMT_LOOKUP.format(s=selector, m=mask, **{f"p{i}": first_plane + plane_stride * i for i in range(8)})


_F16_VALUES = """
    prmt.b32 v, wl, wh, 0x5140;
    mov.b32 {{a, b}}, v;
    cvt.f32.f16 ${e1}, a;
    cvt.f32.f16 ${e0}, b;
    prmt.b32 v, wl, wh, 0x7362;
    mov.b32 {{a, b}}, v;
    cvt.f32.f16 ${e3}, a;
    cvt.f32.f16 ${e2}, b;"""
_FILLED_BF16_VALUES = """
    prmt.b32 ${e1}, wl, wh, 0x40CC;
    prmt.b32 ${e0}, wl, wh, 0x51DD;
    prmt.b32 ${e3}, wl, wh, 0x62EE;
    prmt.b32 ${e2}, wl, wh, 0x73FF;"""


def _prmt_asm(values: str) -> str:
    """PTX: one word ($8) and the 8 plane registers ($9-$16) in, its 8 values ($0-$7) out."""
    return """{
    .reg .b32 s, sb, t, tb, ma, mb, l0, l1, h0, h1, wl, wh, v;
    .reg .b16 a, b;
    and.b32 s, $8, 0x77777777;
    shr.u32 sb, s, 16;
    shr.u32 t, $8, 3;
    shr.u32 tb, $8, 19;
    prmt.b32 ma, 0xFF00FF00, 0xFF00FF00, t;
    prmt.b32 mb, 0xFF00FF00, 0xFF00FF00, tb;""" \
        + prmt_lookup("s", "ma", 9) + values.format(e0=0, e1=1, e2=2, e3=3) \
        + prmt_lookup("sb", "mb", 9) + values.format(e0=4, e1=5, e2=6, e3=7) + "\n}"


_PRMT_F16_ASM = tl.constexpr(_prmt_asm(_F16_VALUES))
_PRMT_BF16_ASM = tl.constexpr(_prmt_asm(_FILLED_BF16_VALUES))


@triton.jit
def _code_values(words, p0, p1, p2, p3, p4, p5, p6, p7, FILLED_BF16: tl.constexpr, IN_REGISTERS: tl.constexpr):
    """The 8 values of each 32-bit word of codes, in element order, in float32 (Note [prmt lookup]);
    p0..p7 are the byte planes of the 16 values (NF4Weight.code_planes): float16, or with
    FILLED_BF16 the top halves h of float32s whose low half repeats h's sign bit.

    With n = nibble, s = n & 7, and the planes L (low bytes) and H (high bytes), each split in
    entries 0-7 (two registers) and 8-15 (two registers):

        lo = prmt(L[0:8], s) if n < 8 else prmt(L[8:16], s)     4 nibbles per prmt, blended by lop3
        hi = same with H
        value = float32(float16(hi << 8 | lo))                   prmt pairs them, cvt is exact
              = float32 bits (hi, lo, fill, fill)                FILLED_BF16: one prmt (sign mode)

    IN_REGISTERS False (the CPU interpreter, which cannot run PTX): the same values computed from
    the planes with integer ops (slow, but it checks the planes as well as the kernel).
    """
    if IN_REGISTERS:
        if FILLED_BF16:
            v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                _PRMT_BF16_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
                [words, p0, p1, p2, p3, p4, p5, p6, p7],
                dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32),
                is_pure=True, pack=1)
            return (v0.to(tl.float32, bitcast=True), v1.to(tl.float32, bitcast=True),
                    v2.to(tl.float32, bitcast=True), v3.to(tl.float32, bitcast=True),
                    v4.to(tl.float32, bitcast=True), v5.to(tl.float32, bitcast=True),
                    v6.to(tl.float32, bitcast=True), v7.to(tl.float32, bitcast=True))
        else:
            return tl.inline_asm_elementwise(
                _PRMT_F16_ASM, "=f,=f,=f,=f,=f,=f,=f,=f,r,r,r,r,r,r,r,r,r",
                [words, p0, p1, p2, p3, p4, p5, p6, p7],
                dtype=(tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32,
                       tl.float32), is_pure=True, pack=1)
    else:
        return (_plane_value(words >> 4, p0, p1, p2, p3, p4, p5, p6, p7, FILLED_BF16),
                _plane_value(words, p0, p1, p2, p3, p4, p5, p6, p7, FILLED_BF16),
                _plane_value(words >> 12, p0, p1, p2, p3, p4, p5, p6, p7, FILLED_BF16),
                _plane_value(words >> 8, p0, p1, p2, p3, p4, p5, p6, p7, FILLED_BF16),
                _plane_value(words >> 20, p0, p1, p2, p3, p4, p5, p6, p7, FILLED_BF16),
                _plane_value(words >> 16, p0, p1, p2, p3, p4, p5, p6, p7, FILLED_BF16),
                _plane_value(words >> 28, p0, p1, p2, p3, p4, p5, p6, p7, FILLED_BF16),
                _plane_value(words >> 24, p0, p1, p2, p3, p4, p5, p6, p7, FILLED_BF16))


@triton.jit
def _plane_value(shifted, p0, p1, p2, p3, p4, p5, p6, p7, FILLED_BF16: tl.constexpr):
    """float32 value of the nibble in the low 4 bits of `shifted`, read from the planes (interpreter)."""
    n = shifted & 0xF
    byte_shift = 8 * (n % 4)
    lo = (tl.where(n < 4, p0, tl.where(n < 8, p1, tl.where(n < 12, p2, p3))) >> byte_shift) & 0xFF
    hi = (tl.where(n < 4, p4, tl.where(n < 8, p5, tl.where(n < 12, p6, p7))) >> byte_shift) & 0xFF
    if FILLED_BF16:
        bits = (hi << 24) | (lo << 16) | tl.where(hi >= 128, 0xFFFF, 0)
        return bits.to(tl.float32, bitcast=True)
    else:
        return ((hi << 8) | lo).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _lane_id(anything):
    """This thread's lane in its warp (PTX %laneid); `anything` is an unused operand."""
    return tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [anything], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _x_values(x_ptr, word, x_in):
    """x[8 word + j] for j = 0..7 as 8 float32 tensors shaped like `word` (NB, WPB), read as two
    8-byte loads per word instead of eight 2-byte loads (x is 16-bit; float32 x: eight loads)."""
    dtype = x_ptr.dtype.element_ty
    if dtype.primitive_bitwidth == 32:
        x_at = x_ptr + word * 8  # (NB, WPB)
        x0 = tl.load(x_at, mask=x_in, other=0.0)
        x1 = tl.load(x_at + 1, mask=x_in, other=0.0)
        x2 = tl.load(x_at + 2, mask=x_in, other=0.0)
        x3 = tl.load(x_at + 3, mask=x_in, other=0.0)
        x4 = tl.load(x_at + 4, mask=x_in, other=0.0)
        x5 = tl.load(x_at + 5, mask=x_in, other=0.0)
        x6 = tl.load(x_at + 6, mask=x_in, other=0.0)
        x7 = tl.load(x_at + 7, mask=x_in, other=0.0)
    else:
        x64 = x_ptr.to(tl.pointer_type(tl.int64)) + word * 2  # (NB, WPB) four x values per int64
        a = tl.load(x64, mask=x_in, other=0)
        b = tl.load(x64 + 1, mask=x_in, other=0)
        x0 = (a & 0xFFFF).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
        x1 = ((a >> 16) & 0xFFFF).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
        x2 = ((a >> 32) & 0xFFFF).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
        x3 = ((a >> 48) & 0xFFFF).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
        x4 = (b & 0xFFFF).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
        x5 = ((b >> 16) & 0xFFFF).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
        x6 = ((b >> 32) & 0xFFFF).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
        x7 = ((b >> 48) & 0xFFFF).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _byte_pair(dot8, words, SHIFT: tl.constexpr, byte_code_ptr, x_hi, x_lo):
    """dot8 + both products of the byte at bit SHIFT of each word, its two values from one 8-byte
    load of the 256-entry table (the "byte" lookup)."""
    pair = tl.load(byte_code_ptr.to(tl.pointer_type(tl.int64)) + ((words >> SHIFT) & 0xFF))
    hi = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)  # (BLOCK_N, NB, WPB)
    lo = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    return dot8 + hi * x_hi[None, :, :] + lo * x_lo[None, :, :]


@triton.jit
def _dot_column(acc, c, scale, x_at, x_in, dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + (c * scale) @ x_at[...]: one of the 8 interleaved column sets of a tile (M > 1)."""
    w = tl.reshape(c * scale, (BLOCK_N, BLOCK_K // 8)).to(dtype)  # (BLOCK_N, BLOCK_K/8)
    return tl.dot(w, tl.load(x_at, mask=x_in, other=0.0), acc)  # x_at: (BLOCK_K/8, M_PAD)


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
def _word_pointers(packed_ptr, rows, word, K, row_words, BLOCKSIZE: tl.constexpr, TILED: tl.constexpr):
    """int32 pointers to the words `word` (NB, WPB) of rows `rows` (BLOCK_N,): (BLOCK_N, NB, WPB), in row
    order or tiled (kernels/nf4_tiles.py Note [tiled codes]: a word stays whole at code_offset)."""
    words_ptr = packed_ptr.to(tl.pointer_type(tl.int32))
    if TILED:
        return words_ptr + code_offset(rows[:, None, None], 4 * word[None, :, :], K, BLOCKSIZE, TILED) // 4
    else:
        return words_ptr + rows.to(tl.int64)[:, None, None] * row_words + word[None, :, :]


@triton.jit
def _gemv_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr, byte_code_ptr,
    code_planes_ptr, bias_ptr, out_ptr,
    # sizes and strides
    M, N, K, row_words, stride_xm, stride_om,  # row_words = K // 8: Triton sees if 16 divides it (16-byte loads)
    # weight format (rows hold whole blocks)
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, OFFSET_IS_POINTER: tl.constexpr,
    # problem: M_PAD is 1 (FMA path) or 16 (tensor cores, M <= 16)
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, M_PAD: tl.constexpr,
    # code lookup, one of GEMV_LOOKUPS (Note [prmt lookup]); IN_REGISTERS False: no PTX (interpreter)
    LOOKUP: tl.constexpr, IN_REGISTERS: tl.constexpr, TILED: tl.constexpr,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    NB: tl.constexpr = BLOCK_K // BLOCKSIZE  # blocks per row in a tile
    WPB: tl.constexpr = BLOCKSIZE // 8  # 32-bit words per block
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    first, last = split_range(tl.cdiv(K, BLOCK_K), pid_k, SPLIT)
    word_in_tile = tl.arange(0, NB)[:, None] * WPB + tl.arange(0, WPB)[None, :]  # (NB, WPB)
    # The 8 byte-plane registers of Note [prmt lookup], each lane reading its own copy
    # (code_planes is (16, 32)) so that ptxas keeps them in per-thread registers.
    FILLED_BF16: tl.constexpr = LOOKUP == "prmt_bf16"
    lane = _lane_id(pid_n) if IN_REGISTERS else 0
    planes = code_planes_ptr + (8 * 32 if FILLED_BF16 else 0) + lane  # rows 0-7 float16, 8-15 filled bfloat16
    p0 = tl.load(planes + 0 * 32)
    p1 = tl.load(planes + 1 * 32)
    p2 = tl.load(planes + 2 * 32)
    p3 = tl.load(planes + 3 * 32)
    p4 = tl.load(planes + 4 * 32)
    p5 = tl.load(planes + 5 * 32)
    p6 = tl.load(planes + 6 * 32)
    p7 = tl.load(planes + 7 * 32)
    if M_PAD == 1:
        # Note [register double buffering]: the words and scales of chunk i + 1 are loaded before
        # chunk i is multiplied, so a chunk's loads are in flight during the previous one's math.
        acc = tl.zeros((BLOCK_N, NB, WPB), dtype=tl.float32)  # one partial sum per word of the tile
        end_word = tl.minimum(row_words, last * (BLOCK_K // 8))  # this split's words end here
        word = first * (BLOCK_K // 8) + word_in_tile  # (NB, WPB)
        at = _word_pointers(packed_ptr, rows, word, K, row_words, BLOCKSIZE, TILED)
        words = tl.load(at, mask=(rows < N)[:, None, None]
                        & (word < end_word)[None, :, :], other=0)  # (BLOCK_N, NB, WPB) int32
        scale = _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rows,
                        first * NB + tl.arange(0, NB), N, K, BLOCKSIZE, DOUBLE_QUANT, OFFSET_IS_POINTER)
        for chunk in range(first, last):
            next_word = word + BLOCK_K // 8
            at = _word_pointers(packed_ptr, rows, next_word, K, row_words, BLOCKSIZE, TILED)
            next_words = tl.load(at, mask=(rows < N)[:, None, None]
                                 & (next_word < end_word)[None, :, :], other=0)
            next_scale = _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rows,
                                 (chunk + 1) * NB + tl.arange(0, NB), N, K, BLOCKSIZE, DOUBLE_QUANT,
                                 OFFSET_IS_POINTER)  # (BLOCK_N, NB); zero past the row
            dot8 = tl.zeros((BLOCK_N, NB, WPB), dtype=tl.float32)
            x_in = word < row_words
            x0, x1, x2, x3, x4, x5, x6, x7 = _x_values(x_ptr, word, x_in)  # 8 x (NB, WPB): x[8 word + j]
            if LOOKUP == "byte":  # byte b of a word holds elements 2b (high nibble), 2b + 1: two values per load
                dot8 = _byte_pair(dot8, words, 0, byte_code_ptr, x0, x1)
                dot8 = _byte_pair(dot8, words, 8, byte_code_ptr, x2, x3)
                dot8 = _byte_pair(dot8, words, 16, byte_code_ptr, x4, x5)
                dot8 = _byte_pair(dot8, words, 24, byte_code_ptr, x6, x7)
            else:
                if LOOKUP == "nibble":  # element j of a word: shift 4, 0, 12, 8, 20, 16, 28, 24
                    c0 = tl.load(code_ptr + ((words >> 4) & 0xF))  # (BLOCK_N, NB, WPB)
                    c1 = tl.load(code_ptr + (words & 0xF))
                    c2 = tl.load(code_ptr + ((words >> 12) & 0xF))
                    c3 = tl.load(code_ptr + ((words >> 8) & 0xF))
                    c4 = tl.load(code_ptr + ((words >> 20) & 0xF))
                    c5 = tl.load(code_ptr + ((words >> 16) & 0xF))
                    c6 = tl.load(code_ptr + ((words >> 28) & 0xF))
                    c7 = tl.load(code_ptr + ((words >> 24) & 0xF))
                else:
                    c0, c1, c2, c3, c4, c5, c6, c7 = _code_values(words, p0, p1, p2, p3, p4, p5, p6, p7, FILLED_BF16,
                                                                  IN_REGISTERS)  # 8 x (BLOCK_N, NB, WPB)
                dot8 += c0 * x0[None, :, :]
                dot8 += c1 * x1[None, :, :]
                dot8 += c2 * x2[None, :, :]
                dot8 += c3 * x3[None, :, :]
                dot8 += c4 * x4[None, :, :]
                dot8 += c5 * x5[None, :, :]
                dot8 += c6 * x6[None, :, :]
                dot8 += c7 * x7[None, :, :]
            acc += dot8 * scale[:, :, None]  # post-scaling: sum_k c_k s x_k = s sum_k c_k x_k
            word, words, scale = next_word, next_words, next_scale
        y = tl.sum(tl.sum(acc, axis=2), axis=1)  # (BLOCK_N,)
        store_output(y[:, None], tl.zeros((1, 1), dtype=tl.int32), rows[:, None], out_ptr, stride_om,
                     bias_ptr, M, N, pid_k, HAS_BIAS, SPLIT)
    else:
        offs_m = tl.arange(0, M_PAD)  # (M_PAD,)
        acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)  # y.T
        dtype = x_ptr.dtype.element_ty
        if LOOKUP == "prmt" or LOOKUP == "prmt_bf16":
            # One tl.dot per element j of the words: W[:, 8 word + j] against x[:, 8 word + j].T; the
            # dot sums over K, so the 8 interleaved column sets need no interleaving in registers.
            word_col = tl.reshape(word_in_tile, (BLOCK_K // 8,))  # (BLOCK_K/8,) word index in the tile
            x_cols = x_ptr + offs_m[None, :] * stride_xm + 8 * word_col[:, None]  # (BLOCK_K/8, M_PAD)
            for chunk in range(first, last):
                k0 = chunk * BLOCK_K
                word = k0 // 8 + word_in_tile  # (NB, WPB)
                at = _word_pointers(packed_ptr, rows, word, K, row_words, BLOCKSIZE, TILED)
                words = tl.load(at, mask=(rows < N)[:, None, None]
                                & (word < row_words)[None, :, :], other=0)  # (BLOCK_N, NB, WPB) int32
                scale = _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rows,
                                k0 // BLOCKSIZE + tl.arange(0, NB), N, K, BLOCKSIZE, DOUBLE_QUANT,
                                OFFSET_IS_POINTER)[:, :, None]  # (BLOCK_N, NB, 1)
                c0, c1, c2, c3, c4, c5, c6, c7 = _code_values(words, p0, p1, p2, p3, p4, p5, p6, p7, FILLED_BF16,
                                                              IN_REGISTERS)  # 8 x (BLOCK_N, NB, WPB)
                x_at = x_cols + k0  # (BLOCK_K/8, M_PAD)
                x_in = (offs_m < M)[None, :] & (k0 + 8 * word_col < K)[:, None]
                acc = _dot_column(acc, c0, scale, x_at + 0, x_in, dtype, BLOCK_N, BLOCK_K)
                acc = _dot_column(acc, c1, scale, x_at + 1, x_in, dtype, BLOCK_N, BLOCK_K)
                acc = _dot_column(acc, c2, scale, x_at + 2, x_in, dtype, BLOCK_N, BLOCK_K)
                acc = _dot_column(acc, c3, scale, x_at + 3, x_in, dtype, BLOCK_N, BLOCK_K)
                acc = _dot_column(acc, c4, scale, x_at + 4, x_in, dtype, BLOCK_N, BLOCK_K)
                acc = _dot_column(acc, c5, scale, x_at + 5, x_in, dtype, BLOCK_N, BLOCK_K)
                acc = _dot_column(acc, c6, scale, x_at + 6, x_in, dtype, BLOCK_N, BLOCK_K)
                acc = _dot_column(acc, c7, scale, x_at + 7, x_in, dtype, BLOCK_N, BLOCK_K)
        else:
            offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            j = tl.arange(0, 8)
            shifts = 8 * (j // 2) + 4 - 4 * (j % 2)  # element order within a little-endian word
            for chunk in range(first, last):
                k0 = chunk * BLOCK_K
                word = k0 // 8 + word_in_tile  # (NB, WPB)
                at = _word_pointers(packed_ptr, rows, word, K, row_words, BLOCKSIZE, TILED)
                words = tl.load(at, mask=(rows < N)[:, None, None]
                                & (word < row_words)[None, :, :], other=0)  # (BLOCK_N, NB, WPB) int32
                nibbles = (words[:, :, :, None] >> shifts[None, None, None, :]) & 0xF  # (BLOCK_N, NB, WPB, 8)
                scale = _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rows,
                                k0 // BLOCKSIZE + tl.arange(0, NB), N, K, BLOCKSIZE, DOUBLE_QUANT,
                                OFFSET_IS_POINTER)  # (BLOCK_N, NB)
                w = tl.load(code_ptr + nibbles) * scale[:, :, None, None]
                w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(dtype)
                xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + (k0 + offs_k)[:, None],
                             mask=(offs_m < M)[None, :] & (k0 + offs_k < K)[:, None], other=0.0)  # (BLOCK_K, M_PAD)
                acc = tl.dot(w, xt, acc)
        store_output(acc, offs_m[None, :], rows[:, None], out_ptr, stride_om, bias_ptr, M, N, pid_k,
                     HAS_BIAS, SPLIT)


def _autotuned(configs):
    """Timed by cold_graph_bench: a call's host time exceeds its GPU time (Note [timing short kernels])."""
    return triton.autotune(configs=[_INTERPRETER_CONFIG] if interpreting() else candidates(configs),
                           key=["N", "K", "SPLIT", "BLOCKSIZE", "DOUBLE_QUANT", "LOOKUP"],
                           reset_to_zero=["out_ptr"], do_bench=cold_graph_bench)(_gemv_kernel)


gemv_fma = _autotuned(_FMA_CONFIGS)  # launch with M_PAD=1
gemv_dot = _autotuned(_DOT_CONFIGS)  # launch with M_PAD=16

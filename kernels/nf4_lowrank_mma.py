"""W + s B A per lane on the tensor cores: the merged weight of a QLoRA layer's input gradient.

    for each strip of 32 QUADS columns of W (program column) and part of its rows (program row):
        a_frags = lora_a on the strip as the mma's B operand, every 8-column tile   once per warp
        for each 16 rows of this warp's share:
            b_frag = lora_b on the 16 rows as the mma's A operand                   per 16 ranks
            words  = this lane's code word (8 columns) of rows g and g + 8, per quad Note [merged lane map]
            scale  = block scales of the 16 rows, one decode per lane, shuffled     (blocks >= the strip)
            delta  = mma.m16n8k16(b_frag, a_frag) per 8-column tile                float32, summed over ranks
            out    = fma(s, delta, code[nibble] * scale).to(dtype)                   Note [shared code table]
            two 16-byte stores per quad: 8 columns of rows g and g + 8

Same result as kernels/nf4_lowrank.py's tile kernel, which stays for what this one does not take
(float32 output, ranks above MAX_RANK, the CPU interpreter). Why a second kernel: there Triton
computes the rank sum with tl.dot in the MMA layout and the dequantized tile in a blocked one and
moves data between them through shared memory, and its 16-row tiles re-read lora_a; it costs
1.4-1.5x the plain dequantization. Here each lane holds the mma's C values for exactly the
columns whose codes it loads and whose outputs it stores, so nothing changes layout, and a warp
keeps its strip of lora_a in registers for all its rows. H100 (benchmarks/RESULTS.md run 84, rank
16, bfloat16): 18.9 / 62.0 / 63.6 / 70.8 us for 4096 x 4096 / 14336 x 4096 / 4096 x 14336 /
8192 x 8192, 1.09-1.19x the plain dequantization (17.4 / 53.5 / 53.6 / 60.9), against 25.6 / 75.2 /
80.4 / 85.8 for the tile kernel.

Note [merged lane map]
    mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"): lane = 4 g + t holds C at rows g
    and g + 8, columns 2t and 2t + 1 of the 8-column tile, and B at column g. Which column of W a
    tile column stands for is ours to choose, as long as B (lora_a's column) and C agree. Tile
    jj (0..3) of quad q (32 columns) puts its column 2t + e at column 32 q + 8 t + 2 jj + e of the
    strip: lane t's 8 columns of a quad are one 32-bit word of codes (byte jj holds tile jj's
    columns, high nibble first, as bitsandbytes packs them) and 16 contiguous bytes of the output,
    and a store instruction writes 64 contiguous bytes (two whole sectors) of each of 8 rows. The
    B operand of tile (q, jj) is then lora_a at column 32 q + 8 (g >> 1) + 2 jj + (g & 1), ranks
    {2t, 2t+1} (b0) and {2t+8, 2t+9} (b1): rank pairs, two rows of lora_a (r, K), so four 16-bit
    loads per register pair, once per warp. lora_b's rows are the A operand: rows g, g + 8 at
    ranks {2t, 2t+1} and {2t+8, 2t+9}. Ranks past r load as zeros. Measured and not kept (run 83):
    lanes owning 16 contiguous columns of two quads, for 8-byte code loads; each store then wrote
    half sectors, and L2 merging them made the kernel 1.4-1.7x slower.

Note [shared code table]
    Each warp writes the 16 code values into a 64-byte table in shared memory, declared in inline
    PTX and 64-byte aligned, so one shift and one lop3 ((word >> b) & 0x3C | table) address a code
    and the warp's 32 lookups hit 16 banks without conflicts. The first version gathered from the
    table in global memory (a 64-bit address per weight) and every lane decoded the scales of its
    rows: 1.28x the plain dequantization on 14336 x 4096 (run 79). The shared table and the fused
    multiply-add below: 1.26x (runs 80-81), with Nsight Compute finding the L1 pipe 88% busy
    (run 82), where the four lanes of a quad each made the three dependent loads of a scale decode
    for 8 rows. Now one lane per row decodes and the quad takes the scales by shuffles: 1.16x
    (run 84).

Rounding: w = code * scale and the double-quant decode are rounded float32 operations as in
kernels.reference (the kernel runs with fp fusion off), so with a zero adapter the result is the
dequantization bit for bit; w + s * delta is one fused multiply-add, since the rank sum's order
already differs from the reference's. The result is rounded once to the output dtype.

Needs 16-bit output (lora_a and lora_b rounded to it by the caller), K % 32 == 0, packed codes on
4 bytes, and rank <= MAX_RANK (`lowrank_mma_fits`). Like kernels/nf4_mma.py this is inline PTX with
per-lane semantics: compiled for sm_90 in CI, checked against the reference on the GPU.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.launch import choose_config
from kernels.nf4_mma import _lane_ids, _mma, _scale, _shift, _shuffle
from kernels.nf4_mma_t import _load_b32, tiled_pair
from kernels.nf4_tiles import NF4Weight

__all__ = ["lowrank_mma", "lowrank_mma_fits", "LowrankConfig", "LOWRANK_CONFIGS", "MAX_RANK"]

MAX_RANK = 64  # 4 chunks of 16 ranks: the strip of lora_a is 8 QUADS registers per chunk


def lowrank_mma_fits(n_cols: int, rank: int, packed_address: int = 0) -> bool:
    """Rows of whole quads of 32 columns (whose codes start on 4 bytes) and a rank the registers hold."""
    return n_cols % 32 == 0 and 1 <= rank <= MAX_RANK and packed_address % 4 == 0


@triton.jit
def _half(ptr, index, valid):
    """The 16-bit value at ptr[index] (int16 pointer) as the low half of an int32; 0 where not valid."""
    return tl.load(ptr + index, mask=valid, other=0).to(tl.int32) & 0xFFFF


@triton.jit
def _rank_pair(ptr, at, step, rank, R):
    """ptr[at] (rank `rank`) and ptr[at + step] (rank + 1) packed low, high: one mma register."""
    return _half(ptr, at, rank < R) | (_half(ptr, at + step, rank + 1 < R) << 16)


@triton.jit
def _round_pair(v0, v1, FLOAT16: tl.constexpr):
    """float32 v0, v1 rounded to the output dtype and packed (v0 low, v1 high)."""
    if FLOAT16:
        asm: tl.constexpr = "cvt.rn.f16x2.f32 $0, $2, $1;"
    else:
        asm: tl.constexpr = "cvt.rn.bf16x2.f32 $0, $2, $1;"
    return tl.inline_asm_elementwise(asm, "=r,f,f", [v0, v1], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _store4(address, p0, p1, p2, p3, valid):
    """16 bytes at byte `address` (int64, 16-aligned) where `valid` != 0; returns a dummy."""
    return tl.inline_asm_elementwise(
        """{
        .reg .pred p;
        setp.ne.b32 p, $2, 0;
        @p st.global.v4.b32 [$1], {$3, $4, $5, $6};
        mov.b32 $0, 0;
        }""", "=r,l,r,r,r,r,r", [address, valid, p0, p1, p2, p3], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _code_table(code_ptr, lane):
    """The 16 code values in a 64-byte shared-memory table (Note [shared code table]); returns its
    shared-window address. Each warp writes it (all warps the same values) and syncs before use."""
    value = tl.load(code_ptr + (lane & 15))
    return tl.inline_asm_elementwise(
        """{
        .shared .align 64 .b32 nf4_code_table[16];
        .reg .pred p;
        .reg .b32 at;
        mov.u32 $0, nf4_code_table;
        setp.lt.u32 p, $1, 16;
        shl.b32 at, $1, 2;
        add.u32 at, at, $0;
        @p st.shared.f32 [at], $2;
        bar.warp.sync 0xffffffff;
        }""", "=r,r,f", [lane, value], dtype=tl.int32, is_pure=False, pack=1)


# Byte offset 4 * nibble of the 8 codes of a word in element order (byte i: high nibble, then low):
# nibble at bit b -> (word >> (b - 2)) & 0x3C, or'ed with the 64-aligned table address by one lop3
# ((a & b) | c is lut 0xEA).
_LOOKUP8 = tl.constexpr("{\n    .reg .b32 at;\n" + "".join(
    f"    {'shl.b32 at, $8, 2' if bit == 0 else f'shr.u32 at, $8, {bit - 2}'};\n"
    f"    lop3.b32 at, at, 0x3C, $9, 0xEA;\n"
    f"    ld.shared.f32 ${element}, [at];\n"
    for element, bit in enumerate((4, 0, 12, 8, 20, 16, 28, 24))) + "}")


@triton.jit
def _codes8(word, table):
    """The 8 code values (float32) of a word of packed codes, in element order, from the shared table."""
    return tl.inline_asm_elementwise(_LOOKUP8, "=f,=f,=f,=f,=f,=f,=f,=f,r,r", [word, table],
                                     dtype=(tl.float32,) * 8, is_pure=True, pack=1)


@triton.jit
def _run(col0, q, t):
    """The first of lane t's 8 columns in quad q of the strip at col0 (Note [merged lane map])."""
    return col0 + 32 * q + 8 * t


@triton.jit
def _a_frags(a16_ptr, col0, g, t, R, K, QUADS: tl.constexpr, R_CHUNKS: tl.constexpr):
    """lora_a on the strip as B operands: per quad, tile and rank chunk, (b0, b1) (Note [merged lane map]).
    Columns past K read column K - 1: their outputs are never stored."""
    frags = ()
    for q in tl.static_range(QUADS):
        for jj in tl.static_range(4):
            col = tl.minimum(_run(col0, q, g >> 1) + 2 * jj + (g & 1), K - 1)
            for c in tl.static_range(R_CHUNKS):
                rank = 16 * c + 2 * t
                frags = frags + ((_rank_pair(a16_ptr, rank * K + col, K, rank, R),
                                  _rank_pair(a16_ptr, (rank + 8) * K + col, K, rank + 8, R)),)
    return frags


@triton.jit
def _tile_loads(n0, b16_ptr, packed_ptr, absmax_ptr, col0, g, t, N, K, R, BLOCKSIZE: tl.constexpr,
                QUADS: tl.constexpr, R_CHUNKS: tl.constexpr, EVEN_R: tl.constexpr, ROW_BLOCKS: tl.constexpr,
                TILED: tl.constexpr):
    """The loads of rows n0 .. n0 + 15: lora_b's A operands per rank chunk, this lane's code word of rows
    g and g + 8 per quad (row order, or tiled: nf4_mma_t.tiled_pair), and the absmax entries (with their
    blocks) of those words. Rows past N read row N - 1; quads past K read the last quad."""
    row_g = tl.minimum(n0 + g, N - 1)
    row_g8 = tl.minimum(n0 + g + 8, N - 1)
    b_frags = ()
    for c in tl.static_range(R_CHUNKS):
        rank = 16 * c + 2 * t
        if EVEN_R:  # rank pairs are aligned 32-bit words of lora_b's rows
            b32_ptr = b16_ptr.to(tl.pointer_type(tl.int32))
            b_frags = b_frags + ((tl.load(b32_ptr + ((row_g * R + rank) >> 1), mask=rank < R, other=0),
                                  tl.load(b32_ptr + ((row_g8 * R + rank) >> 1), mask=rank < R, other=0),
                                  tl.load(b32_ptr + ((row_g * R + rank + 8) >> 1), mask=rank + 8 < R, other=0),
                                  tl.load(b32_ptr + ((row_g8 * R + rank + 8) >> 1), mask=rank + 8 < R, other=0)),)
        else:
            b_frags = b_frags + ((_rank_pair(b16_ptr, row_g * R + rank, 1, rank, R),
                                  _rank_pair(b16_ptr, row_g8 * R + rank, 1, rank, R),
                                  _rank_pair(b16_ptr, row_g * R + rank + 8, 1, rank + 8, R),
                                  _rank_pair(b16_ptr, row_g8 * R + rank + 8, 1, rank + 8, R)),)
    codes = packed_ptr.to(tl.int64)  # K is even: rows start on bytes
    words = ()  # per quad, the words of rows g and g + 8
    for q in tl.static_range(QUADS):
        col = tl.minimum(col0 + 32 * q, K - 32) + 8 * t
        if TILED:  # n0 % 16 == 0 and N % 16 == 0: row g8 = row g + 8 of the same band
            words = words + (tiled_pair(packed_ptr, n0, g, col >> 1, K, BLOCKSIZE),)
        else:
            words = words + ((_load_b32(codes + row_g.to(tl.int64) * (K >> 1) + (col >> 1)),
                              _load_b32(codes + row_g8.to(tl.int64) * (K >> 1) + (col >> 1))),)
    scales = ()
    if ROW_BLOCKS:  # the strip lies in one block of each row: lane l < 16 decodes row n0 + l
        block = tl.minimum(n0 + (g * 4 + t) % 16, N - 1) * (K // BLOCKSIZE) + col0 // BLOCKSIZE
        scales = ((tl.load(absmax_ptr + block), block),)
    else:  # blocks by the flat index, per lane and quad
        for q in tl.static_range(QUADS):
            col = tl.minimum(_run(col0, q, t), K - 8)
            block_g = (row_g.to(tl.int64) * K + col) // BLOCKSIZE
            block_g8 = (row_g8.to(tl.int64) * K + col) // BLOCKSIZE
            scales = scales + ((tl.load(absmax_ptr + block_g), block_g, tl.load(absmax_ptr + block_g8), block_g8),)
    return b_frags, words, scales


@triton.jit
def _tile_math(loaded, n0, a_frags, table, nested_absmax_ptr, nested_code_ptr, shift, scaling, out_ptr, col0,
               g, t, N, K, QUADS: tl.constexpr, R_CHUNKS: tl.constexpr, ROW_BLOCKS: tl.constexpr,
               DOUBLE_QUANT: tl.constexpr, FLOAT16: tl.constexpr):
    """Rows n0 .. n0 + 15 of the strip: the mmas, the dequantization, the rounding and the stores."""
    b_frags, words, scales = loaded
    row_g = n0 + g
    z = 0.0
    if ROW_BLOCKS:
        entry, block = scales[0]
        mine = _scale(entry, block, nested_absmax_ptr, nested_code_ptr, shift, DOUBLE_QUANT)  # row n0 + lane % 16
        scale_g = _shuffle(mine, g)
        scale_g8 = _shuffle(mine, g + 8)
    for q in tl.static_range(QUADS):
        if not ROW_BLOCKS:
            entry_g, block_g, entry_g8, block_g8 = scales[q]
            scale_g = _scale(entry_g, block_g, nested_absmax_ptr, nested_code_ptr, shift, DOUBLE_QUANT)
            scale_g8 = _scale(entry_g8, block_g8, nested_absmax_ptr, nested_code_ptr, shift, DOUBLE_QUANT)
        word_g, word_g8 = words[q]
        codes_g = _codes8(word_g, table)
        codes_g8 = _codes8(word_g8, table)
        pairs_g = ()
        pairs_g8 = ()
        for jj in tl.static_range(4):
            c0, c1, c2, c3 = z, z, z, z
            for c in tl.static_range(R_CHUNKS):
                a0, a1, a2, a3 = b_frags[c]
                b0, b1 = a_frags[(4 * q + jj) * R_CHUNKS + c]
                c0, c1, c2, c3 = _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, FLOAT16)
            # byte jj: column 2 jj (high nibble), then 2 jj + 1; w = code * scale rounded, then w + s delta
            v0 = tl.fma(scaling, c0, codes_g[2 * jj] * scale_g)
            v1 = tl.fma(scaling, c1, codes_g[2 * jj + 1] * scale_g)
            v2 = tl.fma(scaling, c2, codes_g8[2 * jj] * scale_g8)
            v3 = tl.fma(scaling, c3, codes_g8[2 * jj + 1] * scale_g8)
            pairs_g = pairs_g + (_round_pair(v0, v1, FLOAT16),)
            pairs_g8 = pairs_g8 + (_round_pair(v2, v3, FLOAT16),)
        col = _run(col0, q, t)
        at = out_ptr.to(tl.int64) + row_g.to(tl.int64) * (2 * K) + 2 * col
        in_k = col < K
        _store4(at, pairs_g[0], pairs_g[1], pairs_g[2], pairs_g[3], (in_k & (row_g < N)).to(tl.int32))
        _store4(at + 16 * K, pairs_g8[0], pairs_g8[1], pairs_g8[2], pairs_g8[3],
                (in_k & (row_g + 8 < N)).to(tl.int32))


@triton.jit
def _lowrank_mma_kernel(
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr, b_ptr, a_ptr, out_ptr,
    N, K, R, scaling, rows_per_program,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, OFFSET_IS_POINTER: tl.constexpr, FLOAT16: tl.constexpr,
    QUADS: tl.constexpr, R_CHUNKS: tl.constexpr, EVEN_R: tl.constexpr, ROW_BLOCKS: tl.constexpr,
    WARPS: tl.constexpr, TILED: tl.constexpr,
):
    strip = tl.program_id(0)
    lane, warp = _lane_ids(strip)
    g = lane >> 2
    t = lane & 3
    shift = _shift(offset, DOUBLE_QUANT, OFFSET_IS_POINTER)
    col0 = strip * (32 * QUADS)
    a16_ptr = a_ptr.to(tl.pointer_type(tl.int16))
    b16_ptr = b_ptr.to(tl.pointer_type(tl.int16))
    a_frags = _a_frags(a16_ptr, col0, g, t, R, K, QUADS, R_CHUNKS)
    table = _code_table(code_ptr, lane)
    # This warp's rows: tiles of 16, every WARPS-th of the program's.
    first = tl.program_id(1) * rows_per_program + 16 * warp
    end = tl.minimum((tl.program_id(1) + 1) * rows_per_program, N)
    n_tiles = tl.cdiv(tl.maximum(end - first, 0), 16 * WARPS)
    if n_tiles > 0:  # each tile's loads are issued before the previous tile's math
        loaded = _tile_loads(first, b16_ptr, packed_ptr, absmax_ptr, col0, g, t, N, K, R, BLOCKSIZE, QUADS,
                             R_CHUNKS, EVEN_R, ROW_BLOCKS, TILED)
        for i in range(n_tiles - 1):
            current = loaded
            n0 = first + i * (16 * WARPS)
            loaded = _tile_loads(n0 + 16 * WARPS, b16_ptr, packed_ptr, absmax_ptr, col0, g, t, N, K, R, BLOCKSIZE,
                                 QUADS, R_CHUNKS, EVEN_R, ROW_BLOCKS, TILED)
            _tile_math(current, n0, a_frags, table, nested_absmax_ptr, nested_code_ptr, shift, scaling, out_ptr,
                       col0, g, t, N, K, QUADS, R_CHUNKS, ROW_BLOCKS, DOUBLE_QUANT, FLOAT16)
        _tile_math(loaded, first + (n_tiles - 1) * (16 * WARPS), a_frags, table, nested_absmax_ptr,
                   nested_code_ptr, shift, scaling, out_ptr, col0, g, t, N, K, QUADS, R_CHUNKS, ROW_BLOCKS,
                   DOUBLE_QUANT, FLOAT16)


class LowrankConfig(NamedTuple):
    """A launch of the kernel, timed per shape (lowrank_mma)."""
    quads: int           # 32-column quads per program's strip
    warps: int           # warps per program, each taking every warps-th 16-row tile
    tiles_per_warp: int  # 16-row tiles per warp, which sets the programs along N


# Four quads (32 registers of lora_a) were slower on every shape, and 2 tiles per warp on most (run 84).
LOWRANK_CONFIGS = [LowrankConfig(q, w, n) for q in (1, 2) for w in (4, 8) for n in (4, 8)]
_CHOSEN: dict[tuple, LowrankConfig] = {}


def _configs(rank: int) -> list[LowrankConfig]:
    """The configs whose strip of lora_a fits in 32 registers per lane (MAX_RANK: one quad)."""
    chunks = triton.cdiv(rank, 16)
    return [c for c in LOWRANK_CONFIGS if c.quads * chunks <= 4]


def _launch(weight: NF4Weight, lora_b: torch.Tensor, lora_a: torch.Tensor, scaling: float, out: torch.Tensor,
            config: LowrankConfig) -> None:
    n, k, rank = weight.n_rows, weight.n_cols, lora_a.shape[0]
    rows_per_program = 16 * config.warps * config.tiles_per_warp
    grid = (triton.cdiv(k, 32 * config.quads), triton.cdiv(n, rows_per_program))
    _lowrank_mma_kernel[grid](
        weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, weight.offset, weight.code,
        lora_b, lora_a, out, n, k, rank, float(scaling), rows_per_program,
        BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=weight.double_quant, OFFSET_IS_POINTER=weight.offset_is_pointer,
        FLOAT16=out.dtype == torch.float16, QUADS=config.quads, R_CHUNKS=triton.cdiv(rank, 16),
        EVEN_R=rank % 2 == 0 and lora_b.data_ptr() % 4 == 0,  # rank pairs of lora_b as 32-bit loads
        ROW_BLOCKS=k % weight.blocksize == 0 and weight.blocksize % (32 * config.quads) == 0, WARPS=config.warps,
        TILED=weight.tiled,
        num_warps=config.warps, num_stages=1,
        enable_fp_fusion=False)  # rounded as the reference: see the module docstring


def lowrank_mma(weight: NF4Weight, lora_b: torch.Tensor, lora_a: torch.Tensor, scaling: float, out: torch.Tensor,
                config: LowrankConfig | None = None) -> torch.Tensor:
    """out (N, K) = W + scaling * lora_b @ lora_a, rounded once to out's dtype (bfloat16 or float16);
    lora_b (N, r) and lora_a (r, K) contiguous in out's dtype, lowrank_mma_fits. config: None times
    the configs once per shape (CUDA-graph timing, kernels/launch.py) and keeps the fastest; the
    first with KERNELS_TUNE=0."""
    rank = lora_a.shape[0]
    if config is None:
        key = (weight.n_rows, weight.n_cols, triton.cdiv(rank, 16), weight.blocksize, weight.double_quant,
               out.dtype, out.device, weight.tiled)
        config = choose_config(_CHOSEN, key, lambda: _configs(rank), lambda: _configs(rank)[0],
                               lambda c: _launch(weight, lora_b, lora_a, scaling, out, c))
    _launch(weight, lora_b, lora_a, scaling, out, config)
    return out

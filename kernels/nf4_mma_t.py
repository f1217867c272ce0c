"""Small-M transposed NF4 product on the tensor cores: out = g @ W for M <= 16 rows of g (the input
gradient of x @ W.T at decode-sized batches), W (N, K) read once.

    for each 64 columns of W (one program column) and part of its rows (program row, warps):
        for each 16 rows n0 .. n0 + 15 of this warp's part:
            words  = this lane's 32-bit word (8 columns) of 4 rows                Note [transposed lane map]
            pairs  = bfloat16 pairs of the codes' values, along K                  nf4_mma's byte permutes
            A_j    = pairs re-paired along N, for the 4 column tiles j             one prmt per register
            B      = g[m, rows] * scale[row, block], rounded to bfloat16           Note [scales in g]
            acc_j += mma.m16n8k16(A_j, B)                                          float32
        the warps' acc summed in shared memory, added to out32 (M, K) float32 atomically; out = out32 in g's dtype

Note [transposed lane map]
    out.T (K, M) = W.T (K, N) @ g.T (N, M): A is a 16 x 16 tile of W.T, its rows 16 columns of W,
    its K slots 16 rows of W. mma.m16n8k16 gives lane 4 gid + t the A elements of rows gid and
    gid + 8 at slots {2t, 2t+1} (registers a0, a1) and {2t+8, 2t+9} (a2, a3). The slots are rows
    n0 + slot of W; a lane's rows are n0 + {2t, 2t+1, 2t+8, 2t+9}, and it loads word gid of each
    (columns 8 gid .. 8 gid + 7 of the program's 64). Tile j (j = 0..3) takes byte j of every word:
    its row gid is column 8 gid + 2j (the byte's high nibble) and its row gid + 8 is column
    8 gid + 2j + 1. The lookup gives a word as four pairs along K, (column 2j, column 2j + 1) of one
    row of W; the A registers want pairs along N (two rows, one column), so one prmt per register
    transposes the 2 x 2 block of two rows' pairs. The output columns of a tile are strided: each
    lane stores its sums at their columns in the program's shared memory, where the warps are summed.

Note [scales in g]
    The mma sums over 16 rows of W, each with its own block scale, so the scale cannot multiply the
    sum as in kernels/nf4_mma.py. It multiplies g instead: B = g[m, n] * scale[n, block], rounded to
    bfloat16 (one rounding more than the reference, whose W = code * scale is rounded once; bfloat16
    keeps float32's range, so small gradients do not underflow). The 64 columns of a program lie in
    one block when blocksize % 64 == 0, so one scale per row serves all four tiles. Lanes gid 0-3 of
    a t decode the scales of that t's four rows and the other lanes take them by shuffles.

The programs along N add their sums into out32 atomically, so the float32 order of those few adds
(N / rows per program of them per output) varies from call to call, as in split-K GEMMs.

Needs bfloat16 g, blocksize % 64 == 0, K % 64 == 0, even N and packed codes on 16 bytes
(`mma_t_fits`); everything else takes the tensor-core tiles of kernels/nf4_matmul.py. Like
kernels/nf4_mma.py it is inline PTX with per-lane semantics: compiled for sm_90 in CI, checked
against the reference on the GPU.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.direct_launch import DirectLaunch
from kernels.launch import choose_config
from kernels.nf4_mma import (_lane_ids, _lane_planes, _load_tiled, _mma, _pairs, _partials_base, _scale, _shared_load,
                             _shared_store, _shift, _shuffle)
from kernels.nf4_tiles import NF4Weight, code_offset

__all__ = ["mma_gemv_t", "mma_t_fits", "MmaTConfig", "MMA_T_CONFIGS", "MMA_T_M_MAX"]

MMA_T_M_MAX = 16  # rows of g: two m16n8k16 column tiles

COLUMNS = 64  # columns of W per program: 4 mma tiles of 16


def mma_t_fits(blocksize: int, n_rows: int, n_cols: int, packed_address: int = 0) -> bool:
    """A program's 64 columns lie in one block of every row (Note [scales in g]), rows of g hold
    pairs of values (even N) and the packed codes start on 16 bytes."""
    return blocksize % COLUMNS == 0 and n_cols % COLUMNS == 0 and n_rows % 2 == 0 and packed_address % 16 == 0


@triton.jit
def _load_b32(address):
    """The 32-bit word at byte `address` (int64, 4-aligned), through the read-only path."""
    return tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [address], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _along_n(p, q):
    """From pairs along K of two rows, p = (p0, p1) and q = (q0, q1): (p0, q0) and (p1, q1)."""
    return tl.inline_asm_elementwise("prmt.b32 $0, $2, $3, 0x5410;\n prmt.b32 $1, $2, $3, 0x7632;", "=r,=r,r,r",
                                     [p, q], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _scaled_pair(pair, s0, s1):
    """A bfloat16 pair (v0, v1) as (v0 * s0, v1 * s1), rounded to bfloat16 (float32 products)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 lo, hi;
        .reg .f32 f0, f1;
        shl.b32 lo, $1, 16;
        and.b32 hi, $1, 0xFFFF0000;
        mul.rn.f32 f0, lo, $2;
        mul.rn.f32 f1, hi, $3;
        cvt.rn.bf16x2.f32 $0, f1, f0;
        }""", "=r,r,f,f", [pair, s0, s1], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _pick(words, which, VEC: tl.constexpr):
    """words[which] of the first VEC (1, 2 or 4) of a 4-tuple."""
    if VEC == 1:
        return words[0]
    elif VEC == 2:
        return tl.where(which == 0, words[0], words[1])
    else:
        low = tl.where(which == 0, words[0], words[1])
        high = tl.where(which == 2, words[2], words[3])
        return tl.where(which < 2, low, high)


@triton.jit
def tiled_pair(packed_ptr, band, row, byte, K, BLOCKSIZE: tl.constexpr):
    """The 32-bit words at byte `byte` (a multiple of 4) of rows `row` and row + 8 of the 16-row band
    starting at row `band` (row < 8) from tiled codes (kernels/nf4_tiles.py Note [tiled codes]): both
    lie in one lane's 8 VEC consecutive bytes there, so one load takes both and keeps one word of
    each. A warp whose lanes read the same rows' words so reads 64 VEC consecutive bytes per row pair,
    where two loads of a word each would touch those sectors twice. The offset within the band
    depends on the lane alone: loops over bands add band K / 2."""
    VEC: tl.constexpr = 4 if BLOCKSIZE >= 128 else BLOCKSIZE // 32  # words_per_lane
    RUN: tl.constexpr = 4 * VEC
    which = (byte % RUN) // 4
    at = (packed_ptr.to(tl.int64) + band.to(tl.int64) * (K // 2)
          + code_offset(row, byte - byte % RUN, K, BLOCKSIZE, True))
    row_words, row8_words = _load_tiled(at, VEC)
    return _pick(row_words, which, VEC), _pick(row8_words, which, VEC)


@triton.jit
def _group_loads(n0, packed_ptr, word_byte, g_ptr, g_m, g8_m, absmax_ptr, my_offset, block_col, N, K, t,
                 BLOCKSIZE: tl.constexpr, M_TILES: tl.constexpr, TILED: tl.constexpr):
    """The loads of rows n0 .. n0 + 15 (Note [transposed lane map]): this lane's word of its 4 rows of
    W (byte word_byte of each row, in row order or tiled: tiled_pair), the absmax entry of the row
    whose scale it decodes (with that row and block), and g at its rows (2t, 2t+1) and (2t+8, 2t+9)
    for rows gid (and gid + 8) of g; even N keeps each g pair in its row."""
    rows = (n0 + 2 * t, n0 + 2 * t + 1, n0 + 2 * t + 8, n0 + 2 * t + 9)
    if TILED:  # n0 % 16 == 0: rows r and r + 8 of a band
        w0, w8 = tiled_pair(packed_ptr, n0, 2 * t, word_byte, K, BLOCKSIZE)
        w1, w9 = tiled_pair(packed_ptr, n0, 2 * t + 1, word_byte, K, BLOCKSIZE)
        words = (w0, w1, w8, w9)
    else:
        words = ()
        for i in tl.static_range(4):
            words = words + (_load_b32(packed_ptr.to(tl.int64) + tl.minimum(rows[i], N - 1).to(tl.int64) * (K // 2)
                                       + word_byte),)
    row = n0 + my_offset
    block = tl.minimum(row, N - 1) * (K // BLOCKSIZE) + block_col
    g_lo = g_ptr.to(tl.int64) + tl.minimum(rows[0], N - 2) * 2
    g_hi = g_ptr.to(tl.int64) + tl.minimum(rows[2], N - 2) * 2
    gs = (_load_b32(g_lo + g_m * 2), _load_b32(g_hi + g_m * 2))
    if M_TILES == 2:
        gs = gs + (_load_b32(g_lo + g8_m * 2), _load_b32(g_hi + g8_m * 2))
    return words, (tl.load(absmax_ptr + block), block, row), gs


@triton.jit
def _group_math(acc, acc8, loaded, nested_absmax_ptr, nested_code_ptr, shift, planes, t, N, M_TILES: tl.constexpr,
                DOUBLE_QUANT: tl.constexpr):
    """acc (4 tiles x C of rows 0-7 of g) and acc8 (rows 8-15, M_TILES 2) += one group of 16 rows."""
    words, decode, gs = loaded
    entry, block, row = decode
    p0, p1, p2, p3, p4, p5, p6, p7 = planes
    pairs = ()
    for i in tl.static_range(4):
        pairs = pairs + (_pairs(words[i], p0, p1, p2, p3, p4, p5, p6, p7),)
    mine = tl.where(row < N, _scale(entry, block, nested_absmax_ptr, nested_code_ptr, shift, DOUBLE_QUANT), 0.0)
    s0 = _shuffle(mine, t)  # lanes 4 gid' + t hold the scales of the rows gid' = 0..3 of this t
    s1 = _shuffle(mine, 4 + t)
    s2 = _shuffle(mine, 8 + t)
    s3 = _shuffle(mine, 12 + t)
    b0 = _scaled_pair(gs[0], s0, s1)  # Note [scales in g]
    b1 = _scaled_pair(gs[1], s2, s3)
    if M_TILES == 2:
        b80 = _scaled_pair(gs[2], s0, s1)
        b81 = _scaled_pair(gs[3], s2, s3)
    z = 0.0
    new_acc = ()
    new_acc8 = ()
    for j in tl.static_range(4):
        a0, a1 = _along_n(pairs[0][j], pairs[1][j])  # rows gid, gid + 8 of tile j at slots 2t, 2t + 1
        a2, a3 = _along_n(pairs[2][j], pairs[3][j])  # the same at slots 2t + 8, 2t + 9
        c0, c1, c2, c3 = _mma(a0, a1, a2, a3, b0, b1, acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3],
                              False)
        new_acc = new_acc + (c0, c1, c2, c3)
        if M_TILES == 2:
            d0, d1, d2, d3 = _mma(a0, a1, a2, a3, b80, b81, acc8[4 * j], acc8[4 * j + 1], acc8[4 * j + 2],
                                  acc8[4 * j + 3], False)
            new_acc8 = new_acc8 + (d0, d1, d2, d3)
        else:
            new_acc8 = new_acc8 + (z, z, z, z)
    return new_acc, new_acc8


@triton.jit
def _add_global(address, value, valid):
    """Atomically add float32 `value` at byte `address` (int64) where `valid` != 0; returns a dummy."""
    return tl.inline_asm_elementwise(
        """{
        .reg .pred p;
        setp.ne.b32 p, $3, 0;
        @p red.relaxed.gpu.global.add.f32 [$1], $2;
        mov.b32 $0, 0;
        }""", "=r,l,f,r", [address, value, valid], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _mma_t_kernel(
    g_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_planes_ptr, out32_ptr,
    M, N, K, stride_gm, rows_per_program,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, OFFSET_IS_POINTER: tl.constexpr, M_TILES: tl.constexpr,
    WARPS: tl.constexpr, TILED: tl.constexpr,
):
    pid_col = tl.program_id(0)
    lane, warp = _lane_ids(pid_col)
    gid = lane >> 2
    t = lane & 3
    planes = _lane_planes(code_planes_ptr, lane, False)  # bfloat16 (nf4_mma Note [pair lookup])
    shift = _shift(offset, DOUBLE_QUANT, OFFSET_IS_POINTER)
    first_col = pid_col * 64
    block_col = first_col // BLOCKSIZE
    # This warp's rows: a 16-row-aligned part of the program's rows.
    per_warp = tl.cdiv(tl.cdiv(rows_per_program, 16), WARPS) * 16
    first_row = tl.program_id(1) * rows_per_program + warp * per_warp
    last_row = tl.minimum(tl.minimum(first_row + per_warp, (tl.program_id(1) + 1) * rows_per_program), N)
    word_byte = first_col // 2 + gid * 4  # of each row
    g_m = tl.minimum(gid, M - 1).to(tl.int64) * stride_gm  # B columns: rows gid (and gid + 8) of g
    g8_m = tl.minimum(gid + 8, M - 1).to(tl.int64) * stride_gm
    # The row of this lane's scale decode: its t's rows n0 + {2t, 2t+1, 2t+8, 2t+9}, by gid % 4.
    my_offset = 2 * t + (gid & 1) + 8 * ((gid >> 1) & 1)
    z = 0.0
    acc = (z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z)  # tiles 0-3: C of column tile 0 (rows of g 0-7)
    acc8 = acc  # column tile 1 (rows of g 8-15), M_TILES 2
    for n0 in range(first_row, last_row, 16):
        loaded = _group_loads(n0, packed_ptr, word_byte, g_ptr, g_m, g8_m, absmax_ptr, my_offset, block_col, N, K, t,
                              BLOCKSIZE, M_TILES, TILED)
        acc, acc8 = _group_math(acc, acc8, loaded, nested_absmax_ptr, nested_code_ptr, shift, planes, t, N, M_TILES,
                                DOUBLE_QUANT)
    # C of tile j: rows gid (column 8 gid + 2j of the program's) and gid + 8 (the next column) of
    # out.T, columns 2t, 2t + 1 (rows of out). The warps' sums meet in shared memory (nf4_mma's Note
    # [epilogue]), then one float32 atomic add per output of the program (not one per warp).
    M_PAD: tl.constexpr = 8 * M_TILES
    base = _partials_base(pid_col, WARPS * M_PAD * 64)  # (warp, row of out, column) float32
    mine_at = base + warp * (M_PAD * 64 * 4)
    for j in tl.static_range(4):
        col = 8 * gid + 2 * j
        for h in tl.static_range(2):  # columns col, col + 1
            _shared_store(mine_at + ((2 * t) * 64 + col + h) * 4, acc[4 * j + 2 * h])
            _shared_store(mine_at + ((2 * t + 1) * 64 + col + h) * 4, acc[4 * j + 2 * h + 1])
            if M_TILES == 2:
                _shared_store(mine_at + ((2 * t + 8) * 64 + col + h) * 4, acc8[4 * j + 2 * h])
                _shared_store(mine_at + ((2 * t + 9) * 64 + col + h) * 4, acc8[4 * j + 2 * h + 1])
    tl.debug_barrier()
    tid = warp * 32 + lane
    for i in tl.static_range((64 * M_PAD + 32 * WARPS - 1) // (32 * WARPS)):
        o = tl.minimum(tid + i * (32 * WARPS), 64 * M_PAD - 1)
        col = o % 64
        m = o // 64
        y = 0.0
        for w in tl.static_range(WARPS):
            y += _shared_load(base + ((w * M_PAD + m) * 64 + col) * 4)
        valid = (tid + i * (32 * WARPS) < 64 * M_PAD) & (m < M)
        _add_global(out32_ptr.to(tl.int64) + (m.to(tl.int64) * K + first_col + col) * 4, y, valid.to(tl.int32))


class MmaTConfig(NamedTuple):
    """A launch of the transposed kernel, timed per shape (mma_gemv_t)."""
    warps: int          # warps per program, each taking a part of its rows
    rows_per_warp: int  # rows of W per warp (a multiple of 16), which sets the programs along N


# Two groups of 16 rows per iteration, all loaded before the math, were no faster (run 75).
MMA_T_CONFIGS = [MmaTConfig(w, r) for w in (4, 8) for r in (64, 128, 256, 512)]
_CHOSEN: dict[tuple, MmaTConfig] = {}
_MMA_T = DirectLaunch(_mma_t_kernel)


def _launch(g2d: torch.Tensor, weight: NF4Weight, out32: torch.Tensor, config: MmaTConfig) -> None:
    m, n, k = g2d.shape[0], weight.n_rows, weight.n_cols
    rows_per_program = config.warps * config.rows_per_warp
    grid = (k // COLUMNS, triton.cdiv(n, rows_per_program))
    m_tiles = 1 if m <= 8 else 2
    _MMA_T(grid, (
        g2d, weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, weight.offset,
        weight.code_planes, out32, m, n, k, g2d.stride(0), rows_per_program,
        # BLOCKSIZE, DOUBLE_QUANT, OFFSET_IS_POINTER, M_TILES, WARPS, TILED
        weight.blocksize, weight.double_quant, weight.offset_is_pointer, m_tiles, config.warps, weight.tiled),
        num_warps=config.warps)


def mma_gemv_t(g2d: torch.Tensor, weight: NF4Weight, config: MmaTConfig | None = None) -> torch.Tensor:
    """(M, K) = g2d (M, N) @ W in g2d's dtype (bfloat16) for 1 <= M <= 16, g2d's rows on 4
    bytes, and mma_t_fits(W). config: None times MMA_T_CONFIGS once per shape (CUDA-graph timing,
    kernels/launch.py) and keeps the fastest; the first with KERNELS_TUNE=0."""
    m = g2d.shape[0]
    out32 = torch.zeros((m, weight.n_cols), dtype=torch.float32, device=g2d.device)
    if config is None:
        key = (m > 8, weight.n_rows, weight.n_cols, weight.blocksize, weight.double_quant, g2d.device, weight.tiled)
        config = choose_config(_CHOSEN, key, lambda: MMA_T_CONFIGS, lambda: MMA_T_CONFIGS[0],
                               lambda c: _launch(g2d, weight, torch.zeros_like(out32), c))
    _launch(g2d, weight, out32, config)
    return out32.to(g2d.dtype)


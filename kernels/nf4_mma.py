"""Small-M NF4 matmul on the tensor cores: y = x @ W.T for M <= 64 rows of x (decode), W read once.

    for each 16 ROW_TILES rows of W (a program; or TILES of them in turn, Note [tiles per program]),
    its warps splitting K:
        for each group of 32 VEC columns of K in this warp's part, each 16-row tile of the program:
            words   = this lane's VEC 32-bit words of rows g and g + 8      one load each (Note [lane map]),
                                                                           one for both from tiled codes
                                                                           (kernels/nf4_tiles.py Note [tiled codes])
            A       = bfloat16 pairs of the codes' values                  byte permutes (Note [pair lookup]),
                                                                           a share from a table (Note [pair table])
            for each 8 rows of x (Note [column tiles]):
                tmp   = sum over the group of mma.m16n8k16(A, x fragment)  no scale yet: one block
                acc  += tmp * scale[row, block]                             float32, per row and block
        partial sums of the warps -> shared memory, a barrier, summed, (+ bias), stored as x's dtype

The kernel is written per thread: Triton scalars hold each lane's own values (the lane id comes
from PTX %laneid), and the loads, the mma and the partial sums' stores and loads are inline PTX,
so no Triton layout conversion (shared memory, barriers) sits in the loop, and each weight costs
~20 / 8 byte-permute and logic instructions plus 1/8 of an mma: 3.5 SASS instructions per weight in
the loop (sm_90 compile, blocksize 64, 4 groups per iteration), against ~7 for the FMA kernel of
kernels/nf4_gemv.py (lookup, one FFMA per weight, x converted per row, x and the scales through
shared memory). In an iteration the warp's next words are already loading (Note [fetch ahead])
and a quad shares its scale decodes (Note [shared scales]). A warp may cover two 16-row tiles
with the same x fragments (Note [row tiles]), and the warps' sums meet in shared memory (Note
[epilogue]). At M <= 8 some configs look up a share of the words in a byte -> pair table in shared
memory instead, to take work off the ALU pipe that the permutes saturate (Note [pair table]). At
M = 16 some load x's fragments an iteration ahead too (Note [x ahead]).

Note [fetch ahead]
    In the PTX, each iteration issues the next one's loads before its own math; ptxas moves them to
    the end of the loop body (seen in the sm_90 SASS of every variant tried), so a word arrives ~40
    instructions before its first byte permute and other warps must hide the DRAM latency. DEPTH 2
    loads two iterations ahead: ptxas still issues them at the end of the body, but their use is a
    whole iteration later, for ~24 more registers (two loaded iterations live). H100 (runs 66-68):
    at M = 16, 11.1 -> 9.9 us on 4096 x 4096 and 26.2 -> 22.3 on 4096 x 14336; at M = 1 no gain;
    both depths are timed per shape. Not kept: a prefetch.global.L2 of the iteration after next
    (72 -> 66 us on 28672 x 8192, M = 1, in one build, gone in the next), the L2::256B
    prefetch-size hint on the loads (slower everywhere), a warp barrier after the loads (ptxas
    makes it a NOP and still moves them).

Note [what limits it]
    Nsight Compute on the H100 (28672 x 8192, M = 1): the ALU pipe, which runs the byte permutes
    and logic ops at half the FMA pipe's rate, is 70% busy and the issue slots 47%; DRAM is at 47%.
    The ~20 ALU instructions per word are the lookup itself. Tried and measured, not kept (runs
    36-38): capping registers at 80 (6 warps per scheduler instead of 5) changed nothing; a table
    of byte -> bfloat16 pair in shared memory, one copy per lane (32 KB, conflict-free), cuts the
    loop's ALU work 4x (3.5 -> 2.3 instructions per weight) but then the L1/shared pipe saturates
    (the MIO queue stalls 34% of cycles: 4 table loads per word, and the W loads, which touch 8
    rows each): 77 against 72 us; taking half the rows from each lookup: 76 us, L1 75% busy.
    So only a share of the words takes that table (Note [pair table]). H200, run 130 (28672 x 8192,
    M = 1, without the table): ALU pipe 79% busy, "math pipe throttle" the first stall reason, L1
    wavefronts 56%, DRAM 33%: the lookup's ALU work is still the limit there. With the table (H100,
    run 139, 8192 x 8192, 3/4 of the words) ptxas gives the 4-warp program 127 registers (72
    without), so 4 programs fit an SM instead of 7; the L1 data pipe is then 72% busy, the ALU 38%,
    and the warps wait on the MIO queue and on the table's loads. A register cap of 96 (5 programs
    per SM, no spills) was slower on every shape (run 140), so ptxas keeps its choice. Of those L1
    wavefronts the W loads were ~64 of ~190 per iteration (each load touching 8 rows); tiled codes
    (kernels/nf4_tiles.py Note [tiled codes]) make them ~16: 10-17% less time at M = 1, 5-17% at M = 16
    (run 151).

Note [lane map]
    mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"): lane = 4 g + t holds A at rows g
    and g + 8 and K slots {2t, 2t+1} (registers a0, a1) and {2t+8, 2t+9} (a2, a3), B (x.T) at
    the same K slots and column g, and C at rows g, g + 8 and columns 2t, 2t + 1. The product sums
    over the 16 slots, so any assignment of K positions to slots gives y, as long as A and B use
    the same one: lane t's slots are 4 consecutive columns of one 32-bit word of codes (word j
    holds columns 8j..8j+7 of its row), half h of the word feeding the mma of half h. Lane t of a
    quad reads words t VEC .. t VEC + VEC - 1 of a group of 4 VEC words (32 VEC columns), so each
    mma covers 32 VEC consecutive columns: within one block as long as 32 VEC <= blocksize, which
    is why the scale can multiply the mma's sum (post-scaling, float32) instead of every weight.
    VEC = min(4, blocksize // 32): blocksize 64 (QLoRA's) reads 8 bytes per lane per row.

Note [epilogue]
    The warps of a program hold partial sums of the same rows of y.T over their parts of K. Each
    stores its accumulators into the program's (warp, column, row) float32 array in shared memory
    (KSPLIT x 8 M_TILES x ROWS, 1-32 KB, a static .shared array declared in PTX), then after one
    barrier every thread sums the KSPLIT partials of one or more outputs, in warp order, adds the
    bias and stores the output rounded to x's dtype. Before run 121 the partials went to a scratch
    tensor in global memory (L2) and back through a Triton load and reduction: one more L2 round
    trip and a second barrier per program, and a torch.empty per call. At M = 1 the shared sums
    were 13-27% faster on every benchmark shape (4096 x 4096: 11.6 -> 8.5 us; 28672 x 8192: 71.1 ->
    62.0); at M = 16 they were 1-2% faster on three shapes and 6% slower on two (4096 x 4096,
    4096 x 14336), with the same loop SASS and fewer registers (not explained), so M > 8 times both
    epilogues.
    kernels/nf4_mma_t.py sums its warps the same way (run 127: 1-7% faster than its scratch). Tried
    with it, not kept: an L1 prefetch of the next iteration's x (prefetch.global.L1 by each quad)
    at M = 16, 3-26% slower with either epilogue. Nor kept: only column 0 of the partials at M = 1
    (2 KB instead of up to 16 KB; run 129, H200): the same times by graph replay and by do_bench.

Note [row tiles]
    Each lane loads its x fragment (16 bytes per row of x and 8 weights of a row pair) from L1 or
    L2, not from DRAM, but at M = 16 those loads move 4x the bytes of W, and the programs' x reads
    miss L1 often enough to cost a quarter of the time: 28672 x 8192 took 94.6 us with 16 distinct
    rows of x against 74.0 with one row read 16 times (stride 0), the same mmas. ROW_TILES 2 lets a
    warp multiply the same x fragments by two 16-row tiles of W, halving x's traffic per weight, for
    more registers (138 against 78 at UNROLL 4). Measured in one process (H100): 28672 x 8192,
    M = 16: 95.2 -> 78.2 us; 8192 x 8192: 31.4 -> 26.2; M = 1 unchanged (71.2 / 71.3 and 25.7 /
    25.0) at best, though one tile alone became slower with this code (76.9 against 71.2 us, the
    same loop SASS; benchmarks/RESULTS.md run 58). Four tiles were slower (more registers, fewer
    programs). One and two tiles are timed per shape. x in fragment order (each 16-byte load of a
    warp reading 512 contiguous bytes, half of x's L1 wavefronts) gained nothing at M = 16 (run 130,
    H200, x reordered outside the timing), and one row of x read 16 times only 5-10%: x's traffic is
    no longer most of what M = 16 costs over M = 1.

Note [tiles per program]
    A program may take TILES consecutive tiles of 16 ROW_TILES rows, one after the other, instead of
    one: its warps keep their parts of K, fill the pair table once, and issue the next tile's first
    loads in the current tile's last iteration (before its math, its sums and their barrier), so the
    program's loads stay in flight across the tiles; a second barrier after the sums frees the shared
    partials for the next tile. It serves shapes with many short rows: 14336 x 4096 at M = 1 ran its
    best single tiles as 896 programs of 4 warps, 4 iterations each, at 4 programs per SM (1.7 waves,
    each program filling its own table). H100, graph replay, L2 cleared (runs 169-170), the best of
    the timed set against the best with 2, 3 or 4 tiles: M = 1 14336 x 4096 16.8-17.1 -> 16.1-16.2 us
    ((4, 4, 1) with 3/4 of the words from the table, 2 tiles), 28672 x 8192 52.0 -> 50.9 (4 tiles); on
    4096 x 4096, 8192 x 8192 and 4096 x 14336 fewer programs only lost (7.2 -> 9.0 us, 16.5 -> 18.9,
    15.3 -> 20.9), which the tuning leaves out. At M = 16 14336 x 4096 went from 22.4 to 26.9 us, so
    only M <= 8 times it. A graphed 8B decoding step: 7.21 -> 7.18 ms (run 175). The sums and outputs
    are those of one tile per program, bit for bit.

Note [x ahead]
    Each lane's x fragments used to be loaded in the iteration that uses them (Note [column tiles]), so
    every iteration waited on them: mostly L1 or L2 hits, but at M = 16 the programs of the short-K
    shapes run few warps per SM (136 registers for (8, 2, 2) with the table: one program of 8 warps),
    and Nsight Compute had them stalled on loads more than on anything else (H100, 2026-11-24, run 189:
    4096 x 4096, 2.3 cycles of "long scoreboard" per issued instruction, 8 warps per SM, issue slots
    31% busy). With the x loads replaced by values made from their addresses (no x at all; run 194)
    the best of 13 configs took 4096 x 4096 from 8.94 to 7.99 us, 14336 x 4096 from 21.65 to 17.79 and
    8192 x 8192 from 20.62 to 17.00. X_AHEAD loads an iteration's x fragments with its words, one
    iteration ahead (the first before the table is filled), for UNROLL x M_TILES x 4 VEC more registers
    (the timed M = 16 ones: 123 -> 128, (8, 2, 2) with the table 136 -> 176). H100, graph replay, L2
    cleared (runs 195-197), the timed set's best against the best with x ahead: M = 16 4096 x 4096
    8.76 -> 8.10 us ((8, 2, 1) with half the words from the table), 14336 x 4096 21.35 -> 20.42
    ((4, 2, 1), a quarter), 4096 x 14336 20.07 -> 18.28 ((8, 2, 1), half); 8192 x 8192 and 28672 x 8192
    kept their configs without it (their fastest with x ahead: 21.4 and 67.2 us against 20.5 and 63.8).
    At M = 1 it won nowhere (7.23 -> 7.65 us on 4096 x 4096 at best; run 195). Register caps that would
    fit more programs per SM (96, 80) spilled and lost 15-75% (run 198). The sums are those of the same
    config without it, bit for bit. Only with DEPTH 1 and up to 16 rows of x: above, the fragments of
    4 or 8 column tiles would take 64-128 more registers, and some launches failed (run 199).

Note [column tiles]
    The mma's 8 columns are 8 rows of x (y.T = W @ x.T); M rows take column_tiles(M) = 1, 2, 4 or 8
    tiles (M rounded up to 8, 16, 32, 64), each multiplying the same A fragments, so a word's lookup
    is shared by all of them: at M = 64 a weight costs 1/64 of a lookup and 1/8 of an mma per row of
    x. Each tile's x fragment is loaded where it is used (with one row tile), and its 4 accumulators
    per row tile stay live: 8 tiles hold 32 per thread. ptxas spills above 16 groups x row tiles x
    column tiles per iteration (sm_90 compiles: 8 tiles at 4 groups per iteration use 255 registers
    and spill, at 2 groups 182), so _timed_configs keeps to that; the partial sums of 8 tiles (64
    columns) fit in shared memory only up to 8 warps, and untimed_config falls back to scratch.
    Above M = 16 the dispatch took W dequantized to bf16 and cuBLAS before, which writes the weight
    in bf16 and reads it back: 0.46-0.65x of torch's bf16 product at M = 32 and 64 (H100, graph
    replay, run 143), against 1.55-1.76x at M = 32 (run 144; bitsandbytes 0.41-0.74x) and 0.90-1.05x
    at M = 64 with x in fragment order (run 146, Note [x fragments]; bitsandbytes 0.41-0.49x).

Note [x fragments]
    Above 16 rows the x fragments are most of an iteration's loads, and each 16-byte load of a warp
    in x's row order touches 8 rows of x (8 L1 wavefronts for 512 bytes); Nsight Compute on the
    H100 (run 145) had the L1 data pipe 80% busy at M = 64 with 8 warps per SM waiting on loads.
    So for 8 column tiles (M = 33..64) the launch first copies x into fragment order (x_fragments:
    a copy of x, zero rows up to 64 added by one more below M = 64), where the 32 lanes' 16 bytes of
    one load are 512 consecutive bytes. H100, graph replay, M = 64 (run 146 against run 144):
    4096 x 4096 20.7 -> 19.3 us, 14336 x 4096 68.5 -> 56.7, 4096 x 14336 62.2 -> 51.5, 8192 x 8192
    69.2 -> 56.8, 28672 x 8192 211.6 -> 180.4 (0.90-1.05x of torch's bf16 product instead of
    0.75-0.88x). At M = 32 the copy costs about what it saves (4096 x 4096 11.6 -> 13.5 us, 28672 x
    8192 107.6 -> 104.7, the others within 6%), and at M <= 16 fragment order gained nothing (run
    130, H200), so x stays in its rows up to 32.

Note [pair lookup]
    The 16 code values in bfloat16 (or float16 for float16 x) are split into a low-byte and a
    high-byte plane of 16 bytes, four registers each (NF4Weight.code_planes rows 16-23, 0-7). A
    word's 8 nibbles, as prmt selectors (n & 7), pick 4 low bytes from entries 0-7 and 4 from 8-15
    per prmt, blended by bit 3 of each nibble (lop3 with a byte mask made by one more prmt), the
    same for the high bytes; one prmt per pair then interleaves low and high bytes into the mma's
    16-bit pairs. 21 instructions per word, 8 weights (the shift for the masks runs on the FMA pipe, the
    other 20 on the ALU pipe). The values are the code rounded to
    bfloat16 (2^-9 relative; bitsandbytes rounds the dequantized weight to bfloat16 as well).

Note [pair table]
    The same pairs from a table in shared memory: per byte value b, the pair (code[b >> 4],
    code[b & 15]), once per lane (entry (b, lane) at byte 128 b + 4 lane: a warp's 32 loads hit 32
    banks whatever the bytes; 32 KB per program). The program's warps write it from the permute
    lookup before the loop, after issuing their first loads (Note [first loads]): one lookup gives
    the pairs of 4 byte values, 4 lookups per lane at KSPLIT 4. A word's 4 pairs then cost 3 byte
    permutes and a shift (ALU pipe), 4 address multiply-adds (FMA pipe) and 4 shared loads (MIO),
    against ~20 ALU instructions. Only the first TABLE_QUARTERS / 4 of a row tile's 2 VEC words per
    group take the table, so the two pipes share the lookups (all of them saturated the MIO pipe,
    runs 43-45). In the loop SASS (sm_90, M = 1, 4 warps, 4 groups per iteration) 3/4 of the words
    through the table cut the ALU-pipe instructions from 354 to 157 per 16 words, the loop from 453
    to 343 instructions.
    Timed alone at M = 1, the best config with 3/4 or 4/4 of the words from the table beat the best
    without: H100, run 115 (before the shared sums), by up to 13% (4096 x 14336 23.4 -> 20.7 us);
    H200, runs 131 and 136, by 5-17% on the five benchmark shapes (8192 x 8192 21.9 -> 18.8,
    4096 x 14336 19.2 -> 16.8, 28672 x 8192 60.5 -> 56.3) and by -5% to +9% on Llama-3.2-1B's. At
    M = 16, where x's fragments add MIO loads, it won nowhere (run 115), so only M <= 8 times the
    table configs, but for three: with tiled codes (8, 2, 2) with the whole table took 4096 x 4096
    from 9.4 to 8.9 us (run 154; no other shape gained), and with a quarter of the words from the
    table (8, 2, 2) took 8192 x 8192 from 21.9 to 20.3 us and (4, 2, 1) 14336 x 4096 from 21.7 to
    21.3 (run 185; 1-3 quarters on five loops tried), so 8 < M <= 16 times those too.
    In a decoding step (H200, GPU time of back-to-back replays of the captured step, runs 133 and
    136): 1B 2.83-2.85 against 2.86-2.90 ms, 8B 7.32-7.41 against 7.47-7.54. The eleventh session
    had measured graphed decoding 1.3x slower with the table, by wall time per generated token,
    which includes the host's work for every token; that measure spread over 2.3-4.5 ms/token for
    one config in run 132, so it no longer judges a kernel.
    With the shared sums the table must leave room for the partials, KSPLIT x 8 M_TILES x ROWS
    words, within 48 KB of static shared memory (shared_bytes; every timed config fits).

Needs blocksize % 32 == 0 and K % blocksize == 0 (rows hold whole blocks), 16-bit x; others
take kernels/nf4_gemv.py. The CPU interpreter cannot run it (PTX, per-lane semantics): it is
compiled for sm_90 in CI and checked against the reference on the GPU.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.direct_launch import DirectLaunch
from kernels.launch import choose_config
from kernels.nf4_gemv import prmt_lookup
from kernels.nf4_tiles import NF4Weight, words_per_lane

__all__ = ["mma_gemv", "MMA_M_MAX", "mma_fits", "MmaConfig", "MMA_CONFIGS", "MMA_CONFIGS_M8",
           "MMA_TABLE_CONFIGS", "MMA_TABLE_CONFIGS_M16", "untimed_config", "shared_bytes", "STATIC_SHARED_MAX",
           "column_tiles"]

MMA_M_MAX = 64  # rows of x: up to 8 column tiles of 8 (Note [column tiles])


def mma_fits(blocksize: int, n_cols: int, packed_address: int = 0) -> bool:
    """Rows of W hold whole blocks of a multiple of 32 columns (Note [lane map]) and the packed codes
    start on 16 bytes (the kernel reads them up to 16 bytes at a time)."""
    return blocksize % 32 == 0 and n_cols % blocksize == 0 and packed_address % 16 == 0


@triton.jit
def _lane_ids(anything):
    """(lane, warp) of this thread; `anything` is an unused operand."""
    lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [anything], dtype=tl.int32, is_pure=True,
                                     pack=1)
    tid = tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [anything], dtype=tl.int32, is_pure=True,
                                    pack=1)
    return lane, tid >> 5


@triton.jit
def _load_words(address, VEC: tl.constexpr):
    """VEC (1, 2 or 4) 32-bit words at byte `address` (int64, 4 VEC-aligned), streamed past L1;
    the words beyond VEC are 0."""
    if VEC == 4:
        w0, w1, w2, w3 = tl.inline_asm_elementwise(
            "ld.global.nc.L1::no_allocate.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [address],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    elif VEC == 2:
        w0, w1 = tl.inline_asm_elementwise(
            "ld.global.nc.L1::no_allocate.v2.b32 {$0, $1}, [$2];", "=r,=r,l", [address],
            dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        w2 = w0 * 0
        w3 = w0 * 0
    else:
        w0 = tl.inline_asm_elementwise("ld.global.nc.L1::no_allocate.b32 $0, [$1];", "=r,l", [address],
                                       dtype=tl.int32, is_pure=True, pack=1)
        w1 = w0 * 0
        w2 = w0 * 0
        w3 = w0 * 0
    return w0, w1, w2, w3


@triton.jit
def _load_tiled(address, VEC: tl.constexpr):
    """This lane's 8 VEC bytes of a band's group of tiled codes at `address` (kernels/nf4_tiles.py Note
    [tiled codes]): VEC words of row g, then VEC of row g + 8, as two 4-tuples padded with zeros."""
    if VEC == 1:
        a0, b0, z, _ = _load_words(address, 2)
        return (a0, z, z, z), (b0, z, z, z)
    elif VEC == 2:
        a0, a1, b0, b1 = _load_words(address, 4)
        z = a0 * 0
        return (a0, a1, z, z), (b0, b1, z, z)
    else:
        return _load_words(address, 4), _load_words(address + 16, 4)


@triton.jit
def _load_x16(address):
    """16 bytes (4 pairs of 16-bit x values) at byte `address` (int64, 16-aligned)."""
    return tl.inline_asm_elementwise("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [address],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


# Selectors s = nibbles & 7 (low half of the word: elements 1, 0, 3, 2 in prmt bytes 0..3; high half:
# 5, 4, 7, 6). Blend masks: byte k = 0xFF where bit 3 of nibble k is set, by prmt's sign mode
# (selector bit 3: the chosen byte's top bit, replicated): a high nibble's bit 3 is its byte's
# top bit, a low nibble's is the top bit of that byte of w << 4. lop3 0xD8 is (l0 & ~m) | (l1 & m).
# Pairs: bytes (lo e0, hi e0, lo e1, hi e1) = prmt 0x4051 of (wl, wh), (e2, e3) = 0x6273.
_PAIR_VALUES = """
    prmt.b32 ${e0}, wl, wh, 0x4051;
    prmt.b32 ${e1}, wl, wh, 0x6273;"""
_PAIR_ASM = tl.constexpr("""{
    .reg .b32 s, sb, w4, ma, mb, l0, l1, h0, h1, wl, wh;
    and.b32 s, $4, 0x77777777;
    shr.u32 sb, s, 16;
    shl.b32 w4, $4, 4;
    prmt.b32 ma, $4, w4, 0x9D8C;
    prmt.b32 mb, $4, w4, 0xBFAE;""" + prmt_lookup("s", "ma", 5) + _PAIR_VALUES.format(e0=0, e1=1)
                         + prmt_lookup("sb", "mb", 5) + _PAIR_VALUES.format(e0=2, e1=3) + "\n}")


@triton.jit
def _pairs(word, p0, p1, p2, p3, p4, p5, p6, p7):
    """The 8 codes of a word as 4 registers of 16-bit pairs (elements (0, 1), (2, 3), (4, 5), (6, 7))."""
    return tl.inline_asm_elementwise(_PAIR_ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
                                     [word, p0, p1, p2, p3, p4, p5, p6, p7],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _table_base(anything):
    """The shared-window address of the pair table (declared once per kernel: this must be called
    once); `anything` is an unused operand."""
    return tl.inline_asm_elementwise(
        """{
        .shared .align 16 .b32 nf4_pair_table[8192];
        mov.u32 $0, nf4_pair_table;
        }""", "=r,r", [anything], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _table_store(at, pair):
    """The same pair into 4 lanes' copies at shared address `at` (16-aligned); returns a dummy."""
    return tl.inline_asm_elementwise(
        """{
        st.shared.v4.b32 [$1], {$2, $2, $2, $2};
        mov.b32 $0, 0;
        }""", "=r,r,r", [at, pair], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _fill_table(base, lane, warp, planes, KSPLIT: tl.constexpr):
    """The program's warps write the table, then wait for each other. A lane looks up one run of four
    byte values (4 q .. 4 q + 3: pair k of _pairs is that of byte k) and stores each of its four pairs
    into its 16 bytes of that value's 128 (the copies of lanes 4 c .. 4 c + 3, c = lane % 8): a warp
    covers 4 of the 64 runs per step (16 steps shared by the KSPLIT warps), and the 8 lanes of a run
    fill all 32 banks."""
    tl.static_assert(16 % KSPLIT == 0, "the pair table is filled by 1, 2, 4, 8 or 16 warps")
    p0, p1, p2, p3, p4, p5, p6, p7 = planes
    chunk = lane & 7
    for j in range(16 // KSPLIT):
        first = 4 * (4 * (j * KSPLIT + warp) + (lane >> 3))  # the run's first byte value
        pair0, pair1, pair2, pair3 = _pairs(first * 0x01010101 + 0x03020100, p0, p1, p2, p3, p4, p5, p6, p7)
        at = base + first * 128 + chunk * 16
        _table_store(at, pair0)
        _table_store(at + 128, pair1)
        _table_store(at + 256, pair2)
        _table_store(at + 384, pair3)
    tl.debug_barrier()


_TABLE_ASM = tl.constexpr("""{
    .reg .b32 b0, b1, b2, b3;
    prmt.b32 b0, $4, 0, 0x4440;
    prmt.b32 b1, $4, 0, 0x4441;
    prmt.b32 b2, $4, 0, 0x4442;
    shr.u32 b3, $4, 24;
    mad.lo.u32 b0, b0, 128, $5;
    mad.lo.u32 b1, b1, 128, $5;
    mad.lo.u32 b2, b2, 128, $5;
    mad.lo.u32 b3, b3, 128, $5;
    ld.shared.b32 $0, [b0];
    ld.shared.b32 $1, [b1];
    ld.shared.b32 $2, [b2];
    ld.shared.b32 $3, [b3];
}""")


@triton.jit
def _table_pairs(word, lane_table):
    """_pairs through the shared table (Note [pair table]); lane_table = table address + 4 lane."""
    return tl.inline_asm_elementwise(_TABLE_ASM, "=r,=r,=r,=r,r,r", [word, lane_table],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


_MMA = "mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32 {{$0, $1, $2, $3}}, {{$4, $5, $6, $7}}, {{$8, $9}}, " \
       "{{$10, $11, $12, $13}};"
_MMA_F16 = tl.constexpr(_MMA.format(t="f16"))
_MMA_BF16 = tl.constexpr(_MMA.format(t="bf16"))


@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, FLOAT16: tl.constexpr):
    """D = A @ B + C, one m16n8k16 with float32 accumulators (Note [lane map])."""
    if FLOAT16:
        asm: tl.constexpr = _MMA_F16
    else:
        asm: tl.constexpr = _MMA_BF16
    return tl.inline_asm_elementwise(asm, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
                                     dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _store2(address, v0, v1, valid):
    """Two float32 at byte `address` (int64, 8-aligned) where `valid` != 0; returns a dummy."""
    return tl.inline_asm_elementwise(
        """{
        .reg .pred p;
        setp.ne.b32 p, $3, 0;
        @p st.global.v2.f32 [$1], {$2, $4};
        mov.b32 $0, 0;
        }""", "=r,l,f,r,f", [address, v0, valid, v1], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _shuffle(value, source):
    """float32 `value` of lane `source` of this warp (every lane of the warp takes part)."""
    return tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=r,r,r",
                                     [value.to(tl.int32, bitcast=True), source], dtype=tl.int32, is_pure=True,
                                     pack=1).to(tl.float32, bitcast=True)


@triton.jit
def _lane_planes(code_planes_ptr, lane, FLOAT16: tl.constexpr):
    """The 8 registers of code-value bytes (Note [pair lookup]) for float16 or bfloat16; each lane reads
    its own copy of the planes, so that ptxas keeps them in per-lane registers."""
    at = code_planes_ptr + (0 if FLOAT16 else 16 * 32) + lane
    return (tl.load(at), tl.load(at + 32), tl.load(at + 2 * 32), tl.load(at + 3 * 32), tl.load(at + 4 * 32),
            tl.load(at + 5 * 32), tl.load(at + 6 * 32), tl.load(at + 7 * 32))


_PARTIALS_DECLARATION = "{{ .shared .align 16 .b32 nf4_mma_partials[{words}]; mov.u32 $0, nf4_mma_partials; }}"
_PARTIALS_256 = tl.constexpr(_PARTIALS_DECLARATION.format(words=256))
_PARTIALS_512 = tl.constexpr(_PARTIALS_DECLARATION.format(words=512))
_PARTIALS_1024 = tl.constexpr(_PARTIALS_DECLARATION.format(words=1024))
_PARTIALS_2048 = tl.constexpr(_PARTIALS_DECLARATION.format(words=2048))
_PARTIALS_4096 = tl.constexpr(_PARTIALS_DECLARATION.format(words=4096))
_PARTIALS_8192 = tl.constexpr(_PARTIALS_DECLARATION.format(words=8192))


@triton.jit
def _partials_base(anything, WORDS: tl.constexpr):
    """Shared-window address of the program's (warp, column, row) float32 partial sums, WORDS of them
    (a power of two from 256 to 8192); declared once per kernel, so called once."""
    if WORDS == 256:
        asm: tl.constexpr = _PARTIALS_256
    elif WORDS == 512:
        asm: tl.constexpr = _PARTIALS_512
    elif WORDS == 1024:
        asm: tl.constexpr = _PARTIALS_1024
    elif WORDS == 2048:
        asm: tl.constexpr = _PARTIALS_2048
    elif WORDS == 4096:
        asm: tl.constexpr = _PARTIALS_4096
    else:
        tl.static_assert(WORDS == 8192)
        asm: tl.constexpr = _PARTIALS_8192
    return tl.inline_asm_elementwise(asm, "=r,r", [anything], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _shared_store(at, value):
    """float32 `value` at shared address `at`; returns a dummy."""
    return tl.inline_asm_elementwise("st.shared.f32 [$1], $2; mov.b32 $0, 0;", "=r,r,f", [at, value],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _shared_load(at):
    """float32 at shared address `at` (after the barrier that follows the stores)."""
    return tl.inline_asm_elementwise("ld.shared.f32 $0, [$1];", "=f,r", [at], dtype=tl.float32, is_pure=False,
                                     pack=1)


_STORE_HALF = """{{
        .reg .pred p;
        .reg .b16 h;
        setp.ne.b32 p, $3, 0;
        cvt.rn.{t}.f32 h, $2;
        @p st.global.b16 [$1], h;
        mov.b32 $0, 0;
        }}"""
_STORE_F16 = tl.constexpr(_STORE_HALF.format(t="f16"))
_STORE_BF16 = tl.constexpr(_STORE_HALF.format(t="bf16"))


@triton.jit
def _store_half(address, value, valid, FLOAT16: tl.constexpr):
    """float32 `value` rounded to float16 or bfloat16 at byte `address` (int64) where `valid` != 0."""
    if FLOAT16:
        asm: tl.constexpr = _STORE_F16
    else:
        asm: tl.constexpr = _STORE_BF16
    return tl.inline_asm_elementwise(asm, "=r,l,f,r", [address, value, valid], dtype=tl.int32, is_pure=False,
                                     pack=1)


@triton.jit
def _shift(offset, DOUBLE_QUANT: tl.constexpr, OFFSET_IS_POINTER: tl.constexpr):
    """The double-quant offset added to every decoded scale, read once."""
    if DOUBLE_QUANT and OFFSET_IS_POINTER:
        return tl.load(offset)
    else:
        return offset


@triton.jit
def _scale(entry, block, nested_absmax_ptr, nested_code_ptr, shift, DOUBLE_QUANT: tl.constexpr):
    """float32 scale of block `block` from its absmax entry (uint8 code with double quant)."""
    if DOUBLE_QUANT:
        return tl.load(nested_code_ptr + entry.to(tl.int32)) * tl.load(nested_absmax_ptr + (block >> 8)) + shift
    else:
        return entry


@triton.jit
def _words(w_at, w8_at, VEC: tl.constexpr):
    """This lane's VEC words of rows g and g + 8 in one group, at byte addresses w_at, w8_at."""
    return (_load_words(w_at, VEC), _load_words(w8_at, VEC))


@triton.jit
def _fetch(w_ats, entry_ats, w_step, VEC: tl.constexpr, UNROLL: tl.constexpr, ROW_TILES: tl.constexpr,
           TILED: tl.constexpr):
    """An iteration's loads, issued one iteration ahead (Note [fetch ahead]): for each of its UNROLL
    groups (w_step bytes apart) and each row tile, the words from w_ats[tile] = (w_at, w8_at) on (tiled
    codes: both rows in one load from w_at); for each row tile, the two absmax entries this lane
    decodes (Note [shared scales]) at entry_ats[tile]."""
    words = ()
    for u in tl.static_range(UNROLL):
        tiles = ()
        for r in tl.static_range(ROW_TILES):
            if TILED:
                tiles = tiles + (_load_tiled(w_ats[r][0] + u * w_step, VEC),)
            else:
                tiles = tiles + (_words(w_ats[r][0] + u * w_step, w_ats[r][1] + u * w_step, VEC),)
        words = words + (tiles,)
    entries = ()
    for r in tl.static_range(ROW_TILES):
        entries = entries + ((tl.load(entry_ats[r][0]), tl.load(entry_ats[r][1])),)
    return words, entries


@triton.jit
def _group(acc, words, x_ats, x_given, scales, planes, lane_table, VEC: tl.constexpr, M_TILES: tl.constexpr,
           FLOAT16: tl.constexpr, ROW_TILES: tl.constexpr, TABLE_WORDS: tl.constexpr, X_FRAGMENTS: tl.constexpr,
           X_AHEAD: tl.constexpr):
    """acc (per row tile, 4 M_TILES float32: C of each column tile) += scale * (one group's mmas): words
    (per row tile, from _words), scales (per row tile, those of its rows g and g + 8), x_ats the byte
    addresses of this lane's x fragments (one per column tile; Note [x fragments]), or with X_AHEAD the
    fragments themselves in x_given (Note [x ahead]). Every row tile multiplies the same x fragments:
    Note [row tiles]."""
    p0, p1, p2, p3, p4, p5, p6, p7 = planes
    xs = ()
    if X_AHEAD:
        xs = x_given
    elif ROW_TILES > 1:  # loaded once for every row tile; with one, each where it is used
        for j in tl.static_range(M_TILES):
            xs = xs + (_x_group(x_ats[j], VEC, X_FRAGMENTS),)
    new_acc = ()
    for r in tl.static_range(ROW_TILES):
        wg, wg8 = words[r]
        sg, sg8 = scales[r]
        pairs = ()
        for v in tl.static_range(VEC):
            if 2 * v < TABLE_WORDS:  # Note [pair table]
                a01, a23, a45, a67 = _table_pairs(wg[v], lane_table)
            else:
                a01, a23, a45, a67 = _pairs(wg[v], p0, p1, p2, p3, p4, p5, p6, p7)
            if 2 * v + 1 < TABLE_WORDS:
                b01, b23, b45, b67 = _table_pairs(wg8[v], lane_table)
            else:
                b01, b23, b45, b67 = _pairs(wg8[v], p0, p1, p2, p3, p4, p5, p6, p7)
            pairs = pairs + ((a01, b01, a23, b23, a45, b45, a67, b67),)
        sums = ()
        for j in tl.static_range(M_TILES):
            if X_AHEAD or ROW_TILES > 1:
                x = xs[j]
            else:
                x = _x_group(x_ats[j], VEC, X_FRAGMENTS)
            z = 0.0
            t0, t1, t2, t3 = z, z, z, z
            for v in tl.static_range(VEC):
                a01, b01, a23, b23, a45, b45, a67, b67 = pairs[v]
                t0, t1, t2, t3 = _mma(a01, b01, a23, b23, x[4 * v], x[4 * v + 1], t0, t1, t2, t3, FLOAT16)
                t0, t1, t2, t3 = _mma(a45, b45, a67, b67, x[4 * v + 2], x[4 * v + 3], t0, t1, t2, t3, FLOAT16)
            sums = sums + (acc[r][4 * j] + t0 * sg, acc[r][4 * j + 1] + t1 * sg, acc[r][4 * j + 2] + t2 * sg8,
                           acc[r][4 * j + 3] + t3 * sg8)
        new_acc = new_acc + (sums,)
    return new_acc


@triton.jit
def _moved(addresses, step, COUNT: tl.constexpr):
    """Each of COUNT addresses moved by `step`."""
    moved = ()
    for j in tl.static_range(COUNT):
        moved = moved + (addresses[j] + step,)
    return moved


@triton.jit
def _iteration(acc, fetched, x_ats, x_given, blocks, sources, nested_absmax_ptr, nested_code_ptr, shift, planes,
               lane_table, VEC: tl.constexpr, UNROLL: tl.constexpr, M_TILES: tl.constexpr, FLOAT16: tl.constexpr,
               DOUBLE_QUANT: tl.constexpr, ROW_TILES: tl.constexpr, TABLE_WORDS: tl.constexpr,
               X_FRAGMENTS: tl.constexpr, X_STEP: tl.constexpr, X_AHEAD: tl.constexpr):
    """UNROLL groups: for each row tile this lane decodes the scales of one group (blocks[tile] of
    rows g and g + 8) and takes the others from its quad (Note [shared scales]); X_STEP: bytes of x
    per group; with X_AHEAD, x_given holds the iteration's x fragments (_x_iteration)."""
    words, entries = fetched
    scales = ()
    for r in tl.static_range(ROW_TILES):
        scales = scales + ((_scale(entries[r][0], blocks[r][0], nested_absmax_ptr, nested_code_ptr, shift,
                                   DOUBLE_QUANT),
                            _scale(entries[r][1], blocks[r][1], nested_absmax_ptr, nested_code_ptr, shift,
                                   DOUBLE_QUANT)),)
    for u in tl.static_range(UNROLL):
        shared = ()
        for r in tl.static_range(ROW_TILES):
            shared = shared + ((_shuffle(scales[r][0], sources[u]), _shuffle(scales[r][1], sources[u])),)
        if X_AHEAD:
            x_group = x_given[u]
        else:
            x_group = ()
        acc = _group(acc, words[u], _moved(x_ats, u * X_STEP, M_TILES), x_group, shared, planes, lane_table, VEC,
                     M_TILES, FLOAT16, ROW_TILES, TABLE_WORDS, X_FRAGMENTS, X_AHEAD)
    return acc


@triton.jit
def _advance(pairs, step, ROW_TILES: tl.constexpr):
    """pairs (per row tile, two addresses or block indices), each moved by `step`."""
    moved = ()
    for r in tl.static_range(ROW_TILES):
        moved = moved + ((pairs[r][0] + step, pairs[r][1] + step),)
    return moved


@triton.jit
def _blocks_at(j, row_blocks, first, VEC: tl.constexpr, UNROLL: tl.constexpr, ROW_TILES: tl.constexpr,
               BLOCKSIZE: tl.constexpr):
    """Per row tile, the blocks of rows g and g + 8 whose scales this lane decodes in iteration j
    (group `first` + j UNROLL, Note [shared scales])."""
    return _advance(row_blocks, (first + j * UNROLL) * (32 * VEC) // BLOCKSIZE, ROW_TILES)


@triton.jit
def _fetch_at(j, w_ats, row_blocks, first, absmax_ptr, VEC: tl.constexpr, UNROLL: tl.constexpr,
              ROW_TILES: tl.constexpr, BLOCKSIZE: tl.constexpr, W_BYTES: tl.constexpr, TILED: tl.constexpr):
    """The loads of iteration j (w_ats: this lane's addresses in iteration 0; W_BYTES per group)."""
    blocks = _blocks_at(j, row_blocks, first, VEC, UNROLL, ROW_TILES, BLOCKSIZE)
    return _fetch(_advance(w_ats, j * (UNROLL * W_BYTES), ROW_TILES), _advance(blocks, absmax_ptr, ROW_TILES), W_BYTES,
                  VEC, UNROLL, ROW_TILES, TILED)


@triton.jit
def _fetch_first(j, w_ats, row_blocks, first, absmax_ptr, safe_ptr, valid, VEC: tl.constexpr, UNROLL: tl.constexpr,
                 ROW_TILES: tl.constexpr, BLOCKSIZE: tl.constexpr, W_BYTES: tl.constexpr, TILED: tl.constexpr):
    """_fetch_at(j, ...) where `valid`; elsewhere the same loads, all from safe_ptr (16-aligned, at least
    8 VEC bytes) and absmax_ptr, whose values are dropped (Note [first loads])."""
    w_at = _advance(w_ats, j * (UNROLL * W_BYTES), ROW_TILES)
    entry_at = _advance(_blocks_at(j, row_blocks, first, VEC, UNROLL, ROW_TILES, BLOCKSIZE), absmax_ptr, ROW_TILES)
    safe = safe_ptr.to(tl.int64)
    w_safe = ()
    entry_safe = ()
    for r in tl.static_range(ROW_TILES):
        w_safe = w_safe + ((tl.where(valid, w_at[r][0], safe), tl.where(valid, w_at[r][1], safe)),)
        entry_safe = entry_safe + ((tl.where(valid, entry_at[r][0], absmax_ptr),
                                    tl.where(valid, entry_at[r][1], absmax_ptr)),)
    return _fetch(w_safe, entry_safe, tl.where(valid, W_BYTES, 0), VEC, UNROLL, ROW_TILES, TILED)


@triton.jit
def _iteration_at(acc, fetched, j, x_ats, row_blocks, first, sources, nested_absmax_ptr, nested_code_ptr, shift,
                  planes, lane_table, VEC: tl.constexpr, UNROLL: tl.constexpr, M_TILES: tl.constexpr,
                  FLOAT16: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_TILES: tl.constexpr, BLOCKSIZE: tl.constexpr,
                  TABLE_WORDS: tl.constexpr, X_FRAGMENTS: tl.constexpr, X_STEP: tl.constexpr):
    """_iteration on the loads of iteration j (x_ats: this lane's x addresses in iteration 0)."""
    return _iteration(acc, fetched, _moved(x_ats, j * (UNROLL * X_STEP), M_TILES), (),
                      _blocks_at(j, row_blocks, first, VEC, UNROLL, ROW_TILES, BLOCKSIZE), sources, nested_absmax_ptr,
                      nested_code_ptr, shift, planes, lane_table, VEC, UNROLL, M_TILES, FLOAT16, DOUBLE_QUANT,
                      ROW_TILES, TABLE_WORDS, X_FRAGMENTS, X_STEP, False)


@triton.jit
def _x_group(at, VEC: tl.constexpr, X_FRAGMENTS: tl.constexpr):
    """This lane's 4 VEC pair registers of x from byte `at` on (a 16-tuple padded with zeros): VEC
    loads of 16 bytes, consecutive in x's rows, 512 bytes apart in fragment order (Note [x fragments])."""
    APART: tl.constexpr = 512 if X_FRAGMENTS else 16
    x0, x1, x2, x3 = _load_x16(at)
    if VEC >= 2:
        x4, x5, x6, x7 = _load_x16(at + APART)
    else:
        x4, x5, x6, x7 = x0 * 0, x0 * 0, x0 * 0, x0 * 0
    if VEC == 4:
        x8, x9, x10, x11 = _load_x16(at + 2 * APART)
        x12, x13, x14, x15 = _load_x16(at + 3 * APART)
    else:
        x8, x9, x10, x11 = x0 * 0, x0 * 0, x0 * 0, x0 * 0
        x12, x13, x14, x15 = x0 * 0, x0 * 0, x0 * 0, x0 * 0
    return (x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)


@triton.jit
def _x_iteration(x_ats, valid, safe_ptr, VEC: tl.constexpr, UNROLL: tl.constexpr, M_TILES: tl.constexpr,
                 X_FRAGMENTS: tl.constexpr, X_STEP: tl.constexpr):
    """An iteration's x fragments, per group and column tile (Note [x ahead]), from x_ats (this lane's
    addresses in the iteration's first group) where `valid`, else all from safe_ptr (x's start: at
    least 16 VEC bytes in rows, 512 VEC in fragment order), whose values are dropped."""
    xs = ()
    for u in tl.static_range(UNROLL):
        group = ()
        for j in tl.static_range(M_TILES):
            group = group + (_x_group(tl.where(valid, x_ats[j] + u * X_STEP, safe_ptr.to(tl.int64)), VEC,
                                      X_FRAGMENTS),)
        xs = xs + (group,)
    return xs


@triton.jit
def _tile_at(tile, packed_ptr, start, g, t, lane, N, K, BLOCKSIZE: tl.constexpr, VEC: tl.constexpr,
             W_BYTES: tl.constexpr, ROW_TILES: tl.constexpr, TILED: tl.constexpr):
    """Per row tile of tile `tile` (Note [tiles per program]): the first blocks of rows g and g + 8,
    and the byte addresses of this lane's words in group `start` (tiled codes, kernels/nf4_tiles.py
    Note [tiled codes]: those of row g, then of row g + 8, 4 VEC bytes on). Rows past N read row
    N - 1; their sums are dropped."""
    ROWS: tl.constexpr = 16 * ROW_TILES
    row_blocks = ()
    w_ats = ()
    for r in tl.static_range(ROW_TILES):
        row_g = tl.minimum(tile * ROWS + 16 * r + g, N - 1)
        row_g8 = tl.minimum(tile * ROWS + 16 * r + g + 8, N - 1)
        row_blocks = row_blocks + ((row_g * (K // BLOCKSIZE), row_g8 * (K // BLOCKSIZE)),)
        if TILED:  # N % 16 == 0: no row past N (a tile past N is never loaded from: _fetch_first)
            w_at = (packed_ptr.to(tl.int64) + (tile * ROW_TILES + r).to(tl.int64) * (8 * K) + start * W_BYTES
                    + lane * (8 * VEC))
            w_ats = w_ats + ((w_at, w_at + 4 * VEC),)
        else:
            w_at = packed_ptr.to(tl.int64) + row_g.to(tl.int64) * (K // 2) + start * W_BYTES + t * (4 * VEC)
            w_ats = w_ats + ((w_at, w_at + (row_g8 - row_g).to(tl.int64) * (K // 2)),)
    return row_blocks, w_ats


@triton.jit
def _mma_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_planes_ptr, bias_ptr,
    scratch_ptr, out_ptr,
    M, N, K, stride_xm, stride_om,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, OFFSET_IS_POINTER: tl.constexpr,
    HAS_BIAS: tl.constexpr, M_TILES: tl.constexpr, FLOAT16: tl.constexpr,
    KSPLIT: tl.constexpr, UNROLL: tl.constexpr, ROW_TILES: tl.constexpr, DEPTH: tl.constexpr,
    SHARED_SUMS: tl.constexpr, TABLE_QUARTERS: tl.constexpr, X_FRAGMENTS: tl.constexpr, TILED: tl.constexpr,
    TILES: tl.constexpr, X_AHEAD: tl.constexpr,
):
    VEC: tl.constexpr = 4 if BLOCKSIZE >= 128 else BLOCKSIZE // 32  # words per lane per row and group (words_per_lane)
    GROUP: tl.constexpr = 32 * VEC  # columns of K per group
    W_BYTES: tl.constexpr = 256 * VEC if TILED else 16 * VEC  # from a group of a row (tiled: 16 rows) to the next
    X_STEP: tl.constexpr = 512 * VEC * M_TILES if X_FRAGMENTS else 64 * VEC  # bytes of x per group
    ROWS: tl.constexpr = 16 * ROW_TILES  # rows of W per tile (and per warp)
    M_PAD: tl.constexpr = 8 * M_TILES
    tl.static_assert(TILES == 1 or DEPTH == 1, "nf4_mma: several tiles per program load one iteration ahead")
    tl.static_assert(not X_AHEAD or (DEPTH == 1 and M_TILES <= 2), "nf4_mma: x ahead: depth 1, up to 16 rows of x")
    program = tl.program_id(0)
    lane, warp = _lane_ids(program)
    g = lane >> 2
    t = lane & 3
    planes = _lane_planes(code_planes_ptr, lane, FLOAT16)
    TABLE_WORDS: tl.constexpr = TABLE_QUARTERS * 2 * VEC // 4  # of a row tile's 2 VEC words per group
    if TABLE_WORDS > 0:
        table = _table_base(program)  # written below, after the first loads (Note [first loads])
        lane_table = table + 4 * lane
    else:
        lane_table = lane
    if SHARED_SUMS:
        base = _partials_base(program, KSPLIT * M_PAD * ROWS)  # Note [epilogue]
    shift = _shift(offset, DOUBLE_QUANT, OFFSET_IS_POINTER)
    n_groups = K // GROUP
    per_warp = tl.cdiv(n_groups, KSPLIT)
    start = tl.minimum(warp * per_warp, n_groups)  # this warp's part of K: groups [start, start + count)
    count = tl.minimum(start + per_warp, n_groups) - start
    # Note [tiles per program]: tiles first_tile .. first_tile + n_mine - 1, one after the other.
    first_tile = program * TILES
    if TILES == 1:
        n_mine = 1
    else:
        n_mine = tl.minimum(TILES, tl.cdiv(N, ROWS) - first_tile)
    row_blocks, w_ats = _tile_at(first_tile, packed_ptr, start, g, t, lane, N, K, BLOCKSIZE, VEC, W_BYTES, ROW_TILES,
                                 TILED)
    # Column tile j: row 8 j + g of x; lanes of columns g >= M read row M - 1 (in x's rows) or padding
    # (fragment order): columns of y that are never stored.
    zeros = ()
    x_starts = ()
    for j in tl.static_range(M_TILES):
        if X_FRAGMENTS:  # Note [x fragments]
            x_starts = x_starts + (x_ptr.to(tl.int64) + start * X_STEP + j * (512 * VEC) + lane * 16,)
        else:
            x_starts = x_starts + (x_ptr.to(tl.int64) + start * X_STEP + t * (16 * VEC)
                                   + tl.minimum(8 * j + g, M - 1).to(tl.int64) * stride_xm * 2,)
        zeros = zeros + (0.0, 0.0, 0.0, 0.0)
    # Note [shared scales]: in an iteration, lane t of a quad decodes the scales of group t % UNROLL
    # (rows g and g + 8, the same for the whole quad) and the quad shuffles them: two double-quant
    # decodes per lane, row tile and iteration instead of 2 UNROLL.
    mine = t % UNROLL
    quad = lane & -4
    if UNROLL == 2:
        sources = (quad, quad + 1)
    else:
        sources = (quad, quad + 1, quad + 2, quad + 3)
    # Note [fetch ahead]: each iteration issues the loads of the iteration DEPTH ahead before its own
    # math, so a warp keeps its loads in flight while it computes; the last DEPTH are peeled off.
    n_iter = count // UNROLL
    # Note [first loads]: the first iteration's loads (the first two with DEPTH 2) are issued before the
    # pair table is written, so that their latency overlaps the table's; a warp with no whole
    # iteration loads from safe places instead and never uses the values. H100, run 117, best
    # configs with the table at M = 1: 2-5% faster on four shapes (4096 x 14336 20.7 -> 20.1 us,
    # 8192 x 8192 23.0 -> 21.8), the same on 14336 x 4096; the others unchanged (outputs bit-identical).
    # With tiled codes ptxas moves the W loads (read-only, .nc) past the table's barrier (sm_90 SASS of
    # (4, 4, 1) with the table, 2026-11-24); made coherent loads with side effects, which stay before
    # it, they gained nothing consistent (run 171: M = 1 -2% to +5% per shape), so they are left so.
    first = start + mine
    if DEPTH == 2:
        current = _fetch_first(0, w_ats, row_blocks, first, absmax_ptr, code_planes_ptr, n_iter > 0, VEC, UNROLL,
                               ROW_TILES, BLOCKSIZE, W_BYTES, TILED)
        following = _fetch_first(tl.maximum(tl.minimum(1, n_iter - 1), 0), w_ats, row_blocks, first, absmax_ptr,
                                 code_planes_ptr, n_iter > 0, VEC, UNROLL, ROW_TILES, BLOCKSIZE, W_BYTES,
                                 TILED)
    else:
        fetched = _fetch_first(0, w_ats, row_blocks, first, absmax_ptr, code_planes_ptr, n_iter > 0, VEC, UNROLL,
                               ROW_TILES, BLOCKSIZE, W_BYTES, TILED)
    if X_AHEAD:  # Note [x ahead]: the first iteration's x with its words
        x_next = _x_iteration(x_starts, n_iter > 0, x_ptr, VEC, UNROLL, M_TILES, X_FRAGMENTS, X_STEP)
    else:
        x_next = ()
    if TABLE_WORDS > 0:
        _fill_table(table, lane, warp, planes, KSPLIT)
    for s in range(n_mine):
        tile = first_tile + s
        if TILES > 1:
            row_blocks, w_ats = _tile_at(tile, packed_ptr, start, g, t, lane, N, K, BLOCKSIZE, VEC, W_BYTES,
                                         ROW_TILES, TILED)
        x_ats = x_starts
        group = start
        acc = ()
        for r in tl.static_range(ROW_TILES):
            acc = acc + (zeros,)
        if DEPTH == 2:
            if n_iter > 0:
                for i in range(n_iter - 2):
                    ahead = _fetch_at(i + 2, w_ats, row_blocks, first, absmax_ptr, VEC, UNROLL, ROW_TILES,
                                      BLOCKSIZE, W_BYTES, TILED)
                    acc = _iteration_at(acc, current, i, x_ats, row_blocks, first, sources, nested_absmax_ptr,
                                        nested_code_ptr, shift, planes, lane_table, VEC, UNROLL, M_TILES, FLOAT16,
                                        DOUBLE_QUANT, ROW_TILES, BLOCKSIZE, TABLE_WORDS, X_FRAGMENTS, X_STEP)
                    current = following
                    following = ahead
                if n_iter >= 2:
                    acc = _iteration_at(acc, current, n_iter - 2, x_ats, row_blocks, first, sources,
                                        nested_absmax_ptr, nested_code_ptr, shift, planes, lane_table, VEC, UNROLL,
                                        M_TILES, FLOAT16, DOUBLE_QUANT, ROW_TILES, BLOCKSIZE, TABLE_WORDS,
                                        X_FRAGMENTS, X_STEP)
                    current = following
                acc = _iteration_at(acc, current, n_iter - 1, x_ats, row_blocks, first, sources, nested_absmax_ptr,
                                    nested_code_ptr, shift, planes, lane_table, VEC, UNROLL, M_TILES, FLOAT16,
                                    DOUBLE_QUANT, ROW_TILES, BLOCKSIZE, TABLE_WORDS, X_FRAGMENTS, X_STEP)
            w_ats = _advance(w_ats, n_iter * (UNROLL * W_BYTES), ROW_TILES)
            x_ats = _moved(x_ats, n_iter * (UNROLL * X_STEP), M_TILES)
            group += n_iter * UNROLL
        elif n_iter > 0:  # DEPTH 1: addresses advanced in place (measured faster at M = 16 than by index)
            blocks = _advance(row_blocks, first * GROUP // BLOCKSIZE, ROW_TILES)
            for _ in range(n_iter - 1):
                current = fetched
                x_current = x_next
                next_block = (group + UNROLL + mine) * GROUP // BLOCKSIZE
                next_blocks = _advance(row_blocks, next_block, ROW_TILES)
                fetched = _fetch(_advance(w_ats, UNROLL * W_BYTES, ROW_TILES),
                                 _advance(next_blocks, absmax_ptr, ROW_TILES), W_BYTES, VEC, UNROLL, ROW_TILES, TILED)
                if X_AHEAD:
                    x_next = _x_iteration(_moved(x_ats, UNROLL * X_STEP, M_TILES), True, x_ptr, VEC, UNROLL, M_TILES,
                                          X_FRAGMENTS, X_STEP)
                acc = _iteration(acc, current, x_ats, x_current, blocks, sources, nested_absmax_ptr, nested_code_ptr,
                                 shift, planes, lane_table, VEC, UNROLL, M_TILES, FLOAT16, DOUBLE_QUANT, ROW_TILES,
                                 TABLE_WORDS, X_FRAGMENTS, X_STEP, X_AHEAD)
                w_ats = _advance(w_ats, UNROLL * W_BYTES, ROW_TILES)
                x_ats = _moved(x_ats, UNROLL * X_STEP, M_TILES)
                group += UNROLL
                blocks = next_blocks
            current = fetched
            x_current = x_next
            if TILES > 1:  # the next tile's first loads, in flight through this tile's last math and sums
                next_blocks, next_w_ats = _tile_at(tile + 1, packed_ptr, start, g, t, lane, N, K, BLOCKSIZE, VEC,
                                                   W_BYTES, ROW_TILES, TILED)
                fetched = _fetch_first(0, next_w_ats, next_blocks, first, absmax_ptr, code_planes_ptr,
                                       s + 1 < n_mine, VEC, UNROLL, ROW_TILES, BLOCKSIZE, W_BYTES, TILED)
                if X_AHEAD:  # the same x as this tile's first iteration
                    x_next = _x_iteration(x_starts, s + 1 < n_mine, x_ptr, VEC, UNROLL, M_TILES, X_FRAGMENTS, X_STEP)
            acc = _iteration(acc, current, x_ats, x_current, blocks, sources, nested_absmax_ptr, nested_code_ptr,
                             shift, planes, lane_table, VEC, UNROLL, M_TILES, FLOAT16, DOUBLE_QUANT, ROW_TILES,
                             TABLE_WORDS, X_FRAGMENTS, X_STEP, X_AHEAD)
            w_ats = _advance(w_ats, UNROLL * W_BYTES, ROW_TILES)
            x_ats = _moved(x_ats, UNROLL * X_STEP, M_TILES)
            group += UNROLL
        for _ in range(count % UNROLL):  # the rest, one group at a time, each lane decoding its own scales
            block = group * GROUP // BLOCKSIZE
            words = ()
            scales = ()
            for r in tl.static_range(ROW_TILES):
                words = words + (_words(w_ats[r][0], w_ats[r][1], VEC),)
                first_g, first_g8 = row_blocks[r]
                scales = scales + ((_scale(tl.load(absmax_ptr + first_g + block), first_g + block, nested_absmax_ptr,
                                           nested_code_ptr, shift, DOUBLE_QUANT),
                                    _scale(tl.load(absmax_ptr + first_g8 + block), first_g8 + block,
                                           nested_absmax_ptr, nested_code_ptr, shift, DOUBLE_QUANT)),)
            acc = _group(acc, words, x_ats, (), scales, planes, lane_table, VEC, M_TILES, FLOAT16, ROW_TILES,
                         TABLE_WORDS, X_FRAGMENTS, False)
            w_ats = _advance(w_ats, W_BYTES, ROW_TILES)
            x_ats = _moved(x_ats, X_STEP, M_TILES)
            group += 1
        if SHARED_SUMS:
            # Note [epilogue]: the warps' partial sums of the tile's rows, (KSPLIT, M_PAD columns of y.T,
            # ROWS rows) float32 in shared memory; after a barrier each thread sums the KSPLIT partials of
            # the outputs tid, tid + 32 KSPLIT, ... (row fastest: neighbouring threads store neighbouring y).
            mine_at = base + warp * (M_PAD * ROWS * 4)
            for r in tl.static_range(ROW_TILES):
                row = 16 * r + g
                for c in tl.static_range(2 * M_TILES):
                    col = 2 * t + 8 * (c // 2) + (c % 2)
                    _shared_store(mine_at + (col * ROWS + row) * 4, acc[r][4 * (c // 2) + (c % 2)])
                    _shared_store(mine_at + (col * ROWS + row + 8) * 4, acc[r][4 * (c // 2) + 2 + (c % 2)])
            tl.debug_barrier()
            tid = warp * 32 + lane
            for j in tl.static_range((ROWS * M_PAD + 32 * KSPLIT - 1) // (32 * KSPLIT)):
                o = tl.minimum(tid + j * (32 * KSPLIT), ROWS * M_PAD - 1)
                row = o % ROWS
                col = o // ROWS
                y = 0.0
                for w in tl.static_range(KSPLIT):
                    y += _shared_load(base + ((w * M_PAD + col) * ROWS + row) * 4)
                out_row = tile * ROWS + row
                if HAS_BIAS:
                    y += tl.load(bias_ptr + tl.minimum(out_row, N - 1)).to(tl.float32)
                valid = (tid + j * (32 * KSPLIT) < ROWS * M_PAD) & (col < M) & (out_row < N)
                _store_half(out_ptr.to(tl.int64) + (col.to(tl.int64) * stride_om + out_row) * 2, y,
                            valid.to(tl.int32), FLOAT16)
            if TILES > 1:
                tl.debug_barrier()  # every partial read before the next tile's are written
        else:
            # The warps' partial sums of the tile's rows, (KSPLIT, ROWS rows, M_PAD columns of y.T) float32.
            part = scratch_ptr.to(tl.int64) + ((tile * KSPLIT + warp) * ROWS * M_PAD).to(tl.int64) * 4
            for r in tl.static_range(ROW_TILES):
                row = 16 * r + g
                for j in tl.static_range(M_TILES):
                    col = 2 * t + 8 * j
                    _store2(part + (row * M_PAD + col) * 4, acc[r][4 * j], acc[r][4 * j + 1],
                            (col < M).to(tl.int32))
                    _store2(part + ((row + 8) * M_PAD + col) * 4, acc[r][4 * j + 2], acc[r][4 * j + 3],
                            (col < M).to(tl.int32))
            tl.debug_barrier()
            warps = tl.arange(0, KSPLIT)
            rows = tl.arange(0, ROWS)
            cols = tl.arange(0, M_PAD)
            parts = tl.load(scratch_ptr + ((tile * KSPLIT + warps)[:, None, None] * ROWS + rows[None, :, None])
                            * M_PAD + cols[None, None, :], mask=(cols < M)[None, None, :], other=0.0)
            y = tl.sum(parts, axis=0)  # (ROWS, M_PAD): y.T
            out_rows = tile * ROWS + rows
            if HAS_BIAS:
                y += tl.load(bias_ptr + out_rows, mask=out_rows < N, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptr + cols[None, :].to(tl.int64) * stride_om + out_rows[:, None],
                     y.to(out_ptr.dtype.element_ty), mask=(out_rows < N)[:, None] & (cols < M)[None, :])


class MmaConfig(NamedTuple):
    """A launch of the kernel, timed per shape (mma_gemv)."""
    ksplit: int             # warps per program, each taking a part of K
    unroll: int             # groups per loop iteration
    row_tiles: int          # 16-row tiles of W per warp (Note [row tiles])
    depth: int = 1          # iterations from a load to its use (Note [fetch ahead])
    shared_sums: bool = True  # the warps' sums meet in shared memory, else in global scratch (Note [epilogue])
    table: int = 0          # quarters of a group's words looked up in the shared table (Note [pair table])
    tiles: int = 1          # tiles of 16 row_tiles rows per program, one after the other (Note [tiles per program])
    x_ahead: bool = False   # x's fragments loaded an iteration ahead, with the words; M <= 16 (Note [x ahead])


# One warp per program never won on the H100 (runs 36-40), so it is not tried; loads two iterations
# ahead only won with one row tile and 8 warps (runs 66-68, benchmarks/RESULTS.md).
_LOOPS = [MmaConfig(ksplit, unroll, row_tiles) for row_tiles in (1, 2) for ksplit in (2, 4, 8, 16) for unroll in (2, 4)]
_LOOPS += [MmaConfig(8, unroll, 1, depth=2) for unroll in (2, 4)]
# Sums in shared memory won at M = 1 on every shape, by 13-27%; at M = 16 either epilogue won on some
# shapes, by up to 6% (run 121, benchmarks/RESULTS.md), so M > 8 times both.
MMA_CONFIGS_M8 = _LOOPS
MMA_CONFIGS = _LOOPS + [config._replace(shared_sums=False) for config in _LOOPS]
# Also timed for M <= 8 (Note [pair table]): every winner of run 115 with the table is among these.
MMA_TABLE_CONFIGS = [MmaConfig(ksplit, 4, row_tiles, table=table) for row_tiles in (1, 2) for ksplit in (4, 8)
                     for table in (3, 4)]
MMA_TABLE_CONFIGS += [MmaConfig(8, 4, 1, depth=2, table=table) for table in (3, 4)]
# Several tiles per program won at M = 1 on the shapes whose rows are many and short (runs 169-170,
# Note [tiles per program]) and lost at M = 16.
MMA_TABLE_CONFIGS += [MmaConfig(4, 4, 1, table=table, tiles=tiles) for tiles in (2, 4) for table in (3, 4)]
# Also timed for 8 < M <= 16: the table configs that won there (runs 154 and 185, Note [pair table]), and
# those that won with x ahead (runs 196-197, Note [x ahead]).
MMA_TABLE_CONFIGS_M16 = [MmaConfig(8, 2, 2, table=4), MmaConfig(8, 2, 2, table=1), MmaConfig(4, 2, 1, table=1),
                         MmaConfig(8, 2, 1, table=1, x_ahead=True), MmaConfig(8, 2, 1, table=2, x_ahead=True),
                         MmaConfig(4, 2, 1, table=1, x_ahead=True)]

STATIC_SHARED_MAX = 48 * 1024  # what a kernel may declare statically (more must be dynamic)


def column_tiles(m: int) -> int:
    """8-column tiles of y.T that M = m rows of x take: 1, 2, 4 or 8 (a power of two, so that the
    partial sums' shared array is one; Note [column tiles])."""
    return 1 << max(0, (triton.cdiv(m, 8) - 1).bit_length())


def shared_bytes(config: MmaConfig, m: int) -> int:
    """Static shared memory of a launch: the pair table (Note [pair table]) and the partial sums
    (Note [epilogue]), each rounded as the kernel declares it."""
    table = 32 * 1024 if config.table else 0
    words = config.ksplit * 8 * column_tiles(m) * 16 * config.row_tiles
    return table + (4 * max(256, words) if config.shared_sums else 0)


def _timed_configs(m: int) -> list[MmaConfig]:
    """What mma_gemv times for M = m rows of x: built only when a shape is tuned, not per call. Above
    M = 16 (Note [column tiles]) the configs that compile without spilling registers and whose partial
    sums fit in static shared memory."""
    if m <= 8:
        return MMA_CONFIGS_M8 + MMA_TABLE_CONFIGS
    if m <= 16:
        return MMA_CONFIGS + MMA_TABLE_CONFIGS_M16
    return [c for c in MMA_CONFIGS if c.unroll * c.row_tiles * column_tiles(m) <= 16 and c.depth == 1
            and shared_bytes(c, m) <= STATIC_SHARED_MAX]


_CHOSEN: dict[tuple, MmaConfig] = {}
_MMA_GEMV = DirectLaunch(_mma_gemv_kernel)


def untimed_config(n_rows: int, m: int = 1) -> MmaConfig:
    """A config without timing: about 4096 warps in all (the measured winners on the H100 are within
    one step of it, benchmarks/RESULTS.md), 4 groups per iteration (2 above M = 32), one 16-row tile
    per warp; the warps' sums in global scratch where shared memory cannot hold them (M > 16)."""
    tiles = triton.cdiv(n_rows, 16)
    unroll = 4 if column_tiles(m) <= 4 else 2  # Note [column tiles]
    config = MmaConfig(min(16, max(2, 1 << max(0, (4096 // tiles).bit_length() - 1))), unroll, 1)
    return config if shared_bytes(config, m) <= STATIC_SHARED_MAX else config._replace(shared_sums=False)


def x_fragments(x2d: torch.Tensor, vec: int, m_tiles: int) -> torch.Tensor:
    """x (M, K) in fragment order (Note [x fragments]): for each group of 32 vec columns, column tile j
    and load i, 512 bytes holding lane 4 g + t's 16: x[8 j + g, 32 vec G + 8 vec t + 8 i : .. + 8].
    Rows past M are zeros."""
    m, k = x2d.shape
    padded = F.pad(x2d, (0, 0, 0, 8 * m_tiles - m)) if m < 8 * m_tiles else x2d.contiguous()
    view = padded.view(m_tiles, 8, k // (32 * vec), 4, vec, 8)  # j, g, G, t, i, 8 values
    return view.permute(2, 0, 4, 1, 3, 5).contiguous()  # G, j, i, g, t, 8 values


def _launch(x2d: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None, out: torch.Tensor,
            config: MmaConfig) -> None:
    ksplit, unroll, row_tiles, depth, shared_sums, table, tiles_per_program, x_ahead = config
    m, n, k = x2d.shape[0], weight.n_rows, weight.n_cols
    m_tiles = column_tiles(m)
    fragments = m_tiles > 4  # Note [x fragments]
    x = x_fragments(x2d, words_per_lane(weight.blocksize), m_tiles) if fragments else x2d
    tiles = triton.cdiv(n, 16 * row_tiles)
    if shared_sums:
        scratch = out  # not read
    else:
        scratch = torch.empty(tiles * ksplit * 16 * row_tiles * 8 * m_tiles, dtype=torch.float32, device=x2d.device)
    _MMA_GEMV((triton.cdiv(tiles, tiles_per_program),), (
        x, weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, weight.offset,
        weight.code_planes, out if bias is None else bias, scratch, out, m, n, k, x2d.stride(0), out.stride(0),
        # BLOCKSIZE, DOUBLE_QUANT, OFFSET_IS_POINTER, HAS_BIAS, M_TILES, FLOAT16, KSPLIT, UNROLL, ROW_TILES, DEPTH,
        # SHARED_SUMS, TABLE_QUARTERS, X_FRAGMENTS, TILED, TILES, X_AHEAD
        weight.blocksize, weight.double_quant, weight.offset_is_pointer, bias is not None, m_tiles,
        x2d.dtype == torch.float16, ksplit, unroll, row_tiles, depth, shared_sums, table, fragments, weight.tiled,
        tiles_per_program, x_ahead),
        num_warps=ksplit)


def mma_gemv(x2d: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None, out: torch.Tensor,
             config: MmaConfig | None = None) -> torch.Tensor:
    """out (M, N) = x2d (M, K) @ W.T (+ bias) for 1 <= M <= MMA_M_MAX, 16-bit x2d whose rows start on
    16 bytes, and mma_fits(W). config: None times _timed_configs(M) once per shape and column tiles
    (CUDA-graph timing, L2 cleared: kernels/launch.py) and keeps the fastest; untimed_config with
    KERNELS_TUNE=0."""
    m = x2d.shape[0]
    if config is None:
        key = (column_tiles(m), weight.n_rows, weight.n_cols, weight.blocksize, weight.double_quant, x2d.dtype,
               bias is not None, x2d.device, weight.tiled)
        config = choose_config(_CHOSEN, key, lambda: _timed_configs(m), lambda: untimed_config(weight.n_rows, m),
                               lambda c: _launch(x2d, weight, bias, out, c))
    elif config.tiles > 1 and config.depth != 1:
        raise ValueError(f"nf4_mma: {config}: several tiles per program need depth=1 (Note [tiles per program])")
    elif config.x_ahead and (config.depth != 1 or column_tiles(m) > 2):
        raise ValueError(f"nf4_mma: {config} at M = {m}: x ahead needs depth=1 and at most 16 rows of x "
                         f"(Note [x ahead])")
    elif shared_bytes(config, m) > STATIC_SHARED_MAX:
        raise ValueError(f"nf4_mma: {config} at M = {m} needs {shared_bytes(config, m)} bytes "
                         f"of static shared memory, more than {STATIC_SHARED_MAX}: fewer warps or row tiles, or "
                         f"shared_sums=False")
    _launch(x2d, weight, bias, out, config)
    return out


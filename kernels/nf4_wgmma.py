"""NF4 matmul for medium M on the warpgroup MMA: y = x @ W.T, W decoded into the MMA's registers.

    for each tile of 16 WARPS rows of W (64 or 128) and BLOCK_X (128 or 256) rows of x, and each of
    SPLIT parts of K (a program of WARPS = 4 or 8 warps, one or two warpgroups):
        for each step of 64 columns of K in the part:
            x tile (BLOCK_X, 64)  -> shared memory by TMA, STAGES steps ahead
            codes, block scales   -> registers, loaded two steps ahead (Note [pipeline])
            A (16 WARPS, 64)      = scale * code values, 16-bit pairs made in the A registers of
                                    wgmma (Note [A from the codes])
            acc (16 WARPS, BLOCK_X) += A @ x tile.T     wgmma, A from registers; the next step's A
                                                        is decoded while this one runs
        SPLIT = 1: y tile = acc.T (+ bias)      shared memory, TMA store
        else: acc -> float32 workspace; the part that finishes last sums the SPLIT parts in order
              and stores y (Note [split K])

W never goes to memory in 16 bits. Dequantization + cuBLAS (kernels/nf4_dequant.py) writes 2 bytes
per weight and reads them back whatever M: at M = 128 it took 0.45-0.66x of torch's bf16 product on
the benchmark shapes (H100, benchmarks/RESULTS.md run 206), where the dispatch with this kernel took
0.71-1.00x (run 208). Each program decodes its W tile once per BLOCK_X rows of x, so at large M the
decoding is repeated M / BLOCK_X times and this kernel loses to dequantization + cuBLAS (Note [where
it pays]); kernels/nf4_matmul.py times the two (Note [medium M] there). Needs Hopper (wgmma), tiled
codes (kernels/nf4_tiles.py Note [tiled codes]) with 64-column blocks (QLoRA's), K % 64 == 0, 16-bit
x, and Triton's Gluon (3.6 or later): wgmma_fits.

Note [A from the codes]
    wgmma's A operand from registers has the fragment layout of mma.m16n8k16 in each warp (warp w
    holds rows 16 w .. 16 w + 15 of the tile): lane 4 g + t holds rows g and g + 8 at columns
    16 s + 2 t + {0, 1} and 16 s + 8 + 2 t + {0, 1} of each 16-column slice s, i.e. byte t of each
    32-bit word of codes of its two rows (a byte holds two codes, high nibble first). Tiled codes
    keep a band's 16 rows x 64 columns in 512 bytes, quad g's rows g and g + 8 in 64 of them, so
    every lane of a quad loads those 64 bytes (four 16-byte loads, the same addresses in its 4
    lanes), and a lane gathers byte t of 4 words into one word (3 byte permutes), looks its 8
    codes up as 4 bfloat16 pairs (the permute lookup of kernels/nf4_mma.py Note [pair lookup]) and
    multiplies each pair by its row's block scale (mul.rn.bf16x2): one pair per word loaded, in the
    word's place. The words are a (band, g, t, 16) tensor whose layout puts band on the warps, (g, t)
    on the lanes and the 16 words in registers; the pairs, split into their two values, permuted and
    reshaped to (16 WARPS rows, 64 columns), have exactly the layout of the A operand (the compiler
    checks it: convert_layout(assert_trivial=True)), so no value moves between lanes.
    The block scale is rounded to the 16-bit type before the multiply, so A is W rounded twice (at
    most 2^-8 relative for bfloat16, against 2^-9 for W in bfloat16); the products are summed in
    float32 by the tensor cores.

Note [pipeline]
    Step i issues its wgmma (asynchronously), waits until step i - 1's is done (one group left in
    flight), frees step i - 1's x slot for a TMA load STAGES steps ahead, issues the loads of step
    i + 2's words and scale bytes, and decodes step i + 1's A while step i's wgmma runs. Three
    things keep ptxas from serializing the wgmmas (its warning C7513/C7515: a wgmma's registers
    written while it may still read them): the loop is unrolled by two, so consecutive steps' A
    live in different registers; the decode takes its lane selector from the wait's results, so
    nothing that feeds A can be scheduled above the wait; and the loaded words and scale bytes are
    not passed through the wait (that would stall it until they arrive: 0-6% slower, run 205). The
    double-quant lookup of a scale (nested_code[absmax byte]) is made where the step is decoded,
    a step after its byte was loaded, not right after the load.

Note [split K]
    With few tiles (32 programs of 128 x 128 for N = 4096 at M <= 128, against 132 SMs) each program
    runs all K / 64 steps in turn and most SMs idle. SPLIT programs per tile then take consecutive
    parts of the steps. Each writes its float32 sums to its own slice of a workspace and takes a
    ticket from the tile's counter (atomic add, acquire-release, after a CTA barrier); the program
    with the last ticket reads the SPLIT slices in split order (so the sums do not depend on which
    program finished first), adds the bias, stores y and puts the counter back to 0. The counters
    are zeroed per call (a memset), so two calls on different streams cannot share them. Only with
    BLOCK_X = 128: at 256 the final sum holds two 128 x 256 float32 tiles and spills registers.

Note [where it pays]
    H100, graph replay, L2 cleared, against torch's bf16 product in the same run
    (benchmarks/RESULTS.md runs 204-208). A step of 64 columns takes about 0.94 us for a 128 x 256
    tile (8 warps, one program per SM: 229 registers) and 0.7-0.8 us for 64 x 128 (4 warps, 164
    registers, three programs per SM), whatever M; the same loop with the loads and the decoding
    taken out took 0.6 us (run 205: 163 against 173 us for torch at M = 4096 on 4096 x 4096). So
    the decoding and its loads, not the tensor cores, set the pace: Nsight Compute (run 205) had 2
    warps per scheduler with 0.42 eligible, 7 cycles per issued instruction, the issue slots 28%
    busy. It wins where dequantization + cuBLAS pays for writing W at a small M, and loses at
    M = 4096 (0.69-0.77x of torch against 0.87-0.93x: 4096 x 4096 228 against 191 us).
"""
from typing import NamedTuple

import torch
import triton

from kernels.nf4_gemv import prmt_lookup
from kernels.nf4_tiles import NF4Weight

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # Triton 3.6 names the TMA copies async_copy_*, later versions async_load / async_store (and refuse the
    # old names); the CTA barrier became gl.barrier.
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    _tma_store = tma.async_store if hasattr(tma, "async_store") else tma.async_copy_shared_to_global
    _cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier
    HAVE_GLUON = tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 6)
except (ImportError, AttributeError):  # Triton without Gluon's Hopper API: the dequantization path serves
    HAVE_GLUON = False

__all__ = ["wgmma_fits", "wgmma_matmul", "split_fits", "BLOCK_K", "BLOCK_XS", "WgmmaConfig"]

BLOCK_K = 64           # columns of K per step: one block of 64
BLOCK_XS = (128, 256)  # rows of x per program (the wgmma's N)


def _decode_asm(float16: bool) -> str:
    """PTX, 4 words in ($4-$7: rows g, g, g + 8, g + 8) -> 4 scaled pairs out ($0-$3): byte t (selector
    $8) of each word gathered into one word, its 8 codes looked up as 4 pairs (planes $20, $24, ... $48),
    pairs 0 and 1 times row g's scale ($12), 2 and 3 times row g + 8's ($16). Every operand comes as a
    pack of 4 registers (inline_asm_elementwise, pack=4)."""
    pairs = """
    prmt.b32 e{0}, wl, wh, 0x4051;
    prmt.b32 e{1}, wl, wh, 0x6273;"""  # (low, high) bytes -> pairs of elements (0, 1), (2, 3): kernels/nf4_mma.py
    mul = "mul.rn.f16x2" if float16 else "mul.rn.bf16x2"
    return ("""{
    .reg .b32 g01, g23, w, s, sb, w4, ma, mb, l0, l1, h0, h1, wl, wh, e0, e1, e2, e3;
    prmt.b32 g01, $4, $5, $8;
    prmt.b32 g23, $6, $7, $8;
    prmt.b32 w, g01, g23, 0x5410;
    and.b32 s, w, 0x77777777;
    shr.u32 sb, s, 16;
    shl.b32 w4, w, 4;
    prmt.b32 ma, w, w4, 0x9D8C;
    prmt.b32 mb, w, w4, 0xBFAE;""" + prmt_lookup("s", "ma", 20, 4) + pairs.format(0, 1)
            + prmt_lookup("sb", "mb", 20, 4) + pairs.format(2, 3) + f"""
    {mul} $0, e0, $12;
    {mul} $1, e1, $12;
    {mul} $2, e2, $16;
    {mul} $3, e3, $16;
}}""")


if HAVE_GLUON:
    _BLOCK_K = gl.constexpr(BLOCK_K)
    _DECODE_BF16 = gl.constexpr(_decode_asm(False))
    _DECODE_F16 = gl.constexpr(_decode_asm(True))

    @gluon.jit
    def _decode(words, select, scale_g, scale_g8, p0, p1, p2, p3, p4, p5, p6, p7, FLOAT16: gl.constexpr):
        """Scaled pairs, one per word (Note [A from the codes]); a pack of 4 words is rows g, g, g + 8, g + 8."""
        if FLOAT16:
            asm: gl.constexpr = _DECODE_F16
        else:
            asm: gl.constexpr = _DECODE_BF16
        return gl.inline_asm_elementwise(asm, "=r,=r,=r,=r" + ",r" * 48,
                                         [words, select, scale_g, scale_g8, p0, p1, p2, p3, p4, p5, p6, p7],
                                         dtype=gl.int32, is_pure=True, pack=4)

    @gluon.jit
    def _step_words(words_ptr, word_at, step):
        """The code words of a step (word_at: int64 offsets in 32-bit words, at step 0): a band's 64
        columns are 128 words of tiled codes (kernels/nf4_tiles.py Note [tiled codes])."""
        return gl.load(words_ptr + (word_at + step * 128))

    @gluon.jit
    def _scale_loads(absmax_ptr, nested_absmax_ptr, block, DOUBLE_QUANT: gl.constexpr):
        """What the block scales are made of, as loaded: (absmax byte, nested absmax) with double quant,
        else (absmax, absmax). Used a step later, by _scale_pairs (Note [pipeline])."""
        if DOUBLE_QUANT:
            return gl.load(absmax_ptr + block), gl.load(nested_absmax_ptr + block // 256)
        else:
            absmax = gl.load(absmax_ptr + block)
            return absmax, absmax

    @gluon.jit
    def _scale_pairs(first, nested, nested_code_ptr, offset_ptr, words_layout: gl.constexpr,
                     DOUBLE_QUANT: gl.constexpr, FLOAT16: gl.constexpr):
        """The block scales of _scale_loads (kernels/reference.py) rounded to 16 bits, twice in an int32."""
        if DOUBLE_QUANT:
            scale = gl.load(nested_code_ptr + first.to(gl.int32)) * nested + gl.load(offset_ptr)
        else:
            scale = first
        if FLOAT16:
            half = scale.to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        else:
            half = scale.to(gl.bfloat16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        return gl.convert_layout(half | (half << 16), words_layout)

    @gluon.jit
    def _a_operand(words, select, scale_g, scale_g8, planes, a_layout: gl.constexpr, FLOAT16: gl.constexpr,
                   DTYPE: gl.constexpr, WARPS: gl.constexpr):
        """A (16 WARPS, 64) of a step from its words (band, g, t, 16), word 4 c + 2 r + j being word 2 c + j
        of row g + 8 r of the band (Note [A from the codes])."""
        p0, p1, p2, p3, p4, p5, p6, p7 = planes
        pairs = _decode(words, select, scale_g, scale_g8, p0, p1, p2, p3, p4, p5, p6, p7, FLOAT16)
        pairs = gl.reshape(pairs, (WARPS, 8, 4, 4, 2, 2))  # band, g, t, c, r, j
        low = pairs.to(gl.int16).to(DTYPE, bitcast=True)
        high = (pairs >> 16).to(gl.int16).to(DTYPE, bitcast=True)
        values = gl.permute(gl.join(low, high), (0, 4, 1, 3, 5, 2, 6))  # band, r, g, c, j, t, element
        return gl.convert_layout(gl.reshape(values, (16 * WARPS, _BLOCK_K)), a_layout, assert_trivial=True)

    @gluon.jit
    def _step(i, a_issue, a_other, w, fg, ng, fg8, ng8, acc, x_smem, ready, x_desc, m0, step0, k_steps, words_ptr,
              word_at, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block_g, block_g8, select, planes,
              a_layout: gl.constexpr, words_layout: gl.constexpr, DOUBLE_QUANT: gl.constexpr,
              FLOAT16: gl.constexpr, DTYPE: gl.constexpr, STAGES: gl.constexpr):
        """Step i of k_steps (from step0 on): its wgmma on a_issue; once step i - 1's is done, its x slot
        refilled, step i + 2's words and scale bytes loaded, and step i + 1's A decoded into a_other from
        its words w and scale bytes (fg, ng, fg8, ng8) while step i's wgmma runs (Note [pipeline]).
        Returns (acc, step i + 1's A, step i + 2's words and scale bytes)."""
        slot = i % STAGES
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        acc = warpgroup_mma(a_issue, x_smem.index(slot).permute((1, 0)), acc, is_async=True)
        acc, a_other, select = warpgroup_mma_wait(1, deps=[acc, a_other, select])
        _cta_barrier()  # every warp is done with step i - 1's x slot
        refill = i - 1 + STAGES
        if (i >= 1) & (refill < k_steps):
            free = refill % STAGES
            mbarrier.expect(ready.index(free), x_desc.block_type.nbytes)
            _tma_load(x_desc, [m0, (step0 + refill) * _BLOCK_K], ready.index(free), x_smem.index(free))
        ahead = step0 + gl.minimum(i + 2, k_steps - 1)  # past the last step, the loads repeat it (unused)
        w_ahead = _step_words(words_ptr, word_at, ahead)
        fg_ahead, ng_ahead = _scale_loads(absmax_ptr, nested_absmax_ptr, block_g + ahead, DOUBLE_QUANT)
        fg8_ahead, ng8_ahead = _scale_loads(absmax_ptr, nested_absmax_ptr, block_g8 + ahead, DOUBLE_QUANT)
        scale_g = _scale_pairs(fg, ng, nested_code_ptr, offset_ptr, words_layout, DOUBLE_QUANT, FLOAT16)
        scale_g8 = _scale_pairs(fg8, ng8, nested_code_ptr, offset_ptr, words_layout, DOUBLE_QUANT, FLOAT16)
        a_other = _a_operand(w, select, scale_g, scale_g8, planes, a_layout, FLOAT16, DTYPE, gl.num_warps())
        return acc, a_other, w_ahead, fg_ahead, ng_ahead, fg8_ahead, ng8_ahead

    @gluon.jit
    def _store_tile(acc, y_desc, bias_ptr, n0, m0, N, mma_layout: gl.constexpr, DTYPE: gl.constexpr,
                    BLOCK_X: gl.constexpr, HAS_BIAS: gl.constexpr):
        """y[m0 : m0 + BLOCK_X, n0 : n0 + BLOCK_W] = acc.T (+ bias) in y's dtype, by TMA (clipped at the edges)."""
        BLOCK_W: gl.constexpr = y_desc.block_type.shape[1]
        if HAS_BIAS:
            offs_n = n0 + gl.arange(0, BLOCK_W, layout=gl.SliceLayout(1, mma_layout))
            acc = acc + gl.expand_dims(gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32), 1)
        y_smem = gl.allocate_shared_memory(DTYPE, [BLOCK_X, BLOCK_W], y_desc.layout,
                                           gl.permute(acc.to(DTYPE), (1, 0)))
        fence_async_shared()
        _tma_store(y_desc, [m0, n0], y_smem)
        tma.store_wait(0)

    @gluon.jit
    def nf4_wgmma_kernel(x_desc, y_desc, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                         code_planes_ptr, bias_ptr, workspace_ptr, tickets_ptr, N, K,
                         DOUBLE_QUANT: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr,
                         STAGES: gl.constexpr):
        """y (M, N) = x (M, K) @ W.T (+ bias) for tiled codes with 64-column blocks, K % 64 == 0; one
        program per (16 WARPS rows of W, BLOCK_X rows of x) tile and part of K (module docstring)."""
        DTYPE: gl.constexpr = x_desc.dtype
        BLOCK_X: gl.constexpr = x_desc.block_type.shape[0]
        WARPS: gl.constexpr = gl.num_warps()
        BLOCK_W: gl.constexpr = 16 * WARPS  # rows of W per program: 16 per warp
        FLOAT16: gl.constexpr = DTYPE == gl.float16
        tiles_w = (N + BLOCK_W - 1) // BLOCK_W
        tiles = gl.num_programs(0) // SPLIT
        pid = gl.program_id(0)
        tile = pid % tiles
        part = pid // tiles
        n0 = (tile % tiles_w) * BLOCK_W
        m0 = (tile // tiles_w) * BLOCK_X
        all_steps = K // _BLOCK_K
        per_part = (all_steps + SPLIT - 1) // SPLIT
        step0 = part * per_part
        k_steps = gl.minimum(per_part, all_steps - step0)

        # Per lane (band = warp, g, t, 1): rows, code planes, byte selector; words (band, g, t, 16).
        lane_layout: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1], [1, 8, 4, 1], [WARPS, 1, 1, 1], [3, 2, 1, 0])
        words_layout: gl.constexpr = gl.BlockedLayout([1, 1, 1, 16], [1, 8, 4, 1], [WARPS, 1, 1, 1], [3, 2, 1, 0])
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                              instr_shape=[16, BLOCK_X, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)

        band = gl.arange(0, WARPS, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, lane_layout))))
        band = gl.expand_dims(gl.expand_dims(gl.expand_dims(band, 1), 2), 3)  # (WARPS, 1, 1, 1)
        g = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, lane_layout))))
        g = gl.expand_dims(gl.expand_dims(gl.expand_dims(g, 0), 2), 3)  # (1, 8, 1, 1)
        t = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, lane_layout))))
        t = gl.expand_dims(gl.expand_dims(gl.expand_dims(t, 0), 1), 3)  # (1, 1, 4, 1)
        q = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, words_layout))))
        q = gl.expand_dims(gl.expand_dims(gl.expand_dims(q, 0), 1), 2)  # (1, 1, 1, 16)
        # Bands past N read the last band's codes and scales; their columns of y are not stored.
        band = gl.minimum(n0 // 16 + band, N // 16 - 1) + 0 * t  # (WARPS, 1, 4, 1)
        row = band * 16 + g  # (WARPS, 8, 4, 1): row g of the lane; g + 8 is row + 8
        block_g = row * all_steps  # block of (row, step 0): 64-column blocks
        block_g8 = (row + 8) * all_steps
        word_at = gl.convert_layout(band.to(gl.int64) * (2 * K) + g * 16, words_layout) + q  # (WARPS, 8, 4, 16)
        words_ptr = packed_ptr.to(gl.pointer_type(gl.int32))
        select = gl.convert_layout(t + ((t + 4) << 4), words_layout)  # prmt selector of byte t of two words
        plane_at = code_planes_ptr + (0 if FLOAT16 else 16 * 32) + g * 4 + t  # each lane its own copy
        planes = (gl.convert_layout(gl.load(plane_at), words_layout),
                  gl.convert_layout(gl.load(plane_at + 32), words_layout),
                  gl.convert_layout(gl.load(plane_at + 2 * 32), words_layout),
                  gl.convert_layout(gl.load(plane_at + 3 * 32), words_layout),
                  gl.convert_layout(gl.load(plane_at + 4 * 32), words_layout),
                  gl.convert_layout(gl.load(plane_at + 5 * 32), words_layout),
                  gl.convert_layout(gl.load(plane_at + 6 * 32), words_layout),
                  gl.convert_layout(gl.load(plane_at + 7 * 32), words_layout))

        x_smem = gl.allocate_shared_memory(DTYPE, [STAGES, BLOCK_X, _BLOCK_K], x_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
        fence_async_shared()
        for s in gl.static_range(STAGES):
            if s < k_steps:
                mbarrier.expect(ready.index(s), x_desc.block_type.nbytes)
                _tma_load(x_desc, [m0, (step0 + s) * _BLOCK_K], ready.index(s), x_smem.index(s))

        fg, ng = _scale_loads(absmax_ptr, nested_absmax_ptr, block_g + step0, DOUBLE_QUANT)
        fg8, ng8 = _scale_loads(absmax_ptr, nested_absmax_ptr, block_g8 + step0, DOUBLE_QUANT)
        a_even = _a_operand(_step_words(words_ptr, word_at, step0), select,
                            _scale_pairs(fg, ng, nested_code_ptr, offset_ptr, words_layout, DOUBLE_QUANT, FLOAT16),
                            _scale_pairs(fg8, ng8, nested_code_ptr, offset_ptr, words_layout, DOUBLE_QUANT, FLOAT16),
                            planes, a_layout, FLOAT16, DTYPE, WARPS)
        a_odd = a_even
        step1 = step0 + gl.minimum(k_steps - 1, 1)
        w = _step_words(words_ptr, word_at, step1)
        fg, ng = _scale_loads(absmax_ptr, nested_absmax_ptr, block_g + step1, DOUBLE_QUANT)
        fg8, ng8 = _scale_loads(absmax_ptr, nested_absmax_ptr, block_g8 + step1, DOUBLE_QUANT)
        acc = gl.zeros((BLOCK_W, BLOCK_X), gl.float32, layout=mma_layout)
        for i2 in range(k_steps // 2):  # unrolled by two (Note [pipeline])
            acc, a_odd, w, fg, ng, fg8, ng8 = _step(
                2 * i2, a_even, a_odd, w, fg, ng, fg8, ng8, acc, x_smem, ready, x_desc, m0, step0, k_steps,
                words_ptr, word_at, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block_g, block_g8,
                select, planes, a_layout, words_layout, DOUBLE_QUANT, FLOAT16, DTYPE, STAGES)
            acc, a_even, w, fg, ng, fg8, ng8 = _step(
                2 * i2 + 1, a_odd, a_even, w, fg, ng, fg8, ng8, acc, x_smem, ready, x_desc, m0, step0, k_steps,
                words_ptr, word_at, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block_g, block_g8,
                select, planes, a_layout, words_layout, DOUBLE_QUANT, FLOAT16, DTYPE, STAGES)
        if k_steps % 2 == 1:
            acc, a_odd, w, fg, ng, fg8, ng8 = _step(
                k_steps - 1, a_even, a_odd, w, fg, ng, fg8, ng8, acc, x_smem, ready, x_desc, m0, step0, k_steps,
                words_ptr, word_at, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block_g, block_g8,
                select, planes, a_layout, words_layout, DOUBLE_QUANT, FLOAT16, DTYPE, STAGES)
        acc = warpgroup_mma_wait(0, deps=[acc, a_even, a_odd])[0]
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))

        if SPLIT == 1:
            _store_tile(acc, y_desc, bias_ptr, n0, m0, N, mma_layout, DTYPE, BLOCK_X, HAS_BIAS)
        else:  # Note [split K]
            rows = gl.arange(0, BLOCK_W, layout=gl.SliceLayout(1, mma_layout))
            cols = gl.arange(0, BLOCK_X, layout=gl.SliceLayout(0, mma_layout))
            at = gl.expand_dims(rows, 1) * BLOCK_X + gl.expand_dims(cols, 0)  # (128, BLOCK_X)
            slice_words = BLOCK_W * BLOCK_X
            gl.store(workspace_ptr + (part * tiles + tile).to(gl.int64) * slice_words + at, acc)
            _cta_barrier()
            ticket = gl.atomic_add(tickets_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if ticket == SPLIT - 1:
                total = gl.load(workspace_ptr + tile.to(gl.int64) * slice_words + at, cache_modifier=".cg")
                for s in gl.static_range(1, SPLIT):
                    total += gl.load(workspace_ptr + (s * tiles + tile).to(gl.int64) * slice_words + at,
                                     cache_modifier=".cg")
                gl.store(tickets_ptr + tile, 0)
                _store_tile(total, y_desc, bias_ptr, n0, m0, N, mma_layout, DTYPE, BLOCK_X, HAS_BIAS)


class WgmmaConfig(NamedTuple):
    """A launch of the kernel, timed per shape (kernels/nf4_matmul.py)."""
    block_x: int     # rows of x per program: one of BLOCK_XS
    split: int       # parts of K per tile (Note [split K]); above 1 with block_x 128 only
    warps: int = 8   # 16 rows of W each: 4 (one warpgroup) or 8 (two)
    stages: int = 4  # x tiles in flight


def split_fits(split: int, n_cols: int) -> bool:
    """Whether K = n_cols cut into `split` parts of cdiv(K / 64, split) steps leaves none empty."""
    steps = n_cols // BLOCK_K
    return 1 <= split <= steps and (split - 1) * triton.cdiv(steps, split) < steps


def wgmma_fits(weight: NF4Weight, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel takes x of `dtype` on `device` times this W: Gluon, a Hopper GPU, tiled codes
    with 64-column blocks, K % 64 == 0, 16-bit x (whose rows TMA must read: 16-byte aligned, which
    K % 64 == 0 gives a contiguous x)."""
    return (HAVE_GLUON and device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
            and weight.tiled and weight.blocksize == BLOCK_K and weight.n_cols % BLOCK_K == 0
            and dtype in (torch.bfloat16, torch.float16))


def wgmma_matmul(x2d: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None,
                 config: WgmmaConfig = WgmmaConfig(256, 1), out: torch.Tensor | None = None) -> torch.Tensor:
    """y (M, N) = x2d (M, K) @ W.T (+ bias) in x's dtype (module docstring). wgmma_fits must hold, and TMA
    must be able to read x2d and write `out`: rows with unit stride, starting on 16 bytes, row strides
    multiples of 16 bytes (N % 8 == 0 when out is not given; tiled codes have N % 16 == 0)."""
    m, n, k = x2d.shape[0], weight.n_rows, weight.n_cols
    block_x, split, warps, stages = config
    block_w = 16 * warps
    if (block_x not in BLOCK_XS or warps not in (4, 8) or not 2 <= stages <= 4 or not split_fits(split, k)
            or (split > 1 and block_x != 128)):
        raise ValueError(f"wgmma_matmul: block_x must be one of {BLOCK_XS}, warps 4 or 8, stages 2 to 4, and split "
                         f"must cut K / 64 = {k // BLOCK_K} steps into that many non-empty parts (block_x 128 only: "
                         f"two 128 x 256 float32 tiles in the split's final sum spill registers), got {config}")
    if out is None:
        out = torch.empty(m, n, device=x2d.device, dtype=x2d.dtype)
    if m == 0:
        return out
    dtype = gl.bfloat16 if x2d.dtype == torch.bfloat16 else gl.float16
    x_desc = TensorDescriptor.from_tensor(x2d, [block_x, BLOCK_K],
                                          gl.NVMMASharedLayout.get_default_for([block_x, BLOCK_K], dtype))
    y_desc = TensorDescriptor.from_tensor(out, [block_x, block_w],
                                          gl.NVMMASharedLayout.get_default_for([block_x, block_w], dtype))
    offset = weight.offset if weight.offset_is_pointer else torch.full((1,), weight.offset, device=x2d.device)
    tiles = triton.cdiv(n, block_w) * triton.cdiv(m, block_x)
    if split > 1:
        workspace = torch.empty(split * tiles * block_w * block_x, device=x2d.device, dtype=torch.float32)
        tickets = torch.zeros(tiles, device=x2d.device, dtype=torch.int32)
    else:
        workspace = tickets = out
    nf4_wgmma_kernel[(tiles * split,)](
        x_desc, y_desc, weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, offset,
        weight.code_planes, out if bias is None else bias, workspace, tickets, n, k,
        DOUBLE_QUANT=weight.double_quant, HAS_BIAS=bias is not None, SPLIT=split, STAGES=stages, num_warps=warps)
    return out

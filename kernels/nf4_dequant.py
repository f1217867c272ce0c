"""NF4 (+ double quant) dequantization kernel: packed uint8 -> (N, K) float32 / float16 / bfloat16.

The weight is treated as its flat row-major array; each program expands BYTES packed bytes into
2*BYTES consecutive values:

    for each program p (in parallel):
        bytes  = packed[p*BYTES : (p+1)*BYTES]                     one wide load
        codes  = interleave(bytes >> 4, bytes & 0xF)               (2*BYTES,) high nibble first
        scales = block_scale(blocks covered by the program)        one decode per block
        out[2*p*BYTES : ...] = (code[codes] * scales).to(dtype)

With tiled codes (kernels/nf4_tiles.py Note [tiled codes]) a program reads BYTES (at least one set)
consecutive tiled bytes instead, by sets of 32 VEC bytes (a group's columns of two rows, one block each) and writes
the values where they belong in W: two scale decodes per set. Its index arithmetic stays in 32
bits (the band of a set is a division by a run-time K): H100, do_bench, 3-6% more time than the
row-order kernel on the four larger benchmark shapes and 3% less on 4096 x 4096 (run 155), where
the same code in 64 bits (440 SASS instructions per program against 320, and 240 in row order)
took 13-22% more (run 153, as two earlier versions within 3%); gathering the row-order bytes from
their tiled offsets instead took twice the time (run 150, 4096 x 4096 41.0 against 20.4 us).

BYTES is a power of two, so a program covers whole blocks (2*BYTES >= blocksize) or lies inside
one block. The result equals kernels.reference.dequantize_nf4 bit for bit: the kernel is launched
with fp fusion off, so the double-quant decode `nested_code[q] * nested_absmax + offset` is a
rounded multiply then a rounded add, as in the reference, not a fused multiply-add.
"""
import torch
import triton
import triton.language as tl

from kernels.launch import Tuned, candidates, cold_graph_bench
from kernels.nf4_tiles import block_scale, interpreting, nf4_weight, on_device, words_per_lane

__all__ = ["dequantize_nf4"]

_CONFIGS = [triton.Config({"BYTES": b}, num_warps=w) for b in (512, 1024, 2048) for w in (4, 8)]
_INTERPRETER_CONFIG = triton.Config({"BYTES": 64}, num_warps=4)


@triton.autotune(configs=[_INTERPRETER_CONFIG] if interpreting() else candidates(_CONFIGS),
                 key=["numel", "BLOCKSIZE", "DOUBLE_QUANT"], do_bench=cold_graph_bench)  # kernels/launch.py
@triton.jit
def _dequantize_kernel(
    # pointers
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr, out_ptr,
    # sizes
    numel, nbytes, nblocks, K,
    # weight format
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, OFFSET_IS_POINTER: tl.constexpr, TILED: tl.constexpr,
    # meta-parameters
    BYTES: tl.constexpr,
):
    ELEMENTS: tl.constexpr = 2 * BYTES
    if TILED:
        _dequantize_tiled(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr, out_ptr,
                          tl.program_id(0), nbytes, nblocks, K, BLOCKSIZE, DOUBLE_QUANT, OFFSET_IS_POINTER, BYTES)
        return
    pid = tl.program_id(0).to(tl.int64)
    offs_byte = pid * BYTES + tl.arange(0, BYTES)  # (BYTES,)
    bytes_ = tl.load(packed_ptr + offs_byte, mask=offs_byte < nbytes, other=0)
    nibbles = tl.reshape(tl.join(bytes_ >> 4, bytes_ & 0xF), (ELEMENTS,))  # element 2j+t
    values = tl.load(code_ptr + nibbles.to(tl.int32))  # (ELEMENTS,) float32
    first = pid * ELEMENTS
    if ELEMENTS >= BLOCKSIZE:
        NB: tl.constexpr = ELEMENTS // BLOCKSIZE
        block = first // BLOCKSIZE + tl.arange(0, NB)  # (NB,)
        scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, block < nblocks,
                            DOUBLE_QUANT, OFFSET_IS_POINTER)
        scale = tl.reshape(tl.broadcast_to(scale[:, None], (NB, BLOCKSIZE)), (ELEMENTS,))
    else:
        block = first // BLOCKSIZE  # the whole program lies in one block
        scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, block < nblocks,
                            DOUBLE_QUANT, OFFSET_IS_POINTER)
    offs = first + tl.arange(0, ELEMENTS)
    tl.store(out_ptr + offs, (values * scale).to(out_ptr.dtype.element_ty), mask=offs < numel)


@triton.jit
def _dequantize_tiled(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr, out_ptr, pid,
                      nbytes, nblocks, K, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                      OFFSET_IS_POINTER: tl.constexpr, BYTES: tl.constexpr):
    """Program pid's tiled bytes (tiled_bytes_per_program) by sets of 32 VEC bytes: lanes 4 g .. 4 g + 3
    of a band's group (Note [tiled codes]), i.e. a group's columns of rows g and g + 8, each row in
    one block: two scale decodes per set."""
    VEC: tl.constexpr = 4 if BLOCKSIZE >= 128 else BLOCKSIZE // 32  # words_per_lane
    RUN: tl.constexpr = 4 * VEC  # bytes of one row per lane
    SET: tl.constexpr = 8 * RUN
    SETS: tl.constexpr = max(BYTES, SET) // SET
    sets = pid * SETS + tl.arange(0, SETS)  # (SETS,) int32: the set's index and band arithmetic stay 32-bit
    valid = sets < nbytes // SET
    run = tl.arange(0, 8)  # 2 t + h: lane 4 g + t, row g + 8 h
    at_run = sets.to(tl.int64)[:, None] * SET + run[None, :] * RUN  # (SETS, 8)
    bytes_ = tl.load(packed_ptr + at_run[:, :, None] + tl.arange(0, RUN)[None, None, :], mask=valid[:, None, None],
                     other=0)  # (SETS, 8, RUN)
    nibbles = tl.reshape(tl.join(bytes_ >> 4, bytes_ & 0xF), (SETS, 8, 2 * RUN))  # element 2j+t of the run
    values = tl.load(code_ptr + nibbles.to(tl.int32))  # (SETS, 8, 2 RUN) float32
    per_band = K // (4 * VEC)  # sets in a band: 8 K bytes
    band = sets // per_band
    group = (sets % per_band) // 8
    first = (16 * band + sets % 8).to(tl.int64) * K + group * (32 * VEC)  # (SETS,) row g's first in the group
    scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, first // BLOCKSIZE, valid,
                        DOUBLE_QUANT, OFFSET_IS_POINTER)  # 32 VEC <= blocksize columns: one block
    scale8 = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, (first + 8 * K) // BLOCKSIZE,
                         valid, DOUBLE_QUANT, OFFSET_IS_POINTER)
    lower = (run % 2 == 1)[None, :]  # row g + 8
    run_first = first[:, None] + tl.where(lower, 8 * K, 0) + (run // 2)[None, :] * (8 * VEC)  # (SETS, 8)
    run_scale = tl.where(lower, scale8[:, None], scale[:, None])  # (SETS, 8)
    tl.store(out_ptr + run_first[:, :, None] + tl.arange(0, 2 * RUN)[None, None, :],
             (values * run_scale[:, :, None]).to(out_ptr.dtype.element_ty), mask=valid[:, None, None])


def tiled_bytes_per_program(bytes_: int, blocksize: int) -> int:
    """Bytes a program of _dequantize_tiled covers: BYTES, or one set (32 VEC) where BYTES is less."""
    return max(bytes_, 32 * words_per_lane(blocksize))


_DEQUANTIZE = Tuned(_dequantize_kernel)  # tuned once per key, then launched directly (kernels/launch.py)


def dequantize_nf4(packed: torch.Tensor, state, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W as an (N, K) tensor of `dtype` (float32, float16 or bfloat16) on packed's device."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dequantize_nf4: dtype must be float32, float16 or bfloat16, got {dtype}")
    weight = nf4_weight(packed, state, packed.device)
    out = torch.empty((weight.n_rows, weight.n_cols), dtype=dtype, device=packed.device)
    numel = out.numel()
    nbytes = weight.packed.numel()

    def grid(meta):
        per_program = tiled_bytes_per_program(meta["BYTES"], weight.blocksize) if weight.tiled else meta["BYTES"]
        return (triton.cdiv(nbytes, per_program),)

    key = (numel, weight.blocksize, weight.double_quant, dtype, weight.tiled)  # the autotuner's key and more
    with on_device(packed.device):
        _DEQUANTIZE(
            key, grid, weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, weight.offset, weight.code,
            out, numel, nbytes, weight.absmax.numel(), weight.n_cols,
            BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=weight.double_quant,
            OFFSET_IS_POINTER=weight.offset_is_pointer, TILED=weight.tiled,
            enable_fp_fusion=False,  # bit-exact double-quant decode: see the module docstring
        )
    return out

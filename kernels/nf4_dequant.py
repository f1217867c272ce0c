"""NF4 (+ double quant) dequantization kernel: packed uint8 -> (N, K) float32 / float16 / bfloat16.

The weight is treated as its flat row-major array; each program expands BYTES packed bytes into
2*BYTES consecutive values:

    for each program p (in parallel):
        bytes  = packed[p*BYTES : (p+1)*BYTES]                     one wide load
        codes  = interleave(bytes >> 4, bytes & 0xF)               (2*BYTES,) high nibble first
        scales = block_scale(blocks covered by the program)        one decode per block
        out[2*p*BYTES : ...] = (code[codes] * scales).to(dtype)

BYTES is a power of two, so a program covers whole blocks (2*BYTES >= blocksize) or lies inside
one block. The result equals kernels.reference.dequantize_nf4 bit for bit: the kernel is launched
with fp fusion off, so the double-quant decode `nested_code[q] * nested_absmax + offset` is a
rounded multiply then a rounded add, as in the reference, not a fused multiply-add.
"""
import torch
import triton
import triton.language as tl

from kernels.launch import Tuned, candidates, cold_graph_bench
from kernels.nf4_tiles import block_scale, interpreting, nf4_weight, on_device

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
    numel, nbytes, nblocks,
    # weight format
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, OFFSET_IS_POINTER: tl.constexpr,
    # meta-parameters
    BYTES: tl.constexpr,
):
    ELEMENTS: tl.constexpr = 2 * BYTES
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
        return (triton.cdiv(nbytes, meta["BYTES"]),)

    key = (numel, weight.blocksize, weight.double_quant, dtype)  # the autotuner's key and the dtype
    with on_device(packed.device):
        _DEQUANTIZE(
            key, grid, weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, weight.offset, weight.code,
            out, numel, nbytes, weight.absmax.numel(),
            BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=weight.double_quant,
            OFFSET_IS_POINTER=weight.offset_is_pointer,
            enable_fp_fusion=False,  # bit-exact double-quant decode: see the module docstring
        )
    return out

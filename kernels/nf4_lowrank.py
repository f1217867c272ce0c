"""NF4 dequantization plus a low-rank term: W' = dequantize(W) + s * B @ A, one pass, (N, K) out.

    for each (BLOCK_N, BLOCK_K) tile of W (in parallel):
        w     = code[nibbles] * scale[row, block]           float32, as kernels/nf4_dequant.py
        delta = B[rows, :] @ A[:, cols]                     tl.dot, float32 sum over the rank
        out   = (w + s * delta).to(dtype)                   rounded once

B (N, r) and A (r, K) are a LoRA adapter (lora/function.py uses this for the input gradient of a
QLoRA layer: g @ W' = g @ W + s (g B) A, Note [merged input gradient] there). The dequantization
writes every weight anyway, so adding the rank-r term costs r multiply-adds per weight on the
tensor cores and the reads of A and B, not a pass over an (M, K) tensor.

The w part equals kernels.reference.dequantize_nf4 before its rounding: the kernel is launched
with fp fusion off, so the scale decode and code * scale are separately rounded float32 ops, and
w + s * delta is a rounded multiply then a rounded add. A and B enter the product rounded to the
output dtype (bfloat16 / float16: tensor cores, float32 sums); for a float32 output, and under
the CPU interpreter (whose bfloat16 is unreliable, REFERENCE.md), the wrapper rounds them and the
kernel multiplies in float32.

On the GPU a 16-bit output with rank <= 64 and K % 32 == 0 goes to kernels/nf4_lowrank_mma.py,
the same function written per lane, whether rows hold whole blocks or not: 1.09-1.19x the plain
dequantization's time against this kernel's 1.4-1.5x (H100, benchmarks/RESULTS.md). This kernel
keeps float32 outputs, larger ranks, other widths and the CPU interpreter; it needs rows of whole
blocks (K % blocksize == 0). What neither kernel takes is the reference's formula
(kernels.reference.add_lowrank) on W from the plain dequantization kernel, bit for bit the reference.

`matmul_nf4_t_lowrank` is the product the merged weight exists for, g @ (W + s B A), dispatched by
M like kernels.matmul_nf4_t: up to nf4_matmul.SMALL_M_MAX rows of g, kernels.matmul_nf4_t streams
the 4-bit W (kernels/nf4_mma_t.py for bfloat16 g; writing W' would move 4x its bytes for a product
that reads W once) and an addmm adds s (g B) A; above, W' is written once and multiplied by cuBLAS.
"""
import math

import torch
import triton
import triton.language as tl

from kernels import nf4_matmul
from kernels.launch import Tuned, candidates, cold_graph_bench
from kernels.nf4_dequant import dequantize_nf4
from kernels.nf4_lowrank_mma import lowrank_mma, lowrank_mma_fits
from kernels.nf4_tiles import block_scale, code_offset, interpreting, nf4_weight, on_device

__all__ = ["dequantize_nf4_lowrank", "matmul_nf4_t_lowrank", "lowrank_fits"]

_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=1)
            for n, k, w in ((32, 256, 4), (64, 128, 4), (16, 256, 2), (16, 512, 4), (32, 512, 8), (32, 128, 2))]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4)


def lowrank_fits(blocksize: int, n_cols: int) -> bool:
    """Rows hold whole blocks (of a power-of-two size, as nf4_weight checks), so a tile's scales
    are per (row, block)."""
    return n_cols % blocksize == 0


@triton.autotune(configs=[_INTERPRETER_CONFIG] if interpreting() else candidates(_CONFIGS),
                 key=["N", "K", "R_PAD", "BLOCKSIZE", "DOUBLE_QUANT"], do_bench=cold_graph_bench)
@triton.jit
def _lowrank_kernel(
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr, b_ptr, a_ptr, out_ptr,
    N, K, R, scaling,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, OFFSET_IS_POINTER: tl.constexpr, R_PAD: tl.constexpr,
    DOT_FP32: tl.constexpr, TILED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    first_col = tl.program_id(1) * BLOCK_K
    cols = first_col + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    byte_cols = first_col // 2 + tl.arange(0, BLOCK_K // 2)  # (BLOCK_K / 2,)
    bytes_ = tl.load(packed_ptr + code_offset(rows[:, None], byte_cols[None, :], K, BLOCKSIZE, TILED),
                     mask=row_ok[:, None] & (byte_cols < K // 2)[None, :], other=0)  # (BLOCK_N, BLOCK_K / 2)
    nibbles = tl.reshape(tl.join(bytes_ >> 4, bytes_ & 0xF), (BLOCK_N, BLOCK_K))  # column 2j + t
    values = tl.load(code_ptr + nibbles.to(tl.int32))  # (BLOCK_N, BLOCK_K) float32
    row_block = rows64 * (K // BLOCKSIZE)  # each row's first block
    if BLOCK_K >= BLOCKSIZE:
        NB: tl.constexpr = BLOCK_K // BLOCKSIZE
        block_col = first_col // BLOCKSIZE + tl.arange(0, NB)  # (NB,)
        block = row_block[:, None] + block_col[None, :]  # (BLOCK_N, NB)
        scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block,
                            row_ok[:, None] & (block_col < K // BLOCKSIZE)[None, :], DOUBLE_QUANT, OFFSET_IS_POINTER)
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, NB, BLOCKSIZE)), (BLOCK_N, BLOCK_K))
    else:  # the tile's columns lie in one block of each row
        block = row_block + first_col // BLOCKSIZE  # (BLOCK_N,)
        scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, row_ok,
                            DOUBLE_QUANT, OFFSET_IS_POINTER)[:, None]
    weight = values * scale  # (BLOCK_N, BLOCK_K) float32, rounded as the reference
    RANK_CHUNK: tl.constexpr = min(R_PAD, 64)  # ranks per dot, so large ranks keep small operands
    delta = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for first_rank in tl.static_range(0, R_PAD, RANK_CHUNK):
        ranks = first_rank + tl.arange(0, RANK_CHUNK)
        b = tl.load(b_ptr + rows64[:, None] * R + ranks[None, :], mask=row_ok[:, None] & (ranks < R)[None, :],
                    other=0.0)  # (BLOCK_N, RANK_CHUNK)
        a = tl.load(a_ptr + ranks[:, None].to(tl.int64) * K + cols[None, :],
                    mask=(ranks < R)[:, None] & (cols < K)[None, :], other=0.0)  # (RANK_CHUNK, BLOCK_K)
        if DOT_FP32:  # float32 operands, already rounded to the output dtype by the caller
            delta = tl.dot(b, a, delta, input_precision="ieee")
        else:
            delta = tl.dot(b.to(out_ptr.dtype.element_ty), a.to(out_ptr.dtype.element_ty), delta)  # float32 sums
    out = weight + scaling * delta
    tl.store(out_ptr + rows64[:, None] * K + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols < K)[None, :])


_LOWRANK = Tuned(_lowrank_kernel)  # tuned once per key, then launched directly (kernels/launch.py)


def dequantize_nf4_lowrank(packed: torch.Tensor, state, lora_b: torch.Tensor, lora_a: torch.Tensor,
                           scaling: float, dtype: torch.dtype = torch.bfloat16,
                           config: triton.Config | None = None) -> torch.Tensor:
    """dequantize(W) + scaling * lora_b @ lora_a as an (N, K) tensor of `dtype`; lora_b (N, r),
    lora_a (r, K) of any float dtype on packed's device. config: one of _CONFIGS, launched as it
    is (tests); None times them once per shape."""
    from kernels import reference
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dequantize_nf4_lowrank: dtype must be float32, float16 or bfloat16, got {dtype}")
    weight = nf4_weight(packed, state, packed.device)
    n, k = weight.n_rows, weight.n_cols
    if lora_b.dim() != 2 or lora_a.dim() != 2 or lora_b.shape[0] != n or lora_a.shape[1] != k \
            or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"dequantize_nf4_lowrank: lora_b {tuple(lora_b.shape)} @ lora_a {tuple(lora_a.shape)} "
                         f"must be ({n}, r) @ (r, {k}) for the weight's shape ({n}, {k})")
    if lora_b.device != packed.device or lora_a.device != packed.device:
        raise ValueError(f"dequantize_nf4_lowrank: lora_b ({lora_b.device}) and lora_a ({lora_a.device}) must be "
                         f"on the weight's device ({packed.device})")
    rank = lora_a.shape[0]
    if config is None and dtype != torch.float32 and packed.device.type == "cuda" and not interpreting() \
            and lowrank_mma_fits(k, rank, weight.packed.data_ptr()):  # rows with or without whole blocks
        out = torch.empty((n, k), dtype=dtype, device=packed.device)
        with on_device(packed.device):
            return lowrank_mma(weight, lora_b.to(dtype).contiguous(), lora_a.to(dtype).contiguous(), scaling, out)
    if not lowrank_fits(weight.blocksize, k):  # the reference's formula; `weight`, unlike `state`, may be prepared
        return reference.add_lowrank(dequantize_nf4(packed, weight, torch.float32), lora_b, lora_a, scaling, dtype)
    dot_fp32 = dtype == torch.float32 or interpreting()  # the interpreter's bfloat16 is unreliable (REFERENCE.md)
    if dot_fp32:
        lora_b, lora_a = lora_b.to(dtype).float(), lora_a.to(dtype).float()
    lora_b, lora_a = lora_b.contiguous(), lora_a.contiguous()
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    r_pad = max(16, triton.next_power_of_2(rank))

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))

    key = (n, k, r_pad, weight.blocksize, weight.double_quant, dtype, lora_b.dtype, lora_a.dtype, weight.tiled)
    launch = _LOWRANK if config is None else _forced(config)
    with on_device(packed.device):
        launch(
            key, grid, weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, weight.offset,
            weight.code, lora_b, lora_a, out, n, k, rank, float(scaling),
            BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=weight.double_quant,
            OFFSET_IS_POINTER=weight.offset_is_pointer, R_PAD=r_pad,
            DOT_FP32=dot_fp32, TILED=weight.tiled,
            enable_fp_fusion=False,  # w + s * delta rounded as the reference: see the module docstring
        )
    return out


def matmul_nf4_t_lowrank(g: torch.Tensor, packed: torch.Tensor, state, lora_b: torch.Tensor, lora_a: torch.Tensor,
                         scaling: float, g_b: torch.Tensor | None = None) -> torch.Tensor:
    """g @ (W + scaling * lora_b @ lora_a): (..., N) -> (..., K) in g's dtype, dispatched by M (the
    module docstring). g_b: g @ lora_b (M, r), when the caller has it (a LoRA backward does)."""
    weight = nf4_weight(packed, state, packed.device)
    if g.shape[-1] != weight.n_rows:
        raise ValueError(f"matmul_nf4_t_lowrank: g of shape {tuple(g.shape)} must end in the weight's "
                         f"{weight.n_rows} rows")
    m = math.prod(g.shape[:-1])
    if m > nf4_matmul.SMALL_M_MAX:
        return g @ dequantize_nf4_lowrank(packed, weight, lora_b, lora_a, scaling, g.dtype)
    g2 = g.reshape(m, weight.n_rows)  # (M, N)
    grad = nf4_matmul.matmul_nf4_t(g2, packed, weight)  # (M, K)
    g_b = g2 @ lora_b.to(g.dtype) if g_b is None else g_b.reshape(m, -1)  # (M, r)
    if g_b.dtype == grad.dtype:
        grad.addmm_(g_b, lora_a.to(grad.dtype), alpha=scaling)
    else:
        grad += (scaling * (g_b @ lora_a.to(g_b.dtype))).to(grad.dtype)
    return grad.view(*g.shape[:-1], weight.n_cols)


def _forced(config: triton.Config):
    """A launcher with Tuned's signature that runs `config` without timing anything."""
    def launch(key, grid, *args, **meta):
        _lowrank_kernel.fn[grid(config.kwargs)](*args, **meta, **config.all_kwargs())
    return launch

"""Triton kernels for one AdamW step over flat buffers, with float32 or blockwise 8-bit moments.

    for each element (32-bit), or each block of 256 elements (8-bit):
        m, v = state                                   # 8-bit: code_map[codes] * absmax[block]
        p = p * decay                                  # decay = 1 - lr * weight_decay
        m = m + one_minus_beta1 * (g - m)
        v = v * beta2 + one_minus_beta2 * g * g
        p = p + (-step_size * m) / (sqrt(v) / bias_correction2_sqrt + eps)
        state = m, v                                   # 8-bit: absmax = max |m| of the block,
                                                       #   code = #midpoints below m / absmax
The plain-PyTorch reference of the same math: lora.optim.adamw_reference_ / adamw8bit_reference_
(the state layout and the nearest-code rule are explained there, Notes [8-bit state] and
[nearest code]). Division and square root are the IEEE round-to-nearest ones (div_rn, sqrt_rn),
as torch's; Triton's default `/` on float32 is an approximation. The kernels read and write
every byte once: 28 bytes per element for float32 params and state, 14 + 8/256 for 8-bit.
"""
import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["adamw32_", "adamw8bit_"]

BLOCK_32 = 2048  # elements per program, 32-bit kernel
WARPS_32 = 8
ROWS_8 = 4  # 256-element blocks per program, 8-bit kernel
WARPS_8 = 4
QBLOCK = 256  # elements per 8-bit absmax block


@triton.jit
def _adamw_math(p, g, m, v, decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
                bias_correction2_sqrt):
    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + (one_minus_beta2 * g) * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p + tl.div_rn(-step_size * m, denom)
    return p, m, v


@triton.jit
def _adamw32_kernel(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr,  # pointers, all (n,)
    n,  # sizes
    decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt,
    BLOCK: tl.constexpr,  # meta-parameters
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = offsets < n
    p = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
    p, m, v = _adamw_math(p, g, m, v, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                          step_size, bias_correction2_sqrt)
    tl.store(param_ptr + offsets, p.to(param_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_ptr + offsets, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)


@triton.jit
def _dequantize(codes_ptr, absmax_ptr, map_ptr, offsets, rows, mask, row_mask):
    codes = tl.load(codes_ptr + offsets, mask=mask, other=0).to(tl.int32)  # (ROWS, QBLOCK)
    absmax = tl.load(absmax_ptr + rows, mask=row_mask, other=0.0)  # (ROWS,)
    return tl.load(map_ptr + codes) * absmax[:, None]


@triton.jit
def _quantize(x, codes_ptr, absmax_ptr, midpoints_ptr, offsets, rows, mask, row_mask):
    absmax = tl.max(tl.abs(x), axis=1)  # (ROWS,)
    safe = tl.where(absmax > 0, absmax, 1.0)
    scale = tl.where(absmax > 0, tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), safe), 0.0)
    y = x * scale[:, None]  # (ROWS, QBLOCK) in [-1, 1]
    code = tl.zeros(y.shape, dtype=tl.int32)  # = #midpoints < y, by binary search over 255 of them
    for i in tl.static_range(8):
        step = 128 >> i
        code = tl.where(y > tl.load(midpoints_ptr + code + (step - 1)), code + step, code)
    tl.store(codes_ptr + offsets, code.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + rows, absmax, mask=row_mask)


@triton.jit
def _adamw8bit_kernel(
    param_ptr, grad_ptr,  # pointers, (n,)
    exp_avg_codes_ptr, exp_avg_absmax_ptr, exp_avg_sq_codes_ptr, exp_avg_sq_absmax_ptr,  # (n,), (n/256,)
    signed_map_ptr, signed_midpoints_ptr, unsigned_map_ptr, unsigned_midpoints_ptr,  # (256,), (255,)
    n_blocks,  # sizes
    decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt,
    ROWS: tl.constexpr, QBLOCK: tl.constexpr,  # meta-parameters
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,) block indices
    row_mask = rows < n_blocks
    offsets = rows.to(tl.int64)[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]  # (ROWS, QBLOCK)
    mask = row_mask[:, None] & (offsets >= 0)
    p = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    m = _dequantize(exp_avg_codes_ptr, exp_avg_absmax_ptr, signed_map_ptr, offsets, rows, mask, row_mask)
    v = _dequantize(exp_avg_sq_codes_ptr, exp_avg_sq_absmax_ptr, unsigned_map_ptr, offsets, rows, mask,
                    row_mask)
    p, m, v = _adamw_math(p, g, m, v, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                          step_size, bias_correction2_sqrt)
    tl.store(param_ptr + offsets, p.to(param_ptr.dtype.element_ty), mask=mask)
    _quantize(m, exp_avg_codes_ptr, exp_avg_absmax_ptr, signed_midpoints_ptr, offsets, rows, mask, row_mask)
    _quantize(v, exp_avg_sq_codes_ptr, exp_avg_sq_absmax_ptr, unsigned_midpoints_ptr, offsets, rows,
              mask, row_mask)


def _check(device: torch.device, n: int, tensors: dict[str, torch.Tensor],
           dtypes: dict[str, torch.dtype]) -> None:
    for name, t in tensors.items():
        if t.numel() != n or not t.is_contiguous() or t.device != device:
            raise ValueError(f"adamw: {name} must be contiguous with {n} elements on {device}, "
                             f"got {tuple(t.shape)} on {t.device}")
        if name in dtypes and t.dtype != dtypes[name]:
            raise ValueError(f"adamw: {name} must be {dtypes[name]}, got {t.dtype}")


def adamw32_(param, grad, exp_avg, exp_avg_sq, *, decay, one_minus_beta1, beta2, one_minus_beta2,
             eps, step_size, bias_correction2_sqrt) -> None:
    """One AdamW step in place; all (n,) contiguous; state float32, param/grad any float dtype."""
    n = param.numel()
    _check(param.device, n, dict(param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq),
           dict(exp_avg=torch.float32, exp_avg_sq=torch.float32))
    if n == 0:
        return
    with torch.cuda.device(param.device) if param.is_cuda else contextlib.nullcontext():
        _adamw32_kernel[(triton.cdiv(n, BLOCK_32),)](
            param, grad, exp_avg, exp_avg_sq, n, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
            step_size, bias_correction2_sqrt, BLOCK=BLOCK_32, num_warps=WARPS_32)


def adamw8bit_(param, grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
               signed_map, signed_midpoints, unsigned_map, unsigned_midpoints, *, decay,
               one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt) -> None:
    """One AdamW step in place with 8-bit moments; param/grad/codes (n,), n a multiple of 256,
    absmax (n/256,) float32, maps (256,) and midpoints (255,) float32, all on one device."""
    n = param.numel()
    if n % QBLOCK:
        raise ValueError(f"adamw8bit_: {n} elements is not a multiple of {QBLOCK}")
    n_blocks = n // QBLOCK
    codes = dict(exp_avg_codes=exp_avg_codes, exp_avg_sq_codes=exp_avg_sq_codes)
    absmax = dict(exp_avg_absmax=exp_avg_absmax, exp_avg_sq_absmax=exp_avg_sq_absmax)
    _check(param.device, n, dict(param=param, grad=grad, **codes), {k: torch.uint8 for k in codes})
    _check(param.device, n_blocks, absmax, {k: torch.float32 for k in absmax})
    for name, t, size in (("signed_map", signed_map, 256), ("unsigned_map", unsigned_map, 256),
                          ("signed_midpoints", signed_midpoints, 255),
                          ("unsigned_midpoints", unsigned_midpoints, 255)):
        if t.numel() != size or t.dtype != torch.float32 or t.device != param.device:
            raise ValueError(f"adamw8bit_: {name} must be float32 ({size},) on {param.device}")
    if n == 0:
        return
    with torch.cuda.device(param.device) if param.is_cuda else contextlib.nullcontext():
        _adamw8bit_kernel[(triton.cdiv(n_blocks, ROWS_8),)](
            param, grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
            signed_map, signed_midpoints, unsigned_map, unsigned_midpoints, n_blocks,
            decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt,
            ROWS=ROWS_8, QBLOCK=QBLOCK, num_warps=WARPS_8)

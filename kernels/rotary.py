"""Rotary position embeddings in one pass: y = x * cos + rotate_half(x) * sin, and its backward.

PyTorch spells the rotation as five kernels (two halves, a negation, a concatenation, two products
and a sum), each a round trip through memory with a bf16 rounding; here each row is read once,
rotated in float32 and written once:

    for each row r = (b, h, t) of x (B, H, T, D), in parallel (any strides, unit stride on D):
        x1, x2 = x[r, :D/2], x[r, D/2:]           c1, c2 = cos[b, t] halves    s1, s2 = sin[b, t] halves
        forward:   y  = (x1 c1 - x2 s1,  x2 c2 + x1 s2)
        backward:  dx = (g1 c1 + g2 s2,  g2 c2 - g1 s1)   (the transposed map: rotate_half^T v = (v2, -v1))

cos and sin are (B or 1, T, D), HF's layout (each half holds the same angles); they take no
gradient (they come from positions). `kernels.reference.apply_rotary` is the plain-PyTorch reference.
"""
import torch
import triton
import triton.language as tl

from kernels.nf4_tiles import on_device

__all__ = ["apply_rotary"]


@triton.jit
def _rotary_kernel(
    # pointers
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    # sizes
    n_rows, H, T,
    # strides (elements): x and out by (b, h, t), cos and sin by (b, t); unit stride on D
    stride_xb, stride_xh, stride_xt, stride_ob, stride_oh, stride_ot, stride_cb, stride_ct,
    # meta-parameters
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, ROWS: tl.constexpr, BACKWARD: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,) flat (b, h, t)
    t = rows % T
    h = (rows // T) % H
    b = rows // (T * H)
    cols = tl.arange(0, BLOCK_HALF)  # (BLOCK_HALF,)
    mask = (rows < n_rows)[:, None] & (cols < HALF)[None, :]
    x_at = (b * stride_xb + h * stride_xh + t * stride_xt)[:, None] + cols[None, :]
    c_at = (b * stride_cb + t * stride_ct)[:, None] + cols[None, :]
    x1 = tl.load(x_ptr + x_at, mask=mask, other=0.0).to(tl.float32)  # (ROWS, BLOCK_HALF)
    x2 = tl.load(x_ptr + x_at + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + c_at, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + c_at + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + c_at, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + c_at + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    o_at = (b * stride_ob + h * stride_oh + t * stride_ot)[:, None] + cols[None, :]
    tl.store(out_ptr + o_at, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + o_at + HALF, y2.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    B, H, T, D = x.shape
    out = torch.empty_like(x)  # the same strides as x (a transposed view stays one)
    half = D // 2
    block_half = triton.next_power_of_2(half)
    rows = max(1, 2048 // block_half)
    n_rows = B * H * T
    stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0
    with on_device(x.device):
        _rotary_kernel[(triton.cdiv(n_rows, rows),)](
            x, cos, sin, out, n_rows, H, T,
            x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
            stride_cb, cos.stride(1),
            HALF=half, BLOCK_HALF=block_half, ROWS=rows, BACKWARD=backward, num_warps=4,
        )
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        if grad_out.stride(-1) != 1:  # e.g. the expanded gradient of a sum: the kernel needs unit stride on D
            grad_out = grad_out.contiguous()
        return _launch(grad_out, cos, sin, backward=True), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by cos, sin (B or 1, T, D); the result has x's dtype and strides.
    Differentiable in x."""
    B, H, T, D = x.shape
    if D % 2 or x.stride(-1) != 1 or cos.shape != sin.shape or cos.shape[1:] != (T, D) \
            or cos.shape[0] not in (1, B) or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError(f"apply_rotary: x (B, H, T, D) with even D and unit stride on D, cos and sin "
                         f"(B or 1, T, D) alike; got x {tuple(x.shape)} strides {x.stride()}, cos "
                         f"{tuple(cos.shape)} strides {cos.stride()}, sin {tuple(sin.shape)} strides {sin.stride()}")
    return _Rotary.apply(x, cos, sin)

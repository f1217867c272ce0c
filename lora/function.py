"""A LoRA layer over a frozen base, forward and backward written out as one autograd node.

    y  = base(x) + s h B^T        h = x A^T (M, r)            s = scaling
    dB = s g^T h                  (N, r)
    dA = s (g B)^T x              (r, K)
    dx = g W + s (g B) A          (M, K)

Autograd would record four nodes (the base, x A^T, h B^T, the sum) and build dx from two (M, K)
tensors and a third for their sum. Here the low-rank term lands in the GEMM that made the other
term (beta = 1 in cuBLAS' epilogue): forward y += s h B^T on the base's output, backward
dx += s (g B) A on g W. On the H100 (benchmarks/qlora_layer.py, run 53, M = 4096) a step of the
layer over a bf16 base takes 0.87-0.94x the time of the autograd version.

Note [merged input gradient]
    A 4-bit base (quant.Linear4bit) has to write a dequantized W for g W anyway. It writes
    W' = W + s B A instead (kernels/nf4_lowrank.py: r tensor-core multiply-adds per weight in the
    same pass), and dx = g W' is one GEMM: no (M, K) pass for the low-rank term at all. W' is
    rounded once to the compute dtype, so dx's error stays one rounding of the merged weight, the
    same bound as the rounding of W alone (measured against float64, run 53: 2.3e-3 relative,
    against 2.9e-3 for the bf16 layer's g W + s (g B) A). Only dx uses W': the forward keeps the
    low-rank term separate, so the adapter's effect on y is not rounded to W's precision. The
    merged dequantization costs 1.1-1.2x the plain one (kernels/nf4_lowrank_mma.py), less than
    the (M, K) pass it saves at M = 4096 (benchmarks/RESULTS.md). At M <= 16 rows the product reads
    W once and writing W' would cost more than the product: there kernels/nf4_mma_t.py streams the
    4-bit W and an addmm adds s (g B) A (kernels.matmul_nf4_t_lowrank, which
    `Linear4bit.input_gradient` calls): 1.8-3.7x faster than the merged weight at M = 1 and 16
    (H100, run 74).

Takes: no DoRA, no active dropout, and a base without trainable parameters that is an nn.Linear
or has `input_gradient(grad, lora_b, lora_a, scaling, grad_b)` (quant.Linear4bit). lora/layers.py
decides (`fits`); everything else runs through autograd as before.
"""
import torch
import torch.nn as nn

__all__ = ["LoRAFunction", "fits"]


def fits(base: nn.Module) -> bool:
    """A frozen nn.Linear, or a frozen module that computes g (W + s B A) itself."""
    if any(p.requires_grad for p in base.parameters()):
        return False
    return isinstance(base, nn.Linear) or callable(getattr(base, "input_gradient", None))


def _adapter_dtype(x: torch.Tensor, a: torch.Tensor) -> torch.dtype:
    """The adapter path's dtype: autocast's when it is on (as F.linear would), else the adapters'."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return a.dtype


class LoRAFunction(torch.autograd.Function):
    """y = base(x) + scaling * (x A^T) B^T; gradients for x, A, B (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, scaling):  # x (..., K), lora_a (r, K), lora_b (N, r)
        result = base(x)  # (..., N)
        dtype = _adapter_dtype(x, lora_a)
        n_out = result.shape[-1]
        x_a = x.reshape(-1, x.shape[-1]).to(dtype)  # (M, K)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            h = x_a @ a.t()  # (M, r)
            flat = result.reshape(-1, n_out)  # (M, N)
            if flat.dtype == dtype:
                flat.addmm_(h, b.t(), alpha=scaling)  # in the GEMM's epilogue: beta = 1
            else:
                flat = flat + (scaling * (h @ b.t())).to(flat.dtype)
        ctx.save_for_backward(x_a, h, a, b)
        ctx.base, ctx.scaling = base, scaling
        ctx.x_shape, ctx.x_dtype, ctx.adapter_dtypes = x.shape, x.dtype, (lora_a.dtype, lora_b.dtype)
        return flat.view(result.shape)

    @staticmethod
    def backward(ctx, grad):  # grad (..., N)
        x_a, h, a, b = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])  # (M, N)
        with torch.autocast(g.device.type, enabled=False):
            g_a = g.to(h.dtype)
            grad_x = grad_a = grad_b = None
            if ctx.needs_input_grad[2]:
                grad_b = (g_a.t() @ h).mul_(s).to(ctx.adapter_dtypes[1])  # (N, r)
            gb = g_a @ b  # (M, r)
            if ctx.needs_input_grad[1]:
                grad_a = (gb.t() @ x_a).mul_(s).to(ctx.adapter_dtypes[0])  # (r, K)
            if ctx.needs_input_grad[0]:
                grad_x = _input_grad(ctx.base, g, gb, a, b, s).to(ctx.x_dtype).view(ctx.x_shape)
        return grad_x, grad_a, grad_b, None, None


def _input_grad(base: nn.Module, g: torch.Tensor, gb: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """g W + s (g B) A, (M, K), in g's dtype (the base's output dtype)."""
    if isinstance(base, nn.Linear):
        grad_x = g @ base.weight.to(g.dtype)  # (M, K)
        if gb.dtype == grad_x.dtype:
            return grad_x.addmm_(gb, a, alpha=scaling)
        return grad_x + (scaling * (gb @ a)).to(grad_x.dtype)
    return base.input_gradient(g, b, a, scaling, gb)  # Note [merged input gradient]

"""The LoRA layer: a frozen linear-like base plus a trainable low-rank update.

    y = base(x) + s * B A dropout(x)          s = alpha / r   (rsLoRA: alpha / sqrt(r))

A (r, in) and B (out, r) are the adapters; B starts at zero, so a fresh layer computes exactly
base(x). With DoRA (Liu et al. 2024, arXiv 2402.09353) the merged weight is re-scaled row by row:

    W' = m * (W0 + s B A) / ||W0 + s B A||_row      y = W' x + bias

m (out,) is a trainable magnitude initialised to ||W0||_row, so a fresh DoRA layer also computes
base(x). Note [DoRA's detached norm]: as the paper (section 4.3) and PEFT do, the row norm is treated
as a constant in the backward pass, which saves the memory of its graph.

The base is anything linear-like: an `nn.Linear`, or a module with `in_features`, `out_features`,
`forward` and `dequantize()` (such as `quant.Linear4bit`). Only `nn.Linear` bases are merged in place;
others are replaced by a dense `nn.Linear` while merged and restored exactly on unmerge.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import function as lora_function

__all__ = ["LoRALinear", "is_linear_like", "base_weight"]


def is_linear_like(module: nn.Module) -> bool:
    """An nn.Linear, or a module following the linear protocol (in/out features, dequantize())."""
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
        and callable(getattr(module, "dequantize", None))
    )


def base_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a linear-like module, dequantized if it is stored quantized."""
    if isinstance(module, nn.Linear):
        return module.weight
    return module.dequantize()


def _device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


class LoRALinear(nn.Module):
    """y = base(x) + scaling * lora_B(lora_A(lora_dropout(x)))   (DoRA: see the module docstring).

    Parameter names follow PEFT (`lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector`) so
    adapter files map one to one.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = "kaiming",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(
                f"LoRALinear needs an nn.Linear or a module with in_features, out_features and "
                f"dequantize(); got {type(base_layer).__name__}"
            )
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.use_dora = use_dora
        self.dropout_p = dropout
        self.init = init
        self.merged = False
        self.disabled = False
        self._quantized_base = None  # the quantized base while merged into a dense stand-in
        self._dora_norm = None  # DoRA's row norm at merge time, for an exact unmerge

        device = _device_of(base_layer)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude_vector = None
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(
                torch.empty(self.out_features, device=device, dtype=dtype)
            )
        self.reset_adapter()

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A: Kaiming-uniform (as nn.Linear's default) or N(0, 1/r); B: zero; m: ||W0||_row."""
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.lora_magnitude_vector is not None and self.lora_A.weight.device.type != "meta":
            m = self.lora_magnitude_vector
            w0 = base_weight(self.base_layer).to(torch.promote_types(m.dtype, torch.float32))
            m.copy_(w0.norm(dim=1))

    def delta_weight(self) -> torch.Tensor:
        """s * B A, (out, in), in the adapters' dtype."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def _bias(self):
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.disabled or self.merged:
            return self.base_layer(x)
        if self.use_dora:
            return self._dora_forward(x)
        a, b = self.lora_A.weight, self.lora_B.weight
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            if lora_function.fits(self.base_layer):  # one autograd node, the sums in the GEMMs
                return lora_function.LoRAFunction.apply(x, a, b, self.base_layer, self.scaling)
        result = self.base_layer(x)  # (..., out)
        # Under autocast the adapters run in the autocast dtype: casting x to the adapters' float32
        # would copy every activation for nothing. Without autocast x meets the adapters' dtype.
        autocast = torch.is_autocast_enabled(x.device.type)
        x_a = x if autocast else x.to(a.dtype)
        h = F.linear(self.lora_dropout(x_a), a)  # (..., r)
        if autocast or h.dtype == result.dtype:
            # result + s * h B^T as one GEMM with the sum in its epilogue (beta = 1, alpha = s)
            flat = torch.addmm(result.reshape(-1, self.out_features), h.reshape(-1, self.r), b.t(),
                               alpha=self.scaling)
            return flat.view(result.shape)
        return result + (self.scaling * F.linear(h, b)).to(result.dtype)

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """bias + (m / ||W0 + sBA||_row) * (W0 x + s B A dropout(x)); the norm is detached."""
        a = self.lora_A.weight
        w0 = base_weight(self.base_layer)  # (out, in)
        bias = self._bias()
        with torch.no_grad():
            norm = (w0.to(a.dtype) + self.delta_weight()).norm(dim=1)  # (out,)
        scale = self.lora_magnitude_vector / norm  # (out,)
        x_drop = self.lora_dropout(x)
        base_out = F.linear(x_drop.to(w0.dtype), w0)  # (..., out), bias added once below
        update = self.lora_B(self.lora_A(x_drop.to(a.dtype)))  # (..., out)
        out = scale * (base_out.to(a.dtype) + self.scaling * update)
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.to(base_out.dtype)

    def merged_weight(self) -> torch.Tensor:
        """The dense weight that computes this layer with the adapter folded in, fp32 (out, in)."""
        w = base_weight(self.base_layer).float() + self.delta_weight().float()
        if self.use_dora:
            w = (self.lora_magnitude_vector.float() / w.norm(dim=1)).unsqueeze(1) * w
        return w

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else ("rsLoRA" if self.use_rslora else "LoRA")
        return (
            f"{kind}: in={self.in_features}, out={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"
        )

"""Folding adapters into the base weights, explicitly (never as a side effect of train()/eval()).

    merge:    W <- W + s B A                      (DoRA: W <- m * (W + s B A) / ||W + s B A||_row)
    unmerge:  W <- W - s B A                      (DoRA: W <- W * ||.||_row / m - s B A)

An `nn.Linear` base is changed in place; the round trip is exact to the rounding of the weight's
dtype (fp32 weights: ~1e-7 relative). A quantized base (anything with `dequantize()`) cannot hold
the merged weight, so while merged the layer computes through a dense `nn.Linear` of the merged
weight and keeps the quantized base aside; unmerge puts the untouched quantized base back.
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from .layers import LoRALinear
from .wrap import lora_layers

__all__ = [
    "merge", "unmerge", "merged_state_dict", "disabled", "trainable_parameters", "ParameterCount",
]


def _require_layers(model: nn.Module, what: str) -> list[tuple[str, LoRALinear]]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"lora.{what}: the model has no LoRA layers (call lora.wrap first)")
    return layers


@torch.no_grad()
def _merge_layer(layer: LoRALinear) -> None:
    base = layer.base_layer
    merged = layer.merged_weight()  # fp32 (out, in)
    if isinstance(base, nn.Linear):
        if layer.use_dora:
            unscaled = base.weight.float() + layer.delta_weight().float()
            layer._dora_norm = unscaled.norm(dim=1)  # kept for an exact unmerge
        base.weight.copy_(merged.to(base.weight.dtype))
    else:
        bias = getattr(base, "bias", None)
        dense = nn.Linear(
            layer.in_features, layer.out_features, bias=bias is not None,
            device=merged.device, dtype=base_dtype(base),
        )
        dense.weight.copy_(merged.to(dense.weight.dtype))
        if bias is not None:
            dense.bias.copy_(bias)
        dense.requires_grad_(False)
        layer._quantized_base = base
        layer.base_layer = dense
    layer.merged = True


def base_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a linear-like module computes in (`compute_dtype` for quantized layers)."""
    dtype = getattr(module, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else module.dequantize().dtype


@torch.no_grad()
def _unmerge_layer(layer: LoRALinear) -> None:
    if layer._quantized_base is not None:
        layer.base_layer = layer._quantized_base
        layer._quantized_base = None
    else:
        weight = layer.base_layer.weight
        w = weight.float()
        if layer.use_dora:
            w = w * (layer._dora_norm / layer.lora_magnitude_vector.float()).unsqueeze(1)
            layer._dora_norm = None
        weight.copy_((w - layer.delta_weight().float()).to(weight.dtype))
    layer.merged = False


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight. Raises if already merged."""
    layers = _require_layers(model, "merge")
    for name, layer in layers:
        if layer.merged:
            raise ValueError(f"lora.merge: layer {name} is already merged")
    for _, layer in layers:
        _merge_layer(layer)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`: the base weights come back (exactly, for quantized bases)."""
    layers = _require_layers(model, "unmerge")
    for name, layer in layers:
        if not layer.merged:
            raise ValueError(f"lora.unmerge: layer {name} is not merged")
    for _, layer in layers:
        _unmerge_layer(layer)
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The plain state dict of the base model with every adapter folded in; the model is unchanged.

    Keys are those of the unwrapped model (`...q_proj.weight`, no `base_layer.` or adapters);
    quantized bases come out as dense weights. `dtype` casts floating tensors (default: each
    weight's own dtype; dense weights of quantized layers in their compute dtype).
    """
    layers = dict(_require_layers(model, "merged_state_dict"))
    quantized = [n for n, m in model.named_modules() if n and _is_quantized(m)]
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if any(name.startswith(n + ".") for n in list(layers) + quantized):
            continue  # inside a LoRA or quantized layer: written with that layer
        if name in layers:
            layer = layers[name]
            base = layer.base_layer if layer._quantized_base is None else layer._quantized_base
            weight = layer.base_layer.weight if layer.merged else layer.merged_weight()
            target = base.weight.dtype if isinstance(base, nn.Linear) else base_dtype(base)
            out[prefix + "weight"] = weight.to(target).clone()
            bias = getattr(base, "bias", None)
            if bias is not None:
                out[prefix + "bias"] = bias.detach().clone()
        elif _is_quantized(module):
            out[prefix + "weight"] = module.dequantize()
            if getattr(module, "bias", None) is not None:
                out[prefix + "bias"] = module.bias.detach().clone()
        else:
            for key, tensor in module.named_parameters(recurse=False):
                out[prefix + key] = tensor.detach().clone()
            for key, tensor in module.named_buffers(recurse=False):
                if key not in module._non_persistent_buffers_set:
                    out[prefix + key] = tensor.detach().clone()
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


def _is_quantized(module: nn.Module) -> bool:
    """A linear-like module that stores its weight in some other form (e.g. quant.Linear4bit)."""
    return (
        not isinstance(module, nn.Linear)
        and callable(getattr(module, "dequantize", None))
        and isinstance(getattr(module, "in_features", None), int)
    )


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the base model: inside the block every LoRA layer computes base(x) alone."""
    layers = _require_layers(model, "disabled")
    for name, layer in layers:
        if layer.merged:
            raise ValueError(f"lora.disabled: layer {name} is merged; call lora.unmerge first")
    previous = [layer.disabled for _, layer in layers]
    for _, layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for (_, layer), was in zip(layers, previous):
            layer.disabled = was


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f}"
        )


def trainable_parameters(model: nn.Module, verbose: bool = False) -> ParameterCount:
    """Trainable and total parameter counts. Quantized layers count their logical weights
    (in_features * out_features), not the bytes that hold them. verbose=True prints the line."""
    trainable = total = 0
    seen: set[int] = set()
    for module in model.modules():
        quantized = _is_quantized(module)
        if quantized:
            total += module.in_features * module.out_features
        for key, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if quantized and key == "weight":
                continue  # counted logically above
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
    count = ParameterCount(trainable, total)
    if verbose:
        print(count)
    return count

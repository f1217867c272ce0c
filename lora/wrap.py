"""`lora.wrap(model, r=16)`: put LoRA adapters on the linear layers of any PyTorch model, in place.

Which layers: `targets="all-linear"` takes every linear-like module (see `layers.is_linear_like`)
except the output head; a list of patterns takes the modules whose dotted name matches one of them.
A pattern matches a name if it equals the name, is its last dotted components (`"q_proj"`,
`"self_attn.q_proj"`), or is a regular expression that matches the whole name
(`r"model\\.layers\\.[0-3]\\..*_proj"`). `exclude` removes names by the same rule.
"""
import re
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from .layers import LoRALinear, is_linear_like

__all__ = ["wrap", "lora_layers", "OUTPUT_HEAD_NAMES"]

OUTPUT_HEAD_NAMES = ("lm_head",)  # never wrapped by "all-linear": it maps to the vocabulary


def _matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(_matches(name, p) for p in patterns)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(dotted name, layer) of every LoRA layer in the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _select(model: nn.Module, targets, exclude: Sequence[str]) -> list[str]:
    # nn.MultiheadAttention reads out_proj.weight directly, so its projection cannot be wrapped.
    inside_mha = {f"{n}.{c}" if n else c for n, m in model.named_modules()
                  if isinstance(m, nn.MultiheadAttention) for c, _ in m.named_children()}
    linear = [n for n, m in model.named_modules() if n and is_linear_like(m) and n not in inside_mha]
    if targets == "all-linear":
        chosen = [n for n in linear if n.rsplit(".", 1)[-1] not in OUTPUT_HEAD_NAMES]
    elif isinstance(targets, str):
        raise ValueError(f"targets must be 'all-linear' or a list of name patterns, got {targets!r}")
    else:
        patterns = list(targets)
        if not patterns:
            raise ValueError("targets is an empty list: name at least one module pattern")
        chosen = [n for n in linear if _matches_any(n, patterns)]
        others = [n for n, m in model.named_modules() if n and _matches_any(n, patterns)]
        not_linear = [n for n in others if n not in linear]
        if not_linear and not chosen:
            raise ValueError(
                f"targets {patterns} match only modules that are not linear: {not_linear[:5]}"
            )
    chosen = [n for n in chosen if not _matches_any(n, exclude)]
    if not chosen:
        sample = ", ".join(linear[:8]) or "none"
        raise ValueError(
            f"lora.wrap: no linear layer matches targets={targets!r} (exclude={list(exclude)}); "
            f"linear layers in this model include: {sample}"
        )
    return chosen


def wrap(
    model: nn.Module,
    r: int = 16,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets="all-linear",
    exclude: Sequence[str] = (),
    use_rslora: bool = False,
    use_dora: bool = False,
    init: str = "kaiming",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Replace the chosen linear layers by `LoRALinear`s, freeze every other parameter.

    alpha defaults to 2 * r. Adapters live on each base layer's device in `dtype` (float32 by
    default, whatever the base's dtype). Returns the model, changed in place.
    """
    if lora_layers(model):
        raise ValueError(
            "lora.wrap: this model already has LoRA layers; unwrap it or load a new base model "
            "before wrapping again"
        )
    alpha = 2 * r if alpha is None else alpha
    names = _select(model, targets, exclude)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child_name)
        layer = LoRALinear(
            base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
            use_dora=use_dora, init=init, dtype=dtype,
        )
        setattr(parent, child_name, layer)
    return model

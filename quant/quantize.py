"""`quant.quantize(model)`: swap every `nn.Linear` for a `Linear4bit`, in place.

A name in `skip` leaves a layer in full precision: it matches a module whose dotted name equals
it or ends with it after a dot (`"lm_head"` matches `lm_head` and `model.lm_head`). Only modules
whose type is exactly `nn.Linear` are swapped: subclasses may read their float weight directly
(`nn.MultiheadAttention` reads its `out_proj.weight`). Quantize before `lora.wrap`, not after: the
adapters are `nn.Linear`s too.

Memory: layers are swapped one at a time and the model drops its reference to each
full-precision weight as soon as that layer is replaced, so (unless the caller holds other
references) at most one full-precision layer beyond the 4-bit ones is alive at any time. A model
on the `meta` device gets unfilled `Linear4bit`s of the right shapes, ready for
`load_state_dict(..., assign=True)` with a bitsandbytes-format state dict.

On a GPU the layers hold their codes in the kernels' fastest order; `quant.tile_codes(model, False)`
keeps them in bitsandbytes' row order (quant/linear.py Note [tiled codes on the GPU]).
"""
from typing import Sequence

import torch
import torch.nn as nn

from .linear import Linear4bit
from .nf4 import check_blocksize, check_quant_type

__all__ = ["quantize", "tile_codes"]


def _skipped(name: str, skip: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize(
    model: nn.Module,
    blocksize: int = 64,
    double_quant: bool = True,
    quant_type: str = "nf4",
    skip: Sequence[str] = ("lm_head",),
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace each `nn.Linear` not named in `skip` by `Linear4bit.from_linear(...)`; returns model.

    compute_dtype None keeps each layer's own dtype."""
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    if isinstance(skip, str):
        skip = (skip,)
    if type(model) is nn.Linear:
        raise ValueError(
            "quant.quantize swaps layers inside a model; for a single nn.Linear use "
            "quant.Linear4bit.from_linear(linear)"
        )
    names = [
        name for name, module in model.named_modules(remove_duplicate=False)
        if type(module) is nn.Linear and not _skipped(name, skip)
    ]
    done: dict[int, Linear4bit] = {}  # a module shared under two names stays shared
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child_name)
        if id(linear) not in done:
            try:
                done[id(linear)] = Linear4bit.from_linear(
                    linear, blocksize=blocksize, double_quant=double_quant,
                    quant_type=quant_type, compute_dtype=compute_dtype,
                )
            except (TypeError, ValueError) as e:
                raise type(e)(f"quant.quantize: layer {name}: {e}") from None
        setattr(parent, child_name, done[id(linear)])
        del linear  # the full-precision weight goes with the old module
    return model


def tile_codes(model: nn.Module, enabled: bool = True) -> int:
    """Every `Linear4bit` of `model` holds its packed codes in the kernels' tile order while on a GPU
    (the layers' default), or in rows with enabled=False: quant/linear.py Note [tiled codes on the
    GPU]. Returns how many layers hold them tiled now."""
    return sum(layer.tile_codes(enabled) for layer in model.modules() if isinstance(layer, Linear4bit))

"""LoRA for any PyTorch model: `import lora; lora.wrap(model, r=16)`.

    lora.wrap(model, r=16, alpha=32, targets="all-linear")   adapters on, everything else frozen
    lora.save(model, "out/adapter"); lora.load(model, "out/adapter")        PEFT layout
    lora.merge(model); lora.unmerge(model); lora.merged_state_dict(model)
    with lora.disabled(model): ...                                          the base model
    lora.trainable_parameters(model, verbose=True)
    lora.optim.AdamW(params, lr=2e-4, state_bits=8, paged=True)
The trainer: `python -m lora.train config.toml`, or `import lora.train; lora.train.run(config)`.
"""
from . import optim
from .io import load, save
from .layers import LoRALinear
from .merge import disabled, merge, merged_state_dict, trainable_parameters, unmerge
from .wrap import lora_layers, wrap

__all__ = [
    "optim", "wrap", "save", "load", "merge", "unmerge", "merged_state_dict", "disabled",
    "trainable_parameters", "lora_layers", "LoRALinear",
]

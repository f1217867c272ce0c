"""Adapter files in the PEFT layout, so PEFT, vLLM and llama.cpp's converter read them.

    out/adapter/adapter_config.json        peft_type "LORA", r, lora_alpha, target_modules, ...
    out/adapter/adapter_model.safetensors  base_model.model.<module path>.lora_A.weight  (r, in)
                                           base_model.model.<module path>.lora_B.weight  (out, r)
                                           base_model.model.<module path>.lora_magnitude_vector (out,)  DoRA

Writes go to a temporary file that is renamed over the target, so a crash never leaves half a file.
"""
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .wrap import lora_layers, wrap

__all__ = ["save", "load", "atomic_write", "plain_mode", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) and rename the result onto `path`; on any error nothing is left. The file
    gets the mode a plain open() would give it (0o666 less the umask): mkstemp and safetensors'
    save_file both create owner-only files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, plain_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def plain_mode(directory: bool = False) -> int:
    """The mode a plain open() (or mkdir()) gives: 0o666 (0o777) less the process's umask. Reading
    the umask means setting it: for that moment it is the common 0o022."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, layer in lora_layers(model):
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
        if layer.use_dora:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    return tensors


def _config(model: nn.Module, base_model_name_or_path: str | None, task_type: str) -> dict:
    layers = [layer for _, layer in lora_layers(model)]
    first = layers[0]
    for field in ("r", "alpha", "dropout_p", "use_rslora", "use_dora", "init"):
        values = {getattr(layer, field) for layer in layers}
        if len(values) > 1:
            raise ValueError(
                f"lora.save: layers differ in {field} ({sorted(values, key=str)}); the PEFT "
                f"layout stores one value"
            )
    targets = sorted({name.rsplit(".", 1)[-1] for name, _ in lora_layers(model)})
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout_p,
        "target_modules": targets,
        "bias": "none",
        "use_rslora": first.use_rslora,
        "use_dora": first.use_dora,
        "init_lora_weights": "gaussian" if first.init == "gaussian" else True,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save(
    model: nn.Module,
    path: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    task_type: str = "CAUSAL_LM",
) -> Path:
    """Write the adapters of a wrapped model to the folder `path` (created if missing)."""
    if not lora_layers(model):
        raise ValueError("lora.save: the model has no LoRA layers (call lora.wrap first)")
    folder = Path(path)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None)
    config = _config(model, base_model_name_or_path, task_type)
    tensors = {k: v.detach().contiguous().cpu() for k, v in _adapter_tensors(model).items()}
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return folder


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"lora.load: no {CONFIG_NAME} in {folder}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"lora.load: {path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"lora.load: {path} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"lora.load: {path} has peft_type {config['peft_type']!r}, not 'LORA'")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ValueError(f"lora.load: {path} is missing the key {key!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"lora.load: {path} uses {key}, which this library does not support")
    return config


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"lora.load: no {WEIGHTS_NAME} in {folder}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"lora.load: {path} is not a readable safetensors file: {e}") from None


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapters from the folder `path` into `model`, in place; returns the model.

    A model with no LoRA layers is first wrapped as the adapter's config says (r, lora_alpha,
    lora_dropout, target_modules, use_rslora, use_dora). Every key and shape of the file is checked
    against the model; the first mismatch is named. Scaling follows the file's config.
    """
    folder = Path(path)
    config = read_config(folder)
    tensors = _read_tensors(folder)
    if not lora_layers(model):
        targets = config.get("target_modules") or "all-linear"
        if isinstance(targets, str) and targets != "all-linear":
            targets = [targets]
        wrap(
            model, r=int(config["r"]), alpha=config["lora_alpha"],
            dropout=float(config.get("lora_dropout") or 0.0), targets=targets,
            use_rslora=bool(config.get("use_rslora")), use_dora=bool(config.get("use_dora")),
        )
    for name, layer in lora_layers(model):
        if layer.merged:
            raise ValueError(f"lora.load: layer {name} is merged; call lora.unmerge first")
    expected = _adapter_tensors(model)
    file = folder / WEIGHTS_NAME
    for key, param in expected.items():  # in model order, so the first mismatch is the earliest layer
        if key not in tensors:
            raise ValueError(f"lora.load: {file} has no tensor {key!r}, which the model expects")
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise ValueError(
                f"lora.load: {file}: {key!r} has shape {tuple(tensors[key].shape)}, the model "
                f"expects {tuple(param.shape)}"
            )
    for key in tensors:
        if key not in expected:
            raise ValueError(f"lora.load: {file} has {key!r}, which matches no LoRA layer of the model")
    with torch.no_grad():
        for key, tensor in tensors.items():
            expected[key].copy_(tensor)
    for _, layer in lora_layers(model):
        layer.alpha = config["lora_alpha"]
        layer.use_rslora = bool(config.get("use_rslora"))
    return model

"""Writing HF-format folders: config.json + model.safetensors, or shards + model.safetensors.index.json.

Every file is written under a temporary name and renamed, so a crash never leaves a half-written
file under a real name; config.json goes last, so a folder without it is visibly incomplete.
"""
import json
import os
from pathlib import Path

import torch

__all__ = ["save_pretrained", "save_safetensors_folder", "atomic_write"]


def save_pretrained(model, folder, max_shard_bytes: int | None = None) -> Path:
    """Save a models.Llama (plain, or quantized with quant.Linear4bit layers) as an HF-format folder.

    A tied lm_head is not stored (HF's convention). Quantized layers are stored in the
    bitsandbytes layout, and config.json then gets a bitsandbytes "quantization_config".
    """
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = model.config.to_hf_config()
    quantization = _quantization_config(model)
    if quantization:
        config["quantization_config"] = quantization
    config["torch_dtype"] = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    return save_safetensors_folder(state, config, folder, max_shard_bytes)


def _quantization_config(model) -> dict | None:
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    if not layers:
        return None
    import quant
    layers = [m for m in layers if isinstance(m, quant.Linear4bit)]
    first = layers[0]
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": first.quant_type,
        "bnb_4bit_use_double_quant": bool(first.double_quant),
        "bnb_4bit_compute_dtype": str(first.compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": None,
    }


def save_safetensors_folder(state_dict: dict, config: dict, folder, max_shard_bytes: int | None = None) -> Path:
    """Write `state_dict` as safetensors (one file, or shards of at most max_shard_bytes each,
    with model.safetensors.index.json) and `config` as config.json into `folder`."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() if _shares_storage(v, state_dict, k) else
               v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    shards: list[dict] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(folder / "model.safetensors", lambda tmp: save_file(shards[0], str(tmp), metadata=metadata))
        _remove(folder / "model.safetensors.index.json")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(folder / name, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata=metadata))
            weight_map.update({key: name for key in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(folder / "model.safetensors.index.json", lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
        _remove(folder / "model.safetensors")
    atomic_write(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    return folder


def _shares_storage(tensor: torch.Tensor, state_dict: dict, key: str) -> bool:
    """Whether another entry of state_dict views the same memory (safetensors refuses shared tensors)."""
    pointer = tensor.untyped_storage().data_ptr()
    return any(k != key and v.untyped_storage().data_ptr() == pointer for k, v in state_dict.items())


def atomic_write(path: Path, write):
    """Call write(temporary_path), then rename the temporary file to `path` (removed on failure). The
    file gets the mode a plain open() would give it (0o666 less the umask): safetensors' save_file
    creates owner-only files. lora/io.py has its own atomic_write: models/ knows nothing of lora/,
    and `import lora` does not load models/ (DESIGN.md's one direction of dependency)."""
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def _umask() -> int:
    """The process's umask. Reading it means setting it: for that moment it is the common 0o022."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove(path: Path):
    if path.exists():
        path.unlink()

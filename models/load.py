"""Loading a Llama from an HF-format folder, a GGUF file or a pre-quantized bitsandbytes-4bit folder.

Note [streaming load]
    The model is built on the `meta` device (no memory), then filled module by module in the
    order of the model (embeddings, layer 0, layer 1, ..., norm, head): each parameter is read
    from its source on its own (safetensors through `safe_open`, memory-mapped; GGUF tensor by
    tensor), checked against the shape the config implies, converted to `dtype` on `device` and
    assigned. With quantize="nf4" each linear layer but `lm_head` becomes a `quant.Linear4bit`
    the moment its weight arrives, so at any time memory holds the finished part of the model
    plus one full-precision weight. A layer stored in bitsandbytes' 4-bit layout (a `*-bnb-4bit`
    folder) becomes a `quant.Linear4bit` straight from the stored tensors, never re-quantized.
    With host_embeddings the embeddings and head are read into host memory and stay there
    (models/offload.py), so the device never holds them, even while loading.
    Before anything is read, the source's keys are checked against the model: a parameter with
    no tensor, or a tensor with no place, is an error naming the file and the key.
"""
import json
import struct
from pathlib import Path

import torch
from torch import nn

from models.gguf import DEQUANTIZABLE, GGUFFile
from models.jsonfile import read_json_object
from models.llama import Llama, LlamaConfig
from models.offload import keep_embeddings_on_host

__all__ = ["load_pretrained", "config_from_gguf", "GGUF_TO_HF"]

# Keys some checkpoints carry that this model computes instead.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_BNB_QUANT_STATE = "weight.quant_state.bitsandbytes__"  # + "nf4" or "fp4", after "P."


def load_pretrained(path, dtype=torch.bfloat16, device="cpu", quantize=None, host_embeddings: bool = False) -> Llama:
    """See Llama.from_pretrained and Note [streaming load]."""
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            is_gguf = f.read(4) == b"GGUF"
        if not is_gguf:
            raise ValueError(f"{path}: not a GGUF file; pass a .gguf file or an HF-format folder")
        with GGUFFile(path) as gguf:
            source = GGUFSource(gguf)
            return _fill(source, source.config, dtype, device, quantize, host_embeddings)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: missing; an HF-format model folder needs config.json")
        hf_config = read_json_object(config_path)
        cfg = LlamaConfig.from_hf_config(config_path)
        if _bnb_quantization(hf_config, config_path):
            quantize = None  # stored 4-bit layers load as they are; the checkpoint's other layers stay in dtype
        with SafetensorsSource(path) as source:
            return _fill(source, cfg, dtype, device, quantize, host_embeddings)
    raise FileNotFoundError(f"{path}: no such file or folder")


def _bnb_quantization(hf_config: dict, config_path: Path) -> bool:
    """Whether config.json describes a bitsandbytes 4-bit checkpoint (and one this loader reads)."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return False
    if qc.get("quant_method", "bitsandbytes") != "bitsandbytes" or not qc.get("load_in_4bit", False):
        raise ValueError(f"{config_path}: quantization_config {qc} is not supported; only bitsandbytes "
                         f"4-bit checkpoints (load_in_4bit) load")
    if qc.get("bnb_4bit_quant_type", "nf4") not in ("nf4", "fp4"):
        raise ValueError(f"{config_path}: bnb_4bit_quant_type {qc['bnb_4bit_quant_type']!r} is not supported")
    return True


# ----------------------------------------------------------------------------------------------
# Filling the meta model


def _fill(source, cfg: LlamaConfig, dtype, device, quantize, host_embeddings=False) -> Llama:
    """Build `cfg` on meta and fill it from `source`. See Note [streaming load]."""
    on_host = ("model.embed_tokens", "lm_head") if host_embeddings else ()
    with torch.device("meta"):
        model = Llama(cfg)
    _check_keys(source, model)
    device = torch.device(device)
    for module_name, module in list(model.named_modules()):
        prefix = module_name + "." if module_name else ""
        if module_name == "lm_head" and cfg.tie_word_embeddings:
            continue  # tie_weights() below; a stored copy of the head is not read
        if isinstance(module, nn.Linear) and _stored_4bit(source, prefix):
            new = _read_prequantized_linear(source, module, prefix, dtype, device)
        elif isinstance(module, nn.Linear) and quantize == "nf4" and module_name != "lm_head":
            new = _quantize_linear(source, module, prefix, dtype, device)
        else:
            _fill_parameters(source, module, prefix, dtype, "cpu" if module_name in on_host else device)
            continue
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    model.tie_weights()
    if host_embeddings:
        model.model.embed_tokens.weight.requires_grad_(False)
        model.lm_head.weight.requires_grad_(False)
        keep_embeddings_on_host(model)
    return model


def _stored_4bit(source, prefix: str) -> bool:
    return any(source.has(prefix + _BNB_QUANT_STATE + t) for t in ("nf4", "fp4"))


def _check_keys(source, model: Llama):
    """Before reading anything: every parameter has a tensor, and every tensor has a place."""
    expected = set(model.state_dict())
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    quantized = {name + "." for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and _stored_4bit(source, name + ".")}

    def belongs(key):
        return (key in expected or key.endswith(_IGNORED_SUFFIXES) or
                (key == "lm_head.weight" and model.config.tie_word_embeddings) or
                any(key.startswith(prefix + "weight.") for prefix in quantized))

    missing = sorted(k for k in expected if not source.has(k))
    if missing:
        raise ValueError(f"{source.describe()}: missing tensor {missing[0]!r}"
                         + (f" ({len(missing)} missing: {', '.join(missing[:5])}, ...)" if len(missing) > 1 else ""))
    unexpected = [k for k in source.keys() if not belongs(k)]
    if unexpected:
        raise ValueError(f"{source.where(unexpected[0])}: tensor {unexpected[0]!r} does not belong to a Llama of "
                         f"this config ({len(unexpected)} unexpected tensors: {', '.join(unexpected[:5])}"
                         f"{', ...' if len(unexpected) > 5 else ''})")


def _read(source, key: str, expected_shape, dtype, device) -> torch.Tensor:
    shape = tuple(source.shape(key))
    if shape != tuple(expected_shape):
        raise ValueError(f"{source.where(key)}: tensor {key!r} has shape {shape}, the config expects "
                         f"{tuple(expected_shape)}")
    return _owned(source.get(key, device), dtype)


def _owned(tensor: torch.Tensor, dtype=None) -> torch.Tensor:
    """`tensor` in `dtype`, in memory of its own.

    safetensors hands out CPU tensors that view the memory-mapped file; a model built on those
    would break (SIGBUS) if the file were later truncated or rewritten in place, so such a
    tensor is copied unless the dtype conversion already made a copy."""
    out = tensor if dtype is None else tensor.to(dtype=dtype)
    if out.device.type == "cpu" and out.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
        out = out.clone()
    return out


def _fill_parameters(source, module: nn.Module, prefix: str, dtype, device):
    """Replace the module's own (meta) parameters by tensors read from the source."""
    for name, param in list(module.named_parameters(recurse=False)):
        tensor = _read(source, prefix + name, param.shape, dtype, device)
        setattr(module, name, nn.Parameter(tensor, requires_grad=param.requires_grad))


def _quantize_linear(source, linear: nn.Linear, prefix: str, dtype, device) -> nn.Module:
    """Read one linear layer's weight (and bias) and return it as quant.Linear4bit (NF4, double quant)."""
    import quant
    weight = _read(source, prefix + "weight", linear.weight.shape, dtype, device)
    bias = None
    if linear.bias is not None:
        bias = _read(source, prefix + "bias", linear.bias.shape, dtype, device)
    return quant.Linear4bit.from_weight(weight, bias, blocksize=64, double_quant=True, quant_type="nf4",
                                        compute_dtype=dtype)


def _read_prequantized_linear(source, linear: nn.Linear, prefix: str, dtype, device) -> nn.Module:
    """A quant.Linear4bit filled from a bitsandbytes 4-bit state dict (packed weight + statistics)."""
    import quant
    state = {key[len(prefix):]: _owned(source.get(key, device))
             for key in source.keys() if key.startswith(prefix + "weight")}
    if linear.bias is not None:
        state["bias"] = _read(source, prefix + "bias", linear.bias.shape, dtype, device)
    layer = quant.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                             compute_dtype=dtype, device="meta")
    try:
        layer.load_state_dict(state, assign=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"{source.where(prefix + 'weight')}: bitsandbytes 4-bit tensors of {prefix}weight do "
                         f"not fit a {linear.out_features}x{linear.in_features} layer: {e}") from None
    return layer


# ----------------------------------------------------------------------------------------------
# Sources: HF safetensors folders and GGUF files, read one tensor at a time


class SafetensorsSource:
    """The tensors of an HF-format folder: model.safetensors, or shards named by model.safetensors.index.json."""

    def __init__(self, folder: Path):
        from safetensors import safe_open
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files, weight_map = ["model.safetensors"], None
        else:
            others = sorted(p.name for p in folder.glob("*.safetensors"))
            if len(others) == 1:
                files, weight_map = others, None
            else:
                pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
                hint = f" (found {', '.join(pickles)}: pickle checkpoints are not read; convert them to " \
                       f"safetensors)" if pickles else ""
                raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
        self.handles = {}
        self.file_of: dict[str, str] = {}
        try:
            for name in files:
                file = folder / name
                if not file.is_file():
                    raise FileNotFoundError(f"{file}: missing (listed in {index.name})")
                check_safetensors_file(file)
                handle = safe_open(str(file), framework="pt", device="cpu")
                self.handles[name] = handle
                for key in handle.keys():
                    if weight_map is None or weight_map.get(key) == name:
                        self.file_of[key] = name
            if weight_map is not None:
                for key, name in weight_map.items():
                    if key not in self.file_of:
                        raise ValueError(f"{folder / name}: missing tensor {key!r} (listed in {index.name})")
        except BaseException:
            self.close()
            raise

    def keys(self):
        return list(self.file_of)

    def has(self, key: str) -> bool:
        return key in self.file_of

    def shape(self, key: str):
        return self.handles[self.file_of[key]].get_slice(key).get_shape()

    def get(self, key: str, device) -> torch.Tensor:
        return self.handles[self.file_of[key]].get_tensor(key).to(device)

    def where(self, key: str) -> str:
        return str(self.folder / self.file_of.get(key, "model.safetensors"))

    def describe(self) -> str:
        names = sorted(self.handles)
        return str(self.folder / names[0]) if len(names) == 1 else f"{self.folder} ({', '.join(names)})"

    def close(self):
        self.handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_safetensors_file(file: Path):
    """Raise one clear error when a safetensors file is truncated or its header is corrupt.

    The format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor
    name to {"dtype", "shape", "data_offsets": [begin, end]} (relative to the data that follows).
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ValueError(f"{file}: truncated safetensors file: the header needs {n} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: corrupt safetensors header: {e}") from None
    data_size = size - 8 - n
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        end = entry.get("data_offsets", [0, 0])[1] if isinstance(entry, dict) else 0
        if end > data_size:
            raise ValueError(f"{file}: truncated safetensors file: tensor {key!r} needs data bytes up to {end}, "
                             f"the file holds {data_size}")


# GGUF tensor names (per layer: "blk.{i}." + name) -> HF Llama names
GGUF_TO_HF = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
GGUF_LAYER_TO_HF = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str | None:
    module, _, param = gguf_name.rpartition(".")
    if module in GGUF_TO_HF:
        return f"{GGUF_TO_HF[module]}.{param}"
    parts = module.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in GGUF_LAYER_TO_HF:
        return f"model.layers.{parts[1]}.{GGUF_LAYER_TO_HF[parts[2]]}.{param}"
    return None


def config_from_gguf(gguf: GGUFFile) -> LlamaConfig:
    """The LlamaConfig that a GGUF file's `llama.*` metadata (and tensors) describe."""
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf.path}: general.architecture is {arch!r}; only 'llama' is supported")

    def get(key, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"{gguf.path}: missing metadata key 'llama.{key}'")
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    rotary_dims = int(meta.get("llama.rope.dimension_count", head_dim))
    if rotary_dims != head_dim:
        raise ValueError(f"{gguf.path}: llama.rope.dimension_count {rotary_dims} != head_dim {head_dim}: "
                         f"partial rotary embeddings are not supported")
    vocab = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens", [])) or \
        gguf.tensors["token_embd.weight"].shape[0]
    rope_scaling = None
    scaling_type = meta.get("llama.rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(meta["llama.rope.scaling.factor"])}
    elif scaling_type not in ("none", None):
        raise ValueError(f"{gguf.path}: llama.rope.scaling.type {scaling_type!r} is not supported")
    rope_freq_factors = None
    if "rope_freqs.weight" in gguf.tensors:
        rope_freq_factors = tuple(gguf.tensor("rope_freqs.weight").tolist())
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(meta.get("llama.context_length", 2048)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        rope_freq_factors=rope_freq_factors,
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in gguf.tensors,
        attention_bias="blk.0.attn_q.bias" in gguf.tensors,
    )


def unpermute_gguf_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row order of attn_q / attn_k (interleaved rotary pairs) -> HF's halves.

    GGUF stores rows of each head as (d0, d_half, d1, d_half+1, ...): HF's weight reshaped to
    (heads, 2, head_dim/2, ...) with the two middle axes swapped. Swapping back restores HF's.
    """
    shape = weight.shape
    return weight.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


class GGUFSource:
    """The tensors of a GGUF file under HF names, dequantized one at a time, Q/K rows un-permuted."""

    def __init__(self, gguf: GGUFFile):
        self.gguf = gguf
        self.config = config_from_gguf(gguf)
        self.gguf_name: dict[str, str] = {}
        for name in gguf.tensors:
            if name == "rope_freqs.weight":  # folded into the config
                continue
            hf = _hf_name(name)
            if hf is None:
                raise ValueError(f"{gguf.path}: tensor {name!r} has no place in a Llama model")
            info = gguf.tensors[name]
            if info.type_name not in DEQUANTIZABLE:  # fail before loading anything
                raise ValueError(f"{gguf.path}: tensor {name!r} has type {info.type_name}, which is not supported "
                                 f"(supported: {', '.join(DEQUANTIZABLE)})")
            self.gguf_name[hf] = name

    def keys(self):
        return list(self.gguf_name)

    def has(self, key: str) -> bool:
        return key in self.gguf_name

    def shape(self, key: str):
        return self.gguf.tensors[self.gguf_name[key]].shape

    def get(self, key: str, device) -> torch.Tensor:
        tensor = self.gguf.tensor(self.gguf_name[key], device=device)
        if key.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = unpermute_gguf_rows(tensor, self.config.num_attention_heads)
        elif key.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = unpermute_gguf_rows(tensor, self.config.num_key_value_heads)
        return tensor

    def where(self, key: str) -> str:
        return f"{self.gguf.path} (tensor {self.gguf_name.get(key, key)!r})"

    def describe(self) -> str:
        return str(self.gguf.path)

"""A small GGUF writer for tests (the format is described in models/gguf.py, Note [the GGUF layout]).

Written independently of the reader: values are packed with `struct` from explicit type ids, and
quantized blocks are assembled byte by byte from chosen scales and codes.
"""
import struct

import numpy as np
import torch

UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, BF16 = 0, 1, 2, 3, 8, 12, 30
_FORMATS = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
            BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}


def _string(s: str) -> bytes:
    data = s.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _value(value_type: int, value) -> bytes:
    if value_type == STRING:
        return _string(value)
    if value_type == ARRAY:
        element_type, items = value
        return struct.pack("<IQ", element_type, len(items)) + b"".join(_value(element_type, v) for v in items)
    return struct.pack(_FORMATS[value_type], value)


def _typed(value):
    """(type, value) as given, or a type inferred from a Python value."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], int) and not isinstance(value[0], bool):
        return value
    if isinstance(value, bool):
        return BOOL, value
    if isinstance(value, int):
        return (INT32 if value < 0 else UINT32), value
    if isinstance(value, float):
        return FLOAT32, value
    if isinstance(value, str):
        return STRING, value
    if isinstance(value, list):
        element_type = _typed(value[0])[0] if value else UINT32
        return ARRAY, (element_type, value)
    raise TypeError(f"cannot infer a GGUF type for {value!r}")


def write_gguf(path, metadata: dict, tensors: list, alignment: int | None = None, version: int = 3):
    """tensors: (name, ggml_type, torch_shape, raw bytes). alignment: also written as general.alignment."""
    align = alignment or 32
    if alignment is not None:
        metadata = dict(metadata, **{"general.alignment": (UINT32, alignment)})
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata)))
    for key, value in metadata.items():
        value_type, value = _typed(value)
        out += _string(key) + struct.pack("<I", value_type) + _value(value_type, value)
    offset = 0
    offsets = []
    for name, ggml_type, shape, raw in tensors:
        offsets.append(offset)
        dims = list(reversed(shape))
        out += _string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, offset)
        offset += -(-len(raw) // align) * align
    out += b"\0" * (-len(out) % align)
    for (name, ggml_type, shape, raw), start in zip(tensors, offsets):
        out += raw + b"\0" * (-len(raw) % align)
    with open(path, "wb") as f:
        f.write(bytes(out))


def plain_bytes(t: torch.Tensor, ggml_type: int) -> bytes:
    """F32 / F16 / BF16 bytes of a tensor, row-major."""
    dtype = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}[ggml_type]
    return t.detach().to(dtype).contiguous().view(torch.uint8).numpy().tobytes()


def q8_0_block(d: float, q: np.ndarray) -> bytes:
    """One Q8_0 block: fp16 scale, 32 int8 codes."""
    assert q.shape == (32,)
    return np.float16(d).tobytes() + q.astype(np.int8).tobytes()


def q4_0_block(d: float, q: np.ndarray) -> bytes:
    """One Q4_0 block: fp16 scale, 16 bytes; byte j = q[j] | q[j + 16] << 4 (q in 0..15)."""
    assert q.shape == (32,)
    packed = (q[:16].astype(np.uint8) & 0xF) | (q[16:].astype(np.uint8) << 4)
    return np.float16(d).tobytes() + packed.tobytes()


def q4_1_block(d: float, m: float, q: np.ndarray) -> bytes:
    """One Q4_1 block: fp16 scale, fp16 minimum, 16 bytes of nibbles as in Q4_0."""
    assert q.shape == (32,)
    packed = (q[:16].astype(np.uint8) & 0xF) | (q[16:].astype(np.uint8) << 4)
    return np.float16(d).tobytes() + np.float16(m).tobytes() + packed.tobytes()


def quantize_q8_0(t: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    """A tensor as Q8_0 blocks (d = absmax / 127), and the values those blocks decode to."""
    x = t.detach().float().reshape(-1, 32).numpy()
    d = np.abs(x).max(axis=1) / 127.0
    d16 = d.astype(np.float16)
    q = np.round(x / np.where(d16 == 0, 1, d16.astype(np.float32))[:, None]).clip(-127, 127)
    raw = b"".join(q8_0_block(d16[i], q[i]) for i in range(len(x)))
    return raw, torch.from_numpy((d16.astype(np.float32)[:, None] * q).astype(np.float32)).reshape(t.shape)


def permute_for_gguf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's conversion of HF q/k rows to its interleaved rotary order (what the reader undoes)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


HF_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_metadata(cfg, tokens=None) -> dict:
    meta = {
        "general.architecture": "llama",
        "llama.block_count": cfg.num_hidden_layers,
        "llama.context_length": cfg.max_position_embeddings,
        "llama.embedding_length": cfg.hidden_size,
        "llama.feed_forward_length": cfg.intermediate_size,
        "llama.attention.head_count": cfg.num_attention_heads,
        "llama.attention.head_count_kv": cfg.num_key_value_heads,
        "llama.rope.freq_base": float(cfg.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        "llama.rope.dimension_count": cfg.head_dim,
        "llama.vocab_size": cfg.vocab_size,
    }
    return meta


def llama_gguf_tensors(model, ggml_type: int = F32) -> list:
    """The tensors of a models.Llama under GGUF names, q/k rows permuted as llama.cpp stores them.
    Norms are always F32 (as llama.cpp writes them); the rest in ggml_type (F32, F16, BF16 or Q8_0)."""
    cfg = model.config
    out = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, _, param = rest.rpartition(".")
            gguf_name = f"blk.{layer}.{HF_TO_GGUF_LAYER[module]}.{param}"
            if module == "self_attn.q_proj":
                t = permute_for_gguf(t, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                t = permute_for_gguf(t, cfg.num_key_value_heads)
        kind = F32 if t.dim() == 1 else ggml_type
        raw = quantize_q8_0(t)[0] if kind == Q8_0 else plain_bytes(t, kind)
        out.append((gguf_name, kind, tuple(t.shape), raw))
    return out

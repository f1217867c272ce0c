"""A minimal Llama: config with presets, RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Module names mirror Hugging Face's LlamaForCausalLM (`model.layers.0.self_attn.q_proj`, ...), so
checkpoints and PEFT adapters map one to one. Every projection is a plain `nn.Linear`; quantization
and LoRA swap or wrap those from the outside.

Note [attention masks and packing]
    `Llama.forward(input_ids, attention_mask=None, position_ids=None, kv_cache=None,
    document_ids=None)` knows three kinds of masking, combined into one boolean "may attend"
    mask of shape (B, 1, T, S) for `F.scaled_dot_product_attention` (S = cached + new tokens):
    - causal, always: a query at position p sees keys at positions <= p;
    - `attention_mask` (B, S) of 0/1: padding; keys with 0 are never attended to (as in HF);
    - `document_ids` (B, T) of ints: packing; a document is a run of equal ids, and a query sees
      only keys of its own run. When `position_ids` is not given, positions restart at 0 at each
      run, so a packed row gives the same logits as its documents run separately.
    Every query also sees itself, so rows of padding never have an empty softmax (their outputs
    are meaningless but finite). Without padding or packing the mask is not built at all and
    SDPA runs with `is_causal=True` (its fastest path).
"""
import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import kernels
from models.jsonfile import read_json_object

__all__ = ["LlamaConfig", "Llama", "KVCache", "rope_inverse_frequencies"]

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class LlamaConfig:
    """The shape of a Llama model; field names follow Hugging Face's config.json.

    `rope_scaling` is HF's dict: None, {"rope_type": "linear", "factor": f}, or
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}. `rope_freq_factors` is the other way checkpoints spell
    Llama-3.1 scaling (GGUF's `rope_freqs` tensor): one divisor per rotary frequency.
    """
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_freq_factors: tuple[float, ...] | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig: num_attention_heads ({self.num_attention_heads}) is not a "
                             f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in _ROPE_TYPES:
                raise ValueError(f"LlamaConfig.rope_scaling: rope_type {rope_type!r} is not supported "
                                 f"(supported: {', '.join(_ROPE_TYPES)})")
        if self.rope_freq_factors is not None:
            self.rope_freq_factors = tuple(float(f) for f in self.rope_freq_factors)
            if len(self.rope_freq_factors) != self.head_dim // 2:
                raise ValueError(f"LlamaConfig.rope_freq_factors has {len(self.rope_freq_factors)} "
                                 f"values, expected head_dim // 2 = {self.head_dim // 2}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "LlamaConfig":
        """A named shape (see PRESETS), optionally with fields replaced: preset("llama3-8b", num_hidden_layers=2)."""
        if name not in PRESETS:
            raise ValueError(f"unknown Llama preset {name!r}; known: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf_config(cls, config: "dict | str | Path") -> "LlamaConfig":
        """From HF's config.json: a dict, the file, or the folder that holds it."""
        source = "config dict"
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            source = str(path)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such config file")
            config = read_json_object(path)
        model_type = config.get("model_type")
        architectures = config.get("architectures") or []
        if model_type != "llama" and "LlamaForCausalLM" not in architectures:
            raise ValueError(f"{source}: model_type {model_type!r} (architectures {architectures}) is not a "
                             f"Llama; only model_type 'llama' is supported")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (Llama uses 'silu')")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in config:
                raise ValueError(f"{source}: missing key {key!r}")
        # transformers >= 5 writes the rotary settings as one dict "rope_parameters".
        rope = config.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        rope_scaling = config.get("rope_scaling")
        if rope and rope.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        try:
            return cls(
                vocab_size=config["vocab_size"],
                hidden_size=config["hidden_size"],
                intermediate_size=config["intermediate_size"],
                num_hidden_layers=config["num_hidden_layers"],
                num_attention_heads=config["num_attention_heads"],
                num_key_value_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                head_dim=config.get("head_dim") or 0,
                max_position_embeddings=config.get("max_position_embeddings", 2048),
                rope_theta=float(rope_theta),
                rope_scaling=rope_scaling,
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bool(config.get("attention_bias", False)),
                mlp_bias=bool(config.get("mlp_bias", False)),
            )
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf_config(self) -> dict:
        """HF's config.json for this shape (what `LlamaForCausalLM` and our loader read)."""
        if self.rope_freq_factors is not None:
            raise ValueError("rope_freq_factors (from a GGUF file) have no HF config.json spelling")
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
        }


_LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)

PRESETS: dict[str, LlamaConfig] = {
    "llama2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                             rope_theta=10000.0, rms_norm_eps=1e-5),
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                             rope_theta=500000.0, rms_norm_eps=1e-5),
    "llama3.1-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                               rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE), rms_norm_eps=1e-5),
    "llama3.2-1b": LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                               max_position_embeddings=131072, rope_theta=500000.0,
                               rope_scaling=dict(_LLAMA3_ROPE, factor=32.0), rms_norm_eps=1e-5,
                               tie_word_embeddings=True),
    "llama3.1-70b": LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072,
                                rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE), rms_norm_eps=1e-5),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
}


def rope_inverse_frequencies(cfg: LlamaConfig, device=None) -> torch.Tensor:
    """The rotary frequencies (head_dim // 2,) float32, with the config's scaling applied.

    inv_freq[i] = theta ** (-2i / head_dim). "linear" divides them all by `factor`. "llama3"
    (Llama 3.1) keeps high frequencies (wavelength < original_ctx / high_freq_factor), divides
    low ones (wavelength > original_ctx / low_freq_factor) by `factor`, and blends in between:
        s = (original_ctx / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
        inv_freq = (1 - s) * inv_freq / factor + s * inv_freq
    `rope_freq_factors` (GGUF) divide each frequency by its own factor.
    """
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = cfg.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        original_ctx = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > original_ctx / low, inv_freq / factor, inv_freq)
        smooth = (original_ctx / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelength >= original_ctx / high) & (wavelength <= original_ctx / low)
        inv_freq = torch.where(is_medium, blended, scaled)
    if cfg.rope_freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(cfg.rope_freq_factors, dtype=torch.float32, device=device)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension (HF's rotary layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# Inputs of at least this many elements take the fused kernel on CUDA; smaller ones (decoding one
# token) keep the five PyTorch kernels, whose launches cost the host less than one Triton launch.
FUSED_ROTARY_MIN = 1 << 16


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin. x (B, H, T, D); cos, sin (B, T, D) in x's dtype.

    On CUDA, kernels.apply_rotary computes it in one pass, in float32 rounded once (see
    kernels/rotary.py), instead of five kernels that each round to x's dtype."""
    if x.is_cuda and x.numel() >= FUSED_ROTARY_MIN and kernels.available():
        return kernels.apply_rotary(x, cos, sin)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), computed in float32, rounded to x's dtype before the weight."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm reduces in float32 and rounds once to x's dtype (one fused kernel on CUDA), so
        # no float32 copy of x is made, nor saved for the backward pass.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions, for generation.

    `length` counts the positions already stored; `Llama.forward` writes the new keys after them
    and advances `length` by the number of new tokens once all layers are done.

    For a CUDA graph (models/generate.py) the positions must live on the device instead: with
    `positions` set (a (T,) int64 device tensor), `Llama.forward` writes the T new keys at those
    positions, attends over all `max_len` slots with a mask that admits slots <= the query's
    position, and leaves `length` alone. The same kernels then serve every decoding step.
    """

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0
        self.positions: torch.Tensor | None = None  # (T,) int64 on the device: see the class docstring

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, KV, T, D) after the cached positions (or at `positions`); return all keys
        and values so far (all max_len slots with `positions`)."""
        if self.positions is not None:
            self.keys[layer].index_copy_(2, self.positions, k)
            self.values[layer].index_copy_(2, self.positions, v)
            return self.keys[layer], self.values[layer]  # (B, KV, max_len, D)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache is full: {self.length} cached + {k.shape[2]} new > max_len {self.max_len}")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]  # (B, KV, S, D)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings, through F.scaled_dot_product_attention."""

    def __init__(self, cfg: LlamaConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, mask, kv_cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)  # (B, KV, S, D)
        group = self.n_heads // self.n_kv_heads
        if group > 1:  # every backend of SDPA takes repeated heads; enable_gqa does not reach all
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, S, D)
        if mask is None:  # plain causal over T new tokens with no cache, or one new token
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (B|1, 1, T, S) bool
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, cfg: LlamaConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, kv_cache=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where a run of equal document ids begins (always at t = 0)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def positions_in_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token within its run of equal document ids, restarting at 0."""
    B, T = document_ids.shape
    index = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = document_starts(document_ids)
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index  # (B, T)


def build_attention_mask(T: int, past: int, attention_mask, document_ids, device):
    """The (B|1, 1, T, past+T) bool "may attend" mask, or None when SDPA's own causal path suffices.

    See Note [attention masks and packing]."""
    if attention_mask is None and document_ids is None and (past == 0 or T == 1):
        return None
    S = past + T
    q_pos = torch.arange(past, S, device=device)
    k_pos = torch.arange(S, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
    if document_ids is not None:  # runs, not raw ids: a document id used twice in a row is two documents
        runs = document_starts(document_ids).cumsum(dim=1)  # (B, T)
        allowed = allowed & (runs[:, :, None] == runs[:, None, :])[:, None]  # (B, 1, T, T)
    return allowed | (k_pos[None, :] == q_pos[:, None])[None, None]


class LlamaModel(nn.Module):
    """The decoder stack without the output head: embeddings, layers, final norm -> hidden states."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False
        self.checkpoint_offload = None  # a models.offload.CheckpointOffload, used with gradient_checkpointing
        self._inv_freq: torch.Tensor | None = None  # rope frequencies, computed once per device

    def rope_frequencies(self, device: torch.device) -> torch.Tensor:
        """rope_inverse_frequencies(config) on `device` (a tensor's device), computed on first use:
        a forward pass then launches no kernels (and copies nothing from the host) for them, as
        CUDA graphs need."""
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = rope_inverse_frequencies(self.config, device)
        return self._inv_freq

    def _rotary_tables(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, T, D) in `dtype` of the rotary angles at position_ids (B, T), D = head_dim."""
        angles = position_ids[..., None].float() * self.rope_frequencies(position_ids.device)  # (B, T, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, D)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, kv_cache=None, document_ids=None,
                inputs_embeds=None):
        """(B, T) token ids, or their (B, T, hidden) embeddings, -> (B, T, hidden) final hidden states.

        The layers run on the device of the embeddings (a HostEmbedding's output device when the
        table is in host memory, models/offload.py); masks and positions are moved there. With
        gradient checkpointing on and `checkpoint_offload` set (a models.offload.CheckpointOffload),
        the checkpointed layer inputs wait in host memory. See Llama.forward."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids (B, T) and inputs_embeds (B, T, hidden)")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, hidden)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must be (B, T, hidden={self.config.hidden_size}), "
                             f"got shape {tuple(inputs_embeds.shape)}")
        x = inputs_embeds
        B, T, _ = x.shape
        past = kv_cache.length if kv_cache is not None else 0
        device = x.device
        if kv_cache is not None and kv_cache.positions is not None:  # a decoding step for a CUDA graph
            if attention_mask is not None or document_ids is not None or position_ids is not None:
                raise ValueError("a KVCache with positions takes no attention_mask, document_ids or position_ids")
            return self._forward_at_positions(x, kv_cache)
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, past + T):
                raise ValueError(f"attention_mask must be (B, cached + T) = {(B, past + T)} of 0/1, "
                                 f"got shape {tuple(attention_mask.shape)}")
            attention_mask = attention_mask.to(device)
        if document_ids is not None:
            if tuple(document_ids.shape) != (B, T):
                raise ValueError(f"document_ids must be (B, T) = {(B, T)}, got shape {tuple(document_ids.shape)}")
            if past:
                raise ValueError("document_ids (packing) cannot be combined with a non-empty kv_cache")
            document_ids = document_ids.to(device)
        if position_ids is None:
            if document_ids is not None:
                position_ids = positions_in_documents(document_ids)
            else:
                position_ids = torch.arange(past, past + T, device=device).expand(B, T)
        elif tuple(position_ids.shape) not in ((B, T), (1, T)):
            raise ValueError(f"position_ids must be (B, T) = {(B, T)}, got shape {tuple(position_ids.shape)}")
        position_ids = position_ids.to(device)
        mask = build_attention_mask(T, past, attention_mask, document_ids, device)

        cos, sin = self._rotary_tables(position_ids, x.dtype)  # (B|1, T, D)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing:
            offload = self.checkpoint_offload
            with offload.hooks() if offload is not None else contextlib.nullcontext():
                for layer in self.layers:
                    x = checkpoint(layer, x, cos, sin, mask, kv_cache, use_reentrant=False)
            if offload is not None:
                offload.finish_forward()
        else:
            for layer in self.layers:
                x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        return self.norm(x)

    def _forward_at_positions(self, x, kv_cache: KVCache) -> torch.Tensor:
        """x (B, T, hidden) at kv_cache.positions (T,): see KVCache. Nothing here reads a Python
        number that changes between steps, so a CUDA graph of it serves every step."""
        B, T, _ = x.shape
        positions = kv_cache.positions  # (T,)
        if tuple(positions.shape) != (T,):
            raise ValueError(f"KVCache.positions must be (T,) = ({T},), got shape {tuple(positions.shape)}")
        slots = torch.arange(kv_cache.max_len, device=x.device)
        mask = (slots[None, :] <= positions[:, None])[None, None]  # (1, 1, T, max_len)
        cos, sin = self._rotary_tables(positions[None], x.dtype)  # (1, T, D), the same for every row
        for layer in self.layers:
            x = layer(x, cos, sin, mask, kv_cache)
        return self.norm(x)


class Llama(nn.Module):
    """Llama for causal LM: `logits = model(input_ids)`, (B, T) -> (B, T, vocab).

    `model.gradient_checkpointing = True` recomputes each decoder layer in the backward pass
    (torch.utils.checkpoint, non-reentrant) while training. With `tie_word_embeddings`,
    `lm_head.weight` is `model.embed_tokens.weight`.
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        if self.lm_head.weight.device.type != "meta":
            self.apply(_init_weights)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool):
        self.model.gradient_checkpointing = bool(enabled)

    def tie_weights(self):
        """Make lm_head share the embedding matrix when the config ties them (again after loading)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, kv_cache=None, document_ids=None,
                inputs_embeds=None):
        """Logits (B, T, vocab) for input_ids (B, T) (or their embeddings, inputs_embeds (B, T, hidden)).

        attention_mask: (B, cached + T) 0/1 padding mask; position_ids: (B, T); kv_cache: a KVCache
        that this call reads and extends; document_ids: (B, T) ints for packed rows. See
        Note [attention masks and packing].
        """
        return self.lm_head(self.model(input_ids, attention_mask, position_ids, kv_cache, document_ids,
                                       inputs_embeds))

    @property
    def device(self) -> torch.device:
        """Where the layers compute (the embeddings and head may be in host memory: models/offload.py)."""
        return self.model.norm.weight.device

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KVCache in the dtype of the embeddings, on the device of the layers."""
        return KVCache(self.config, batch_size, max_len, dtype=self.model.embed_tokens.weight.dtype,
                       device=self.device)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.bfloat16, device="cpu", quantize=None,
                        host_embeddings: bool = False) -> "Llama":
        """Load an HF-format folder, a .gguf file or a pre-quantized bitsandbytes-4bit folder.

        quantize=None keeps the weights in `dtype`; "nf4" quantizes every linear layer but lm_head
        as it is read (quant.Linear4bit), so peak memory stays near the 4-bit model. host_embeddings
        reads the embeddings and head into host memory, frozen, never onto `device`
        (models.keep_embeddings_on_host). See models.load.
        """
        from models.load import load_pretrained
        return load_pretrained(path, dtype=dtype, device=device, quantize=quantize, host_embeddings=host_embeddings)


def _init_weights(module: nn.Module, std: float = 0.02):
    """Normal(0, 0.02) weights and zero biases (HF's initializer_range), for randomly initialised models."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)

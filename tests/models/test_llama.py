"""The Llama model: presets, HF configs, a loop-by-loop reference forward, rotary scaling, packing,
padding, the KV cache and gradient checkpointing."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from models.llama import KVCache, Llama, LlamaConfig, rope_inverse_frequencies


def tiny_config(**overrides) -> LlamaConfig:
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5)
    return LlamaConfig(**{**base, **overrides})


# Published parameter counts of the real checkpoints (embeddings counted once when tied).
@pytest.mark.parametrize("name,count", [("llama2-7b", 6_738_415_616), ("llama3-8b", 8_030_261_248),
                                        ("llama3.1-8b", 8_030_261_248), ("llama3.2-1b", 1_235_814_400),
                                        ("llama3.1-70b", 70_553_706_496), ("smollm2-135m", 134_515_008)])
def test_presets_have_the_published_sizes(name, count):
    with torch.device("meta"):
        model = Llama(LlamaConfig.preset(name))
    assert sum(p.numel() for p in model.parameters()) == count


def test_preset_overrides_and_unknown_name():
    cfg = LlamaConfig.preset("llama3-8b", num_hidden_layers=2)
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size == 4096
    assert LlamaConfig.preset("llama3-8b").num_hidden_layers == 32  # presets are not mutated
    with pytest.raises(ValueError, match="unknown Llama preset 'llama9'"):
        LlamaConfig.preset("llama9")


def test_hf_config_round_trip_and_variants(tmp_path):
    cfg = LlamaConfig.preset("llama3.2-1b")
    assert LlamaConfig.from_hf_config(cfg.to_hf_config()) == cfg
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    assert LlamaConfig.from_hf_config(tmp_path) == cfg
    # transformers >= 5 spells the rotary settings as one "rope_parameters" dict
    v5 = {k: v for k, v in cfg.to_hf_config().items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = dict(cfg.rope_scaling, rope_theta=cfg.rope_theta)
    assert LlamaConfig.from_hf_config(v5) == cfg
    plain = dict(v5, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    assert LlamaConfig.from_hf_config(plain).rope_scaling is None
    # HF's defaults for keys older configs leave out
    minimal = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
               "num_hidden_layers": 1, "num_attention_heads": 2}
    small = LlamaConfig.from_hf_config(minimal)
    assert (small.num_key_value_heads, small.head_dim, small.rms_norm_eps, small.tie_word_embeddings) == (2, 4, 1e-6, False)


def test_bad_hf_configs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'mistral'.*is not a Llama"):
        LlamaConfig.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"config\.json: missing key 'vocab_size'"):
        LlamaConfig.from_hf_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        LlamaConfig.from_hf_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LlamaConfig.from_hf_config(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        tiny_config(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
        tiny_config(num_key_value_heads=3)


def test_llama3_rope_scaling_formula():
    """Each frequency by the Llama 3.1 rule, written as a scalar loop."""
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    cfg = tiny_config(head_dim=32, num_attention_heads=2, rope_theta=500000.0, rope_scaling=scaling)
    got = rope_inverse_frequencies(cfg)
    expected, regimes = [], set()
    for i in range(16):
        f = 1.0 / 500000.0 ** (2 * i / 32)
        wavelength = 2 * math.pi / f
        if wavelength < 64 / 4.0:
            expected.append(f)
            regimes.add("high frequency: kept")
        elif wavelength > 64 / 1.0:
            expected.append(f / 8.0)
            regimes.add("low frequency: divided")
        else:
            s = (64 / wavelength - 1.0) / (4.0 - 1.0)
            expected.append((1 - s) * f / 8.0 + s * f)
            regimes.add("between: blended")
    assert len(regimes) == 3  # the shape is chosen so that every branch is exercised
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0)
    linear = rope_inverse_frequencies(tiny_config(rope_scaling={"rope_type": "linear", "factor": 4.0}))
    torch.testing.assert_close(linear * 4.0, rope_inverse_frequencies(tiny_config()), rtol=1e-6, atol=0)


def reference_forward(model: Llama, ids: torch.Tensor) -> torch.Tensor:
    """Logits for one sequence (T,), head by head and with rotary embeddings as complex rotations
    of the pairs (x[i], x[i + D/2]): an independent spelling of the same model."""
    cfg = model.config
    D, H, KV = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    T = ids.shape[0]
    inv_freq = torch.tensor([1.0 / cfg.rope_theta ** (2 * i / D) for i in range(D // 2)], dtype=torch.float64)
    rotation = torch.polar(torch.ones(T, D // 2, dtype=torch.float64),
                           torch.arange(T, dtype=torch.float64)[:, None] * inv_freq)  # (T, D/2)

    def rope(x):  # (T, D)
        z = torch.complex(x[:, :D // 2].double(), x[:, D // 2:].double()) * rotation
        return torch.cat((z.real, z.imag), dim=-1).float()

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    x = model.model.embed_tokens.weight[ids]  # (T, hidden)
    for layer in model.model.layers:
        a = layer.self_attn
        h = rms(x, layer.input_layernorm.weight)
        q, k, v = h @ a.q_proj.weight.T, h @ a.k_proj.weight.T, h @ a.v_proj.weight.T
        heads = []
        for head in range(H):
            kv = head // (H // KV)
            qh = rope(q[:, head * D:(head + 1) * D])
            kh = rope(k[:, kv * D:(kv + 1) * D])
            vh = v[:, kv * D:(kv + 1) * D]
            scores = qh @ kh.T / math.sqrt(D)
            scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            heads.append(scores.softmax(-1) @ vh)
        x = x + torch.cat(heads, dim=-1) @ a.o_proj.weight.T
        h = rms(x, layer.post_attention_layernorm.weight)
        m = layer.mlp
        x = x + (F.silu(h @ m.gate_proj.weight.T) * (h @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    return rms(x, model.model.norm.weight) @ model.lm_head.weight.T


@pytest.mark.parametrize("kv_heads,tied", [(2, False), (4, True), (1, False)])
def test_forward_matches_reference(kv_heads, tied):
    model = Llama(tiny_config(num_key_value_heads=kv_heads, tie_word_embeddings=tied)).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = torch.randint(0, 96, (2, 13))
    with torch.no_grad():
        logits = model(ids)
        assert logits.shape == (2, 13, 96)
        for b in range(2):
            torch.testing.assert_close(logits[b], reference_forward(model, ids[b]), rtol=1e-4, atol=1e-4)


def test_matches_transformers_llama():
    """Optional cross-check with HF transformers' LlamaForCausalLM (skips when it is not installed)."""
    transformers = pytest.importorskip("transformers")
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
    cfg = tiny_config(rope_scaling=scaling, rope_theta=500000.0)
    model = Llama(cfg).eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_config())).eval()
    hf.load_state_dict(model.state_dict())
    ids = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_packed_rows_equal_separate_documents():
    model = Llama(tiny_config()).eval()
    docs = [torch.randint(0, 96, (n,)) for n in (5, 1, 7, 3)]
    row = torch.cat(docs)[None]  # (1, 16)
    # ids 0, 1, 0, 2: an id used again later is a new document (documents are runs of equal ids)
    document_ids = torch.cat([torch.full((len(d),), i) for d, i in zip(docs, [0, 1, 0, 2])])[None]
    with torch.no_grad():
        packed = model(row, document_ids=document_ids)[0]
        separate = torch.cat([model(d[None])[0] for d in docs])
        torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)
        # explicit position ids restarting per document give the same
        positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
        torch.testing.assert_close(model(row, position_ids=positions, document_ids=document_ids)[0], separate,
                                   rtol=1e-5, atol=1e-5)
        # without document_ids the documents do see each other
        assert not torch.allclose(model(row, position_ids=positions)[0], separate, atol=1e-3)


def test_packed_batch_with_padding_documents():
    """The trainer's layout: several packed rows, padding as its own document id (-1)."""
    model = Llama(tiny_config()).eval()
    a, b, c = (torch.randint(0, 96, (n,)) for n in (4, 6, 9))
    rows = torch.zeros(2, 10, dtype=torch.long)
    rows[0, :4], rows[0, 4:10] = a, b
    rows[1, :9] = c
    doc = torch.tensor([[0] * 4 + [1] * 6, [0] * 9 + [-1]])
    with torch.no_grad():
        out = model(rows, document_ids=doc)
        torch.testing.assert_close(out[0, :4], model(a[None])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[0, 4:], model(b[None])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1, :9], model(c[None])[0], rtol=1e-5, atol=1e-5)


def test_left_padding_mask():
    model = Llama(tiny_config()).eval()
    short, long = torch.randint(0, 96, (4,)), torch.randint(0, 96, (7,))
    ids = torch.zeros(2, 7, dtype=torch.long)
    ids[0, 3:], ids[1] = short, long
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=positions)
        assert torch.isfinite(out).all()  # padding queries see themselves, never an empty softmax
        torch.testing.assert_close(out[0, 3:], model(short[None])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1], model(long[None])[0], rtol=1e-5, atol=1e-5)


def test_kv_cache_matches_full_forward():
    model = Llama(tiny_config()).eval()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(2, 12)
        steps = [model(ids[:, :5], kv_cache=cache)]  # prefill
        steps.append(model(ids[:, 5:8], kv_cache=cache))  # a chunk against a non-empty cache
        for t in range(8, 12):
            steps.append(model(ids[:, t:t + 1], kv_cache=cache))
        assert cache.length == 12
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="KVCache is full"):
            model(ids[:, :1], kv_cache=cache)


def test_kv_cache_with_padding_mask_over_cached_keys():
    model = Llama(tiny_config()).eval()
    ids = torch.randint(0, 96, (1, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 0, 0, 1, 2, 3]])
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions)
        cache = model.new_kv_cache(1, 6)
        first = model(ids[:, :4], attention_mask=mask[:, :4], position_ids=positions[:, :4], kv_cache=cache)
        rest = [model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1],
                      kv_cache=cache) for t in (4, 5)]
        torch.testing.assert_close(torch.cat([first] + rest, 1)[:, 2:], full[:, 2:], rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = Llama(tiny_config()).train()
    ids = torch.randint(0, 96, (2, 10))
    doc = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])

    def grads():
        model.zero_grad()
        F.cross_entropy(model(ids, document_ids=doc).flatten(0, 1), ids.flatten()).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing = True
    assert model.model.gradient_checkpointing
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_meta_build_and_assign_load():
    cfg = tiny_config(tie_word_embeddings=True)
    source = Llama(cfg).eval()
    with torch.device("meta"):
        model = Llama(cfg)
    state = {k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}
    model.load_state_dict(state, assign=True, strict=False)
    model.tie_weights()
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), source(ids), rtol=0, atol=0)


def test_bad_forward_inputs():
    model = Llama(tiny_config())
    ids = torch.randint(0, 96, (2, 5))
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\)"):
        model(ids[0])
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, cached \+ T\) = \(2, 5\)"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"document_ids must be \(B, T\)"):
        model(ids, document_ids=torch.zeros(5))
    with pytest.raises(ValueError, match=r"position_ids must be \(B, T\)"):
        model(ids, position_ids=torch.zeros(2, 6, dtype=torch.long))
    cache = KVCache(model.config, 2, 10)
    model(ids, kv_cache=cache)
    with pytest.raises(ValueError, match="document_ids.*kv_cache"):
        model(ids, kv_cache=cache, document_ids=torch.zeros(2, 5))


def test_rms_norm_of_bfloat16_is_the_float32_formula_rounded_once():
    from models.llama import RMSNorm
    norm = RMSNorm(256, eps=1e-5).to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight)
    x = (torch.randn(5, 7, 256) * torch.logspace(-2, 2, 7)[:, None]).to(torch.bfloat16)  # rows of all scales
    x64 = x.double()
    normed = (x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    torch.testing.assert_close(norm(x), norm.weight * normed, rtol=0, atol=0)

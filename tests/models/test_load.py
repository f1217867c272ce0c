"""Loading HF-format folders (single file and sharded), NF4 while loading, pre-quantized bitsandbytes
folders, save_pretrained, and every kind of bad checkpoint."""
import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

import models
from models.llama import Llama, LlamaConfig


def tiny_config(**overrides) -> LlamaConfig:
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5)
    return LlamaConfig(**{**base, **overrides})


def write_folder(folder, model, shards: int = 1, drop=(), extra=None, config=None):
    """An HF-format folder written by hand: config.json and safetensors (split into `shards` files
    with model.safetensors.index.json when shards > 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    for key in drop:
        del state[key]
    state.update(extra or {})
    (folder / "config.json").write_text(json.dumps(config or model.config.to_hf_config()))
    keys = list(state)
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def same_logits(a, b, atol=0.0):
    ids = torch.randint(0, a.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(ids), b.eval()(ids), rtol=atol, atol=atol)


@pytest.mark.parametrize("shards,tied", [(1, False), (1, True), (3, False), (3, True)])
def test_hf_folder_loads_the_same_model(tmp_path, shards, tied):
    model = Llama(tiny_config(tie_word_embeddings=tied))
    write_folder(tmp_path / "m", model, shards=shards)
    loaded = models.Llama.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.parameters())
    same_logits(loaded, model)


@pytest.mark.parametrize("tied", [False, True])
def test_embeddings_and_head_can_load_straight_into_host_memory(tmp_path, tied):
    model = Llama(tiny_config(tie_word_embeddings=tied))
    write_folder(tmp_path / "m", model)
    loaded = models.Llama.from_pretrained(tmp_path / "m", dtype=torch.float32, quantize="nf4", host_embeddings=True)
    assert isinstance(loaded.model.embed_tokens, models.HostEmbedding)
    assert isinstance(loaded.lm_head, models.HostHead)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    assert not loaded.model.embed_tokens.weight.requires_grad
    same_logits(loaded, models.Llama.from_pretrained(tmp_path / "m", dtype=torch.float32, quantize="nf4"))


def test_loaded_weights_do_not_map_the_file(tmp_path):
    """safetensors' CPU tensors view the memory-mapped file; ours are copies, so rewriting the
    checkpoint in place (here: truncating it) leaves a loaded model intact."""
    model = Llama(tiny_config())
    write_folder(tmp_path / "m", model)
    loaded = models.Llama.from_pretrained(tmp_path / "m", dtype=torch.float32)
    with open(tmp_path / "m" / "model.safetensors", "r+b") as f:
        f.truncate(0)
    same_logits(loaded, model)


def test_dtype_conversion_and_ignored_keys(tmp_path):
    model = Llama(tiny_config(tie_word_embeddings=True))
    # an older checkpoint: rotary inv_freq buffers stored, and a tied head stored as well
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
             "lm_head.weight": model.lm_head.weight.detach().clone()}
    write_folder(tmp_path / "m", model, extra=extra)
    loaded = models.Llama.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    ref = Llama(tiny_config(tie_word_embeddings=True)).to(torch.bfloat16)
    ref.load_state_dict(model.state_dict())
    same_logits(loaded, ref)


@pytest.mark.parametrize("max_shard_bytes", [None, 40_000])
def test_save_pretrained_round_trip(tmp_path, max_shard_bytes):
    model = Llama(tiny_config())
    models.save_pretrained(model, tmp_path / "out", max_shard_bytes=max_shard_bytes)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    if max_shard_bytes is None:
        assert files == ["config.json", "model.safetensors"]
    else:
        assert "model.safetensors.index.json" in files and len(files) > 3
        assert not any(".tmp" in f for f in files)
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {stat.S_IMODE((tmp_path / "out" / f).stat().st_mode) for f in files}
    assert modes == {0o666 & ~umask}  # as a plain open() makes them (safetensors alone writes 0o600)
    same_logits(models.Llama.from_pretrained(tmp_path / "out", dtype=torch.float32), model)


def test_nf4_while_loading_equals_quantizing_afterwards(tmp_path):
    quant = pytest.importorskip("quant")
    model = Llama(tiny_config())
    write_folder(tmp_path / "m", model, shards=2)
    loaded = models.Llama.from_pretrained(tmp_path / "m", dtype=torch.float32, quantize="nf4")
    linears = {n: type(m).__name__ for n, m in loaded.named_modules() if n.endswith(("_proj", "lm_head"))}
    assert linears.pop("lm_head") == "Linear" and set(linears.values()) == {"Linear4bit"}
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    reference = Llama(tiny_config())
    reference.load_state_dict(model.state_dict())
    quant.quantize(reference, skip=("lm_head",), compute_dtype=torch.float32)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    same_logits(loaded, reference)


def test_prequantized_bitsandbytes_folder(tmp_path):
    quant = pytest.importorskip("quant")
    model = Llama(tiny_config(tie_word_embeddings=True))
    # leave one layer unquantized, as checkpoints with llm_int8_skip_modules do
    quant.quantize(model, skip=("lm_head", "model.layers.1.mlp.down_proj"), compute_dtype=torch.float32)
    models.save_pretrained(model, tmp_path / "bnb")
    config = json.loads((tmp_path / "bnb" / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit"] and config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    for quantize in (None, "nf4"):  # a stored 4-bit layer is never quantized twice
        loaded = models.Llama.from_pretrained(tmp_path / "bnb", dtype=torch.float32, quantize=quantize)
        assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
        assert type(loaded.model.layers[1].mlp.down_proj) is torch.nn.Linear
        for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
            assert torch.equal(a, b), name
        same_logits(loaded, model)


def test_bad_prequantized_tensors(tmp_path):
    quant = pytest.importorskip("quant")
    model = Llama(tiny_config())
    quant.quantize(model, compute_dtype=torch.float32)
    models.save_pretrained(model, tmp_path / "bnb")
    state = {}
    from safetensors import safe_open
    with safe_open(str(tmp_path / "bnb" / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state["model.layers.0.mlp.up_proj.weight.absmax"] = state["model.layers.0.mlp.up_proj.weight.absmax"][:-1]
    save_file(state, str(tmp_path / "bnb" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors: bitsandbytes 4-bit tensors of "
                                         r"model\.layers\.0\.mlp\.up_proj\.weight"):
        models.Llama.from_pretrained(tmp_path / "bnb", dtype=torch.float32)


def test_missing_files_and_foreign_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such file or folder"):
        models.Llama.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config\.json: missing"):
        models.Llama.from_pretrained(tmp_path / "empty")
    model = Llama(tiny_config())
    write_folder(tmp_path / "mistral", model, config=dict(model.config.to_hf_config(), model_type="mistral",
                                                            architectures=["MistralForCausalLM"]))
    with pytest.raises(ValueError, match=r"mistral/config\.json: model_type 'mistral'"):
        models.Llama.from_pretrained(tmp_path / "mistral")
    write_folder(tmp_path / "gptq", model, config=dict(model.config.to_hf_config(),
                                                         quantization_config={"quant_method": "gptq", "bits": 4}))
    with pytest.raises(ValueError, match=r"gptq/config\.json: quantization_config .* not supported"):
        models.Llama.from_pretrained(tmp_path / "gptq")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps(model.config.to_hf_config()))
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(FileNotFoundError, match=r"pickled: no model\.safetensors.*pytorch_model\.bin: pickle"):
        models.Llama.from_pretrained(tmp_path / "pickled")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt: not a GGUF file"):
        models.Llama.from_pretrained(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="quantize must be None or 'nf4'"):
        models.Llama.from_pretrained(tmp_path / "mistral", quantize="int8")


def test_wrong_missing_and_unexpected_tensors(tmp_path):
    model = Llama(tiny_config())
    key = "model.layers.1.mlp.up_proj.weight"
    write_folder(tmp_path / "shape", model, extra={key: torch.zeros(128, 65)})
    with pytest.raises(ValueError, match=r"shape/model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' "
                                         r"has shape \(128, 65\), the config expects \(128, 64\)"):
        models.Llama.from_pretrained(tmp_path / "shape")
    write_folder(tmp_path / "missing", model, shards=2, drop=[key])
    with pytest.raises(ValueError, match=r"missing \(model-00001-of-00002\.safetensors, model-00002-of-00002\.safetensors\): "
                                         r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        models.Llama.from_pretrained(tmp_path / "missing")
    write_folder(tmp_path / "extra", model, extra={"model.layers.2.mlp.up_proj.weight": torch.zeros(128, 64)})
    with pytest.raises(ValueError, match=r"extra/model\.safetensors: tensor 'model\.layers\.2\.mlp\.up_proj\.weight' "
                                         r"does not belong"):
        models.Llama.from_pretrained(tmp_path / "extra")


def test_truncated_and_inconsistent_safetensors(tmp_path):
    model = Llama(tiny_config())
    write_folder(tmp_path / "cut", model)
    file = tmp_path / "cut" / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-1000])
    with pytest.raises(ValueError, match=r"cut/model\.safetensors: truncated safetensors file: tensor '[\w.]+' needs"):
        models.Llama.from_pretrained(tmp_path / "cut")
    file.write_bytes(data[:20])
    with pytest.raises(ValueError, match=r"cut/model\.safetensors: truncated safetensors file: the header needs"):
        models.Llama.from_pretrained(tmp_path / "cut")

    write_folder(tmp_path / "shards", model, shards=2)
    (tmp_path / "shards" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors: missing \(listed in "
                                                r"model\.safetensors\.index\.json\)"):
        models.Llama.from_pretrained(tmp_path / "shards")

    write_folder(tmp_path / "index", model, shards=2)
    index = json.loads((tmp_path / "index" / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    index["weight_map"]["model.layers.0.mlp.down_proj.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / "index" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model-00001-of-00002\.safetensors: missing tensor 'model\.layers\.0\.mlp\.\w+_proj"
                                         r"\.weight' \(listed in model\.safetensors\.index\.json\)"):
        models.Llama.from_pretrained(tmp_path / "index")

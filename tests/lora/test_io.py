import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora

from .toy import ToyLM, randomize_adapters


def _saved(tmp_path, **kw):
    model = lora.wrap(ToyLM(), r=4, alpha=8, **kw)
    randomize_adapters(model)
    lora.save(model, tmp_path / "adapter", base_model_name_or_path="toy/base")
    return model, tmp_path / "adapter"


def test_peft_layout_keys_shapes_and_config(tmp_path):
    model, folder = _saved(tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    assert "base_model.model.blocks.0.q_proj.lora_A.weight" in tensors
    assert tensors["base_model.model.blocks.1.up.lora_B.weight"].shape == (32, 4)
    assert tensors["base_model.model.blocks.1.down.lora_A.weight"].shape == (4, 32)
    assert len(tensors) == 16
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    assert config["target_modules"] == ["down", "q_proj", "up", "v_proj"]
    assert config["bias"] == "none" and config["use_rslora"] is False and config["use_dora"] is False
    assert config["base_model_name_or_path"] == "toy/base"
    assert not list(folder.glob("*.tmp"))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_get_the_mode_of_a_plain_open(tmp_path, umask):
    """Not owner-only whatever the umask (mkstemp and safetensors' save_file create 0o600 files)."""
    previous = os.umask(umask)
    try:
        _, folder = _saved(tmp_path)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {"adapter_config.json": 0o666 & ~umask, "adapter_model.safetensors": 0o666 & ~umask}


@pytest.mark.parametrize("kw", [{}, {"use_dora": True}, {"use_rslora": True}])
def test_save_load_round_trip_into_a_fresh_base(tmp_path, kw):
    model, folder = _saved(tmp_path, **kw)
    ids = torch.randint(0, 50, (9,))
    expected = model.eval()(ids)
    fresh = ToyLM()
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in model.state_dict().items()
                           if "lora_" not in k})
    lora.load(fresh, folder)  # wraps as the config says, then loads
    torch.testing.assert_close(fresh.eval()(ids), expected)
    if kw.get("use_dora"):
        assert "base_model.model.blocks.0.up.lora_magnitude_vector" in load_file(
            folder / "adapter_model.safetensors")


def test_load_into_an_already_wrapped_model(tmp_path):
    model, folder = _saved(tmp_path)
    other = lora.wrap(ToyLM(), r=4, alpha=8)
    lora.load(other, folder)
    for (_, a), (_, b) in zip(lora.lora_layers(model), lora.lora_layers(other)):
        assert torch.equal(a.lora_A.weight, b.lora_A.weight)
        assert torch.equal(a.lora_B.weight, b.lora_B.weight)


def test_load_names_a_shape_mismatch(tmp_path):
    _, folder = _saved(tmp_path)
    other = lora.wrap(ToyLM(), r=8)
    with pytest.raises(ValueError, match=r"lora_A.weight' has shape \(4, 16\), the model expects \(8, 16\)"):
        lora.load(other, folder)


def test_load_names_a_missing_and_an_unexpected_key(tmp_path):
    _, folder = _saved(tmp_path)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    missing = dict(tensors)
    del missing["base_model.model.blocks.1.v_proj.lora_B.weight"]
    save_file(missing, path)
    with pytest.raises(ValueError, match="has no tensor 'base_model.model.blocks.1.v_proj.lora_B.weight'"):
        lora.load(lora.wrap(ToyLM(), r=4), folder)
    extra = dict(tensors, **{"base_model.model.blocks.0.k_proj.lora_A.weight": torch.zeros(4, 16)})
    save_file(extra, path)
    with pytest.raises(ValueError, match="k_proj.lora_A.weight', which matches no LoRA layer"):
        lora.load(lora.wrap(ToyLM(), r=4), folder)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        lora.load(ToyLM(), tmp_path)
    _, folder = _saved(tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors"):
        lora.load(ToyLM(), folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        lora.load(ToyLM(), folder)
    (folder / "adapter_config.json").write_text('{"peft_type": "IA3", "r": 4, "lora_alpha": 8}')
    with pytest.raises(ValueError, match="peft_type 'IA3'"):
        lora.load(ToyLM(), folder)


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    model, folder = _saved(tmp_path)
    before = (folder / "adapter_model.safetensors").read_bytes()
    import lora.io as io

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(io, "save_file", broken_save)
    with pytest.raises(OSError, match="No space left"):
        lora.save(model, folder)
    assert (folder / "adapter_model.safetensors").read_bytes() == before
    assert not list(folder.glob(".*.tmp"))


def test_save_refuses_an_unwrapped_model(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora.save(ToyLM(), tmp_path / "a")

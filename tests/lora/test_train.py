"""The trainer end to end on the CPU: a tiny random Llama with SmolLM2's real tokenizer and the demo's
dataset. Loss falls; resume is exact; bad input is clear; checkpoints are whole or absent; the
merged export computes what the adapted model computes."""
import json
import os
import shutil
import stat

import pytest
import torch

import lora
import lora.train
import models
from lora.config import Config
from lora.demo import DATA

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """An HF-format folder: a 2-layer Llama (random weights) and SmolLM2's tokenizer."""
    gguf = models.fetch_smollm2()
    tok = models.Tokenizer.from_pretrained(gguf)
    cfg = models.LlamaConfig.preset("smollm2-135m", hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    model = models.Llama(cfg)
    with torch.no_grad():  # larger tied embeddings, so adapters can move the logits within a few steps
        model.model.embed_tokens.weight.mul_(25)
    models.save_pretrained(model, folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "people.jsonl"
    path.write_text("".join(DATA.read_text().splitlines(keepends=True)[:48]))
    return path


def _config(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=str(data), output_dir=str(out), quantize="nf4", r=8, alpha=16,
                dropout=0.0, max_length=128, batch_size=4, lr=3e-3, warmup_steps=2, max_steps=8,
                eval_every=0, save_every=0, log_every=100, seed=1)
    return Config(**(base | kw))


def _losses(history):
    return [h["loss"] for h in history if "loss" in h]


def test_loss_falls_and_outputs_are_written(tiny_model_dir, small_data, tmp_path):
    result = lora.train.run(_config(tiny_model_dir, small_data, tmp_path, max_steps=20, lr=1e-2),
                            log=lambda s: None)
    assert result["final_eval_loss"] < 0.8 * result["first_eval_loss"]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = _losses(log)
    assert len(losses) == 20 and sum(losses[-4:]) < 0.8 * sum(losses[:4])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000020"]


def test_resume_continues_exactly(tiny_model_dir, small_data, tmp_path):
    full = lora.train.Trainer(_config(tiny_model_dir, small_data, tmp_path / "a", save_every=3, keep_checkpoints=5), log=lambda s: None)
    full.fit()
    expected = _losses(full.history)
    # An interrupted run: only the step-3 checkpoint survived.
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000003", tmp_path / "b" / "checkpoints" / "step-000003")
    resumed = lora.train.Trainer(_config(tiny_model_dir, small_data, tmp_path / "b", save_every=3, resume=True),
                                 log=lambda s: None)
    resumed.fit()
    assert _losses(resumed.history) == expected  # bitwise on the CPU, history from step 1 on


def test_a_corrupt_checkpoint_state_is_named_on_resume(tiny_model_dir, small_data, tmp_path):
    trainer = lora.train.Trainer(_config(tiny_model_dir, small_data, tmp_path, max_steps=1), log=lambda s: None)
    trainer.train_step()
    folder = trainer.save_checkpoint()
    state = folder / "trainer_state.json"
    for text, message in [('{"progress": {"step": 1', "not valid JSON"), ('{"history": []}', "'progress' is missing"),
                          ('{"progress": {"stepp": 1}}', "'progress' is missing or malformed")]:
        state.write_text(text)
        with pytest.raises(ValueError, match=message) as error:
            trainer.resume_from(folder)
        assert str(state) in str(error.value)


def test_a_failed_checkpoint_write_leaves_nothing_behind(tiny_model_dir, small_data, tmp_path, monkeypatch):
    trainer = lora.train.Trainer(_config(tiny_model_dir, small_data, tmp_path, max_steps=2), log=lambda s: None)
    trainer.train_step()
    first = trainer.save_checkpoint()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    trainer.train_step()
    monkeypatch.setattr(lora.optim, "save_state", disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name]
    assert trainer.latest_checkpoint() == first


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_checkpoint_gets_the_modes_of_plain_files_and_folders(tiny_model_dir, small_data, tmp_path, umask):
    """Not owner-only whatever the umask (mkdtemp and safetensors' save_file create owner-only ones)."""
    trainer = lora.train.Trainer(_config(tiny_model_dir, small_data, tmp_path, max_steps=1), log=lambda s: None)
    trainer.train_step()
    previous = os.umask(umask)
    try:
        folder = trainer.save_checkpoint()
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}
    modes["."] = stat.S_IMODE(folder.stat().st_mode)
    assert "rng.safetensors" in modes and "trainer_state.json" in modes
    assert modes == {name: (0o777 if (folder / name).is_dir() else 0o666) & ~umask for name in modes}


def test_merged_export_matches_the_adapted_model(tiny_model_dir, small_data, tmp_path):
    trainer = lora.train.Trainer(_config(tiny_model_dir, small_data, tmp_path, quantize="none", max_steps=3),
                                 log=lambda s: None)
    for _ in range(3):
        trainer.train_step()
    folder = lora.train.export_merged(trainer.model, trainer.tok, tmp_path / "merged", log=lambda s: None)
    merged = models.Llama.from_pretrained(folder, dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 12))
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), trainer.model(ids), rtol=1e-4, atol=1e-4)
    assert models.Tokenizer.from_pretrained(folder).encode("hello") == trainer.tok.encode("hello")


def test_truncation_is_counted_and_bad_paths_are_clear(tiny_model_dir, small_data, tmp_path):
    trainer = lora.train.Trainer(_config(tiny_model_dir, small_data, tmp_path, max_length=24), log=lambda s: None)
    assert trainer.stats.truncated == trainer.stats.examples  # every example is longer than 24 tokens
    with pytest.raises(FileNotFoundError, match="model path .*nowhere does not exist"):
        lora.train.Trainer(_config(tmp_path / "nowhere", small_data, tmp_path))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no examples"):
        lora.train.Trainer(_config(tiny_model_dir, empty, tmp_path))


def test_command_line(tiny_model_dir, small_data, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "{tiny_model_dir}"\ndata = "{small_data}"\noutput_dir = "{tmp_path / "out"}"\n'
                    f'max_steps = 1\nr = 4\nmax_length = 128\n')
    assert lora.train.main([str(toml), "--lr", "1e-3", "--no-packing"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["lr"] == 1e-3
    assert lora.train.main([str(toml), "--learning-rate", "1"]) == 2
    assert "unknown config field 'learning_rate'" in capsys.readouterr().err

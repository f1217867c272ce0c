import math

import pytest

from lora.config import Config, apply_overrides, load_config, parse_args
from lora.train import learning_rate


def test_toml_and_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "m"\ndata = "d.jsonl"\nlr = 1e-3\ntargets = ["q_proj", "v_proj"]\npacking = false\n')
    config = load_config(path)
    assert (config.lr, config.targets, config.packing) == (1e-3, ["q_proj", "v_proj"], False)
    file, flags = parse_args([str(path), "--lr", "5e-4", "--targets", "o_proj,down_proj", "--resume",
                              "--no-gradient-checkpointing", "--r=8"])
    assert file == str(path)
    config = apply_overrides(config, flags)
    assert (config.lr, config.targets, config.resume, config.gradient_checkpointing, config.r) == (
        5e-4, ["o_proj", "down_proj"], True, False, 8)


def test_unknown_fields_and_bad_values_are_named(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "m"\nlearning_rate = 1e-3\n')
    with pytest.raises(ValueError, match=r"run.toml: unknown config field 'learning_rate'"):
        load_config(path)
    with pytest.raises(ValueError, match=r"unknown config field 'rank'"):
        parse_args(["--rank", "4"])
    with pytest.raises(ValueError, match=r"did you mean 'epochs'"):
        parse_args(["--epoch", "4"])
    with pytest.raises(ValueError, match=r"field 'r': expected an integer"):
        apply_overrides(Config(), {"r": "1.5"})
    path.write_text("model = [")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ValueError, match="model is empty.*data is empty"):
        Config().validate()
    with pytest.raises(FileNotFoundError, match="no such config file"):
        load_config(tmp_path / "missing.toml")


def test_warmup_then_cosine_schedule():
    c = Config(model="m", data="d", lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [learning_rate(c, s, total_steps=14) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert learning_rate(c, 14, total_steps=14) == pytest.approx(0.1)
    linear = Config(model="m", data="d", lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert learning_rate(linear, 5, total_steps=10) == pytest.approx(0.5)

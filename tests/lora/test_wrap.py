import pytest
import torch
import torch.nn as nn

import lora
from lora import LoRALinear

from .toy import ToyLM, randomize_adapters


def _wrapped_names(model):
    return sorted(name for name, _ in lora.lora_layers(model))


def test_all_linear_wraps_every_linear_but_the_head():
    model = lora.wrap(ToyLM(), r=4)
    expected = sorted(
        f"blocks.{i}.{n}" for i in range(2) for n in ("q_proj", "v_proj", "up", "down")
    )
    assert _wrapped_names(model) == expected
    assert isinstance(model.lm_head, nn.Linear)


def test_wrap_returns_the_same_model_and_defaults_alpha_to_2r():
    model = ToyLM()
    assert lora.wrap(model, r=8) is model
    layer = model.blocks[0].q_proj
    assert (layer.r, layer.alpha, layer.scaling) == (8, 16, 2.0)


@pytest.mark.parametrize(
    "targets, expected",
    [
        (["q_proj", "v_proj"], ["q_proj", "v_proj"]),
        (["blocks.1.up"], None),
        ([r"blocks\.0\.(up|down)"], None),
    ],
)
def test_target_patterns(targets, expected):
    model = lora.wrap(ToyLM(), r=2, targets=targets)
    names = _wrapped_names(model)
    if expected is not None:
        assert names == sorted(f"blocks.{i}.{n}" for i in range(2) for n in expected)
    elif targets == ["blocks.1.up"]:
        assert names == ["blocks.1.up"]
    else:
        assert names == ["blocks.0.down", "blocks.0.up"]


def test_exclude_and_explicit_head():
    model = lora.wrap(ToyLM(), r=2, exclude=["down", r"blocks\.1\..*"])
    assert _wrapped_names(model) == ["blocks.0.q_proj", "blocks.0.up", "blocks.0.v_proj"]
    model = lora.wrap(ToyLM(), r=2, targets=["lm_head"])
    assert _wrapped_names(model) == ["lm_head"]


def test_everything_but_the_adapters_is_frozen_and_only_adapters_get_gradients():
    model = lora.wrap(ToyLM(), r=4)
    randomize_adapters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    model(torch.randint(0, 50, (8,))).logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_wrap_keeps_outputs_of_a_fresh_model():
    model = ToyLM()
    ids = torch.randint(0, 50, (6,))
    before = model(ids)
    lora.wrap(model, r=4, use_dora=False)
    assert torch.equal(model(ids), before)


def test_wrapping_twice_is_an_error():
    model = lora.wrap(ToyLM(), r=4)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        lora.wrap(model, r=4)


def test_no_match_names_the_patterns_and_lists_layers():
    with pytest.raises(ValueError, match=r"no linear layer matches targets=\['k_proj'\].*blocks\.0\.q_proj"):
        lora.wrap(ToyLM(), targets=["k_proj"])
    with pytest.raises(ValueError, match="not linear"):
        lora.wrap(ToyLM(), targets=["norm"])
    with pytest.raises(ValueError, match="'all-linear' or a list"):
        lora.wrap(ToyLM(), targets="q_proj")


def test_any_model_a_bare_linear_in_a_sequential():
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2))
    lora.wrap(model, r=2)
    assert isinstance(model[0], LoRALinear) and isinstance(model[2], LoRALinear)


def test_trainable_parameters_counts():
    model = ToyLM(vocab=50, d=16)
    total = sum(p.numel() for p in model.parameters())
    lora.wrap(model, r=4)
    adapters = 2 * (4 * (16 + 16) + 4 * (16 + 16) + 4 * (16 + 32) + 4 * (32 + 16))
    count = lora.trainable_parameters(model)
    assert (count.trainable, count.total) == (adapters, total + adapters)
    assert count.percent == pytest.approx(100 * adapters / (total + adapters))
    assert f"trainable params: {adapters:,}" in str(count)


def test_trainable_parameters_counts_quantized_layers_logically(capsys):
    from .test_layers import FakeQuantLinear

    model = nn.Sequential(FakeQuantLinear(torch.randn(6, 10)))
    count = lora.trainable_parameters(model, verbose=True)
    assert count.total == 6 * 10 + 6  # logical weight + bias; the stored buffer is not counted
    assert "all params: 66" in capsys.readouterr().out


def test_multihead_attention_projection_is_left_alone():
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(self.attn(x, x, x)[0])

    model = lora.wrap(WithMHA(), r=2)
    assert _wrapped_names(model) == ["proj"]
    model(torch.randn(2, 3, 8)).sum().backward()  # MHA still works

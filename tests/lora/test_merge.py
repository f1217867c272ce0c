import pytest
import torch
import torch.nn as nn

import lora

from .test_layers import FakeQuantLinear
from .toy import ToyLM, randomize_adapters


def _model(**kw):
    model = lora.wrap(ToyLM(), r=4, **kw)
    randomize_adapters(model)
    return model.eval()


@pytest.mark.parametrize("kw", [{}, {"use_rslora": True}, {"use_dora": True}])
def test_merge_matches_unmerged_and_unmerge_restores_the_weights(kw):
    model = _model(**kw)
    ids = torch.randint(0, 50, (16,))
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = model(ids)
    lora.merge(model)
    assert all(layer.merged for _, layer in lora.lora_layers(model))
    torch.testing.assert_close(model(ids), unmerged, rtol=1e-5, atol=1e-5)
    changed = model.blocks[0].q_proj.base_layer.weight
    assert not torch.allclose(changed, base_weights["blocks.0.q_proj.base_layer.weight"])
    lora.unmerge(model)
    for name, param in model.named_parameters():
        if name in base_weights:
            torch.testing.assert_close(param, base_weights[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(ids), unmerged, rtol=1e-5, atol=1e-5)


def test_eval_and_train_never_merge():
    model = _model()
    model.eval()
    model.train()
    assert not any(layer.merged for _, layer in lora.lora_layers(model))


def test_merge_twice_and_unmerge_unmerged_are_errors():
    model = _model()
    with pytest.raises(ValueError, match="is not merged"):
        lora.unmerge(model)
    lora.merge(model)
    with pytest.raises(ValueError, match="already merged"):
        lora.merge(model)
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora.merge(ToyLM())


@pytest.mark.parametrize("kw", [{}, {"use_dora": True}])
def test_merged_state_dict_is_a_plain_model_computing_the_adapted_function(kw):
    model = _model(**kw)
    ids = torch.randint(0, 50, (10,))
    expected = model(ids)
    state = lora.merged_state_dict(model)
    plain = ToyLM()
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state)
    torch.testing.assert_close(plain.eval()(ids), expected, rtol=1e-5, atol=1e-5)
    assert not any(layer.merged for _, layer in lora.lora_layers(model))  # model unchanged
    lora.merge(model)
    merged_again = lora.merged_state_dict(model)
    for key in state:
        torch.testing.assert_close(merged_again[key], state[key], rtol=1e-6, atol=1e-6)


def test_merged_state_dict_dtype_cast():
    state = lora.merged_state_dict(_model(), dtype=torch.bfloat16)
    assert {v.dtype for v in state.values()} == {torch.bfloat16}


def test_disabled_runs_the_base_model():
    base = ToyLM().eval()
    ids = torch.randint(0, 50, (12,))
    expected = base(ids)
    model = lora.wrap(base, r=4)
    randomize_adapters(model)
    assert not torch.allclose(model(ids), expected)
    with lora.disabled(model):
        torch.testing.assert_close(model(ids), expected)
    assert not torch.allclose(model(ids), expected)
    lora.merge(model)
    with pytest.raises(ValueError, match="merged; call lora.unmerge"):
        with lora.disabled(model):
            pass


def test_merging_a_quantized_base_goes_through_dequantize_and_restores_it():
    w = torch.randn(6, 10)
    quantized = FakeQuantLinear(w)
    model = nn.Sequential(quantized)
    lora.wrap(model, r=3)
    randomize_adapters(model)
    x = torch.randn(5, 10)
    unmerged = model(x)
    lora.merge(model)
    assert isinstance(model[0].base_layer, nn.Linear)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    lora.unmerge(model)
    assert model[0].base_layer is quantized
    torch.testing.assert_close(model(x), unmerged)
    state = lora.merged_state_dict(model)
    assert set(state) == {"0.weight", "0.bias"}
    torch.testing.assert_close(x @ state["0.weight"].T + state["0.bias"], unmerged, rtol=1e-5, atol=1e-5)

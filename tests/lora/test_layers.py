import math

import pytest
import torch
import torch.nn as nn

from lora import LoRALinear


def _layer(in_f=12, out_f=7, r=4, alpha=8.0, bias=True, **kw):
    base = nn.Linear(in_f, out_f, bias=bias, dtype=torch.float64)
    layer = LoRALinear(base, r=r, alpha=alpha, dtype=torch.float64, **kw)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return base, layer


@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_formula(bias):
    base, layer = _layer(bias=bias)
    x = torch.randn(5, 3, 12, dtype=torch.float64)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ base.weight.T + (8.0 / 4) * (x @ a.T @ b.T)
    if bias:
        expected = expected + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    base, layer = _layer(r=9, alpha=6.0, use_rslora=True)
    assert layer.scaling == pytest.approx(6.0 / math.sqrt(9))
    x = torch.randn(4, 12, dtype=torch.float64)
    expected = base(x) + 2.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expected)


def test_fresh_layer_computes_the_base_exactly():
    base = nn.Linear(10, 6)
    layer = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(3, 10)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.count_nonzero(layer.lora_A.weight) == layer.lora_A.weight.numel()


def test_kaiming_and_gaussian_init_statistics():
    base = nn.Linear(4096, 8)
    kaiming = LoRALinear(base, r=64, alpha=8)
    bound = 1 / math.sqrt(4096)  # kaiming_uniform(a=sqrt(5)) on fan_in 4096
    a = kaiming.lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    gaussian = LoRALinear(base, r=64, alpha=8, init="gaussian")
    assert gaussian.lora_A.weight.std().item() == pytest.approx(1 / 64, rel=0.02)


def test_adapters_keep_their_dtype_over_a_bf16_base():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=4)
    assert layer.lora_A.weight.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = base(x).float() + (x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)


def test_dropout_applies_to_the_adapter_path_only():
    base, layer = _layer(dropout=0.5)
    x = torch.randn(64, 12, dtype=torch.float64)
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    mask_x = nn.functional.dropout(x, 0.5, training=True)
    expected = base(x) + layer.scaling * (mask_x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(y, expected)
    layer.eval()
    expected_eval = base(x) + layer.scaling * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expected_eval)


def test_dora_matches_its_formula():
    base, layer = _layer(use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1 + torch.rand(7, dtype=torch.float64))
    x = torch.randn(6, 12, dtype=torch.float64)
    w = base.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    m = layer.lora_magnitude_vector
    expected = x @ ((m / w.norm(dim=1)).unsqueeze(1) * w).T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_fresh_dora_layer_computes_the_base():
    base = nn.Linear(12, 7, dtype=torch.float64)
    layer = LoRALinear(base, r=4, alpha=8, use_dora=True, dtype=torch.float64)
    torch.testing.assert_close(layer.lora_magnitude_vector, base.weight.norm(dim=1))
    x = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-12, atol=1e-12)


def test_dora_gradient_treats_the_norm_as_constant():
    base, layer = _layer(use_dora=True, bias=False)
    base.requires_grad_(False)
    x = torch.randn(5, 12, dtype=torch.float64)
    layer(x).square().sum().backward()
    # With a constant norm c, y = (m/c) (W0 x + s B A x), so dL/dm = sum_batch (dL/dy * y) / m.
    w = base.weight + layer.scaling * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()
    m = layer.lora_magnitude_vector.detach()
    y = x @ ((m / w.norm(dim=1)).unsqueeze(1) * w).T
    expected = (2 * y * y).sum(0) / m
    torch.testing.assert_close(layer.lora_magnitude_vector.grad, expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "rank r must be a positive integer"),
        ({"r": 2.5}, "rank r must be a positive integer"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"init": "orthogonal"}, "init must be"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"r": 4, "alpha": 8} | kwargs
    with pytest.raises(ValueError, match=message):
        LoRALinear(nn.Linear(4, 4), **args)


def test_rejects_a_module_that_is_not_linear():
    with pytest.raises(TypeError, match="in_features, out_features and dequantize"):
        LoRALinear(nn.Conv1d(4, 4, 1), r=2, alpha=2)


class FakeQuantLinear(nn.Module):
    """A linear-like module that is not nn.Linear: stores its weight scaled by 2 in int8-ish form."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("stored", weight * 2)
        self.bias = nn.Parameter(torch.randn(weight.shape[0], dtype=weight.dtype))

    def dequantize(self):
        return self.stored / 2

    def forward(self, x):
        return x @ self.dequantize().T + self.bias


def test_protocol_base_works_without_being_nn_linear():
    w = torch.randn(5, 9, dtype=torch.float64)
    base = FakeQuantLinear(w)
    layer = LoRALinear(base, r=3, alpha=3, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, 9, dtype=torch.float64)
    expected = x @ w.T + base.bias + x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)


def test_under_autocast_the_adapter_path_runs_in_the_autocast_dtype():
    base = nn.Linear(32, 24).to(torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 24)
    expected = base(x).float() + 2.0 * (x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(y.float(), expected, rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.abs().sum() > 0

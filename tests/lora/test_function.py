"""lora/function.py: the LoRA layer's written-out backward against autograd of its formula (CPU)."""
import pytest
import torch
import torch.nn as nn

import quant
from lora import LoRALinear
from lora.function import fits


def _frozen(base: nn.Module) -> nn.Module:
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def _lora(base, r=4, alpha=8.0, dtype=torch.float64, **kw):
    layer = LoRALinear(base, r=r, alpha=alpha, dtype=dtype, **kw)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


def _autograd_formula(x, weight, bias, a, b, s):
    y = x @ weight.T + s * ((x @ a.T) @ b.T)
    return y if bias is None else y + bias


def _grads(fn, tensors, grad):
    for t in tensors:
        t.grad = None
    y = fn()
    y.backward(grad)
    return y.detach(), [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_linear_base_matches_autograd(bias, use_rslora):
    base = _frozen(nn.Linear(12, 7, bias=bias, dtype=torch.float64))
    layer = _lora(base, r=4, alpha=6.0, use_rslora=use_rslora)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 5, 7, dtype=torch.float64)
    y, got = _grads(lambda: layer(x), [x, a, b], grad)
    assert type(layer(x).grad_fn).__name__ == "LoRAFunctionBackward"
    y_want, want = _grads(lambda: _autograd_formula(x, base.weight, base.bias, a, b, layer.scaling), [x, a, b], grad)
    torch.testing.assert_close(y, y_want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_only_the_requested_gradients():
    layer = _lora(_frozen(nn.Linear(12, 7, dtype=torch.float64)))
    layer.lora_A.weight.requires_grad_(False)
    x = torch.randn(5, 12, dtype=torch.float64)  # no gradient for x either
    layer(x).sum().backward()
    assert layer.lora_A.weight.grad is None and layer.lora_B.weight.grad is not None


def test_4bit_base_merges_the_adapter_into_the_input_gradient():
    """Note [merged input gradient]: dx = g @ (W + s B A) rounded once to the compute dtype; dA and
    dB as autograd computes them."""
    torch.manual_seed(0)
    base = quant.Linear4bit.from_weight(torch.randn(24, 64) * 0.1, torch.randn(24) * 0.1, compute_dtype=torch.float32)
    assert not fits(base)  # its bias trains
    assert fits(_frozen(base))
    layer = _lora(base, r=8, alpha=16.0, dtype=torch.float32)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    x = torch.randn(3, 64, requires_grad=True)
    grad = torch.randn(3, 24)
    y, (dx, da, db) = _grads(lambda: layer(x), [x, a, b], grad)
    weight = base.dequantize(torch.float32)
    y_want, (dx_want, da_want, db_want) = _grads(lambda: _autograd_formula(x, weight, base.bias, a, b, 2.0),
                                                 [x, a, b], grad)
    torch.testing.assert_close(y, y_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(da, da_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, db_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, grad @ base.dequantize_lowrank(b, a, 2.0), rtol=0, atol=0)
    torch.testing.assert_close(dx, base.input_gradient(grad, b, a, 2.0), rtol=0, atol=0)


def test_4bit_merged_weight_is_rounded_once():
    base = quant.Linear4bit.from_weight(torch.randn(16, 64), compute_dtype=torch.bfloat16)
    lora_b, lora_a = torch.randn(16, 4), torch.randn(4, 64)
    merged = base.dequantize_lowrank(lora_b, lora_a, 0.5)
    want = base.dequantize(torch.float32) + 0.5 * (lora_b.bfloat16().float() @ lora_a.bfloat16().float())
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, want.bfloat16())


def test_under_autocast_adapters_run_in_the_autocast_dtype_and_keep_theirs():
    base = _frozen(nn.Linear(32, 24).to(torch.bfloat16))
    layer = _lora(base, alpha=8.0, dtype=torch.float32)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(3, 5, 24, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (dx, da, db) = _grads(lambda: layer(x), [x, a, b], grad)
        y_want, want = _grads(lambda: torch.addmm(base(x).reshape(15, 24), nn.functional.linear(x, a).reshape(15, 4),
                                                  b.t(), alpha=2.0).view(3, 5, 24), [x, a, b], grad)
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16
    assert da.dtype == torch.float32 and db.dtype == torch.float32
    torch.testing.assert_close(y, y_want, rtol=0, atol=0)  # the same GEMMs
    for got, w in zip((dx, da, db), want):
        torch.testing.assert_close(got.float(), w.float(), rtol=2e-2, atol=2e-2)


def test_trainable_base_dropout_and_dora_keep_autograd():
    trainable = nn.Linear(12, 7, dtype=torch.float64)
    assert not fits(trainable)
    layer = _lora(trainable)
    x = torch.randn(5, 12, dtype=torch.float64)
    layer(x).sum().backward()
    assert trainable.weight.grad is not None  # the base's own gradient is not dropped
    dropout = _lora(_frozen(nn.Linear(12, 7, dtype=torch.float64)), dropout=0.1)
    assert type(dropout(x).grad_fn).__name__ != "LoRAFunctionBackward"
    dropout.eval()
    assert type(dropout(x).grad_fn).__name__ == "LoRAFunctionBackward"  # dropout is the identity in eval
    dora = _lora(_frozen(nn.Linear(12, 7, dtype=torch.float64)), use_dora=True)
    assert type(dora(x).grad_fn).__name__ != "LoRAFunctionBackward"

"""quant.quantize(model): the in-place module swap; and LoRA over Linear4bit (lora.wrap / merge)."""
import gc
import weakref

import pytest
import torch
import torch.nn as nn

import quant


class Block(nn.Module):
    def __init__(self, d=64, attn=True):
        super().__init__()
        # nn.MultiheadAttention's out_proj is an nn.Linear subclass whose weight MHA reads directly
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True) if attn else None
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        if self.attn is not None:
            x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.down(torch.relu(self.up(x)))


class Tiny(nn.Module):
    def __init__(self, d=64, vocab=50, attn=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, attn), Block(d, attn)])
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


def test_quantize_swaps_linears_except_skip_and_subclasses():
    model = Tiny()
    ids = torch.randint(0, 50, (2, 6))
    before = model(ids)
    up_weight = model.blocks[0].up.weight.detach().clone()
    assert quant.quantize(model) is model
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["blocks.0.up"] == kinds["blocks.1.down"] == "Linear4bit"
    assert kinds["lm_head"] == "Linear"  # skipped by name
    assert kinds["blocks.0.attn.out_proj"] == "NonDynamicallyQuantizableLinear"  # a subclass
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if n != "lm_head")
    assert torch.equal(model.blocks[0].up.dequantize(),
                       quant.Linear4bit.from_weight(up_weight).dequantize())
    after = model(ids)
    assert after.dtype == before.dtype
    assert 0 < (after - before).norm() / before.norm() < 0.2


def test_skip_patterns_and_options():
    model = Tiny()
    quant.quantize(model, skip=("lm_head", "blocks.1.up"), blocksize=128, double_quant=False,
                   quant_type="fp4", compute_dtype=torch.bfloat16)
    assert type(model.blocks[1].up) is nn.Linear
    layer = model.blocks[0].up
    assert (layer.blocksize, layer.double_quant, layer.quant_type) == (128, False, "fp4")
    assert layer.compute_dtype == torch.bfloat16 and layer.absmax.dtype == torch.float32
    with pytest.raises(ValueError, match="power of two"):
        quant.quantize(Tiny(), blocksize=60)


def test_quantize_frees_the_full_precision_weights():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    refs = [weakref.ref(m.weight) for m in model]
    quant.quantize(model)
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_shared_linear_stays_shared():
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    quant.quantize(model)
    assert isinstance(model[0], quant.Linear4bit) and model[0] is model[2]


def test_error_names_the_layer():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 1: .*NaN or inf"):
        quant.quantize(model)


# --- LoRA over Linear4bit ---

lora = pytest.importorskip("lora")


def test_lora_over_quantized_model_trains_only_adapters_and_merges():
    model = Tiny(attn=False)
    quant.quantize(model, compute_dtype=torch.float32)
    lora.wrap(model, r=8)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)]
    assert "blocks.0.up" in wrapped and "lm_head" not in wrapped
    assert isinstance(model.blocks[0].up.base_layer, quant.Linear4bit)
    for _, layer in lora.lora_layers(model):  # make B non-zero so the adapters change the output
        nn.init.normal_(layer.lora_B.weight, std=0.05)

    ids = torch.randint(0, 50, (2, 6))
    model(ids).pow(2).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable and all(".lora_" in n for n in trainable)
    assert with_grad == trainable
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.grad is not None)

    with torch.no_grad():
        unmerged = model(ids)
        lora.merge(model)
        merged = model(ids)
        lora.unmerge(model)
        back = model(ids)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    assert torch.equal(back, unmerged)
    assert isinstance(model.blocks[0].up.base_layer, quant.Linear4bit)

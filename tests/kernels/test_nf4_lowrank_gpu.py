"""kernels/nf4_lowrank.py (W + s B A) and the LoRA layer over a 4-bit base, on the GPU:
    PYTHONPATH=. python -m pytest -m gpu tests/kernels/test_nf4_lowrank_gpu.py -q
"""
import pytest
import torch
import torch.nn as nn

import quant
from kernels import nf4_lowrank, reference
from lora import LoRALinear
from tests.kernels.nf4_inputs import random_nf4

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


SHAPES = [(4096, 4096, 64, 16), (333, 1088, 32, 7), (1000, 4160, 64, 64), (77, 5120, 256, 1), (4101, 1024, 1024, 33),
          (515, 2048, 64, 200)]


@pytest.mark.parametrize("n_rows,n_cols,blocksize,rank", SHAPES)
@pytest.mark.parametrize("config", nf4_lowrank._CONFIGS)
def test_every_config_matches_reference(n_rows, n_cols, blocksize, rank, config):
    _check(n_rows, n_cols, blocksize, rank, torch.bfloat16, config)


@pytest.mark.parametrize("n_rows,n_cols,blocksize,rank", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_float16_and_float32(n_rows, n_cols, blocksize, rank, dtype):
    _check(n_rows, n_cols, blocksize, rank, dtype, nf4_lowrank._CONFIGS[0])


def _check(n_rows, n_cols, blocksize, rank, dtype, config):
    packed, state = random_nf4(n_rows, n_cols, blocksize, double_quant=True, device="cuda")
    lora_b = torch.randn(n_rows, rank, device="cuda")
    lora_a = torch.randn(rank, n_cols, device="cuda") / rank ** 0.5
    got = nf4_lowrank.dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 0.5, dtype, config=config)
    want = reference.dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 0.5, dtype)
    # The float32 sums differ in order: one rounding step apart at most (float32: a few ulps).
    rtol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=1e-6 * want.float().abs().max().item())


@pytest.mark.parametrize("m", [1, 5, 16, 17, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_input_gradient_against_float64(m, dtype):
    """matmul_nf4_t_lowrank: streamed W plus an addmm (M <= 16) or the merged weight (above)."""
    packed, state = random_nf4(1000, 4160, 64, double_quant=True, device="cuda")
    lora_b = torch.randn(1000, 16, device="cuda") * 0.05
    lora_a = torch.randn(16, 4160, device="cuda") / 4
    g = torch.randn(m, 1000, device="cuda").to(dtype)
    got = nf4_lowrank.matmul_nf4_t_lowrank(g, packed, state, lora_b, lora_a, 2.0)
    weight = reference.dequantize_nf4(packed, state, torch.float64) + 2.0 * (lora_b.double() @ lora_a.double())
    want = g.double() @ weight
    scale = (g.double().abs() @ weight.abs()).max().item()
    assert got.dtype == dtype and got.shape == (m, 4160)
    assert (got.double() - want).abs().max().item() < 1e-2 * scale


@pytest.mark.parametrize("n_rows,n_cols,rows", [(4096, 4096, 700), (96, 320, 700), (4096, 4096, 1), (1000, 2048, 5)])
def test_lora_over_a_4bit_base_on_the_gpu(n_rows, n_cols, rows):
    """Forward and backward through the kernels against the same layer over the dequantized weight."""
    torch.manual_seed(0)
    base4 = quant.Linear4bit.from_weight(torch.randn(n_rows, n_cols, device="cuda") * 0.02,
                                         compute_dtype=torch.bfloat16).requires_grad_(False)
    base16 = nn.Linear(n_cols, n_rows, bias=False, device="cuda", dtype=torch.float32).requires_grad_(False)
    base16.weight.copy_(base4.dequantize(torch.float32))
    layers = [LoRALinear(base, r=16, alpha=32, dtype=torch.float32) for base in (base4, base16)]
    for layer in layers:
        with torch.no_grad():
            torch.manual_seed(1)
            layer.lora_A.weight.normal_(std=n_cols ** -0.5)
            layer.lora_B.weight.normal_(std=0.05)
    x = torch.randn(3, rows, n_cols, device="cuda", requires_grad=True)
    grad = torch.randn(3, rows, n_rows, device="cuda")
    results = []
    for layer in layers:
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.backward(grad.to(y.dtype))
        results.append((y.float(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad))
    assert type(y.grad_fn).__name__ == "LoRAFunctionBackward"
    for got, want in zip(*results):  # bf16 compute on both sides: bf16 rounding apart
        assert ((got - want).norm() / want.norm()).item() < 1e-2

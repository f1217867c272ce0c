"""Linear4bit on CUDA goes through the Triton kernels; it must compute what the reference path does."""
import pytest
import torch

import quant
from quant.linear import _on_kernels

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("m", [1, 7, 16, 300])
@pytest.mark.parametrize("shape", [(256, 320), (4096, 4096), (130, 200)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_forward_and_backward_match_the_reference(m, shape, dtype):
    out_f, in_f = shape
    weight = torch.randn(out_f, in_f, device="cuda") * 0.05
    layer = quant.Linear4bit.from_weight(weight, torch.randn(out_f, device="cuda"), compute_dtype=dtype)
    w_ref = quant.dequantize_4bit(layer.weight, layer.quant_state, dtype=torch.float32)  # the reference path
    x = torch.randn(m, in_f, device="cuda", dtype=dtype, requires_grad=True)
    assert _on_kernels(x)
    y = layer(x)
    expected = x.detach().double() @ w_ref.double().T + layer.bias.double()
    err = (y.double() - expected).norm() / expected.norm()
    assert err < 1e-2, err
    g = torch.randn_like(y)
    y.backward(g)
    expected_grad = g.double() @ w_ref.double()
    err = (x.grad.double() - expected_grad).norm() / expected_grad.norm()
    assert err < 1e-2, err
    assert torch.equal(layer.dequantize(torch.float32), w_ref) or torch.allclose(
        layer.dequantize(dtype).float(), w_ref.to(dtype).float())

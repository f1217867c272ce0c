"""Linear4bit on CUDA goes through the Triton kernels; it must compute what the reference path does."""
import pytest
import torch

import quant
from kernels.nf4_mma import MMA_M_MAX
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
    w_ref = quant.dequantize_4bit(layer.row_codes(), layer.quant_state, dtype=torch.float32)  # the reference path
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
    assert torch.equal(layer.dequantize(torch.float32), w_ref)  # the kernel, bit for bit
    assert torch.equal(layer.dequantize(dtype), w_ref.to(dtype))


def _same_product(got: torch.Tensor, want: torch.Tensor, m: int) -> bool:
    """Bit for bit up to MMA_M_MAX rows of x, where both layouts take the same kernel; above, tiled codes
    may take the wgmma kernel on Hopper (kernels/nf4_wgmma.py), which rounds W differently."""
    if m <= MMA_M_MAX:
        return torch.equal(got, want)
    return bool((got.double() - want.double()).norm() / want.double().norm() < 1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("m", [1, 16, 300])
def test_tiled_codes_compute_the_same_and_save_rows(m):
    """quant/linear.py Note [tiled codes on the GPU]: tiled by default; the same gradients bit for bit as
    in rows, and the same outputs (bit for bit up to MMA_M_MAX rows, where both layouts take the same
    kernel), the same state dict, rows again off the GPU, and the choice kept across a load and a move."""
    weight = torch.randn(256, 320, device="cuda") * 0.05
    rows = quant.Linear4bit.from_weight(weight, torch.randn(256, device="cuda"))
    assert rows.codes_tiled and not rows.tile_codes(False) and not rows.codes_tiled
    tiled = quant.Linear4bit.from_weight(weight, rows.bias.detach().clone())
    codes = rows.weight.detach().clone()
    assert tiled.codes_tiled and not torch.equal(tiled.weight, codes)
    assert torch.equal(tiled.row_codes(), codes)
    x = torch.randn(m, 320, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for layer in (rows, tiled):
        y = layer(x)
        y.float().square().sum().backward()
        layer.out, layer.grad = y.detach(), x.grad.clone()
        x.grad = None
    assert torch.equal(tiled.grad, rows.grad)
    assert _same_product(tiled.out, rows.out, m)
    assert torch.equal(tiled.dequantize(torch.float32), rows.dequantize(torch.float32))
    w_ref = quant.dequantize_4bit(codes, rows.quant_state, dtype=torch.float32)
    assert torch.equal(tiled.dequantize(torch.float32), w_ref)  # the kernel on tiles, no untiled copy
    state = tiled.state_dict()
    assert all(torch.equal(value, rows.state_dict()[key]) for key, value in state.items())
    tiled.load_state_dict(state)
    assert tiled.codes_tiled and torch.equal(tiled.row_codes(), codes)
    tiled.cpu()
    assert not tiled.codes_tiled and torch.equal(tiled.weight, codes.cpu())
    tiled.cuda()
    assert tiled.codes_tiled and _same_product(tiled(x), rows(x), m)
    assert not tiled.tile_codes(False) and torch.equal(tiled.weight, codes)
    rows.cpu().cuda()
    assert not rows.codes_tiled and torch.equal(rows.weight, codes)
    model = torch.nn.Sequential(rows, quant.Linear4bit(320, 250, device="cuda"))  # 250 rows do not tile
    assert quant.tile_codes(model) == 1 and rows.codes_tiled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_float32_compute_dequantizes_the_tiled_codes_with_the_kernel():
    """float32 inputs take `dequantize` and a matmul; on the GPU that is the kernel's dequantization,
    the reference's values bit for bit, read from the tiled codes."""
    weight = torch.randn(256, 320, device="cuda") * 0.05
    layer = quant.Linear4bit.from_weight(weight, None, compute_dtype=torch.float32)
    assert layer.codes_tiled
    w_ref = quant.dequantize_4bit(layer.row_codes(), layer.quant_state, dtype=torch.float32)
    x = torch.randn(5, 320, device="cuda", requires_grad=True)
    assert not _on_kernels(x)
    y = layer(x)
    assert torch.equal(y, x.detach() @ w_ref.T)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, torch.ones(5, 256, device="cuda") @ w_ref)

"""kernels.apply_rotary against kernels.reference.apply_rotary and against the model's unfused
spelling (models.llama), forward and backward, on transposed views and broadcast positions
(CPU, Triton interpreter; the same tests run on CUDA through the device tool)."""
import pytest
import torch

import kernels
from kernels import reference
from models.llama import rotate_half

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []  # on a GPU machine these are GPU tests (-m gpu)


def _inputs(B, H, T, D, dtype, batch_positions=True):
    x = torch.randn(B, T, H, D, dtype=dtype, device=DEVICE).transpose(1, 2)  # (B, H, T, D), as attention has it
    angles = torch.rand(B if batch_positions else 1, T, D // 2, device=DEVICE) * 50
    angles = torch.cat((angles, angles), dim=-1)
    return x, angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("shape", [(2, 3, 17, 8), (1, 4, 5, 128), (3, 2, 9, 6)])  # D/2 not a power of two
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("batch_positions", [True, False])
def test_forward_and_backward_match_the_reference(shape, dtype, batch_positions):
    x, cos, sin = _inputs(*shape, dtype, batch_positions)
    x.requires_grad_(True)
    y = kernels.apply_rotary(x, cos, sin)
    assert y.stride() == x.stride() and y.dtype == dtype
    expected = reference.apply_rotary(x.detach(), cos, sin)
    # one rounding on both sides; float32 reductions may differ in the last bit (fma on the GPU)
    tolerance = {torch.float32: dict(rtol=0, atol=1e-6), torch.float16: dict(rtol=2 ** -10, atol=1e-3),
                 torch.bfloat16: dict(rtol=2 ** -7, atol=1e-2)}[dtype]
    torch.testing.assert_close(y.detach(), expected, **tolerance)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(dx, reference.apply_rotary(g, cos, sin, backward=True), **tolerance)


def test_the_reference_is_the_model_formula_and_its_gradient():
    x, cos, sin = _inputs(2, 3, 11, 16, torch.float64)
    x.requires_grad_(True)
    plain = x * cos[:, None] + rotate_half(x) * sin[:, None]  # models.llama's spelling
    torch.testing.assert_close(reference.apply_rotary(x, cos, sin), plain)
    g = torch.randn_like(plain)
    (dx,) = torch.autograd.grad(plain, x, g)
    torch.testing.assert_close(reference.apply_rotary(g, cos, sin, backward=True), dx)


def test_an_expanded_gradient_is_handled():
    x, cos, sin = _inputs(2, 3, 11, 16, torch.float32)
    x.requires_grad_(True)
    kernels.apply_rotary(x, cos, sin).sum().backward()  # the gradient is ones, expanded: all strides 0
    ones = torch.ones_like(x.detach())
    torch.testing.assert_close(x.grad, reference.apply_rotary(ones, cos, sin, backward=True), rtol=0, atol=1e-6)


def test_bad_shapes_are_refused_with_the_shapes():
    x, cos, sin = _inputs(2, 3, 11, 16, torch.float32)
    with pytest.raises(ValueError, match=r"cos \(2, 10, 16\)"):
        kernels.apply_rotary(x, cos[:, :10], sin[:, :10])
    with pytest.raises(ValueError, match="even D"):
        kernels.apply_rotary(x[..., :15], cos[..., :15], sin[..., :15])

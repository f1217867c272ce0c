"""kernels.dequantize_nf4 against kernels.reference.dequantize_nf4 (CPU, Triton interpreter)."""
import pytest
import torch

import kernels
from kernels import reference
from tests.kernels.nf4_inputs import random_nf4

# (N, K, blocksize): K % blocksize == 0 or not, odd K (rows straddle bytes) and odd N*K (a padding
# nibble), a program inside one block (blocksize 256 > 2 * 64 interpreter bytes), several
# double-quant second-level blocks (N*K / blocksize > 256).
SHAPES = [(40, 96, 64), (33, 130, 128), (7, 129, 32), (24, 512, 256), (24, 352, 32)]


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two 16-bit float tensors."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max().item()


@pytest.mark.parametrize("n_rows,n_cols,blocksize", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_matches_reference(n_rows, n_cols, blocksize, double_quant):
    packed, state = random_nf4(n_rows, n_cols, blocksize, double_quant)
    got = kernels.dequantize_nf4(packed, state, torch.float32)
    assert got.shape == (n_rows, n_cols) and got.dtype == torch.float32
    assert torch.equal(got, reference.dequantize_nf4(packed, state, torch.float32))  # bit for bit
    assert _ulps(kernels.dequantize_nf4(packed, state, torch.float16),
                 reference.dequantize_nf4(packed, state, torch.float16)) <= 1
    # The interpreter rounds float32 -> bfloat16 by truncation, so 1 ulp here; exact on the GPU.
    assert _ulps(kernels.dequantize_nf4(packed, state, torch.bfloat16),
                 reference.dequantize_nf4(packed, state, torch.bfloat16)) <= 1


@pytest.mark.parametrize("offset_as_tensor", [True, False])
def test_offset_as_tensor_or_float(offset_as_tensor):
    packed, state = random_nf4(40, 96, 64, double_quant=True, offset_as_tensor=offset_as_tensor)
    assert torch.equal(kernels.dequantize_nf4(packed, state, torch.float32),
                       reference.dequantize_nf4(packed, state, torch.float32))


def test_code_table_is_read_not_assumed():
    """Any 16-value code works (FP4 is another table), and changing it changes the output."""
    packed, state = random_nf4(33, 130, 64, double_quant=True)
    state.code = torch.randn(16)
    got = kernels.dequantize_nf4(packed, state, torch.float32)
    assert torch.equal(got, reference.dequantize_nf4(packed, state, torch.float32))
    state.code = state.code + 1.0
    assert not torch.equal(got, kernels.dequantize_nf4(packed, state, torch.float32))


def test_reference_formula_on_one_block():
    """The reference itself, by hand: high nibble first, double-quant scale decoded in float32."""
    packed = torch.tensor([[0x1F], [0x70]], dtype=torch.uint8)  # codes 1, 15, 7, 0
    code = torch.arange(16, dtype=torch.float32) / 10
    nested_code = torch.linspace(-1, 1, 256)
    state = type("S", (), dict(absmax=torch.tensor([200], dtype=torch.uint8), nested_absmax=torch.tensor([0.5]),
                               nested_code=nested_code, offset=torch.tensor(0.25), code=code, blocksize=64,
                               shape=(2, 2)))()
    scale = nested_code[200] * torch.tensor(0.5) + torch.tensor(0.25)
    want = torch.stack([code[1], code[15], code[7], code[0]]) * scale
    assert torch.equal(reference.dequantize_nf4(packed, state, torch.float32), want.view(2, 2))
    assert torch.equal(kernels.dequantize_nf4(packed, state, torch.float32), want.view(2, 2))


def test_bad_inputs_raise_one_clear_error():
    packed, state = random_nf4(40, 96, 64)
    with pytest.raises(ValueError, match="packed"):
        kernels.dequantize_nf4(packed[:-1], state)
    with pytest.raises(ValueError, match="absmax"):
        state.absmax = state.absmax[:-1]
        kernels.dequantize_nf4(packed, state)
    packed, state = random_nf4(40, 96, 64)
    state.blocksize = 48
    with pytest.raises(ValueError, match="blocksize"):
        kernels.dequantize_nf4(packed, state)
    packed, state = random_nf4(40, 96, 64)
    with pytest.raises(TypeError, match="dtype"):
        kernels.dequantize_nf4(packed, state, torch.int8)
    state.nested_code = torch.zeros(255)
    with pytest.raises(ValueError, match="nested_code"):
        kernels.dequantize_nf4(packed, state)

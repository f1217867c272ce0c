"""What of the tensor-core small-M kernel (kernels/nf4_mma.py) can be checked without a GPU.

Its PTX runs only on the device (test_nf4_mma_gpu.py checks its numbers, test_compile_sm90.py
compiles it here); on the CPU: the bfloat16 planes its lookup reads, when it applies, the untimed
config, and the errors of matmul_nf4_mma.
"""
import pytest
import torch

import kernels
from kernels import nf4_matmul, nf4_mma
from tests.kernels.nf4_inputs import NF4_CODE, random_nf4


def _plane_values(planes: torch.Tensor) -> torch.Tensor:
    """(8, 32) int32 planes (low bytes of entries 0-15 in rows 0-3, high bytes in rows 4-7, every
    column one lane's copy) -> (16,) 16-bit patterns, from lane 0."""
    lanes = planes[:, 0].contiguous().view(torch.uint8).view(2, 16).to(torch.int32)  # (low, high) x entry
    return lanes[0] | (lanes[1] << 8)


def test_bfloat16_planes_hold_the_code_rounded_to_bfloat16_in_every_lane():
    planes = kernels.prepare(*random_nf4(8, 64)).code_planes  # (24, 32)
    assert torch.equal(planes[16:], planes[16:, :1].expand(8, 32))
    want = NF4_CODE.bfloat16().view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(_plane_values(planes[16:]), want)
    assert torch.equal(_plane_values(planes[:8]), NF4_CODE.half().view(torch.int16).to(torch.int32) & 0xFFFF)


@pytest.mark.parametrize("blocksize,n_cols,address,fits", [
    (64, 4096, 0, True), (32, 96, 256, True), (256, 14336, 16, True),
    (16, 4096, 0, False), (48, 4800, 0, False), (64, 4100, 0, False), (64, 4096, 8, False)])
def test_mma_fits(blocksize, n_cols, address, fits):
    assert nf4_mma.mma_fits(blocksize, n_cols, address) is fits


@pytest.mark.parametrize("n_rows,warps", [(17, 16), (4096, 16), (8192, 8), (14336, 4), (28672, 2), (128256, 2)])
def test_untimed_config_aims_at_about_4096_warps(n_rows, warps):
    assert nf4_mma.untimed_config(n_rows) == (warps, 4)
    assert (warps, 4) in nf4_mma.MMA_CONFIGS


def test_matmul_nf4_mma_says_what_it_needs():
    packed, state = random_nf4(32, 128)
    x = torch.randn(1, 128, dtype=torch.float16)
    with pytest.raises(ValueError, match="needs float16 or bfloat16 x on CUDA .* blocksize 64, K 128.* 16 bytes"):
        nf4_matmul.matmul_nf4_mma(x, packed, state)  # a CPU tensor (here under the interpreter)
    with pytest.raises(ValueError, match=r"bias must have shape \(32,\)"):
        nf4_matmul.matmul_nf4_mma(x, packed, state, torch.zeros(31, dtype=torch.float16))


def test_matmul_nf4_keeps_the_interpreter_on_the_triton_gemv():
    packed, state = random_nf4(32, 128)
    x = torch.randn(2, 128, dtype=torch.float16)
    assert not nf4_matmul._mma_runs(x, kernels.prepare(packed, state))
    want = x.double() @ kernels.reference.dequantize_nf4(packed, state, torch.float64).T
    torch.testing.assert_close(kernels.matmul_nf4(x, packed, state).double(), want, rtol=2e-3, atol=2e-3)

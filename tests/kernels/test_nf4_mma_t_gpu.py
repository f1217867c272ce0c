"""The transposed small-M kernel (kernels/nf4_mma_t.py, g @ W) against the plain-PyTorch reference, on
the GPU (inline PTX: the CPU interpreter cannot run it; CI compiles it in test_compile_sm90.py):
    PYTHONPATH=. python -m pytest -m gpu tests/kernels/test_nf4_mma_t_gpu.py -q
"""
import pytest
import torch

import kernels
from kernels import nf4_matmul, nf4_mma_t, reference
from kernels.nf4_tiles import nf4_weight
from tests.kernels.nf4_inputs import assert_matmul_close, random_nf4

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

RTOL = 8e-3  # W and g * scale each rounded to bfloat16 once, the output once


def _run(n_rows, n_cols, blocksize, m, double_quant=True, config=None):
    packed, state = random_nf4(n_rows, n_cols, blocksize, double_quant, device="cuda")
    weight = reference.dequantize_nf4(packed, state, torch.float32)
    g = torch.randn(m, n_rows, device="cuda", dtype=torch.bfloat16)
    got = nf4_mma_t.mma_gemv_t(g, nf4_weight(packed, state, g.device), config)
    assert got.dtype == torch.bfloat16
    assert_matmul_close(got, g, weight, None, RTOL)


@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 16])
@pytest.mark.parametrize("n_rows,n_cols", [(4096, 4096), (1000, 4160), (14, 128), (4102, 1024)])
def test_shapes_and_rows(n_rows, n_cols, m):
    _run(n_rows, n_cols, 64, m)  # N below 16, N not a multiple of 16, K not a multiple of 128


@pytest.mark.parametrize("config", nf4_mma_t.MMA_T_CONFIGS)
@pytest.mark.parametrize("m", [1, 12])
def test_every_config(config, m):
    _run(2046, 2048, 64, m, config=config)  # parts of N that end inside a warp's rows


@pytest.mark.parametrize("blocksize", [128, 256, 1024])
def test_blocksizes_and_no_double_quant(blocksize):
    _run(300, 2048, blocksize, 5)
    _run(300, 2048, blocksize, 16, double_quant=False)


def test_matmul_nf4_t_takes_it_for_bfloat16_and_the_tiles_otherwise():
    packed, state = random_nf4(512, 1024, 64, True, device="cuda")
    weight = reference.dequantize_nf4(packed, state, torch.float32)
    g = torch.randn(2, 3, 512, device="cuda", dtype=torch.bfloat16)
    got = kernels.matmul_nf4_t(g, packed, state)
    assert got.shape == (2, 3, 1024)
    assert_matmul_close(got.reshape(6, 1024), g.reshape(6, 512), weight, None, RTOL)
    # the same kernel: up to the order of its float32 atomic adds (one per program and output)
    torch.testing.assert_close(got, nf4_matmul.matmul_nf4_t_mma(g, packed, state), rtol=8e-3, atol=1e-2)
    assert not nf4_matmul._mma_t_runs(g.half(), nf4_weight(packed, state, g.device))
    assert_matmul_close(kernels.matmul_nf4_t(g.half(), packed, state).reshape(6, 1024), g.half().reshape(6, 512),
                        weight, None, 2e-3)
    odd = random_nf4(511, 1024, 64, True, device="cuda")
    assert not nf4_matmul._mma_t_runs(g, nf4_weight(*odd, g.device))
    with pytest.raises(ValueError, match="matmul_nf4_t_mma: needs bfloat16 g on CUDA .* even N"):
        nf4_matmul.matmul_nf4_t_mma(torch.randn(1, 511, device="cuda", dtype=torch.bfloat16), *odd)


def test_strided_g_rows():
    packed, state = random_nf4(256, 512, 64, True, device="cuda")
    weight = reference.dequantize_nf4(packed, state, torch.float32)
    wide = torch.randn(4, 257, device="cuda", dtype=torch.bfloat16)
    g = wide[:, 1:]  # rows start 2 bytes past 4: copied before the kernel reads pairs
    assert_matmul_close(kernels.matmul_nf4_t(g, packed, state), g, weight, None, RTOL)

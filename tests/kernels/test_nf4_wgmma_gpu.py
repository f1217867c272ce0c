"""The wgmma kernel of kernels/nf4_wgmma.py and the medium-M dispatch of kernels/nf4_matmul.py, on Hopper.

    PYTHONPATH=. python -m pytest -m gpu tests/kernels/test_nf4_wgmma_gpu.py -q

Tolerances relative to |x| @ |W|.T with the exact result in fp64 (tests/kernels/test_nf4_gpu.py): the
kernel rounds a weight three times (code value, block scale, their product; Note [A from the codes])
and y once, at most 4 units of the 16-bit type's rounding: 4 * 2^-9 < 8e-3 for bfloat16, 4 * 2^-11
< 2e-3 for float16.
"""
import pytest
import torch

import kernels
from kernels import nf4_matmul, reference
from kernels.nf4_wgmma import HAVE_GLUON, WgmmaConfig, split_fits
from tests.kernels.nf4_inputs import assert_matmul_close, random_nf4


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and HAVE_GLUON


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU and Triton's Gluon")]

RTOL = {torch.bfloat16: 8e-3, torch.float16: 2e-3}
CONFIGS = [WgmmaConfig(128, 1), WgmmaConfig(256, 1), WgmmaConfig(128, 2), WgmmaConfig(128, 3, warps=4),
           WgmmaConfig(128, 1, warps=4, stages=3), WgmmaConfig(256, 1, warps=4, stages=2)]
# (M, N, K): N not a multiple of 128 (2064 = 16 x 129, 1040), an odd number of 64-column steps (576: 9,
# 192: 3), M not a multiple of the tile, one row, one step.
SHAPES = [(77, 2064, 576), (300, 1040, 512), (1, 128, 192), (257, 336, 64 * 7), (129, 4096, 4096)]


def _name(config: WgmmaConfig) -> str:
    return f"x{config.block_x}-split{config.split}-warps{config.warps}-stages{config.stages}"


def _tiled_weight(n_rows, n_cols, double_quant=True):
    packed, state = random_nf4(n_rows, n_cols, 64, double_quant, device="cuda")
    tiled = kernels.tile_codes(packed, state)
    return tiled, kernels.prepare(tiled, state, tiled=True), reference.dequantize_nf4(packed, state, torch.float32)


@pytest.mark.parametrize("config", CONFIGS, ids=_name)
@pytest.mark.parametrize("m,n_rows,n_cols", SHAPES)
def test_wgmma_matches_the_reference(config, m, n_rows, n_cols):
    if not split_fits(config.split, n_cols):
        pytest.skip("that split leaves a part of K empty")
    packed, state, weight = _tiled_weight(n_rows, n_cols)
    x = torch.randn(m, n_cols, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n_rows, device="cuda", dtype=torch.bfloat16)
    got = nf4_matmul.matmul_nf4_wgmma(x, packed, state, bias, config)
    assert_matmul_close(got, x, weight.T, bias, RTOL[torch.bfloat16])


@pytest.mark.parametrize("config", [WgmmaConfig(256, 1), WgmmaConfig(128, 4, warps=4)], ids=_name)
def test_wgmma_float16_without_double_quant(config):
    packed, state, weight = _tiled_weight(1040, 1024, double_quant=False)
    x = torch.randn(200, 1024, device="cuda", dtype=torch.float16)
    assert_matmul_close(nf4_matmul.matmul_nf4_wgmma(x, packed, state, None, config), x, weight.T, None,
                        RTOL[torch.float16])


def test_split_sums_are_the_same_every_call():
    """The last part of a tile sums the parts in split order (Note [split K]), so which part finished
    first does not change a bit of y."""
    packed, state, _ = _tiled_weight(512, 4096)
    x = torch.randn(128, 4096, device="cuda", dtype=torch.bfloat16)
    for config in (WgmmaConfig(128, 8), WgmmaConfig(128, 8, warps=4)):
        first = nf4_matmul.matmul_nf4_wgmma(x, packed, state, None, config)
        for _ in range(20):
            assert torch.equal(nf4_matmul.matmul_nf4_wgmma(x, packed, state, None, config), first)


def test_unaligned_x_and_leading_dims():
    packed, state, weight = _tiled_weight(1040, 512)
    wide = torch.randn(2, 60, 516, device="cuda", dtype=torch.bfloat16)
    x = wide[..., 4:]  # rows start 8 bytes in: TMA cannot read them, so they are copied first
    got = nf4_matmul.matmul_nf4_wgmma(x, packed, state, None, WgmmaConfig(128, 1))
    assert got.shape == (2, 60, 1040)
    assert_matmul_close(got.reshape(120, 1040), x.reshape(120, 512), weight.T, None, RTOL[torch.bfloat16])


@pytest.mark.parametrize("m", [65, 128, 300, 1024])
def test_medium_m_dispatch(m):
    """kernels.matmul_nf4 between MMA_M_MAX and WGMMA_M_MAX rows: the wgmma kernel or dequantization,
    whichever was chosen, gives the product."""
    packed, state, weight = _tiled_weight(2064, 1024)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(2064, device="cuda", dtype=torch.bfloat16)
    assert_matmul_close(kernels.matmul_nf4(x, packed, state, bias), x, weight.T, bias, RTOL[torch.bfloat16])


def test_rows_order_codes_are_refused():
    packed, state = random_nf4(256, 512, 64, device="cuda")
    x = torch.randn(100, 512, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="tiled codes"):
        nf4_matmul.matmul_nf4_wgmma(x, packed, state)

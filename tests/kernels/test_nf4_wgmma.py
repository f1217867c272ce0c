"""The wgmma kernel's checks and the medium-M choice, without a GPU (kernels/nf4_wgmma.py, kernels/nf4_matmul.py
Note [medium M]); tests/kernels/test_nf4_wgmma_gpu.py runs the kernel and test_compile_sm90.py compiles it."""
import pytest
import torch

import kernels
from kernels import nf4_matmul
from kernels.nf4_wgmma import WgmmaConfig, split_fits, wgmma_fits, wgmma_matmul
from tests.kernels.nf4_inputs import random_nf4

H100_SMS = 132


def test_split_fits_leaves_no_part_empty():
    assert split_fits(1, 64) and split_fits(4, 4096) and split_fits(3, 576)
    assert not split_fits(0, 4096) and not split_fits(2, 64)  # one step cannot be cut in two
    assert not split_fits(4, 576)  # 9 steps in parts of 3: the fourth part would start at step 9, past the end
    assert not split_fits(65, 4096)


def test_wgmma_fits_needs_a_hopper_gpu_and_tiled_64_column_blocks():
    packed, state = random_nf4(64, 256, 64)
    tiled = kernels.prepare(kernels.tile_codes(packed, state), state, tiled=True)
    assert not wgmma_fits(tiled, torch.device("cpu"), torch.bfloat16)
    assert not wgmma_fits(kernels.prepare(packed, state), torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("config", [WgmmaConfig(64, 1), WgmmaConfig(256, 2), WgmmaConfig(128, 5),
                                    WgmmaConfig(128, 1, warps=2), WgmmaConfig(128, 1, stages=5)],
                         ids=["x64", "x256-split2", "split5", "warps2", "stages5"])
def test_wgmma_matmul_refuses_configs_it_cannot_run(config):
    packed, state = random_nf4(64, 256, 64)
    tiled = kernels.prepare(kernels.tile_codes(packed, state), state, tiled=True)
    with pytest.raises(ValueError, match="block_x must be one of"):
        wgmma_matmul(torch.zeros(8, 256, dtype=torch.bfloat16), tiled, None, config)


def test_candidates_split_k_only_where_tiles_are_few():
    few = nf4_matmul._wgmma_candidates(128, 4096, 4096, H100_SMS)  # 64 tiles of 64 x 128
    assert [c.split for c in few] == [1, 2, 4] and all(c.block_x == 128 and c.warps == 4 for c in few)
    many = nf4_matmul._wgmma_candidates(512, 14336, 4096, H100_SMS)  # 896 tiles
    assert many == [WgmmaConfig(128, 1, warps=4), WgmmaConfig(256, 1, warps=8), WgmmaConfig(256, 1, warps=4, stages=3)]


@pytest.mark.parametrize("m,n,k,want", [
    (128, 14336, 4096, WgmmaConfig(128, 1, warps=4)),  # run 207: 54 us against 103 us dequantized
    (128, 4096, 14336, "split"),  # 64 tiles: K in parts (run 207: in two, 86 us against 108 us dequantized)
    (512, 14336, 4096, WgmmaConfig(256, 1, warps=8)),  # run 207: 122 us against 145 us dequantized
    (1024, 14336, 4096, "dequantize"),                 # run 206: 208 us dequantized against 242 us
])
def test_untimed_choice_follows_the_measurements(m, n, k, want):
    candidates = nf4_matmul._wgmma_candidates(m, n, k, H100_SMS) + ["dequantize"]
    got = min(candidates, key=lambda c: nf4_matmul._estimated_us(c, m, n, k, H100_SMS))
    assert got.split > 1 if want == "split" else got == want

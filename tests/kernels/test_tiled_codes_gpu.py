"""The per-lane PTX kernels and the dispatch on tiled codes (kernels/nf4_tiles.py Note [tiled codes]),
on the GPU: each against the same weight in row order, same config, bit for bit (the same sums in the
same order; g @ W against the reference), and the row-order result against the reference (the
kernels' own GPU tests).
    PYTHONPATH=. python -m pytest -m gpu tests/kernels/test_tiled_codes_gpu.py -q
"""
import pytest
import torch

import kernels
from kernels import nf4_lowrank_mma, nf4_mma, nf4_mma_t, reference
from tests.kernels.nf4_inputs import assert_matmul_close, random_nf4

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _both(n_rows, n_cols, blocksize, double_quant=True):
    packed, state = random_nf4(n_rows, n_cols, blocksize, double_quant, device="cuda")
    tiled = kernels.tile_codes(packed, state)
    return packed, state, kernels.prepare(packed, state), kernels.prepare(tiled, state, tiled=True)


# Every config at M = 1, a third of them at M = 16 and a half above: each launch is a compile.
MMA_CASES = ([(config, 1) for config in nf4_mma.MMA_CONFIGS_M8 + nf4_mma.MMA_TABLE_CONFIGS]
             + [(config, 16) for config in nf4_mma.MMA_CONFIGS[::3] + nf4_mma.MMA_TABLE_CONFIGS_M16]
             + [(config, m) for m in (24, 64) for config in nf4_mma._timed_configs(m)[::2]])


@pytest.mark.parametrize("config,m,n_cols,blocksize",
                         [(config, m, 4160, 64) for config, m in MMA_CASES]
                         + [(config, m, n_cols, blocksize) for config, m in MMA_CASES[::9]
                            for n_cols, blocksize in ((1088, 32), (5120, 256))])
def test_mma_gemv(config, m, n_cols, blocksize):
    """Every config (remainder loops, row tiles, depth 2, the table, both epilogues) at 2 words per
    lane and row, some at 1 and 4."""
    _, _, rows, tiles = _both(1008, n_cols, blocksize)
    x = torch.randn(m, n_cols, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(1008, device="cuda", dtype=torch.bfloat16)
    want = nf4_mma.mma_gemv(x, rows, bias, torch.empty(m, 1008, device="cuda", dtype=torch.bfloat16), config)
    got = nf4_mma.mma_gemv(x, tiles, bias, torch.empty(m, 1008, device="cuda", dtype=torch.bfloat16), config)
    assert torch.equal(got, want)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("config", nf4_mma_t.MMA_T_CONFIGS)
def test_mma_gemv_t(config, m):
    """Against the reference: the programs' float32 atomic adds land in any order, so two runs on the
    same weight need not agree bit for bit."""
    packed, state, _, tiles = _both(1008, 4160, 64)
    g = torch.randn(m, 1008, device="cuda", dtype=torch.bfloat16)
    weight = reference.dequantize_nf4(packed, state, torch.float32)
    assert_matmul_close(nf4_mma_t.mma_gemv_t(g, tiles, config), g, weight, None, 8e-3)


@pytest.mark.parametrize("config", nf4_lowrank_mma.LOWRANK_CONFIGS)
@pytest.mark.parametrize("blocksize,rank", [(64, 16), (128, 7)])
def test_lowrank_mma(config, blocksize, rank):
    _, _, rows, tiles = _both(1008, 4096, blocksize, double_quant=rank == 16)
    b = torch.randn(1008, rank, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(rank, 4096, device="cuda", dtype=torch.bfloat16)
    outs = [nf4_lowrank_mma.lowrank_mma(w, b, a, 0.5, torch.empty(1008, 4096, device="cuda", dtype=torch.bfloat16),
                                        config) for w in (rows, tiles)]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("m", [1, 16, 40, 300])
def test_dispatch_both_directions(m):
    """kernels.matmul_nf4 / matmul_nf4_t / dequantize_nf4_lowrank on a tiled weight, against the reference."""
    packed, state, _, tiles = _both(4096, 1024, 64)
    weight = reference.dequantize_nf4(packed, state, torch.float32)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    assert_matmul_close(kernels.matmul_nf4(x, tiles.packed, tiles), x, weight.T, None, 8e-3)
    assert_matmul_close(kernels.matmul_nf4_t(g, tiles.packed, tiles), g, weight, None, 8e-3)
    b, a = torch.randn(4096, 16, device="cuda"), torch.randn(16, 1024, device="cuda")
    assert torch.equal(kernels.dequantize_nf4_lowrank(tiles.packed, tiles, b, a, 0.5),
                       kernels.dequantize_nf4_lowrank(packed, kernels.prepare(packed, state), b, a, 0.5))

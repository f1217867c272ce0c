"""The tensor-core small-M kernel (kernels/nf4_mma.py) against the plain-PyTorch reference, on the GPU.

It is inline PTX with per-lane semantics, which the CPU interpreter cannot run; CI compiles it for
sm_90 (test_compile_sm90.py) and these tests check its numbers on the device:
    PYTHONPATH=. python -m pytest -m gpu tests/kernels/test_nf4_mma_gpu.py -q
"""
import pytest
import torch

import kernels
from kernels import nf4_matmul, nf4_mma, reference
from kernels.nf4_tiles import nf4_weight
from tests.kernels.nf4_inputs import assert_matmul_close, random_nf4

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

RTOL = {torch.bfloat16: 8e-3, torch.float16: 2e-3}


def _run(n_rows, n_cols, blocksize, m, dtype=torch.bfloat16, double_quant=True, bias=True, config=None):
    packed, state = random_nf4(n_rows, n_cols, blocksize, double_quant, device="cuda")
    weight = reference.dequantize_nf4(packed, state, torch.float32)
    x = torch.randn(m, n_cols, device="cuda", dtype=dtype)
    b = torch.randn(n_rows, device="cuda", dtype=dtype) if bias else None
    out = torch.empty(m, n_rows, device="cuda", dtype=dtype)
    got = nf4_mma.mma_gemv(x, nf4_weight(packed, state, x.device), b, out, config)
    assert_matmul_close(got, x, weight.T, b, RTOL[dtype])


@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 16, 17, 31, 40, 64])
@pytest.mark.parametrize("n_rows,n_cols", [(4096, 4096), (333, 4096), (17, 1024), (4101, 14336)])
def test_bf16_shapes_and_rows(n_rows, n_cols, m):
    _run(n_rows, n_cols, 64, m)


@pytest.mark.parametrize("config,m", [(config, m) for m in (20, 64) for config in nf4_mma._timed_configs(m)])
def test_every_config_above_16_rows(config, m):
    """Note [column tiles]: 4 and 8 column tiles, each config timed there, remainder loops and odd rows."""
    _run(1000, 4160, 64, m, config=config)


@pytest.mark.parametrize("config,m", [(config, m) for config in nf4_mma.MMA_CONFIGS_M8 for m in (5, 12)]
                         + [(config, 12) for config in nf4_mma.MMA_CONFIGS if config not in nf4_mma.MMA_CONFIGS_M8]
                         + [(config, m) for config in nf4_mma.MMA_TABLE_CONFIGS for m in (1, 5)]
                         + [(config, m) for config in nf4_mma.MMA_TABLE_CONFIGS_M16 for m in (12, 16)])
@pytest.mark.parametrize("n_cols,blocksize", [(4160, 64), (1088, 32), (5120, 1024)])
def test_every_config(config, m, n_cols, blocksize):
    _run(1000, n_cols, blocksize, m, config=config)  # uneven parts of K, remainder loops, many groups per block


@pytest.mark.parametrize("table", [1, 2, 3, 4])
@pytest.mark.parametrize("ksplit", [2, 16])
def test_pair_table_at_every_share_with_two_x_tiles_float16_and_plain_scales(table, ksplit):
    """Note [pair table] outside the timed configs: 16 rows of x, float16 planes, no double quant."""
    config = nf4_mma.MmaConfig(ksplit, 2, 2, table=table, shared_sums=ksplit < 16)  # 16: over 48 KB with the sums
    _run(555, 2560, 64, 16, config=config)
    _run(555, 2560, 256, 3, dtype=torch.float16, double_quant=False, config=config)
    _run(100, 1024, 32, 9, dtype=torch.float16, config=config)
    _run(100, 1024, 64, 1, config=config._replace(shared_sums=False))


@pytest.mark.parametrize("m", [1, 5, 9, 16])
@pytest.mark.parametrize("n_rows,n_cols,blocksize,tiled", [(1000, 4160, 64, False), (1008, 4160, 64, True),
                                                          (4101, 1088, 32, False), (96, 5120, 1024, True)])
def test_x_ahead_gives_the_sums_without_it(n_rows, n_cols, blocksize, tiled, m):
    """Note [x ahead]: bit for bit the output of the same config loading x where it is used, with
    remainder loops, warps without a whole iteration (1088 columns in 16 warps), several tiles per
    program and both layouts (every third depth-1 config)."""
    packed, state = random_nf4(n_rows, n_cols, blocksize, True, device="cuda")
    weight = (kernels.prepare(kernels.tile_codes(packed, state), state, tiled=True) if tiled
              else kernels.prepare(packed, state))
    x = torch.randn(m, n_cols, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n_rows, device="cuda", dtype=torch.bfloat16)
    configs = [c for c in nf4_mma._timed_configs(m) if c.depth == 1][::3]
    configs += [nf4_mma.MmaConfig(16, 2, 1, table=1, shared_sums=False), nf4_mma.MmaConfig(4, 4, 1, table=3, tiles=2)]
    for config in configs:
        plain = nf4_mma.mma_gemv(x, weight, b, torch.empty(m, n_rows, device="cuda", dtype=torch.bfloat16),
                                 config._replace(x_ahead=False))
        ahead = nf4_mma.mma_gemv(x, weight, b, torch.empty(m, n_rows, device="cuda", dtype=torch.bfloat16),
                                 config._replace(x_ahead=True))
        assert torch.equal(ahead, plain), config
    assert_matmul_close(ahead, x, reference.dequantize_nf4(packed, state, torch.float32).T, b, RTOL[torch.bfloat16])


@pytest.mark.parametrize("tiles", [2, 4])
@pytest.mark.parametrize("m", [1, 5, 16, 64])
@pytest.mark.parametrize("n_rows,n_cols,blocksize,tiled", [(1000, 4160, 64, False), (1008, 4160, 64, True),
                                                          (4101, 1088, 32, False), (96, 5120, 1024, True)])
def test_several_tiles_per_program_give_the_sums_of_one(n_rows, n_cols, blocksize, tiled, m, tiles):
    """Note [tiles per program]: bit for bit the output of one tile per program, with a last program
    short of tiles, remainder loops, both layouts and both epilogues (every fifth depth-1 config)."""
    packed, state = random_nf4(n_rows, n_cols, blocksize, True, device="cuda")
    weight = (kernels.prepare(kernels.tile_codes(packed, state), state, tiled=True) if tiled
              else kernels.prepare(packed, state))
    x = torch.randn(m, n_cols, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n_rows, device="cuda", dtype=torch.bfloat16)
    for config in [c for c in nf4_mma._timed_configs(m) if c.depth == 1][::5]:
        one = nf4_mma.mma_gemv(x, weight, b, torch.empty(m, n_rows, device="cuda", dtype=torch.bfloat16),
                               config._replace(tiles=1))
        several = nf4_mma.mma_gemv(x, weight, b, torch.empty(m, n_rows, device="cuda", dtype=torch.bfloat16),
                                   config._replace(tiles=tiles))
        assert torch.equal(several, one), config
    assert_matmul_close(one, x, reference.dequantize_nf4(packed, state, torch.float32).T, b, RTOL[torch.bfloat16])


@pytest.mark.parametrize("blocksize", [32, 128, 256, 1024])
@pytest.mark.parametrize("m", [1, 16, 33])
def test_blocksizes(blocksize, m):
    _run(300, 2048, blocksize, m)


@pytest.mark.parametrize("m", [1, 12, 48])
def test_float16_and_no_double_quant(m):
    _run(777, 3072, 64, m, dtype=torch.float16)
    _run(777, 3072, 64, m, double_quant=False, bias=False)


def test_packed_codes_off_16_bytes_take_the_triton_gemv():
    packed, state = random_nf4(256, 1024, 64, True, device="cuda")
    shifted = torch.empty(packed.numel() + 8, dtype=torch.uint8, device="cuda")[8:]  # starts 8 bytes past 16
    shifted.copy_(packed.reshape(-1))
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    assert not nf4_matmul._mma_runs(x, nf4_weight(shifted, state, x.device))
    weight = reference.dequantize_nf4(packed, state, torch.float32)
    assert_matmul_close(kernels.matmul_nf4(x, shifted, state), x, weight.T, None, RTOL[torch.bfloat16])

"""Tiled codes (kernels/nf4_tiles.py Note [tiled codes]): the permutation, and every Triton kernel on a
tiled weight against the same weight in row order (CPU, Triton interpreter; the per-lane PTX kernels in
test_tiled_codes_gpu.py)."""
import pytest
import torch

import kernels
from kernels import nf4_matmul, reference
from tests.kernels.nf4_inputs import random_nf4

# (N, K, blocksize): one band and group, several of each at 2, 4 and 8 words per lane's row run
# (blocksizes 32, 64, >= 128), and more than one block per group at blocksize 256.
SHAPES = [(16, 64, 64), (48, 192, 64), (32, 96, 32), (16, 512, 128), (32, 512, 256)]


def _tiled_offset(row: int, byte: int, n_cols: int, blocksize: int) -> int:
    """The layout as the Note spells it, byte by byte."""
    vec = 4 if blocksize >= 128 else blocksize // 32
    run = 4 * vec
    band, in_band = divmod(row, 16)
    group, in_group = divmod(byte, 16 * vec)
    lane = 4 * (in_band % 8) + in_group // run
    return band * 8 * n_cols + group * 256 * vec + lane * 8 * vec + (in_band // 8) * run + in_group % run


@pytest.mark.parametrize("n_rows,n_cols,blocksize", SHAPES)
def test_tile_codes_moves_each_byte_to_its_offset(n_rows, n_cols, blocksize):
    packed, state = random_nf4(n_rows, n_cols, blocksize)
    tiled = kernels.tile_codes(packed, state)
    assert tiled.shape == packed.shape and tiled.dtype == torch.uint8
    flat, row_bytes = tiled.reshape(-1), n_cols // 2
    for row in range(n_rows):
        for byte in range(row_bytes):
            assert flat[_tiled_offset(row, byte, n_cols, blocksize)] == packed[row * row_bytes + byte, 0]
    assert torch.equal(kernels.untile_codes(tiled, state), packed)


def test_tiles_fit_and_refusals():
    assert kernels.tiles_fit((4096, 4096), 64) and kernels.tiles_fit((16, 96), 32)
    assert not kernels.tiles_fit((40, 128), 64)  # N % 16
    assert not kernels.tiles_fit((16, 96), 64)  # K % blocksize
    assert not kernels.tiles_fit((16, 64), 16)  # blocksize % 32
    packed, state = random_nf4(40, 128, 64)
    with pytest.raises(ValueError, match=r"tiled codes need N % 16 == 0.*\(40, 128\) at blocksize 64"):
        kernels.tile_codes(packed, state)
    with pytest.raises(ValueError, match=r"NF4 weight: tiled codes need N % 16 == 0.*\(40, 128\)"):
        kernels.prepare(packed, state, tiled=True)


def _both(n_rows, n_cols, blocksize, double_quant=True):
    """The same random weight prepared in row order and tiled."""
    packed, state = random_nf4(n_rows, n_cols, blocksize, double_quant)
    tiled = kernels.tile_codes(packed, state)
    return packed, kernels.prepare(packed, state), tiled, kernels.prepare(tiled, state, tiled=True), state


@pytest.mark.parametrize("n_rows,n_cols,blocksize", SHAPES)
def test_dequantize_tiled(n_rows, n_cols, blocksize):
    packed, rows, tiled, tiles, state = _both(n_rows, n_cols, blocksize, double_quant=blocksize != 128)
    got = kernels.dequantize_nf4(tiled, tiles, torch.float32)
    assert torch.equal(got, reference.dequantize_nf4(packed, state, torch.float32))
    assert torch.equal(kernels.dequantize_nf4(tiled, tiles, torch.float16),
                       kernels.dequantize_nf4(packed, rows, torch.float16))


@pytest.mark.parametrize("n_rows,n_cols,blocksize", SHAPES[:4])
def test_dequantize_lowrank_tiled(n_rows, n_cols, blocksize):
    packed, rows, tiled, tiles, _ = _both(n_rows, n_cols, blocksize)
    b, a = torch.randn(n_rows, 4), torch.randn(4, n_cols)
    for dtype in (torch.float32, torch.float16):
        assert torch.equal(kernels.dequantize_nf4_lowrank(tiled, tiles, b, a, 0.5, dtype),
                           kernels.dequantize_nf4_lowrank(packed, rows, b, a, 0.5, dtype))


STRATEGIES = {
    "gemv": lambda x, p, s: nf4_matmul.matmul_nf4_gemv(x, p, s, split_k=1),
    "small-split3": lambda x, p, s: nf4_matmul.matmul_nf4_small_m(x, p, s, split_k=3),
    "fused": lambda x, p, s: nf4_matmul.matmul_nf4_fused(x, p, s),
    "dequantize": lambda x, p, s: nf4_matmul.matmul_nf4_dequantize(x, p, s),
    "t-small": lambda g, p, s: nf4_matmul.matmul_nf4_t_small_m(g, p, s, split_n=1),
    "t-fused": lambda g, p, s: nf4_matmul.matmul_nf4_t_fused(g, p, s),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("n_rows,n_cols,blocksize", [(48, 192, 64), (16, 512, 128)])
def test_matmul_strategies_tiled(strategy, n_rows, n_cols, blocksize):
    """Each kernel reads the tiled bytes at their offsets: the same sums in the same order, so the
    same output bit for bit."""
    packed, rows, tiled, tiles, _ = _both(n_rows, n_cols, blocksize)
    m = 1 if strategy == "gemv" else 3
    x = torch.randn(m, n_rows if strategy.startswith("t-") else n_cols, dtype=torch.float32)
    assert torch.equal(STRATEGIES[strategy](x, tiled, tiles), STRATEGIES[strategy](x, packed, rows))

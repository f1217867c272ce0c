"""kernels/nf4_lowrank_mma.py (W + s B A per lane) against the plain-PyTorch reference, on the GPU:
    PYTHONPATH=. python -m pytest -m gpu tests/kernels/test_nf4_lowrank_mma_gpu.py -q
"""
import pytest
import torch

from kernels import nf4_lowrank, nf4_lowrank_mma, reference
from kernels.nf4_tiles import nf4_weight
from tests.kernels.nf4_inputs import random_nf4

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# (N, K, blocksize, rank): N not a multiple of 16, K not a multiple of a strip (1088 = 34 quads),
# a block smaller than a strip (32) and larger than K's remainder (1024), ranks 1, 7, 33 (padded
# chunks), 64 (four chunks), and rows that do not hold whole blocks (1000 x 1056, blocksize 64).
SHAPES = [(4096, 4096, 64, 16), (333, 1088, 32, 7), (1000, 4160, 64, 64), (77, 5120, 256, 1),
          (4101, 1024, 1024, 33), (515, 2048, 128, 16), (1000, 1056, 64, 8), (9, 96, 64, 16)]


def _check(n_rows, n_cols, blocksize, rank, dtype, config, double_quant=True):
    packed, state = random_nf4(n_rows, n_cols, blocksize, double_quant=double_quant, device="cuda")
    lora_b = (torch.randn(n_rows, rank, device="cuda") * 0.5).to(dtype)
    lora_a = (torch.randn(rank, n_cols, device="cuda") / rank ** 0.5).to(dtype)
    weight = nf4_weight(packed, state, packed.device)
    out = torch.full((n_rows, n_cols), float("nan"), dtype=dtype, device="cuda")
    got = nf4_lowrank_mma.lowrank_mma(weight, lora_b, lora_a, 0.5, out, config)
    want = reference.dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 0.5, dtype)
    _assert_one_rounding_apart(got, want)
    return got, want


def _assert_one_rounding_apart(got, want):
    """Only the rank sum's order differs from the reference: one rounding step apart at most."""
    eps = torch.finfo(want.dtype).eps
    torch.testing.assert_close(got.float(), want.float(), rtol=eps, atol=1e-6 * want.float().abs().max().item())


@pytest.mark.parametrize("n_rows,n_cols,blocksize,rank", SHAPES)
@pytest.mark.parametrize("config", nf4_lowrank_mma.LOWRANK_CONFIGS + [nf4_lowrank_mma.LowrankConfig(4, 4, 2)])
def test_every_config_matches_reference(n_rows, n_cols, blocksize, rank, config):
    """Every config it may pick for the rank (and four quads, which it no longer times)."""
    if config.quads * -(-rank // 16) > 4:
        pytest.skip("the strip of lora_a would not fit the registers: lowrank_mma never picks it")
    _check(n_rows, n_cols, blocksize, rank, torch.bfloat16, config)


@pytest.mark.parametrize("n_rows,n_cols,blocksize,rank", SHAPES[:4])
@pytest.mark.parametrize("dtype,double_quant", [(torch.float16, True), (torch.bfloat16, False)])
def test_float16_and_no_double_quant(n_rows, n_cols, blocksize, rank, dtype, double_quant):
    _check(n_rows, n_cols, blocksize, rank, dtype, nf4_lowrank_mma.LOWRANK_CONFIGS[0], double_quant)


def test_zero_adapter_is_the_dequantization_bit_for_bit():
    packed, state = random_nf4(300, 2048, 64, double_quant=True, device="cuda")
    weight = nf4_weight(packed, state, packed.device)
    lora_b = torch.zeros(300, 16, dtype=torch.bfloat16, device="cuda")
    lora_a = torch.randn(16, 2048, device="cuda").bfloat16()
    out = torch.empty(300, 2048, dtype=torch.bfloat16, device="cuda")
    got = nf4_lowrank_mma.lowrank_mma(weight, lora_b, lora_a, 2.0, out)
    assert torch.equal(got, reference.dequantize_nf4(packed, state, torch.bfloat16))


def test_dequantize_nf4_lowrank_dispatches_here():
    """The public entry takes this kernel for 16-bit outputs and the tile kernel for float32."""
    packed, state = random_nf4(520, 4096, 64, double_quant=True, device="cuda")
    lora_b = torch.randn(520, 16, device="cuda")
    lora_a = torch.randn(16, 4096, device="cuda") / 4
    before = len(nf4_lowrank_mma._CHOSEN)
    got = nf4_lowrank.dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 2.0, torch.bfloat16)
    assert len(nf4_lowrank_mma._CHOSEN) == before + 1
    want = reference.dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 2.0, torch.bfloat16)
    _assert_one_rounding_apart(got, want)
    full = nf4_lowrank.dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 2.0, torch.float32)
    assert len(nf4_lowrank_mma._CHOSEN) == before + 1
    torch.testing.assert_close(full, reference.dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 2.0,
                                                                      torch.float32), rtol=1e-6, atol=1e-6)


def test_rows_without_whole_blocks_dispatch_here():
    """K % blocksize != 0 (1056 = 16.5 blocks of 64): the tile kernel cannot take it, this one does,
    instead of the plain-PyTorch reference."""
    packed, state = random_nf4(250, 1056, 64, double_quant=True, device="cuda")
    lora_b = torch.randn(250, 8, device="cuda")
    lora_a = torch.randn(8, 1056, device="cuda") / 4
    assert not nf4_lowrank.lowrank_fits(64, 1056)
    before = len(nf4_lowrank_mma._CHOSEN)
    got = nf4_lowrank.dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 2.0, torch.bfloat16)
    assert len(nf4_lowrank_mma._CHOSEN) == before + 1
    want = reference.dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 2.0, torch.bfloat16)
    _assert_one_rounding_apart(got, want)


def test_lora_b_on_two_bytes_takes_16_bit_loads():
    """An even rank whose lora_b starts 2 bytes past a 4-byte boundary (a view into a flat buffer):
    its rank pairs cannot load as 32-bit words."""
    packed, state = random_nf4(100, 1024, 64, double_quant=True, device="cuda")
    weight = nf4_weight(packed, state, packed.device)
    flat = (torch.randn(100 * 16 + 1, device="cuda") * 0.5).bfloat16()
    lora_b = flat[1:].view(100, 16)
    assert lora_b.is_contiguous() and lora_b.data_ptr() % 4 == 2
    lora_a = (torch.randn(16, 1024, device="cuda") / 4).bfloat16()
    out = torch.empty(100, 1024, dtype=torch.bfloat16, device="cuda")
    got = nf4_lowrank_mma.lowrank_mma(weight, lora_b, lora_a, 0.5, out)
    want = reference.dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 0.5, torch.bfloat16)
    _assert_one_rounding_apart(got, want)

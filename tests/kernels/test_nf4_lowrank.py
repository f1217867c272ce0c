"""kernels.nf4_lowrank (W + s B A in one pass) against kernels.reference (CPU, Triton interpreter)."""
import pytest
import torch

import kernels
from kernels import reference
from kernels import nf4_matmul
from kernels.nf4_lowrank import dequantize_nf4_lowrank, lowrank_fits, matmul_nf4_t_lowrank
from tests.kernels.nf4_inputs import random_nf4

# (N, K, blocksize, r): tiles wider than a block and blocks wider than a tile (256 > the
# interpreter's 32 columns), odd N, a rank that is not a power of two, rank 1, several
# double-quant second-level blocks (N * K / blocksize > 256), a rank above one dot's 64.
SHAPES = [(40, 128, 64, 16), (33, 192, 64, 5), (24, 512, 256, 8), (7, 96, 32, 1), (24, 704, 32, 20),
          (17, 128, 64, 100)]  # rank 100: two rank chunks of 64


def _assert_within_an_ulp(got: torch.Tensor, want: torch.Tensor) -> None:
    """16-bit results: the float32 sums differ in order (and the interpreter's bfloat16 rounding
    truncates), so one rounding step apart at most; near 0, where W and s B A cancel, absolutely."""
    eps = torch.finfo(want.dtype).eps
    torch.testing.assert_close(got.float(), want.float(), rtol=eps, atol=1e-6 * want.float().abs().max().item())


def _adapter(n_rows, n_cols, rank, dtype=torch.float32):
    return torch.randn(n_rows, rank).to(dtype), (torch.randn(rank, n_cols) / rank ** 0.5).to(dtype)


@pytest.mark.parametrize("n_rows,n_cols,blocksize,rank", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_lowrank_matches_reference(n_rows, n_cols, blocksize, rank, double_quant):
    packed, state = random_nf4(n_rows, n_cols, blocksize, double_quant)
    lora_b, lora_a = _adapter(n_rows, n_cols, rank)
    got = dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 0.75, torch.float32)
    want = reference.dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 0.75, torch.float32)
    assert got.shape == (n_rows, n_cols) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the rank sum's order differs
    delta = (lora_b @ lora_a).abs().max()
    assert (got - reference.dequantize_nf4(packed, state, torch.float32)).abs().max() > 0.1 * 0.75 * delta
    for dtype in (torch.float16, torch.bfloat16):
        _assert_within_an_ulp(dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 0.75, dtype),
                              reference.dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 0.75, dtype))


def test_zero_scaling_is_the_dequantization_bit_for_bit():
    packed, state = random_nf4(40, 128, 64, double_quant=True)
    lora_b, lora_a = _adapter(40, 128, 16)
    assert torch.equal(dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 0.0, torch.float32),
                       reference.dequantize_nf4(packed, state, torch.float32))


def test_adapter_in_16_bits_enters_rounded():
    """A bfloat16 adapter with a bfloat16 output: the same numbers as the float32 adapter rounded."""
    packed, state = random_nf4(33, 192, 64, double_quant=True)
    lora_b, lora_a = _adapter(33, 192, 8)
    got = dequantize_nf4_lowrank(packed, state, lora_b.bfloat16(), lora_a.bfloat16(), 2.0, torch.bfloat16)
    want = dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 2.0, torch.bfloat16)
    assert torch.equal(got, want)


@pytest.mark.parametrize("double_quant", [True, False])
def test_rows_without_whole_blocks_take_the_reference(double_quant):
    """The reference's formula, also for a weight from kernels.prepare (which has no `shape`)."""
    assert not lowrank_fits(32, 129) and lowrank_fits(64, 128)
    packed, state = random_nf4(7, 129, 32, double_quant=double_quant)
    lora_b, lora_a = _adapter(7, 129, 4)
    want = reference.dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 0.5, torch.float32)
    assert torch.equal(dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 0.5, torch.float32), want)
    assert torch.equal(dequantize_nf4_lowrank(packed, kernels.prepare(packed, state), lora_b, lora_a, 0.5,
                                              torch.float32), want)


def test_errors_name_the_shapes_and_dtype():
    packed, state = random_nf4(40, 128, 64, double_quant=True)
    lora_b, lora_a = _adapter(40, 128, 16)
    with pytest.raises(ValueError, match=r"lora_b \(40, 16\) @ lora_a \(8, 128\) must be \(40, r\) @ \(r, 128\)"):
        dequantize_nf4_lowrank(packed, state, lora_b, lora_a[:8], 1.0)
    with pytest.raises(ValueError, match=r"lora_b \(39, 16\)"):
        dequantize_nf4_lowrank(packed, state, lora_b[:39], lora_a, 1.0)
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16, got torch.int8"):
        dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 1.0, torch.int8)


def test_every_config_in_the_interpreter():
    """A forced config launches without timing; the interpreter runs each family's tile logic."""
    import triton

    from kernels import nf4_lowrank
    packed, state = random_nf4(40, 512, 64, double_quant=True)
    lora_b, lora_a = _adapter(40, 512, 3)
    want = reference.dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 0.5, torch.float32)
    for block_n, block_k in ((16, 32), (16, 64), (32, 128)):  # tiles inside a block, one block, several
        config = triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=4)
        got = nf4_lowrank.dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 0.5, torch.float32, config=config)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m", [1, 16, 17, 40])
def test_input_gradient_streams_w_at_small_m_and_merges_above(m):
    """g @ (W + s B A): up to SMALL_M_MAX rows the small-M product of g @ W plus an addmm, above it
    one product with the merged weight; both the same function to float32 rounding."""
    n_rows, n_cols, rank = 40, 128, 4
    packed, state = random_nf4(n_rows, n_cols, 64, double_quant=True)
    lora_b, lora_a = _adapter(n_rows, n_cols, rank)
    g = torch.randn(2, m, n_rows)
    got = matmul_nf4_t_lowrank(g, packed, state, lora_b, lora_a, 0.5)
    merged = reference.dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 0.5, torch.float64)
    want = g.double() @ merged
    assert got.shape == (2, m, n_cols) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    g2 = g.reshape(-1, n_rows)
    if 2 * m <= nf4_matmul.SMALL_M_MAX:  # the path: W streamed, the adapter added by addmm
        streamed = nf4_matmul.matmul_nf4_t(g2, packed, state).addmm_(g2 @ lora_b, lora_a, alpha=0.5)
    else:
        streamed = g2 @ dequantize_nf4_lowrank(packed, state, lora_b, lora_a, 0.5, torch.float32)
    assert torch.equal(got.reshape(-1, n_cols), streamed)
    g_b = g @ lora_b  # a caller's g @ B is used as given
    assert torch.equal(matmul_nf4_t_lowrank(g, packed, state, lora_b, lora_a, 0.5, g_b), got)


def test_input_gradient_with_a_float32_adapter_and_16_bit_g():
    packed, state = random_nf4(24, 64, 64, double_quant=False)
    lora_b, lora_a = _adapter(24, 64, 8)
    g = torch.randn(3, 24).half()
    got = matmul_nf4_t_lowrank(g, packed, state, lora_b, lora_a, 2.0, g.float() @ lora_b)
    want = g.double() @ reference.dequantize_nf4(packed, state, torch.float64) + 2.0 * (g.double() @ lora_b.double()
                                                                                         @ lora_a.double())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3 * want.abs().max().item())


def test_input_gradient_names_a_mismatched_g():
    packed, state = random_nf4(24, 64, 64)
    lora_b, lora_a = _adapter(24, 64, 8)
    with pytest.raises(ValueError, match=r"matmul_nf4_t_lowrank: g of shape \(3, 23\) must end in the weight's 24"):
        matmul_nf4_t_lowrank(torch.randn(3, 23), packed, state, lora_b, lora_a, 1.0)

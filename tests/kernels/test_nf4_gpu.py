"""The NF4 kernels on CUDA: bfloat16 and float16, model-sized and odd shapes, every strategy.

Run on a GPU machine from the repo root: PYTHONPATH=. python -m pytest -m gpu tests/kernels -q
The first call of each shape autotunes (a few seconds each); Triton caches the compiled kernels.
Tolerances relative to |x| @ |W|.T with the exact result in fp64: bfloat16 8e-3 (W and y each
rounded to bf16 once: <= 2 * 2^-8), float16 2e-3, float32 1e-4 (K up to 14336 terms in fp32).
"""
import pytest
import torch

import kernels
from kernels import nf4_gemv, nf4_matmul, reference
from tests.kernels.nf4_inputs import assert_matmul_close, random_nf4

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

RTOL = {torch.bfloat16: 8e-3, torch.float16: 2e-3, torch.float32: 1e-4}
# (N, K, blocksize): Llama-8B shapes; rows that do not hold whole blocks (4100 % 64 = 4); odd K.
SHAPES = [(4096, 4096, 64), (4096, 14336, 64), (4095, 4100, 64), (333, 4099, 128)]
ROWS = [1, 3, 16, 17, 64, 4096]


def _weight(n_rows, n_cols, blocksize, double_quant=True):
    packed, state = random_nf4(n_rows, n_cols, blocksize, double_quant, device="cuda")
    return packed, state, reference.dequantize_nf4(packed, state, torch.float32)


@pytest.mark.parametrize("n_rows,n_cols,blocksize", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_bit_exact(n_rows, n_cols, blocksize, double_quant):
    packed, state = random_nf4(n_rows, n_cols, blocksize, double_quant, device="cuda")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(kernels.dequantize_nf4(packed, state, dtype),
                           reference.dequantize_nf4(packed, state, dtype)), dtype


@pytest.mark.parametrize("n_rows,n_cols,blocksize", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_matmul_nf4_bf16(n_rows, n_cols, blocksize, m):
    packed, state, weight = _weight(n_rows, n_cols, blocksize)
    x = torch.randn(m, n_cols, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n_rows, device="cuda", dtype=torch.bfloat16)
    assert_matmul_close(kernels.matmul_nf4(x, packed, state, bias), x, weight.T, bias, RTOL[torch.bfloat16])


@pytest.mark.parametrize("n_rows,n_cols,blocksize", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_matmul_nf4_t_bf16(n_rows, n_cols, blocksize, m):
    packed, state, weight = _weight(n_rows, n_cols, blocksize)
    g = torch.randn(m, n_rows, device="cuda", dtype=torch.bfloat16)
    assert_matmul_close(kernels.matmul_nf4_t(g, packed, state), g, weight, None, RTOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_other_dtypes(dtype, m):
    packed, state, weight = _weight(4095, 4100, 64, double_quant=False)
    x = torch.randn(m, 4100, device="cuda", dtype=dtype)
    assert_matmul_close(kernels.matmul_nf4(x, packed, state), x, weight.T, None, RTOL[dtype])
    g = torch.randn(m, 4095, device="cuda", dtype=dtype)
    assert_matmul_close(kernels.matmul_nf4_t(g, packed, state), g, weight, None, RTOL[dtype])


FORWARD = {
    "gemv": lambda x, p, s, b: nf4_matmul.matmul_nf4_gemv(x, p, s, b, split_k=1),
    "gemv-split4": lambda x, p, s, b: nf4_matmul.matmul_nf4_gemv(x, p, s, b, split_k=4),
    "small": lambda x, p, s, b: nf4_matmul.matmul_nf4_small_m(x, p, s, b, split_k=1),
    "small-split4": lambda x, p, s, b: nf4_matmul.matmul_nf4_small_m(x, p, s, b, split_k=4),
    "fused": lambda x, p, s, b: nf4_matmul.matmul_nf4_fused(x, p, s, b),
    "fused-split2": lambda x, p, s, b: nf4_matmul.matmul_nf4_fused(x, p, s, b, split_k=2),
    "dequantize": lambda x, p, s, b: nf4_matmul.matmul_nf4_dequantize(x, p, s, b),
}
TRANSPOSED = {
    "small": lambda g, p, s: nf4_matmul.matmul_nf4_t_small_m(g, p, s, split_n=1),
    "small-split4": lambda g, p, s: nf4_matmul.matmul_nf4_t_small_m(g, p, s, split_n=4),
    "fused": lambda g, p, s: nf4_matmul.matmul_nf4_t_fused(g, p, s),
    "dequantize": lambda g, p, s: nf4_matmul.matmul_nf4_t_dequantize(g, p, s),
}


@pytest.mark.parametrize("strategy,m", [(strategy, m) for strategy in FORWARD for m in (1, 3, 16, 64)
                                        if not (strategy.startswith("gemv") and m > nf4_gemv.GEMV_M_MAX)])
def test_every_forward_strategy(strategy, m):
    packed, state, weight = _weight(1024, 4096, 64)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    assert_matmul_close(FORWARD[strategy](x, packed, state, bias), x, weight.T, bias, RTOL[torch.bfloat16])


@pytest.mark.parametrize("strategy", TRANSPOSED)
@pytest.mark.parametrize("m", [2, 64])
def test_every_transposed_strategy(strategy, m):
    packed, state, weight = _weight(4096, 1024, 64)
    g = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    assert_matmul_close(TRANSPOSED[strategy](g, packed, state), g, weight, None, RTOL[torch.bfloat16])


def test_offset_on_the_host_and_leading_dims():
    packed, state, weight = _weight(4096, 4096, 64)
    state.offset = float(state.offset)
    x = torch.randn(2, 8, 4096, device="cuda", dtype=torch.bfloat16)
    got = kernels.matmul_nf4(x, packed, state)
    assert got.shape == (2, 8, 4096)
    assert_matmul_close(got.reshape(16, 4096), x.reshape(16, 4096), weight.T, None, RTOL[torch.bfloat16])


# Every GEMV lookup (M = 1 and 16) on the shapes of benchmarks/gemv_variants.py and odd ones (N not a
# multiple of any BLOCK_N, K not a multiple of any BLOCK_K, blocksize 128 and 256).
GEMV_SHAPES = [(4096, 4096, 64), (14336, 4096, 64), (4096, 14336, 64), (8192, 8192, 64), (28672, 8192, 64),
               (4095, 4160, 64), (333, 1280, 128), (1000, 2816, 256)]


@pytest.mark.parametrize("lookup", nf4_gemv.GEMV_LOOKUPS)
@pytest.mark.parametrize("n_rows,n_cols,blocksize", GEMV_SHAPES)
def test_gemv_lookups(lookup, n_rows, n_cols, blocksize):
    packed, state, weight = _weight(n_rows, n_cols, blocksize)
    bias = torch.randn(n_rows, device="cuda", dtype=torch.bfloat16)
    for m in (1, 16):
        x = torch.randn(m, n_cols, device="cuda", dtype=torch.bfloat16)
        got = nf4_matmul.matmul_nf4_gemv(x, packed, state, bias, lookup=lookup)
        assert_matmul_close(got, x, weight.T, bias, RTOL[torch.bfloat16])


@pytest.mark.parametrize("lookup", nf4_gemv.GEMV_LOOKUPS)
def test_gemv_lookups_float16_split_and_unaligned_x(lookup):
    packed, state, weight = _weight(4095, 4160, 64)
    for m in (1, 5):
        x = torch.randn(m, 4160, device="cuda", dtype=torch.float16)
        assert_matmul_close(nf4_matmul.matmul_nf4_gemv(x, packed, state, lookup=lookup), x, weight.T, None,
                            RTOL[torch.float16])
    x = torch.randn(1, 4161, device="cuda", dtype=torch.bfloat16)[:, 1:]  # 2-byte aligned: copied
    got = nf4_matmul.matmul_nf4_gemv(x, packed, state, lookup=lookup, split_k=3)
    assert_matmul_close(got, x, weight.T, None, RTOL[torch.bfloat16])


def test_repeated_calls_after_tuning_give_the_same_results():
    """After the first (autotuned) call per shape, kernels/launch.py launches the chosen config
    without the autotuner: repeated calls on two weights of one shape, x aligned or not, stay right."""
    weights = [_weight(4095, 4160, 64), _weight(4095, 4160, 64)]
    for _ in range(3):
        for packed, state, weight in weights:
            for m in (1, 3):
                for shift in (0, 1):  # shift 1: x starts 2 bytes into its storage (copied for M = 1)
                    x = torch.randn(m, 4160 + shift, device="cuda", dtype=torch.bfloat16)[:, shift:]
                    assert_matmul_close(kernels.matmul_nf4(x, packed, state), x, weight.T, None,
                                        RTOL[torch.bfloat16])
            assert torch.equal(kernels.dequantize_nf4(packed, state, torch.bfloat16),
                               reference.dequantize_nf4(packed, state, torch.bfloat16))

"""kernels.matmul_nf4 / matmul_nf4_t and every strategy behind them, against x @ W.T in fp64.

CPU, Triton interpreter: float16 and float32 inputs (the interpreter's tl.dot is wrong on bfloat16;
bfloat16 is covered by test_nf4_gpu.py). Tolerances: float32 1e-5 (no TF32 anywhere), float16
2e-3 (W rounded to float16 once, output rounded once: <= 2 * 2^-11), relative to |x| @ |W|.T.
"""
import pytest
import torch

import kernels
from kernels import nf4_gemv, nf4_matmul, reference
from kernels.nf4_tiles import _filled_bf16
from tests.kernels.nf4_inputs import NF4_CODE, assert_matmul_close, random_nf4

RTOL = {torch.float32: 1e-5, torch.float16: 2e-3}

# (N, K, blocksize): blocks straddling rows (K % blocksize != 0), rows holding whole blocks with
# tiles wider or narrower than a block (blocksize 256: every interpreter tile is narrower), odd K
# (rows straddle bytes).
SHAPES = [(40, 96, 64), (33, 130, 128), (40, 128, 64), (24, 256, 128), (7, 129, 64), (20, 512, 256)]
ROWS = [1, 3, 16, 17, 64]  # GEMV, small-M tensor cores (3, 16), large-M tiles (partial and whole)


def _weight(n_rows, n_cols, blocksize, double_quant=True):
    packed, state = random_nf4(n_rows, n_cols, blocksize, double_quant)
    return packed, state, reference.dequantize_nf4(packed, state, torch.float32)


@pytest.mark.parametrize("n_rows,n_cols,blocksize", SHAPES)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_matmul_nf4(n_rows, n_cols, blocksize, m, dtype):
    packed, state, weight = _weight(n_rows, n_cols, blocksize, double_quant=(m % 2 == 1))
    x = torch.randn(m, n_cols).to(dtype)
    bias = torch.randn(n_rows).to(dtype)
    got = kernels.matmul_nf4(x, packed, state, bias)
    assert got.dtype == dtype
    assert_matmul_close(got, x, weight.T, bias, RTOL[dtype])
    assert_matmul_close(kernels.matmul_nf4(x, packed, state), x, weight.T, None, RTOL[dtype])


@pytest.mark.parametrize("n_rows,n_cols,blocksize", SHAPES)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_matmul_nf4_t(n_rows, n_cols, blocksize, m, dtype):
    packed, state, weight = _weight(n_rows, n_cols, blocksize, double_quant=(m % 2 == 0))
    g = torch.randn(m, n_rows).to(dtype)
    got = kernels.matmul_nf4_t(g, packed, state)
    assert got.dtype == dtype
    assert_matmul_close(got, g, weight, None, RTOL[dtype])


STRATEGIES = {
    "gemv": lambda x, p, s, b: nf4_matmul.matmul_nf4_gemv(x, p, s, b, split_k=1),
    "gemv-split3": lambda x, p, s, b: nf4_matmul.matmul_nf4_gemv(x, p, s, b, split_k=3),
    "small": lambda x, p, s, b: nf4_matmul.matmul_nf4_small_m(x, p, s, b, split_k=1),
    "small-split3": lambda x, p, s, b: nf4_matmul.matmul_nf4_small_m(x, p, s, b, split_k=3),
    "fused": lambda x, p, s, b: nf4_matmul.matmul_nf4_fused(x, p, s, b),
    "fused-split2": lambda x, p, s, b: nf4_matmul.matmul_nf4_fused(x, p, s, b, split_k=2),
    "dequantize": lambda x, p, s, b: nf4_matmul.matmul_nf4_dequantize(x, p, s, b),
}


@pytest.mark.parametrize("strategy,shape", [  # the GEMV reads rows holding whole blocks only
    (strategy, shape) for strategy in STRATEGIES for shape in [(33, 130, 128), (40, 128, 64)]
    if not (strategy.startswith("gemv") and shape[1] % shape[2])])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_every_forward_strategy(strategy, shape, m):
    packed, state, weight = _weight(*shape)
    x = torch.randn(m, shape[1]).half()
    bias = torch.randn(shape[0]).half()
    assert_matmul_close(STRATEGIES[strategy](x, packed, state, bias), x, weight.T, bias, RTOL[torch.float16])


T_STRATEGIES = {
    "small": lambda g, p, s: nf4_matmul.matmul_nf4_t_small_m(g, p, s, split_n=1),
    "small-split2": lambda g, p, s: nf4_matmul.matmul_nf4_t_small_m(g, p, s, split_n=2),
    "fused": lambda g, p, s: nf4_matmul.matmul_nf4_t_fused(g, p, s),
    "fused-split2": lambda g, p, s: nf4_matmul.matmul_nf4_t_fused(g, p, s, split_n=2),
    "dequantize": lambda g, p, s: nf4_matmul.matmul_nf4_t_dequantize(g, p, s),
}


@pytest.mark.parametrize("strategy", T_STRATEGIES)
@pytest.mark.parametrize("shape", [(33, 130, 128), (72, 128, 64)])
def test_every_transposed_strategy(strategy, shape):
    packed, state, weight = _weight(*shape)
    g = torch.randn(5, shape[0]).half()
    assert_matmul_close(T_STRATEGIES[strategy](g, packed, state), g, weight, None, RTOL[torch.float16])


@pytest.mark.parametrize("lookup", nf4_gemv.GEMV_LOOKUPS)
@pytest.mark.parametrize("n_rows,n_cols,blocksize,split", [
    (33, 256, 64, 1), (7, 512, 128, 3), (40, 768, 256, 2), (17, 128, 64, 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 5])
def test_gemv_lookups(lookup, n_rows, n_cols, blocksize, split, dtype, m):
    """Each code lookup, at M = 1 and on the tensor-core path (the interpreter takes "prmt"'s
    tl.load path, with the float16 rounding of the code that the register table has): against the
    reference on the same code."""
    packed, state = random_nf4(n_rows, n_cols, blocksize, double_quant=split != 2)
    if lookup == "prmt":
        state.code = state.code.half().float()  # what the float16 byte planes hold
    if lookup == "prmt_bf16":
        state.code = filled_bf16_values(state.code)
    weight = reference.dequantize_nf4(packed, state, torch.float32)
    x = torch.randn(m, n_cols).to(dtype)
    bias = torch.randn(n_rows).to(dtype)
    got = nf4_matmul.matmul_nf4_gemv(x, packed, state, bias, split_k=split, lookup=lookup)
    assert got.dtype == dtype
    assert_matmul_close(got, x, weight.T, bias, RTOL[dtype])


def filled_bf16_values(code: torch.Tensor) -> torch.Tensor:
    """float32 (16,): the values the "prmt_bf16" planes hold (top half h, low half h's sign bit x 16)."""
    top = _filled_bf16(code).to(torch.int32) << 16  # (16,)
    return (top | torch.where(top < 0, 0xFFFF, 0)).to(torch.int32).view(torch.float32)


def test_filled_bf16_values_are_within_bf16_rounding():
    nonzero = NF4_CODE != 0
    error = (filled_bf16_values(NF4_CODE) - NF4_CODE).abs()[nonzero] / NF4_CODE.abs()[nonzero]
    assert error.max() <= 2.0 ** -8
    assert filled_bf16_values(NF4_CODE)[~nonzero].eq(0).all()


def test_prmt_lookup_rounds_the_code_to_float16():
    """With the unrounded code the "prmt" lookup differs from the reference by the float16 rounding of
    the code values only (<= 2^-12 of each |value|)."""
    packed, state, weight = _weight(24, 512, 64)
    x = torch.randn(1, 512)
    got = nf4_matmul.matmul_nf4_gemv(x, packed, state, lookup="prmt")
    assert_matmul_close(got, x, weight.T, None, 2.0 ** -12 + RTOL[torch.float32])


def test_gemv_rejects_an_unknown_lookup():
    packed, state, _ = _weight(40, 128, 64)
    with pytest.raises(ValueError, match="lookup must be one of"):
        nf4_matmul.matmul_nf4_gemv(torch.randn(1, 128), packed, state, lookup="table")


def test_gemv_needs_whole_blocks():
    packed, state, _ = _weight(33, 130, 128)
    with pytest.raises(ValueError, match="whole blocks"):
        nf4_matmul.matmul_nf4_gemv(torch.randn(1, 130), packed, state)


def test_split_heuristic_splits_only_when_outputs_are_few():
    split = nf4_matmul.split_for_small_m
    assert split(14336, 4096, 224, 132) == 1  # enough programs already
    assert split(4096, 4096, 64, 132) == 3  # 64 programs: 3 splits reach 132
    assert split(4096, 4096, 4096, 32768) == 8  # GEMV threads: 8 splits reach 32768
    assert split(40, 96, 40, 32768) == 1  # too little K to share
    assert split(40, 100_000, 40, 32768) == nf4_matmul.SPLIT_MAX


def test_leading_dims_and_strided_input():
    packed, state, weight = _weight(40, 128, 64)
    x = torch.randn(2, 3, 256)[..., ::2].float()  # (2, 3, 128), last dim strided
    got = kernels.matmul_nf4(x, packed, state)
    assert got.shape == (2, 3, 40)
    assert_matmul_close(got.reshape(6, 40), x.reshape(6, 128), weight.T, None, RTOL[torch.float32])
    g = torch.randn(4, 40, 3).float().transpose(1, 2)  # (4, 3, 40), non-contiguous
    got = kernels.matmul_nf4_t(g, packed, state)
    assert got.shape == (4, 3, 128)
    assert_matmul_close(got.reshape(12, 128), g.reshape(12, 40), weight, None, RTOL[torch.float32])


def test_no_rows():
    packed, state, _ = _weight(40, 96, 64)
    assert kernels.matmul_nf4(torch.zeros(0, 96), packed, state).shape == (0, 40)
    assert kernels.matmul_nf4_t(torch.zeros(2, 0, 40), packed, state).shape == (2, 0, 96)


def test_bad_inputs_raise_one_clear_error():
    packed, state, _ = _weight(40, 96, 64)
    with pytest.raises(ValueError, match="must end in 96"):
        kernels.matmul_nf4(torch.randn(3, 95), packed, state)
    with pytest.raises(ValueError, match="must end in 40"):
        kernels.matmul_nf4_t(torch.randn(3, 96), packed, state)
    with pytest.raises(ValueError, match="bias"):
        kernels.matmul_nf4(torch.randn(3, 96), packed, state, bias=torch.randn(39))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        kernels.matmul_nf4(torch.randn(3, 96).double(), packed, state)
    with pytest.raises(ValueError, match="packed"):
        kernels.matmul_nf4(torch.randn(3, 96), packed[:10], state)
    with pytest.raises(ValueError, match="splits"):
        nf4_matmul.matmul_nf4_small_m(torch.randn(3, 96), packed, state, split_k=0)


def test_gemv_takes_at_most_16_rows():
    packed, state, _ = _weight(40, 128, 64)
    with pytest.raises(ValueError, match="at most 16 rows"):
        nf4_matmul.matmul_nf4_gemv(torch.randn(17, 128).half(), packed, state)


def test_raw_state_calls_reuse_the_code_tables_and_see_a_code_changed_in_place():
    from kernels import nf4_tiles
    packed, state, weight = _weight(40, 128, 64)
    x = torch.randn(1, 128)
    assert_matmul_close(kernels.matmul_nf4(x, packed, state), x, weight.T, None, RTOL[torch.float32])
    first = kernels.prepare(packed, state)
    assert kernels.prepare(packed, state).code_planes is first.code_planes  # cached, not rebuilt
    state.code.mul_(-0.5)  # in place: a new version of the same tensor
    changed = reference.dequantize_nf4(packed, state, torch.float32)
    assert_matmul_close(kernels.matmul_nf4(x, packed, state), x, changed.T, None, RTOL[torch.float32])
    assert kernels.prepare(packed, state).code_planes is not first.code_planes
    for _ in range(2 * nf4_tiles._CODE_TABLES_MAX):  # fresh code tensors: the cache stays bounded
        kernels.prepare(packed, state.__class__(**{**vars(state), "code": state.code.clone()}))
    assert len(nf4_tiles._CODE_TABLES) <= nf4_tiles._CODE_TABLES_MAX

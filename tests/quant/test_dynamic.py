"""quant.dynamic: the 8-bit dynamic map and blockwise 8-bit quantization (used by double quant)."""
import numpy as np
import pytest
import torch

from quant.dynamic import dequantize_blockwise, dynamic_map, quantize_blockwise


def _bnb():
    try:
        import bitsandbytes.functional as F
    except Exception:  # not installed, or fails to load
        pytest.skip("bitsandbytes is not importable")
    return F


# --- an independent scalar reference of the reference kernel's search (numpy float32) ---

def _search(x: np.float32, code: np.ndarray) -> int:
    """7 halving steps from index 127 (x > value goes up), then the nearer of the final pivot and
    the last pivot passed on x's side, judged against their float32 midpoint."""
    pivot, lower_pivot, upper_pivot = 127, 0, 255
    lower, upper = np.float32(-1.0), np.float32(1.0)
    for step in (64, 32, 16, 8, 4, 2, 1):
        value = code[pivot]
        if x > value:
            lower_pivot, lower, pivot = pivot, value, pivot + step
        else:
            upper_pivot, upper, pivot = pivot, value, pivot - step
    value = code[pivot]
    if upper_pivot == 255:
        upper = code[255]
    if lower_pivot == 0:
        lower = code[0]
    if x > value:
        return upper_pivot if x > (upper + value) * np.float32(0.5) else pivot
    return lower_pivot if x < (lower + value) * np.float32(0.5) else pivot


def reference_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    values = x.reshape(-1).float().numpy()
    c = code.numpy()
    codes, absmaxes = [], []
    for start in range(0, len(values), blocksize):
        block = values[start:start + blocksize]
        absmax = np.float32(np.abs(block).max())
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.float32(1.0) / absmax
            codes += [_search(np.float32(v) * inv, c) for v in block]
        absmaxes.append(float(absmax))
    return codes, absmaxes


# --- the map ---

@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_shape_order_and_range(signed):
    code = dynamic_map(signed)
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert (code.diff() >= 0).all()
    assert code[-1].item() == 1.0 and (code == 0).sum() == 1
    if signed:
        assert (code < 0).sum() == 127 and (code > 0).sum() == 128
        assert code[0].item() == pytest.approx(-0.99297, abs=1e-5) and code[127].item() == 0.0
    else:
        assert (code < 0).sum() == 0 and code[0].item() == 0.0
    # 7 exponent bits: the smallest magnitude is a fraction midpoint times 1e-6
    smallest = code[code > 0].min().item()
    assert 1e-7 < smallest < 1e-6


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    F = _bnb()
    assert torch.equal(dynamic_map(signed), F.create_dynamic_map(signed=signed))


# --- blockwise quantization ---

@pytest.mark.parametrize("n,blocksize", [(1000, 256), (256, 256), (77, 64), (5, 256)])
def test_codes_match_the_scalar_reference(n, blocksize):
    code = dynamic_map(True)
    x = torch.randn(n) * torch.rand(1) * 5
    x[: min(n, 3)] = 0.0
    codes, absmax = quantize_blockwise(x, code, blocksize)
    want_codes, want_absmax = reference_blockwise(x, code, blocksize)
    assert codes.dtype == torch.uint8 and codes.shape == (n,)
    assert codes.tolist() == want_codes
    assert absmax.tolist() == want_absmax


def test_ties_on_midpoints_match_the_scalar_reference():
    """Values exactly on every midpoint: the search's final pivot decides, not 'nearest'."""
    code = dynamic_map(True)
    mids = (code[:-1] + code[1:]) * 0.5  # float32 midpoints, as the search compares them
    x = torch.cat([mids, torch.tensor([1.0, -1.0])])  # absmax 1: the values are not rescaled
    codes, _ = quantize_blockwise(x, code, blocksize=x.numel())
    want, _ = reference_blockwise(x, code, blocksize=x.numel())
    assert codes.tolist() == want


def test_codes_are_nearest_up_to_rounding():
    code = dynamic_map(True)
    x = torch.rand(20_000) * 2 - 1
    x[0] = 1.0
    codes, absmax = quantize_blockwise(x, code, blocksize=20_000)
    got = (x - code[codes.long()]).abs()
    best = (x[:, None] - code[None, :]).abs().min(dim=1).values
    assert (got <= best + 1e-7).all()
    assert (got == best).float().mean() > 0.999


def test_dequantize_and_zero_blocks():
    code = dynamic_map(True)
    x = torch.randn(3, 256) * 0.1
    x[1] = 0.0
    codes, absmax = quantize_blockwise(x, code, 256)
    assert absmax[1].item() == 0.0 and codes[256:512].eq(0).all()  # NaN takes code 0
    out = dequantize_blockwise(codes, absmax, code, 256)
    assert torch.equal(out, code[codes.long()] * absmax.repeat_interleave(256))
    assert (out[256:512] == 0).all()
    max_gap = code.diff().max().item()
    err = (out.view(3, 256) - x).abs()
    assert (err <= max_gap / 2 * absmax[:, None] + 1e-9).all()


@pytest.mark.parametrize("n,blocksize", [(1, 256), (255, 256), (256, 256), (1000, 256), (4097, 64), (12, 5)])
def test_dequantize_takes_every_element_s_own_block_scale(n, blocksize):
    code = dynamic_map(True)
    codes = torch.randint(0, 256, (n,), dtype=torch.uint8)
    absmax = torch.rand(-(-n // blocksize)) + 0.5
    want = code[codes.long()] * absmax[torch.arange(n) // blocksize]
    assert torch.equal(dequantize_blockwise(codes, absmax, code, blocksize), want)


def test_integer_input_is_a_type_error():
    with pytest.raises(TypeError, match="int64"):
        quantize_blockwise(torch.arange(10), dynamic_map(True))


def test_against_bitsandbytes_cpu():
    """bitsandbytes' CPU library (0.50) has the same map and absmax, but picks codes with another
    search that is not always the nearest (e.g. it maps 0.021241 to 0.022656, not 0.019844), so
    codes are compared by distance: ours are never farther, and almost all are equal."""
    F = _bnb()
    code = dynamic_map(True)
    x = torch.randn(80, 256) * 3
    q, s = F.quantize_blockwise(x, code=code.clone(), blocksize=256)
    codes, absmax = quantize_blockwise(x, code, 256)
    assert torch.equal(absmax, s.absmax)
    scaled = (x.view(-1, 256) * (1.0 / absmax)[:, None]).view(-1)
    ours = (scaled - code[codes.long()]).abs()
    q = q.view(-1)
    theirs = (scaled - code[q.long()]).abs()
    assert (ours <= theirs + 1e-7).all()
    assert (codes == q).float().mean() > 0.99


@pytest.mark.gpu
def test_against_bitsandbytes_cuda_bit_for_bit():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    F = _bnb()
    code = dynamic_map(True).cuda()
    for n in (256 * 40, 1000, 77):
        x = torch.randn(n, device="cuda") * 3
        q, s = F.quantize_blockwise(x, code=code, blocksize=256)
        codes, absmax = quantize_blockwise(x, code, 256)
        assert torch.equal(absmax, s.absmax)
        assert torch.equal(codes, q.view(-1))

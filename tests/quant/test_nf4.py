"""quantize_4bit / dequantize_4bit: hand-computed cases, an independent scalar reference, error
bounds, NF4 against FP4 and int4, bits per parameter, bad input."""
import math

import numpy as np
import pytest
import torch

import quant
from quant.dynamic import dynamic_map
from tests.quant.test_codebooks import NF4_TREE_THRESHOLDS


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    flat = packed.view(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).view(-1)[:n]


# --- an independent scalar reference of the QLoRA kernel (numpy float32, one value at a time) ---

def _tree_nf4(x: np.float32) -> int:
    """The reference's decision tree written as a walk over its thresholds: x > t goes up."""
    lo, hi = 0, 15
    while lo < hi:  # a balanced binary search over the 15 thresholds, as the tree
        mid = (lo + hi) // 2
        if x > np.float32(NF4_TREE_THRESHOLDS[mid]):
            lo = mid + 1
        else:
            hi = mid
    return lo


def reference_nf4(w: torch.Tensor, blocksize: int) -> tuple[bytes, list]:
    values = w.reshape(-1).float().numpy()
    codes, absmaxes = [], []
    for start in range(0, len(values), blocksize):
        block = values[start:start + blocksize]
        absmax = np.float32(np.max(np.abs(block)))
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.float32(1.0) / absmax
            codes += [_tree_nf4(np.float32(v) * inv) for v in block]
        absmaxes.append(float(absmax))
    if len(codes) % 2:
        codes.append(_tree_nf4(np.float32(0.0)))
    return bytes(codes[i] << 4 | codes[i + 1] for i in range(0, len(codes), 2)), absmaxes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,blocksize", [((37, 29), 64), ((3, 5, 7), 16), ((1,), 64), ((1000,), 256)])
def test_codes_and_absmax_match_the_scalar_reference(dtype, shape, blocksize):
    w = (torch.randn(shape) * 0.05).to(dtype)
    w.view(-1)[:3] = 0.0  # zeros inside a block
    packed, state = quant.quantize_4bit(w, blocksize=blocksize, double_quant=False)
    want_bytes, want_absmax = reference_nf4(w, blocksize)
    assert packed.dtype == torch.uint8 and packed.shape == ((w.numel() + 1) // 2, 1)
    assert bytes(packed.view(-1).tolist()) == want_bytes
    assert state.absmax.tolist() == want_absmax


def test_hand_computed_codes_packing_and_short_last_block():
    # Block 0 (16 values, absmax 2): x / 2 against the NF4 table, by hand.
    block0 = [2.0, -2.0, 0.0, 1.0, 0.16, -0.5, 0.079580299556255, -1.6] + [0.0] * 8
    # 2/2=1 -> 15; -1 -> 0; 0 -> 7; 0.5 < 0.50166 -> 12; 0.08 in (0.0398, 0.1203) -> 8;
    # -0.25 < -0.23461 -> 4; 0.0795803/2 is exactly the threshold 0.03979 between codes 7 and 8,
    # a tie, -> 7; -0.8 in (-0.848, -0.611) -> 1; zeros -> 7.
    # Block 1 (3 values, absmax 0.3, the short last block): 1 -> 15; -1/3 > -0.33968 -> 4; 0 -> 7;
    # odd count: the pad nibble is the code of 0.0, 7.
    w = torch.tensor(block0 + [0.3, -0.1, 0.0])
    packed, state = quant.quantize_4bit(w, blocksize=16, double_quant=False)
    assert packed.view(-1).tolist() == [0xF0, 0x7C, 0x84, 0x71, 0x77, 0x77, 0x77, 0x77, 0xF4, 0x77]
    assert packed.shape == (10, 1)
    assert state.absmax[0].item() == 2.0 and state.absmax[1].item() == float(np.float32(0.3))
    out = quant.dequantize_4bit(packed, state)
    code = quant.NF4_CODE
    assert out[0].item() == 2.0 and out[1].item() == -2.0
    assert out[3].item() == float(code[12] * 2.0)
    assert out[16].item() == float(np.float32(0.3))
    assert out[17].item() == (code[4] * torch.tensor(0.3)).item()


def test_ties_and_multiplying_by_the_reciprocal():
    # absmax 1: a value exactly on a threshold takes the lower code, the next float the upper one.
    t = np.float32(0.03979014977812767)
    above = np.nextafter(t, np.float32(1))
    # absmax 3: 1.1679376363754272 * (1/3) = 0.38931257 > 0.38931254 (code 12), but
    # 1.1679376363754272 / 3 = 0.38931254 exactly on the threshold (code 11): the reference multiplies.
    w = torch.tensor([1.0, float(t), float(above), 0.0] + [0.0] * 12 + [3.0, 1.1679376363754272] + [0.0] * 14)
    assert (w[17] / 3).item() == np.float32(0.3893125355243683)  # the division would tie
    packed, _ = quant.quantize_4bit(w, blocksize=16, double_quant=False)
    codes = unpack(packed, w.numel()).tolist()
    assert codes[:4] == [15, 7, 8, 7]
    assert codes[16:18] == [15, 12]


def test_zero_block_takes_code_zero_and_dequantizes_to_zero():
    w = torch.zeros(2, 16)
    w[1] = torch.linspace(-1, 1, 16)
    packed, state = quant.quantize_4bit(w, blocksize=16, double_quant=False)
    assert packed.view(-1)[:8].tolist() == [0] * 8  # 0 * (1/0) = NaN -> 0b0000 (-1.0 * 0)
    out = quant.dequantize_4bit(packed, state)
    assert torch.equal(out[0], torch.zeros(16))
    assert torch.signbit(out[0]).all()  # -1.0 * 0.0 = -0.0, as the reference
    assert out[1, 0].item() == -1.0 and out[1, -1].item() == 1.0


def test_hand_computed_double_quantized_absmax():
    # Three blocks with absmax 1, 3, 5: offset = 3; absmax - offset = -2, 0, 2; one nested block
    # with absmax 2; scaled -1, 0, 1 -> nearest dynamic-map codes 0 (its minimum), 127 (0.0), 255 (1.0).
    w = torch.zeros(48)
    w[0], w[16], w[32] = 1.0, -3.0, 5.0
    packed, state = quant.quantize_4bit(w, blocksize=16, double_quant=True)
    assert state.offset.item() == 3.0
    assert state.absmax.dtype == torch.uint8 and state.absmax.tolist() == [0, 127, 255]
    assert state.nested_absmax.tolist() == [2.0]
    assert torch.equal(state.nested_code, dynamic_map(signed=True))
    lowest = dynamic_map(signed=True)[0]
    assert lowest.item() == pytest.approx(-0.99297, abs=1e-5)
    want = torch.stack([lowest * 2.0 + 3.0, torch.tensor(3.0), torch.tensor(5.0)])
    assert torch.equal(state.absmax_float(), want)
    out = quant.dequantize_4bit(packed, state)
    assert out[0].item() == want[0].item() and out[16].item() == -3.0 and out[32].item() == 5.0


def test_double_quant_formula_on_random_input():
    """absmax_float = dynamic[q] * nested_absmax[b // 256] + offset, two float32 roundings."""
    w = torch.randn(300, 128) * torch.rand(300, 1)
    _, plain = quant.quantize_4bit(w, double_quant=False)
    _, state = quant.quantize_4bit(w, double_quant=True)
    nblocks = w.numel() // 64
    assert state.absmax.shape == (nblocks,) and state.nested_absmax.shape == (math.ceil(nblocks / 256),)
    assert state.offset.item() == plain.absmax.mean().item()
    product = dynamic_map()[state.absmax.long()] * state.nested_absmax.repeat_interleave(256)[:nblocks]
    assert torch.equal(state.absmax_float(), product + state.offset)
    # and the 8-bit codes are a good approximation of the true absmax
    err = (state.absmax_float() - plain.absmax).abs()
    assert (err <= state.nested_absmax.repeat_interleave(256)[:nblocks] * 0.02).all()


# --- error bounds and the quality of NF4 ---

MAX_HALF_GAP = {
    "nf4": (quant.NF4_CODE[1:] - quant.NF4_CODE[:-1]).max().item() / 2,
    "fp4": (quant.FP4_CODE[:8].sort().values.diff()).max().item() / 2,
}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_roundtrip_error_bound(quant_type, double_quant):
    w = torch.randn(129, 67) * 0.02
    blocksize = 64
    packed, state = quant.quantize_4bit(w, blocksize, double_quant, quant_type)
    _, plain = quant.quantize_4bit(w, blocksize, False, quant_type)
    out = quant.dequantize_4bit(packed, state)
    assert out.shape == w.shape and out.dtype == w.dtype
    n = w.numel()
    true_absmax = plain.absmax.repeat_interleave(blocksize)[:n]
    used_absmax = state.absmax_float().repeat_interleave(blocksize)[:n]
    # |w - c a'| <= |w - c a| + |c| |a - a'| with |c| <= 1
    bound = MAX_HALF_GAP[quant_type] * true_absmax * (1 + 1e-6) + (used_absmax - true_absmax).abs()
    err = (out.view(-1) - w.view(-1)).abs()
    assert (err <= bound + 1e-12).all()
    assert err.max() > 0.3 * bound.max()  # the bound is not vacuous


def _int4_roundtrip(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Symmetric absmax int4: q = round(7 x / absmax) in [-7, 7]."""
    blocks = w.reshape(-1, blocksize).float()
    scale = blocks.abs().amax(dim=1, keepdim=True) / 7
    return (torch.round(blocks / scale).clamp(-7, 7) * scale).view(w.shape)


def test_nf4_error_below_fp4_and_int4_on_gaussian_weights():
    w = torch.randn(512, 512)
    mse = {}
    for quant_type in ("nf4", "fp4"):
        packed, state = quant.quantize_4bit(w, 64, False, quant_type)
        mse[quant_type] = (quant.dequantize_4bit(packed, state) - w).pow(2).mean().item()
    mse["int4"] = (_int4_roundtrip(w, 64) - w).pow(2).mean().item()
    assert mse["nf4"] < mse["fp4"] and mse["nf4"] < mse["int4"], mse
    assert 0.005 < mse["nf4"] < 0.015, mse  # ~0.0092 for N(0, 1) with blocks of 64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_round_trip_in_their_dtype(dtype):
    w = torch.randn(64, 48).to(dtype)
    packed, state = quant.quantize_4bit(w)
    assert state.dtype == dtype
    out = quant.dequantize_4bit(packed, state)
    assert out.dtype == dtype
    full = quant.dequantize_4bit(packed, state, dtype=torch.float32)
    assert torch.equal(out, full.to(dtype))  # fp32 products, then one cast


# --- bits per parameter ---

def test_bits_per_parameter_from_a_real_layer():
    layer = quant.Linear4bit(1024, 1024, bias=False, compute_dtype=torch.float32)
    n = 1024 * 1024
    per_block = [layer.weight, layer.absmax, layer.nested_absmax]
    bits = 8 * sum(t.numel() * t.element_size() for t in per_block) / n
    assert bits == 4 + 8 / 64 + 32 / (64 * 256)
    assert round(bits, 3) == 4.127
    # everything in the state dict, codebooks and JSON included, is a constant ~1.1 KB on top
    total = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert 4.127 < 8 * total / n < 4.137

    plain = quant.Linear4bit(1024, 1024, bias=False, double_quant=False)
    bits = 8 * sum(t.numel() * t.element_size() for t in (plain.weight, plain.absmax)) / n
    assert bits == 4.5


# --- bad input ---

@pytest.mark.parametrize("bad", [
    torch.arange(64), torch.zeros(64, dtype=torch.int8), torch.zeros(64, dtype=torch.complex64),
    torch.zeros(64, dtype=torch.float64), torch.zeros(64, dtype=torch.bool),
])
def test_non_float_tensors_are_type_errors(bad):
    with pytest.raises(TypeError, match=str(bad.dtype).replace("torch.", "")):
        quant.quantize_4bit(bad)


def test_empty_tensor():
    with pytest.raises(ValueError, match=r"empty.*\(0, 5\)"):
        quant.quantize_4bit(torch.zeros(0, 5))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_weights_name_the_block(value):
    w = torch.randn(4, 64)
    w[2, 10] = value
    with pytest.raises(ValueError, match=r"NaN or inf.*block 2, flat elements 128 to 191"):
        quant.quantize_4bit(w)


@pytest.mark.parametrize("blocksize", [0, 3, 8, 48, 100, 8192, 64.0, True, "64"])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="power of two from 16 to 4096"):
        quant.quantize_4bit(torch.randn(128), blocksize=blocksize)


def test_bad_quant_type_and_mismatched_packed():
    with pytest.raises(ValueError, match="quant_type"):
        quant.quantize_4bit(torch.randn(128), quant_type="int4")
    packed, state = quant.quantize_4bit(torch.randn(10, 10))
    with pytest.raises(ValueError, match=r"\(10, 10\)"):
        quant.dequantize_4bit(packed[:-1], state)
    with pytest.raises(TypeError, match="uint8"):
        quant.dequantize_4bit(packed.int(), state)

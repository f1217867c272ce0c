"""The NF4 / FP4 codebooks and the nearest-code rule (thresholds, ties, NaN, signs)."""
import math

import numpy as np
import pytest
import torch

import quant
from quant.codebooks import FP4_THRESHOLDS, NF4_THRESHOLDS, codebook, nearest_code, nf4_code

# ../shared/REFERENCE.md: the 16 float32 NF4 values of the QLoRA reference, code 0b0000 to 0b1111.
NF4_REFERENCE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
# The 15 thresholds of the reference CUDA kernel's NF4 decision tree, low to high.
NF4_TREE_THRESHOLDS = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]


def test_nf4_codebook_follows_from_normal_quantiles_bit_for_bit():
    expected = torch.tensor(NF4_REFERENCE, dtype=torch.float32)
    assert torch.equal(nf4_code(), expected)
    assert torch.equal(quant.NF4_CODE, expected)
    assert quant.NF4_CODE.dtype == torch.float32 and quant.NF4_CODE.shape == (16,)


def test_nf4_codebook_is_equiprobable_under_the_normal():
    """Independent of the float details: the positive codes sit at normal quantiles
    Phi^-1(p_k) / Phi^-1(0.9677083) for p evenly spaced from 0.5 to 0.9677083."""
    q = torch.special.ndtri(torch.tensor(0.9677083, dtype=torch.float64))
    p = torch.linspace(0.5, 0.9677083, 9, dtype=torch.float64)[1:]
    assert torch.allclose(quant.NF4_CODE[8:].double(), torch.special.ndtri(p) / q, atol=1e-6)
    p_neg = torch.linspace(0.5, 0.9677083, 8, dtype=torch.float64)[1:]
    assert torch.allclose(quant.NF4_CODE[:7].flip(0).double(), -torch.special.ndtri(p_neg) / q, atol=1e-6)


def test_nf4_thresholds_are_the_reference_decision_tree():
    expected = torch.tensor(NF4_TREE_THRESHOLDS, dtype=torch.float64).float()
    assert torch.equal(NF4_THRESHOLDS, expected)


def test_fp4_codebook_from_its_table():
    magnitudes = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
    for c in range(16):
        sign = -1.0 if c & 0b1000 else 1.0
        want = np.float32(sign * magnitudes[c & 0b111]) / np.float32(12.0)
        assert quant.FP4_CODE[c].item() == float(want), c
    assert math.copysign(1.0, quant.FP4_CODE[8].item()) == -1.0  # code 0b1000 is -0.0


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ties_go_to_the_lower_code(quant_type):
    code = codebook(quant_type)
    order = code.sort().values if quant_type == "nf4" else code[:8].sort().values
    thresholds = NF4_THRESHOLDS if quant_type == "nf4" else FP4_THRESHOLDS
    for k, t in enumerate(thresholds):
        at = nearest_code(t.view(1), quant_type).long()
        above = nearest_code(torch.nextafter(t, torch.tensor(2.0)).view(1), quant_type).long()
        assert code[at].item() == order[k].item(), (k, t.item())
        assert code[above].item() == order[k + 1].item(), (k, t.item())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nearest_code_is_the_nearest_value(quant_type):
    s = torch.rand(20_000) * 2 - 1
    s[:4] = torch.tensor([-1.0, 1.0, 0.0, -0.0])
    code = codebook(quant_type)
    got = code[nearest_code(s, quant_type).long()]
    best = (s[:, None] - code[None, :]).abs().min(dim=1).values
    assert torch.equal((s - got).abs(), best)


def test_nan_takes_code_zero_and_signs_of_fp4():
    nan = torch.tensor([float("nan")])
    assert nearest_code(nan, "nf4").item() == 0
    assert nearest_code(nan, "fp4").item() == 0
    s = torch.tensor([0.0, -0.0, 1e-4, -1e-4, -1.0, 1.0])
    assert nearest_code(s, "fp4").tolist() == [0b0000, 0b0000, 0b0000, 0b1000, 0b1011, 0b0011]
    assert nearest_code(s, "nf4").tolist() == [7, 7, 7, 7, 0, 15]

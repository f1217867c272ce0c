"""The two 16-value 4-bit codebooks, NF4 and FP4, and the thresholds that pick a code.

A 4-bit code c stores the value `codebook[c] * absmax` of its block. Quantizing picks the nearest
codebook value of x / absmax; ties (x exactly on a midpoint) go to the LOWER value.

Note [the NF4 codebook]
    NormalFloat4 (QLoRA, arXiv 2305.14314, section 3) puts its codes at quantiles of N(0, 1) so
    that every code is equally likely for normally distributed weights, with an exact zero:

        positive:  ndtri(p) for p in linspace(0.9677083, 0.5, 9)[:-1]     8 values
        negative: -ndtri(p) for p in linspace(0.9677083, 0.5, 8)[:-1]     7 values
        zero:      0.0                                                    1 value
        codebook = sorted(values) / max(values)

    (0.9677083 is the midpoint of 1 - 1/(2*15) and 1 - 1/(2*16), which keeps ndtri finite.) The
    float32 constants of the reference come out bit for bit only with this arithmetic: the
    probabilities from a float32 linspace, ndtri in float64, the quantiles cast to float32, and the
    division by the maximum done in float32. Dividing in float64 and casting last is off by one
    ulp in several entries.

Note [the FP4 codebook]
    bitsandbytes' FP4 is not an IEEE-like 1-2-1 format but a table: bit 3 is the sign, and the
    three low bits index the magnitudes 0, 0.0625, 8, 12, 4, 6, 2, 3, all divided by 12 (float32).
    Code 0b1000 is -0.0. To quantize, the sign of x picks bit 3 (x < 0; -0.0 and NaN count as
    positive) and |x| goes to the nearest of the 8 sorted magnitudes.

Note [thresholds in float32]
    The threshold between two adjacent codebook values a < b is their midpoint (a + b) / 2,
    exact in float64 and then rounded to float32; float32's (a + b) / 2 is the same number, since
    halving is exact. These are the 15 constants of the reference's NF4 decision tree
    (0.03979014977812767, ...). A value goes up past a threshold only if it is strictly greater,
    which is `torch.bucketize(x, thresholds, right=False)`. bitsandbytes' CUDA FP4 tree writes its
    thresholds as short decimals (0.583333 rather than 0.5833333, 0.00260417 rather than
    0.0026041667): FP4_THRESHOLDS are those float32 literals, so ratios that land between the two
    spellings (7/12 does, and bf16 weights hit such exact ratios often) get the kernel's code.
"""
import torch

__all__ = ["NF4_CODE", "FP4_CODE", "nf4_code", "fp4_code", "codebook", "QUANT_TYPES"]

QUANT_TYPES = ("nf4", "fp4")

_NF4_OFFSET = 0.9677083  # see Note [the NF4 codebook]
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)  # low 3 bits -> magnitude * 12


def nf4_code() -> torch.Tensor:
    """The 16 NF4 values, float32 (16,), ascending: code c <-> nf4_code()[c]."""
    positive_p = torch.linspace(_NF4_OFFSET, 0.5, 9, dtype=torch.float32)[:-1]
    negative_p = torch.linspace(_NF4_OFFSET, 0.5, 8, dtype=torch.float32)[:-1]
    positive = torch.special.ndtri(positive_p.double())  # (8,) float64
    negative = -torch.special.ndtri(negative_p.double())  # (7,) float64
    zero = torch.zeros(1, dtype=torch.float64)
    values = torch.cat([positive, negative, zero]).float().sort().values  # (16,) float32
    return values / values.max()


def fp4_code() -> torch.Tensor:
    """The 16 FP4 values, float32 (16,), indexed by code (not sorted; see Note [the FP4 codebook])."""
    magnitudes = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32)
    return torch.cat([magnitudes, -magnitudes]) / 12.0


NF4_CODE = nf4_code()
FP4_CODE = fp4_code()


def codebook(quant_type: str) -> torch.Tensor:
    """A fresh copy of the float32 (16,) codebook of "nf4" or "fp4"."""
    if quant_type == "nf4":
        return NF4_CODE.clone()
    if quant_type == "fp4":
        return FP4_CODE.clone()
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def _midpoints(sorted_values: torch.Tensor) -> torch.Tensor:
    """float32 thresholds between adjacent sorted values (see Note [thresholds in float32])."""
    v = sorted_values.double()
    return ((v[:-1] + v[1:]) / 2).float()


NF4_THRESHOLDS = _midpoints(NF4_CODE)  # (15,)
_FP4_MAG_SORTED, _FP4_MAG_ORDER = FP4_CODE[:8].sort()  # ascending magnitudes and their 3-bit codes
# The midpoints of _FP4_MAG_SORTED as the reference kernel spells them (Note [thresholds in float32]).
FP4_THRESHOLDS = torch.tensor(
    [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333], dtype=torch.float32
)  # (7,)


def nearest_code(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """4-bit codes (uint8, same shape) of float32 values already divided by their block's absmax.

    Ties go to the lower value; NaN (0 * (1/0) from an all-zero block) gets code 0b0000, as in the
    reference's decision tree, where every comparison with NaN is false.
    """
    if quant_type == "nf4":
        codes = torch.bucketize(scaled, NF4_THRESHOLDS.to(scaled.device), out_int32=True)
    elif quant_type == "fp4":
        magnitude = torch.bucketize(
            scaled.abs(), FP4_THRESHOLDS.to(scaled.device), out_int32=True
        )
        codes = _FP4_MAG_ORDER.to(device=scaled.device, dtype=torch.int32)[magnitude]
        codes = codes | (scaled < 0).int() << 3
    else:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    codes = codes.masked_fill_(scaled.isnan(), 0)
    return codes.to(torch.uint8)

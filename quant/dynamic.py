"""The 8-bit "dynamic" map (Dettmers 2015, arXiv 1511.04561) and blockwise 8-bit quantization.

Two users: NF4's double quantization stores the per-block absmax in 8 bits with the signed map,
and the 8-bit optimizer stores Adam's moments with the signed (first) and unsigned (second) maps.

Note [the dynamic map]
    A value is sign * 10^-e * f, with the exponent e in 0..6 encoded in unary by leading zero
    bits and the fraction f taken from the midpoints of a linspace(0.1, 1) grid whose size doubles
    with every exponent step. Small exponents get few fraction values, large ones many, so the map
    is dense near +-1 and still reaches 1e-6. Signed: 127 positive, 127 negative values, 0 and
    1.0 (256 values, min -0.99297). Unsigned: 254 positive values, 0 and 1.0. Sorted ascending,
    so a code is the index of its value. The float32 arithmetic below (linspace, midpoints,
    products) is the one the bitsandbytes reference uses, so the maps agree bit for bit.

Note [nearest code by binary search]
    bitsandbytes picks a code with a 7-step binary search from index 127, then compares with the
    midpoint towards the last pivot visited on the other side. On exact midpoints the result is the
    final pivot, not always the lower or the upper neighbour; `quantize_blockwise` replays that
    search step by step so codes match the reference bit for bit, ties included.
"""
import torch

__all__ = ["dynamic_map", "quantize_blockwise", "dequantize_blockwise", "scale_blocks_"]

_MAX_EXPONENT_BITS = 7


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256 sorted float32 values of the dynamic map (see Note [the dynamic map])."""
    values: list[float] = []
    for i in range(_MAX_EXPONENT_BITS):
        n_boundaries = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        boundaries = torch.linspace(0.1, 1.0, n_boundaries)  # float32, as the reference
        midpoints = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(_MAX_EXPONENT_BITS - 1) + i)
        values += (scale * midpoints).tolist()
        if signed:
            values += (-scale * midpoints).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256, len(values)
    return torch.tensor(sorted(values), dtype=torch.float32)


def _nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into the sorted 256-value `code` nearest to each x (float32), as the reference does.

    See Note [nearest code by binary search]."""
    pivot = torch.full_like(x, 127, dtype=torch.long)
    lower_pivot = torch.zeros_like(pivot)
    upper_pivot = torch.full_like(pivot, 255)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    value = code[pivot]
    step = 64
    while step > 0:
        go_up = x > value
        lower_pivot = torch.where(go_up, pivot, lower_pivot)
        lower = torch.where(go_up, value, lower)
        upper_pivot = torch.where(go_up, upper_pivot, pivot)
        upper = torch.where(go_up, upper, value)
        pivot = torch.where(go_up, pivot + step, pivot - step)
        value = code[pivot]
        step //= 2
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = x > value
    take_upper = above & (x > (upper + value) * 0.5)
    take_lower = ~above & (x < (lower + value) * 0.5)
    result = torch.where(take_upper, upper_pivot, pivot)
    return torch.where(take_lower, lower_pivot, result)


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of the row-major flattened `x` with a 256-value `code`.

    Each run of `blocksize` elements (the last may be shorter) is scaled by 1/absmax of the block
    and mapped to its nearest code. Returns (codes uint8 (numel,), absmax float32 (nblocks,)).
    A block of zeros has absmax 0; its codes are those of 0 * (1/0) = nan, as in the reference,
    and dequantize back to 0.
    """
    if x.is_complex() or not x.is_floating_point():
        raise TypeError(f"quantize_blockwise needs a real floating-point tensor, got {x.dtype}")
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = (n + blocksize - 1) // blocksize
    padded = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = padded.abs().amax(dim=1)  # (nblocks,)
    scaled = padded * (1.0 / absmax).unsqueeze(1)  # the reference multiplies by the reciprocal
    codes = _nearest_code(scaled, code.to(flat.device)).to(torch.uint8)
    return codes.view(-1)[:n], absmax


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256
) -> torch.Tensor:
    """code[q] * absmax[block] in float32, flat (numel,)."""
    values = code.to(device=codes.device, dtype=torch.float32).index_select(0, codes.reshape(-1).int())  # (n,)
    return scale_blocks_(values, absmax, blocksize)


def scale_blocks_(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values (n,) *= absmax[i // blocksize] in place, returned. The whole blocks multiply as a (full,
    blocksize) view by absmax[:full, None], the partial last one by its absmax: no per-element block
    index is built (on the CPU that index cost more than the products)."""
    n = values.numel()
    full = n // blocksize
    values[: full * blocksize].view(full, blocksize).mul_(absmax[:full, None])
    if full * blocksize != n:
        values[full * blocksize:].mul_(absmax[full])
    return values

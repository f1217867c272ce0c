"""Blockwise 4-bit quantization (NF4 or FP4) with optional double quantization of the scales.

    quantize:    absmax_b = max |w_i| over block b            (blocks of `blocksize` contiguous
                 c_i = nearest_code(w_i * (1 / absmax_b))       elements of w.reshape(-1))
                 packed byte j = c_{2j} << 4 | c_{2j+1}
    dequantize:  w_i ~= codebook[c_i] * absmax_b               (float32, then cast to w's dtype)

    double quantization (QLoRA section 3): offset = mean(absmax)
                 (absmax - offset) -> 8-bit dynamic-map codes, blocks of 256, one fp32 scale each
                 absmax_b ~= dynamic[q_b] * nested_absmax_{b // 256} + offset

Note [matching the reference bit for bit]
    The QLoRA reference (bitsandbytes' CUDA kernel) computes in float32 and multiplies by the
    reciprocal of the block's absmax rather than dividing, so we do too: `w * (1 / absmax)` can
    differ from `w / absmax` in the last bit, which moves values that sit on a threshold. The
    codes come from the thresholds of `codebooks.py` (ties go down). The last block may be shorter
    than `blocksize`; its absmax is over its own elements. For an odd number of elements the last
    low nibble holds the code of 0.0 (0b0111 for NF4, 0b0000 for FP4): the kernel pads with zeros.
    A block of zeros has absmax 0, so its scaled values are 0 * inf = NaN, which the reference's
    decision tree sends to code 0b0000; it dequantizes to -1.0 * 0 = -0.0 (NF4). The dequantized
    double-quantized absmax is two float32 operations, a product and then a sum, each rounded (no
    fused multiply-add), as the reference does it.
"""
import json
import math
from dataclasses import dataclass

import torch

from .codebooks import QUANT_TYPES, codebook, nearest_code
from .dynamic import dequantize_blockwise, dynamic_map, quantize_blockwise, scale_blocks_

__all__ = [
    "QuantState", "quantize_4bit", "dequantize_4bit", "check_blocksize", "packed_shape",
    "num_blocks", "NESTED_BLOCKSIZE", "SUPPORTED_DTYPES",
]

NESTED_BLOCKSIZE = 256  # blocks of first-level absmax values per nested fp32 scale
MIN_BLOCKSIZE, MAX_BLOCKSIZE = 16, 4096
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def check_blocksize(blocksize) -> int:
    """The blocksize, if it is a power of two from 16 to 4096; a ValueError otherwise."""
    ok = (
        isinstance(blocksize, int) and not isinstance(blocksize, bool)
        and MIN_BLOCKSIZE <= blocksize <= MAX_BLOCKSIZE and blocksize & (blocksize - 1) == 0
    )
    if not ok:
        raise ValueError(
            f"blocksize must be a power of two from {MIN_BLOCKSIZE} to {MAX_BLOCKSIZE} "
            f"(bitsandbytes uses 64 to 4096), got {blocksize!r}"
        )
    return blocksize


def check_quant_type(quant_type) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return quant_type


def num_blocks(numel: int, blocksize: int) -> int:
    return (numel + blocksize - 1) // blocksize


def packed_shape(numel: int) -> torch.Size:
    """Two codes per byte, as a column: ((numel + 1) // 2, 1)."""
    return torch.Size(((numel + 1) // 2, 1))


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def dtype_from_name(name) -> torch.dtype:
    for dtype, dtype_str in _DTYPE_NAMES.items():
        if name == dtype_str:
            return dtype
    raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES.values())}, got {name!r}")


@dataclass
class QuantState:
    """Everything but the packed codes that `dequantize_4bit` needs.

    absmax:        uint8 (nblocks,) dynamic-map codes with double quantization, else fp32 (nblocks,)
    shape, dtype:  of the quantized tensor
    blocksize:     elements per block
    quant_type:    "nf4" or "fp4"
    code:          fp32 (16,) the 4-bit codebook
    nested_absmax: fp32 (ceil(nblocks / 256),) or None        (double quantization only)
    nested_code:   fp32 (256,) the signed dynamic map, or None
    offset:        the mean absmax (float or 0-d fp32 tensor), or None
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: float | torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def absmax_float(self) -> torch.Tensor:
        """The fp32 (nblocks,) absmax: dynamic[q] * nested_absmax + offset with double quant."""
        if not self.double_quant:
            return self.absmax
        scaled = dequantize_blockwise(
            self.absmax, self.nested_absmax, self.nested_code, NESTED_BLOCKSIZE
        )  # (nblocks,) fp32: the product, rounded
        offset = torch.as_tensor(self.offset, dtype=torch.float32, device=scaled.device)
        return scaled + offset  # the sum, rounded separately (no FMA)


def _check_tensor(w, what: str = "tensor") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_4bit needs a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"quantize_4bit needs a float32, float16 or bfloat16 {what}, got {w.dtype}"
            + (" (cast it to float32 first)" if w.dtype == torch.float64 else "")
        )
    if w.numel() == 0:
        raise ValueError(f"quantize_4bit got an empty {what} of shape {tuple(w.shape)}")


def quantize_4bit(
    w: torch.Tensor,
    blocksize: int = 64,
    double_quant: bool = True,
    quant_type: str = "nf4",
) -> tuple[torch.Tensor, QuantState]:
    """Quantize `w` (any shape) to packed 4-bit codes; see the module docstring for the math.

    Returns (packed uint8 ((numel + 1) // 2, 1), QuantState). Raises TypeError for integer,
    complex or float64 tensors and ValueError for empty tensors, NaN or inf values, or a bad
    blocksize or quant_type.
    """
    _check_tensor(w)
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    n = w.numel()
    nblocks = num_blocks(n, blocksize)
    flat = w.reshape(-1).float()  # (n,)
    if nblocks * blocksize != n:
        flat = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n))  # zeros don't move absmax
    blocks = flat.view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (nblocks,) fp32; NaN if the block holds a NaN
    if not torch.isfinite(absmax).all():
        block = int((~torch.isfinite(absmax)).nonzero()[0, 0])
        raise ValueError(
            f"quantize_4bit: the tensor of shape {tuple(w.shape)} holds NaN or inf values (first in "
            f"block {block}, flat elements {block * blocksize} to {min(n, (block + 1) * blocksize) - 1})"
        )
    scaled = blocks * (1.0 / absmax).unsqueeze(1)  # (nblocks, blocksize) see Note [matching ...]
    codes = nearest_code(scaled.view(-1)[:n], quant_type)  # (n,) uint8
    del scaled, blocks, flat
    if n % 2:
        zero_code = nearest_code(torch.zeros(1, device=codes.device), quant_type)
        codes = torch.cat([codes, zero_code])
    packed = (codes[0::2] << 4 | codes[1::2]).view(-1, 1)  # first element in the high nibble

    state = QuantState(
        absmax=absmax, shape=torch.Size(w.shape), dtype=w.dtype, blocksize=blocksize,
        quant_type=quant_type, code=codebook(quant_type).to(w.device),
    )
    if double_quant:
        offset = absmax.mean()  # 0-d fp32
        nested_code = dynamic_map(signed=True).to(w.device)
        state.absmax, state.nested_absmax = quantize_blockwise(
            absmax - offset, nested_code, NESTED_BLOCKSIZE
        )
        state.nested_code, state.offset = nested_code, offset
    return packed, state


def dequantize_4bit(
    packed: torch.Tensor, state: QuantState, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """codebook[code] * absmax[block] in fp32, cast to `dtype` (default state.dtype), state.shape."""
    n = state.numel
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"dequantize_4bit needs packed uint8 codes, got {got}")
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"dequantize_4bit: packed codes of shape {tuple(packed.shape)} do not hold a tensor of "
            f"shape {tuple(state.shape)} (needs {(n + 1) // 2} bytes)"
        )
    code = state.code.to(device=packed.device, dtype=torch.float32)
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # (256, 2) per byte
    # index_select, not pairs[index]: the same gather, 2-3x faster on the CPU (torch 2.13, 2 threads)
    values = pairs.index_select(0, packed.reshape(-1).int()).view(-1)[:n]  # (n,) fp32
    scale_blocks_(values, state.absmax_float().to(packed.device), state.blocksize)
    return values.view(state.shape).to(state.dtype if dtype is None else dtype)


# ---------------------------------------------------------------------------------------------
# The bitsandbytes serialization of a QuantState (see ../shared/REFERENCE.md)
# ---------------------------------------------------------------------------------------------

def quant_state_key(quant_type: str) -> str:
    return f"quant_state.bitsandbytes__{quant_type}"


def state_to_dict(state: QuantState) -> dict[str, torch.Tensor]:
    """The bitsandbytes entries of a QuantState, keyed relative to the weight ("absmax", ...).

    Non-tensor fields go into a UTF-8 JSON object stored as a uint8 tensor, in bitsandbytes'
    key order and `json.dumps` format so that files compare byte for byte."""
    out = {"absmax": state.absmax, "quant_map": state.code}
    info = {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "dtype": dtype_name(state.dtype),
        "shape": list(state.shape),
    }
    if state.double_quant:
        out["nested_absmax"] = state.nested_absmax
        out["nested_quant_map"] = state.nested_code
        info["nested_blocksize"] = NESTED_BLOCKSIZE
        info["nested_dtype"] = "float32"
        info["nested_offset"] = float(state.offset)
    payload = json.dumps(info).encode("utf-8")
    out[quant_state_key(state.quant_type)] = torch.tensor(list(payload), dtype=torch.uint8)
    return out


def _require(tensors: dict, key: str, full_key: str, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"state dict: missing {full_key} (needed by the quant_state JSON)")
    t = tensors[key]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"state dict: {full_key} is a {type(t).__name__}, not a tensor")
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"state dict: {full_key} is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}"
        )
    return t


def parse_quant_state_json(payload: torch.Tensor, full_key: str) -> dict:
    """The JSON object of a `...quant_state.bitsandbytes__<type>` uint8 tensor, checked."""
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
        got = f"{payload.dtype} {tuple(payload.shape)}" if isinstance(payload, torch.Tensor) else type(payload).__name__
        raise ValueError(f"state dict: {full_key} must be a 1-D uint8 tensor of JSON bytes, got {got}")
    try:
        info = json.loads(bytes(payload.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"state dict: {full_key} is not UTF-8 JSON ({e})") from None
    if not isinstance(info, dict):
        raise ValueError(f"state dict: {full_key} holds JSON {type(info).__name__}, not an object")
    return info


def state_from_dict(
    tensors: dict[str, torch.Tensor], json_key: str, prefix: str, shape: torch.Size
) -> QuantState:
    """Rebuild a QuantState from bitsandbytes entries keyed relative to the weight.

    `json_key` is the quant_state key (relative), `prefix` is prepended to keys in error messages,
    `shape` is the shape the caller expects. Every statistic's presence, dtype and shape is
    checked against the JSON; a ValueError names the first key that is wrong."""
    full = lambda key: prefix + key  # noqa: E731
    info = parse_quant_state_json(tensors[json_key], full(json_key))
    quant_type = json_key.rsplit("__", 1)[-1]

    def field(name, check, expected):
        if name not in info:
            raise ValueError(f"state dict: {full(json_key)} has no {name!r}")
        value = info[name]
        if not check(value):
            raise ValueError(f"state dict: {full(json_key)} has {name}={value!r}, expected {expected}")
        return value

    field("quant_type", lambda v: v == quant_type, repr(quant_type) + " (as in its key)")
    blocksize = field("blocksize", lambda v: isinstance(v, int) and not isinstance(v, bool),
                      "an integer")
    try:
        check_blocksize(blocksize)
    except ValueError as e:
        raise ValueError(f"state dict: {full(json_key)}: {e}") from None
    dtype = dtype_from_name(field("dtype", lambda v: v in _DTYPE_NAMES.values(),
                                  f"one of {sorted(_DTYPE_NAMES.values())}"))
    field("shape", lambda v: list(v) == list(shape) if isinstance(v, list) else False,
          f"{list(shape)} (this layer's [out_features, in_features])")
    nblocks = num_blocks(math.prod(shape), blocksize)
    nested = [k for k in ("nested_blocksize", "nested_dtype", "nested_offset") if k in info]
    if nested and len(nested) != 3:
        raise ValueError(
            f"state dict: {full(json_key)} has {nested} but double quantization needs "
            "nested_blocksize, nested_dtype and nested_offset"
        )
    state = QuantState(
        absmax=_require(tensors, "absmax", full("absmax"),
                        torch.uint8 if nested else torch.float32, (nblocks,)),
        shape=torch.Size(shape), dtype=dtype, blocksize=blocksize, quant_type=quant_type,
        code=_require(tensors, "quant_map", full("quant_map"), torch.float32, (16,)),
    )
    if not torch.equal(state.code.cpu(), codebook(quant_type)):
        raise ValueError(f"state dict: {full('quant_map')} is not the {quant_type} codebook")
    if nested:
        field("nested_blocksize", lambda v: v == NESTED_BLOCKSIZE, NESTED_BLOCKSIZE)
        field("nested_dtype", lambda v: v == "float32", "'float32'")
        offset = field("nested_offset", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v), "a finite number")
        state.nested_absmax = _require(
            tensors, "nested_absmax", full("nested_absmax"), torch.float32,
            (num_blocks(nblocks, NESTED_BLOCKSIZE),),
        )
        state.nested_code = _require(
            tensors, "nested_quant_map", full("nested_quant_map"), torch.float32, (256,)
        )
        state.offset = torch.tensor(float(offset), dtype=torch.float32, device=state.absmax.device)
    else:
        for key in ("nested_absmax", "nested_quant_map"):
            if key in tensors:
                raise ValueError(
                    f"state dict: {full(key)} is present but {full(json_key)} has no nested_offset"
                )
    return state

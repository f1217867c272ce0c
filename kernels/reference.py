"""Plain-PyTorch reference of the kernels: the same math, element by element, on any device.

NF4 (kernels/nf4_dequant.py, nf4_matmul.py, nf4_gemv.py):

The weight W is (N, K) = (out_features, in_features), flattened row-major; element e = n*K + k.

    byte    = packed[e // 2]                     packed: uint8 ((N*K + 1) // 2, 1)
    nibble  = byte >> 4 if e is even else byte & 0xF      (the first element in the high nibble)
    b       = e // blocksize                     (blocks run across row ends when K % blocksize != 0)
    scale_b = absmax[b]                                              without double quant
            = nested_code[absmax[b]] * nested_absmax[b // 256] + offset   with double quant
    W[n, k] = code[nibble] * scale_b             in float32, then rounded once to the output dtype

Each product and sum above is one float32 operation, rounded on its own (no fused multiply-add), so
a kernel that does the same operations in the same order matches this reference bit for bit.

`state` is any object with the attributes `absmax, nested_absmax (None without double quant),
nested_code, offset, code, blocksize, shape` (quant.QuantState has exactly these).
"""
import torch
import torch.nn.functional as F

__all__ = ["NESTED_BLOCKSIZE", "block_scales", "unpack_nibbles", "dequantize_nf4", "dequantize_nf4_lowrank",
           "add_lowrank", "matmul_nf4", "matmul_nf4_t", "apply_rotary"]

NESTED_BLOCKSIZE = 256  # first-level blocks per second-level (double-quant) block


def block_scales(state) -> torch.Tensor:
    """The float32 absmax of every block, (nblocks,), decoding double quantization if present."""
    if state.nested_absmax is None:
        return state.absmax.float()
    nblocks = state.absmax.numel()
    device = state.absmax.device
    nested_of_block = torch.arange(nblocks, device=device) // NESTED_BLOCKSIZE  # (nblocks,)
    decoded = state.nested_code.float()[state.absmax.long()] * state.nested_absmax.float()[nested_of_block]
    return decoded + torch.as_tensor(state.offset, dtype=torch.float32, device=device)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The 4-bit codes, int64 (numel,): byte i holds element 2i in its high nibble, 2i+1 in its low."""
    bytes_ = packed.reshape(-1).long()
    nibbles = torch.stack([bytes_ >> 4, bytes_ & 0xF], dim=1).reshape(-1)  # (2 * nbytes,)
    return nibbles[:numel]


def dequantize_nf4(packed: torch.Tensor, state, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W as an (N, K) tensor of `dtype` (see the module docstring for the formula)."""
    n_rows, n_cols = (int(d) for d in state.shape)
    numel = n_rows * n_cols
    nibbles = unpack_nibbles(packed, numel)  # (N*K,)
    block_of = torch.arange(numel, device=packed.device) // state.blocksize  # (N*K,)
    values = state.code.float()[nibbles] * block_scales(state)[block_of]  # (N*K,) float32
    return values.to(dtype).view(n_rows, n_cols)


def dequantize_nf4_lowrank(packed: torch.Tensor, state, lora_b: torch.Tensor, lora_a: torch.Tensor,
                           scaling: float, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """kernels/nf4_lowrank.py: W + scaling * lora_b @ lora_a in float32, rounded once to `dtype`;
    lora_b (N, r) and lora_a (r, K) enter the product rounded to `dtype`."""
    return add_lowrank(dequantize_nf4(packed, state, torch.float32), lora_b, lora_a, scaling, dtype)


def add_lowrank(weight: torch.Tensor, lora_b: torch.Tensor, lora_a: torch.Tensor, scaling: float,
                dtype: torch.dtype) -> torch.Tensor:
    """weight (N, K) float32 + scaling * lora_b @ lora_a, rounded once to `dtype`; lora_b and lora_a
    enter the product rounded to `dtype`."""
    delta = lora_b.to(dtype).float() @ lora_a.to(dtype).float()  # (N, K)
    return (weight + scaling * delta).to(dtype)


def matmul_nf4(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias): (..., K) -> (..., N), with W dequantized to x's dtype."""
    weight = dequantize_nf4(packed, state, x.dtype)  # (N, K)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def matmul_nf4_t(g: torch.Tensor, packed: torch.Tensor, state) -> torch.Tensor:
    """g @ W: (..., N) -> (..., K), the input gradient of x @ W.T."""
    return g @ dequantize_nf4(packed, state, g.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """kernels/rotary.py: x (B, H, T, D) rotated by cos, sin (B or 1, T, D) in float32 (float64 stays
    float64), rounded once to x's dtype. backward=True applies the transposed rotation (the
    gradient with respect to x)."""
    work = torch.promote_types(x.dtype, torch.float32)
    half = x.shape[-1] // 2
    x1, x2 = x.to(work)[..., :half], x.to(work)[..., half:]
    c, s = cos.to(work)[:, None], sin.to(work)[:, None]  # (B|1, 1, T, D)
    c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    if backward:
        y = torch.cat((x1 * c1 + x2 * s2, x2 * c2 - x1 * s1), dim=-1)
    else:
        y = torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1)
    return y.to(x.dtype)

"""Triton kernels: NF4 dequantization and fused dequant-matmul, rotary embeddings.

    kernels.prepare(packed, state, tiled=False)                 -> the checked weight every function takes
    kernels.tile_codes(packed, state)                           -> the codes in the kernels' tile order
    kernels.dequantize_nf4(packed, state, dtype=torch.bfloat16) -> W (N, K)
    kernels.dequantize_nf4_lowrank(packed, state, b, a, s, dtype) -> W + s b @ a (N, K), one pass
    kernels.matmul_nf4(x, packed, state, bias=None)             -> x @ W.T (+ bias)   (..., K) -> (..., N)
    kernels.matmul_nf4_t(g, packed, state)                      -> g @ W              (..., N) -> (..., K)
    kernels.matmul_nf4_t_lowrank(g, packed, state, b, a, s)     -> g @ (W + s b @ a)  (..., N) -> (..., K)
    kernels.apply_rotary(x, cos, sin)                           x * cos + rotate_half(x) * sin, fused
    kernels.reference.*                                          the same in plain PyTorch

`state` is any object with `absmax, nested_absmax (None without double quant), nested_code, offset,
code, blocksize, shape` (quant.QuantState). The kernels run on CUDA tensors (or CPU tensors under
TRITON_INTERPRET=1). The packed codes are read in bitsandbytes' row order, or in the tile order of
kernels/nf4_tiles.py Note [tiled codes] (the same bytes permuted, faster at small M) from a weight
prepared with tiled=True. Triton is imported only when a kernel is first called, so `import kernels`
works without it; `kernels.available()` says whether the kernels can run here.
"""
import functools
import importlib.util

import torch

from kernels import reference

__all__ = ["available", "prepare", "tile_codes", "untile_codes", "tiles_fit", "dequantize_nf4",
           "dequantize_nf4_lowrank", "matmul_nf4", "matmul_nf4_t", "matmul_nf4_t_lowrank", "apply_rotary",
           "reference"]


def available() -> bool:
    """True when Triton is installed and a CUDA device is present."""
    return torch.cuda.is_available() and _triton_installed()


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def prepare(packed: torch.Tensor, state, tiled: bool = False):
    """Check (packed, state) once and return the launch-ready weight (kernels.nf4_tiles.NF4Weight).
    tiled: `packed` holds the codes in tile order (tile_codes), else in row order.

    Every function here accepts it in place of `state`, skipping the per-call checks: callers that
    keep a weight across calls (quant.Linear4bit) prepare it once."""
    from kernels.nf4_tiles import nf4_weight
    return nf4_weight(packed, state, packed.device, tiled)


def tiles_fit(shape, blocksize: int) -> bool:
    """Whether a weight of `shape` (N, K) can hold its codes in tile order: N % 16 == 0, K a multiple of
    the blocksize, which is a multiple of 32."""
    from kernels.nf4_tiles import tiles_fit as fit
    n_rows, n_cols = (int(d) for d in shape)
    return fit(n_rows, n_cols, blocksize)


def tile_codes(packed: torch.Tensor, state) -> torch.Tensor:
    """The packed codes of W (row order, bitsandbytes') in the kernels' tile order (kernels/nf4_tiles.py
    Note [tiled codes]): a new tensor of packed's shape. ValueError when not tiles_fit."""
    from kernels.nf4_tiles import tile_codes as tile
    n_rows, n_cols = (int(d) for d in state.shape)
    return tile(packed.reshape(-1), n_rows, n_cols, int(state.blocksize)).view(packed.shape)


def untile_codes(tiled: torch.Tensor, state) -> torch.Tensor:
    """The inverse of tile_codes: the codes in row order, a new tensor of tiled's shape."""
    from kernels.nf4_tiles import untile_codes as untile
    n_rows, n_cols = (int(d) for d in state.shape)
    return untile(tiled.reshape(-1), n_rows, n_cols, int(state.blocksize)).view(tiled.shape)


def dequantize_nf4(packed: torch.Tensor, state, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W as an (N, K) tensor of `dtype`, equal to kernels.reference.dequantize_nf4 bit for bit."""
    from kernels.nf4_dequant import dequantize_nf4 as run
    return run(packed, state, dtype)


def dequantize_nf4_lowrank(packed: torch.Tensor, state, lora_b: torch.Tensor, lora_a: torch.Tensor, scaling: float,
                           dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W + scaling * lora_b @ lora_a as an (N, K) tensor of `dtype`, in one pass (kernels/nf4_lowrank.py)."""
    from kernels.nf4_lowrank import dequantize_nf4_lowrank as run
    return run(packed, state, lora_b, lora_a, scaling, dtype)


def matmul_nf4(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias), dispatched by the rows of x (kernels/nf4_matmul.py)."""
    from kernels.nf4_matmul import matmul_nf4 as run
    return run(x, packed, state, bias)


def matmul_nf4_t(g: torch.Tensor, packed: torch.Tensor, state) -> torch.Tensor:
    """g @ W, the input gradient of x @ W.T."""
    from kernels.nf4_matmul import matmul_nf4_t as run
    return run(g, packed, state)


def matmul_nf4_t_lowrank(g: torch.Tensor, packed: torch.Tensor, state, lora_b: torch.Tensor, lora_a: torch.Tensor,
                         scaling: float, g_b: torch.Tensor | None = None) -> torch.Tensor:
    """g @ (W + scaling * lora_b @ lora_a), the input gradient of a LoRA layer over a 4-bit base: W
    streamed plus an addmm at small M, W + s b @ a dequantized in one pass above (kernels/nf4_lowrank.py).
    g_b: g @ lora_b, when the caller has it."""
    from kernels.nf4_lowrank import matmul_nf4_t_lowrank as run
    return run(g, packed, state, lora_b, lora_a, scaling, g_b)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by cos, sin (B or 1, T, D) in one pass, differentiable (kernels/rotary.py)."""
    from kernels.rotary import apply_rotary as run
    return run(x, cos, sin)

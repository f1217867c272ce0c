"""The read floor: the GPU time of one kernel that only reads a given number of bytes from HBM.

A small-M product must read its weight once, so no kernel computing it can beat the time of a
plain read of the same bytes under the same timing (L2 cleared before each call).
torch's bf16 time divided by the floor of the 4-bit weight's bytes is then the largest speedup a
4-bit kernel could show in that run: the ceiling the issue's ratio targets are measured against.

    words   = the buffer as int32, BLOCK contiguous words per program
    out[p]  = xor of program p's words           (one store per program, so the loads stay)
"""
import functools

import torch
import triton
import triton.language as tl

# (int32 words per program, warps): the fastest one of these is the floor.
READ_CONFIGS = [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 8)]


@triton.jit
def _read_kernel(words_ptr, out_ptr, n_words, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    words = tl.load(words_ptr + offsets, mask=offsets < n_words, other=0)  # (BLOCK,) int32
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(words, axis=0))


def read_words(words: torch.Tensor, block: int, num_warps: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-program xor of the 1-D int32 tensor `words` in programs of `block` words; out is
    (cdiv(numel, block),) int32 (made when None)."""
    if words.dtype != torch.int32 or words.dim() != 1:
        raise ValueError(f"read_words needs a 1-D int32 tensor, got {words.dtype} of shape {tuple(words.shape)}")
    programs = triton.cdiv(words.numel(), block)
    if out is None:
        out = torch.empty(programs, dtype=torch.int32, device=words.device)
    _read_kernel[(programs,)](words, out, words.numel(), BLOCK=block, num_warps=num_warps)
    return out


def read_floor_us(n_bytes: int, timer, device: str = "cuda") -> float:
    """us to read `n_bytes` (rounded up to 4) with the fastest of READ_CONFIGS; `timer(fn)` gives a
    call's us (benchmarks/nf4_matmul.py passes the one it times the products with)."""
    words = torch.zeros(triton.cdiv(n_bytes, 4), dtype=torch.int32, device=device)
    best = float("inf")
    for block, num_warps in READ_CONFIGS:
        out = torch.empty(triton.cdiv(words.numel(), block), dtype=torch.int32, device=device)
        best = min(best, timer(functools.partial(read_words, words, block, num_warps, out)))
    return best

"""Random NF4 weights for kernel tests: packed bytes and a state object, by the bitsandbytes layout.

The kernels must compute the same function for any valid packed input, so codes, block scales and
the double-quant tables are random here; no quantizer is needed (or imported).
"""
from dataclasses import dataclass

import torch

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)


@dataclass
class State:
    """The attributes the kernels read (quant.QuantState has the same ones)."""
    absmax: torch.Tensor                # float32 (nblocks,), or uint8 codes with double quant
    nested_absmax: torch.Tensor | None  # float32 (ceil(nblocks / 256),) with double quant
    nested_code: torch.Tensor | None    # float32 (256,) with double quant
    offset: torch.Tensor | float
    code: torch.Tensor                  # float32 (16,)
    blocksize: int
    shape: tuple[int, int]              # (N, K)


def random_nf4(n_rows: int, n_cols: int, blocksize: int = 64, double_quant: bool = True,
               offset_as_tensor: bool = True, device: str | torch.device = "cpu") -> tuple[torch.Tensor, State]:
    """(packed uint8 ((N*K + 1) // 2, 1), state) with random codes and scales (padding nibble too)."""
    numel = n_rows * n_cols
    nblocks = (numel + blocksize - 1) // blocksize
    packed = torch.randint(0, 256, ((numel + 1) // 2, 1), dtype=torch.uint8)
    if double_quant:
        absmax = torch.randint(0, 256, (nblocks,), dtype=torch.uint8)
        nested_absmax = torch.rand((nblocks + 255) // 256) * 0.5 + 0.1
        nested_code = torch.sort(torch.rand(256) * 2 - 1).values
        offset = torch.rand(()) + 0.5
        if not offset_as_tensor:
            offset = float(offset)
    else:
        absmax = torch.rand(nblocks) + 0.25
        nested_absmax = nested_code = None
        offset = 0.0
    move = (lambda t: t.to(device) if isinstance(t, torch.Tensor) else t)
    state = State(absmax=move(absmax), nested_absmax=move(nested_absmax), nested_code=move(nested_code),
                  offset=move(offset), code=NF4_CODE.to(device), blocksize=blocksize, shape=(n_rows, n_cols))
    return packed.to(device), state


def assert_matmul_close(got: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                        rtol: float) -> None:
    """got ~= a @ b (+ bias), each output within rtol * (|a| @ |b| + |bias|), the exact result in fp64.

    The bound is the sum of the absolute products that make up the output, the natural scale of
    rounding errors in a dot product; a wrong element, row or scale misses it by orders of magnitude.
    """
    a64, b64 = a.double(), b.double()  # on a's device: fp64 matmuls on the GPU in GPU tests
    want = a64 @ b64
    bound = a64.abs() @ b64.abs()
    if bias is not None:
        want = want + bias.double()
        bound = bound + bias.double().abs()
    assert got.shape == want.shape, (got.shape, want.shape)
    error = (got.double() - want).abs() / bound.clamp_min(1e-30)
    worst = error.max().item()
    assert worst <= rtol, f"max error {worst:.3g} x |a|@|b| exceeds rtol {rtol:.3g}"

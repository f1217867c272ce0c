"""Launching a Triton kernel through the binary Triton compiled for it, without JITFunction.run.

    launch = DirectLaunch(jit_fn)                  jit_fn: a @triton.jit function
    launch(grid, args, num_warps, num_stages)      args: every argument in signature order, constexprs too

The first call for a signature goes through Triton (`jit_fn[grid](*args)`, which compiles and
launches); later calls with the same signature, grid and device call the compiled binary's launcher
directly. On the H100 host one launch of kernels/nf4_mma.py's kernel costs 39 us of host time
through `jit_fn[grid]` and 16 us through the binary (run 109, benchmarks/RESULTS.md); at M = 1 the
kernel itself takes 5-25 us of GPU time, so an eager decode step would pay mostly host time.

Note [direct launch]
    A Triton binary is compiled for a specialization of its arguments: the dtype of each tensor
    and whether its address is a multiple of 16 bytes, the width of each int (i32, i64, u64),
    whether it is a multiple of 16 and whether it equals 1 (then it becomes a constant), the types
    of other scalars, and the value of each constexpr (do_not_specialize turns all the value parts
    of an argument off, do_not_specialize_on_alignment the multiples of 16). JITFunction.run
    derives that on every call and looks the binary up by it and the launch options. `signature`
    derives the same distinctions in a few Python operations, so a binary is reused only for
    arguments it was compiled for. tests/kernels/test_direct_launch.py checks them against
    Triton's own specialization of the same values: a Triton that specializes differently fails
    there rather than launching a binary compiled for other arguments. Launch options other than
    num_warps and num_stages (Triton's debug mode) are not keyed: they are not changed per call.
    Under TRITON_INTERPRET=1 every call goes through the interpreter.
"""
import torch

__all__ = ["DirectLaunch", "signature"]

_INT32 = range(-2 ** 31, 2 ** 31)
_INT64 = range(-2 ** 63, 2 ** 63)


def signature(args: tuple, params: tuple) -> tuple:
    """The specialization of `args` (Note [direct launch]). params: per parameter None for a constexpr
    (keyed by value), else (specialize, divisible): whether Triton specializes its value at all and
    whether on multiples of 16 (do_not_specialize, do_not_specialize_on_alignment)."""
    key = []
    for arg, param in zip(args, params):
        kind = type(arg)
        if param is None:
            key.append(arg)
        elif isinstance(arg, torch.Tensor):
            key.append((arg.dtype, param[1] and arg.data_ptr() % 16 == 0))
        elif kind is int:
            specialize, divisible = param
            key.append(1 if specialize and arg == 1 else (arg in _INT32, arg in _INT64, divisible and arg % 16 == 0))
        else:
            key.append(kind)  # floats, bools: typed, not specialized
    return tuple(key)


def _param(p) -> tuple[bool, bool] | None:
    """signature's description of a Triton KernelParam."""
    if p.is_constexpr:
        return None
    return not p.do_not_specialize, not (p.do_not_specialize or p.do_not_specialize_on_alignment)


class DirectLaunch:
    """A @triton.jit kernel launched through its compiled binaries (Note [direct launch])."""

    def __init__(self, fn):
        self.fn = fn
        self.runners: dict[tuple, object] = {}
        params = getattr(fn, "params", None)  # None: an interpreted function
        self.params = None if params is None else tuple(_param(p) for p in params)

    def __call__(self, grid: tuple[int, ...], args: tuple, num_warps: int, num_stages: int = 1) -> None:
        if self.params is None:
            self.fn[grid](*args, num_warps=num_warps, num_stages=num_stages)
            return
        grid = tuple(grid) + (1,) * (3 - len(grid))
        key = (torch.cuda.current_device(), grid, num_warps, num_stages, signature(args, self.params))
        runner = self.runners.get(key)
        if runner is not None:
            runner(*args)
            return
        binary = self.fn[grid](*args, num_warps=num_warps, num_stages=num_stages)
        self.runners[key] = binary[grid]

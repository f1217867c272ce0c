"""kernels.direct_launch: a binary is reused only for arguments Triton would have compiled it for (its
own specialization of the same values is the reference); under the interpreter every call goes
through Triton; on the GPU the binaries are reused per signature and grid, with the same results."""
import itertools

import pytest
import torch
import triton
import triton.language as tl

from kernels.direct_launch import DirectLaunch, signature


@triton.jit
def _scaled_copy(x_ptr, out_ptr, n, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * factor, mask=offs < n)


def _copy(launch, x, factor, block=32):
    out = torch.empty_like(x)
    launch((triton.cdiv(x.numel(), block),), (x, out, x.numel(), factor, block), num_warps=1)
    return out


def _values():
    x = torch.zeros(64)
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2 ** 31 - 16, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 16, 2 ** 63 - 16, 2 ** 63,
            2 ** 63 + 16]
    tensors = [x, x[1:], x[4:], x[2:], x.half(), x.half()[8:], x.half()[1:], x.to(torch.uint8), x.to(torch.uint8)[3:]]
    return ints + tensors + [2.0, 3.5, True, False, None]


@pytest.mark.parametrize("specialize, align", list(itertools.product([True, False], repeat=2)))
def test_signature_makes_the_distinctions_triton_makes(specialize, align):
    """Two arguments share a binary under `signature` exactly when Triton's own specialization of them
    is the same (the property that makes reusing a binary safe)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    values = _values()
    ours = [signature((v,), ((specialize, specialize and align),)) for v in values]
    theirs = [native_specialize_impl(CUDABackend, v, False, specialize, align) for v in values]
    for (i, a), (j, b) in itertools.combinations(enumerate(values), 2):
        assert (ours[i] == ours[j]) == (theirs[i] == theirs[j]), (a, b, theirs[i], theirs[j])


def test_constexprs_key_by_value():
    params = ((True, True), None)
    x = torch.zeros(8)
    assert signature((x, 64), params) == signature((torch.ones(8), 64), params)
    assert signature((x, 64), params) != signature((x, 128), params)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's path (CPU)")
def test_under_the_interpreter_every_call_goes_through_triton():
    launch = DirectLaunch(_scaled_copy)
    assert launch.params is None
    x = torch.randn(100)
    torch.testing.assert_close(_copy(launch, x, 2.0), 2 * x)
    torch.testing.assert_close(_copy(launch, x, 3.0, block=64), 3 * x)
    assert launch.runners == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_binaries_are_reused_per_signature_and_grid():
    launch = DirectLaunch(_scaled_copy)
    x = torch.randn(100, device="cuda")
    torch.testing.assert_close(_copy(launch, x, 2.0), 2 * x)  # compiled through Triton
    torch.testing.assert_close(_copy(launch, x, 3.0), 3 * x)  # the binary
    other = torch.randn(97, device="cuda")  # other values, the same specialization and grid
    torch.testing.assert_close(_copy(launch, other, -1.0), -other)
    assert len(launch.runners) == 1
    y = torch.randn(1, device="cuda")  # n == 1: a constant in its binary
    torch.testing.assert_close(_copy(launch, y, 1.5), 1.5 * y)
    torch.testing.assert_close(_copy(launch, x[1:], 0.5), 0.5 * x[1:])  # an address off 16 bytes
    torch.testing.assert_close(_copy(launch, x.half(), 2.0), 2 * x.half())  # another dtype
    assert len(launch.runners) == 4

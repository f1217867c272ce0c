"""Shared test set-up.

Without CUDA, Triton kernels run under the interpreter on CPU tensors. TRITON_INTERPRET must be
set before any `@triton.jit` function is defined, so it is set here, before tests import kernels.
"""
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seeded(request):
    """Fresh but reproducible random inputs: each test draws from a seed of its own name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def requires_cuda():
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

"""kernels/adamw.py against the torch reference in lora/optim.py: on the GPU when there is one,
else under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA)."""
import pytest
import torch

import lora.optim as optim
from quant.dynamic import dynamic_map

adamw = pytest.importorskip("kernels.adamw", reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _constants(t=3, lr=1e-2, wd=0.1, betas=(0.9, 0.999), eps=1e-8):
    group = dict(lr=lr, weight_decay=wd, betas=betas, eps=eps, step=t)
    return optim._step_constants(group)


def _state(n):
    """A state several steps old: m of either sign, v >= 0, with magnitudes spread out."""
    m = torch.randn(n, device=DEVICE) * 10.0 ** -torch.randint(0, 4, (n,), device=DEVICE).float()
    return m * 0.1, m * m * 0.05 + torch.rand(n, device=DEVICE) * 1e-4


@pytest.mark.parametrize("n", [5000, 2048 * 3])  # a masked tail, and whole programs
def test_adamw32_kernel_matches_the_reference(n):
    p = torch.randn(n, device=DEVICE)
    g = torch.randn(n, device=DEVICE)
    m, v = _state(n)
    expected = [t.clone() for t in (p, g, m, v)]
    adamw.adamw32_(p, g, m, v, **_constants())
    optim.adamw_reference_(*expected, **_constants())
    # the same float32 operations; a fused multiply-add may round the last bit differently
    torch.testing.assert_close(p, expected[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m, expected[2], rtol=1e-6, atol=3e-8)  # ulp of 0.1 g
    torch.testing.assert_close(v, expected[3], rtol=1e-6, atol=1e-12)
    assert torch.equal(g, expected[1])  # the gradient is read only


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adamw32_kernel_with_half_parameters_keeps_float32_state(dtype):
    n = 3000
    p = torch.randn(n, device=DEVICE).to(dtype)
    g = torch.randn(n, device=DEVICE).to(dtype)
    m, v = _state(n)
    expected = [t.clone() for t in (p, g, m, v)]
    adamw.adamw32_(p, g, m, v, **_constants())
    optim.adamw_reference_(*expected, **_constants())
    assert p.dtype == dtype
    torch.testing.assert_close(p, expected[0])  # dtype's own tolerance: one rounding to it
    torch.testing.assert_close(m, expected[2], rtol=1e-6, atol=3e-8)  # ulp of 0.1 g


def _quantized_state(n):
    signed, _, unsigned, _ = optim._tables(torch.device(DEVICE))
    m, v = _state(n)
    mc, ma = optim.quantize_blockwise_nearest(m, signed)
    vc, va = optim.quantize_blockwise_nearest(v, unsigned)
    return [mc, ma, vc, va]


def test_adamw8bit_kernel_matches_the_reference_step_by_step():
    n = 256 * 13  # 13 blocks: a program (4 blocks) with masked rows
    tables = optim._tables(torch.device(DEVICE))
    p = torch.randn(n, device=DEVICE)
    state = _quantized_state(n)
    for t in range(1, 4):  # each step from the kernel's state, so a rare code that rounded the
        g = torch.randn(n, device=DEVICE)  # other way is not carried into the next comparison
        p_ref, state_ref = p.clone(), [s.clone() for s in state]
        adamw.adamw8bit_(p, g, *state, *tables, **_constants(t))
        optim.adamw8bit_reference_(p_ref, g, *state_ref, *tables, **_constants(t))
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7)  # from float32 m, v: no codes
        for i in (1, 3):  # absmax
            torch.testing.assert_close(state[i], state_ref[i], rtol=1e-6, atol=1e-12)
        for i in (0, 2):  # codes: equal but where float32 rounding put a value across a midpoint
            differ = state[i] != state_ref[i]
            assert differ.float().mean() < 2e-3
            assert ((state[i].int() - state_ref[i].int())[differ].abs() == 1).all()


def test_adamw8bit_kernel_keeps_an_all_zero_block_at_zero():
    n = 512
    tables = optim._tables(torch.device(DEVICE))
    p = torch.randn(n, device=DEVICE)
    p[256:] = 0
    g = torch.randn(n, device=DEVICE)
    g[256:] = 0
    state = [torch.full((n,), 127, dtype=torch.uint8, device=DEVICE), torch.zeros(2, device=DEVICE),
             torch.zeros(n, dtype=torch.uint8, device=DEVICE), torch.zeros(2, device=DEVICE)]
    adamw.adamw8bit_(p, g, *state, *tables, **_constants(1))
    assert (p[256:] == 0).all() and state[1][1] == 0 and state[3][1] == 0
    assert (state[0][256:] == 127).all() and (state[2][256:] == 0).all()
    assert state[1][0] > 0 and dynamic_map(True)[state[0][:256].long().cpu()].abs().max() == 1.0


def test_kernel_arguments_are_checked():
    p = torch.zeros(512, device=DEVICE)
    with pytest.raises(ValueError, match="exp_avg must be torch.float32"):
        adamw.adamw32_(p, p.clone(), p.half(), p.clone(), **_constants())
    with pytest.raises(ValueError, match="grad must be contiguous with 512 elements"):
        adamw.adamw32_(p, torch.zeros(511, device=DEVICE), p.clone(), p.clone(), **_constants())
    tables = optim._tables(torch.device(DEVICE))
    with pytest.raises(ValueError, match="300 elements is not a multiple of 256"):
        adamw.adamw8bit_(p[:300], p[:300], *_quantized_state(300), *tables, **_constants())

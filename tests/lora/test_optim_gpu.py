"""lora.optim.AdamW on CUDA: the Triton kernels inside the optimizer, parity with torch, paged ==
unpaged (the stream pipeline), the working set within its budget, 8-bit against 32-bit."""
import pytest
import torch
import torch.nn as nn

import lora.optim as optim
from lora.optim import AdamW, load_state, save_state

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BUDGET = 256 << 10  # 4 slots of 64 KiB: dozens of pages per step


def _lora_params(layers=4, d=1024, r=16):
    """LoRA-shaped fp32 parameters (A (r, d), B (d, r) per projection) and a few small ones."""
    shapes = [s for _ in range(layers) for s in ((r, d), (d, r), (r, d), (d // 4, r))] + [(d,), (7, 3)]
    return [nn.Parameter(torch.randn(*s, device="cuda") * 0.02) for s in shapes]


def _clone(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def _grads(params, steps):
    return [[torch.randn_like(p) * 1e-2 for p in params] for _ in range(steps)]


def _run(opt, params, grads):
    for step_grads in grads:
        opt.zero_grad()
        for p, g in zip(params, step_grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        opt.step()


def test_the_triton_kernels_are_used():
    assert optim._kernels() is not None, "kernels.adamw did not import: the optimizer falls back to torch"


def test_32bit_matches_torch_adamw_on_cuda():
    ours_params = _lora_params()
    grads = _grads(ours_params, 50)

    def groups(ps):
        return [{"params": ps[:8], "lr": 1e-3, "weight_decay": 0.1}, {"params": ps[8:]}]

    expected = {}
    for kind in ("fused", "foreach"):  # torch's two CUDA paths
        twins = _clone(ours_params)
        reference = torch.optim.AdamW(groups(twins), lr=3e-4, weight_decay=0.01, **{kind: True})
        _run(reference, twins, grads)
        expected[kind] = twins
    ours = AdamW(groups(ours_params), lr=3e-4, weight_decay=0.01)
    _run(ours, ours_params, grads)
    for kind, twins in expected.items():
        for p, q in zip(ours_params, twins):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=kind)


@pytest.mark.parametrize("bits", [32, 8])
def test_paged_equals_unpaged_on_cuda_and_stays_within_budget(bits):
    params = _lora_params(layers=8)
    twins = _clone(params)
    grads = _grads(params, 20)
    unpaged = AdamW(params, lr=1e-3, weight_decay=0.01, state_bits=bits)
    _run(unpaged, params, grads)
    paged = AdamW(twins, lr=1e-3, weight_decay=0.01, state_bits=bits, paged=True, page_budget_bytes=BUDGET)
    _run(paged, twins, grads[:1])  # the first step allocates the slots
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _run(paged, twins, grads[1:])
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= 64 << 10  # nothing grows per step
    store = next(iter(paged._stores.values()))
    assert len(store.slots) == 4 and sum(len(s.pages) for s in paged._segments) >= 8  # slots reused
    assert paged.state_bytes()["device"] <= BUDGET
    pages = [page for s in paged._segments for page in s.pages]
    assert all(page.store.is_pinned() for page in pages if page.on_host)  # asynchronous copies
    assert all(page.store.is_cuda for page in pages if not page.on_host)  # resident within budget
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
    a, b = unpaged.state_dict()["state"], paged.state_dict()["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])


def test_paged_state_memory_on_the_device_is_the_working_set():
    params = _lora_params(layers=8, d=2048)  # 0.85M parameters: 6.5 MiB of 32-bit state
    for p in params:
        p.grad = torch.randn_like(p)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    opt = AdamW(params, paged=True, page_budget_bytes=BUDGET)
    opt.step()
    opt.step()
    torch.cuda.synchronize()
    assert opt.state_bytes()["host"] > 8 * BUDGET
    assert torch.cuda.memory_allocated() - base <= BUDGET + (64 << 10)


@pytest.mark.parametrize("paged", [False, True])
def test_8bit_on_cuda_follows_the_cpu_reference_step_by_step(paged):
    params = _lora_params(layers=2)
    cpu = [nn.Parameter(p.detach().cpu()) for p in params]
    ours = AdamW(params, lr=1e-3, state_bits=8, paged=paged, page_budget_bytes=BUDGET)
    reference = AdamW(cpu, lr=1e-3, state_bits=8)
    for step_grads in _grads(params, 5):  # each step from the same state: a code rounded the
        reference.load_state_dict(ours.state_dict())  # other way is not carried into the next one
        with torch.no_grad():
            for p, q in zip(params, cpu):
                q.copy_(p)
        _run(ours, params, [step_grads])
        _run(reference, cpu, [[g.cpu() for g in step_grads]])
        for p, q in zip(params, cpu):
            torch.testing.assert_close(p.cpu(), q, rtol=1e-6, atol=1e-7)
        a, b = ours.state_dict()["state"], reference.state_dict()["state"]
        for i in a:
            for name in a[i]:
                if name.endswith("codes"):
                    differ = a[i][name] != b[i][name]
                    assert differ.float().mean() < 2e-3
                    assert ((a[i][name].int() - b[i][name].int())[differ].abs() == 1).all()
                else:  # float32 moments of small tensors, and absmax
                    atol = 1e-9 if name == "exp_avg" else 1e-12  # m = 0.9 m + 0.1 g may cancel
                    torch.testing.assert_close(a[i][name], b[i][name], rtol=1e-6, atol=atol)


def _mlp():
    layers = [nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 128), nn.Tanh(), nn.Linear(128, 1)]
    return nn.Sequential(*layers).cuda()


def test_8bit_trains_like_32bit_on_cuda():
    teacher = _mlp()
    x = torch.randn(1024, 64, device="cuda")
    with torch.no_grad():
        y = teacher(x) + 0.01 * torch.randn(1024, 1, device="cuda")
    init = _mlp()
    losses = {}
    for bits, paged in ((32, False), (8, False), (8, True)):
        model = _mlp()
        model.load_state_dict(init.state_dict())
        opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, state_bits=bits, paged=paged)
        for _ in range(200):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
        with torch.no_grad():
            losses[bits, paged] = ((model(x) - y) ** 2).mean().item()
    assert losses[8, False] == pytest.approx(losses[8, True], rel=1e-5)
    assert abs(losses[8, False] / losses[32, False] - 1) < 0.1, losses


@pytest.mark.parametrize("bits", [32, 8])
def test_resume_on_cuda_is_bit_for_bit(tmp_path, bits):
    straight = _lora_params()
    resumed = _clone(straight)
    grads = _grads(straight, 10)
    kw = dict(lr=1e-3, state_bits=bits, paged=True, page_budget_bytes=BUDGET)
    _run(AdamW(straight, **kw), straight, grads)
    first = AdamW(resumed, **kw)
    _run(first, resumed, grads[:5])
    save_state(first, tmp_path / "opt.safetensors")
    fresh_params = _clone(resumed)
    fresh = AdamW(fresh_params, **dict(kw, paged=False))
    load_state(fresh, tmp_path / "opt.safetensors")
    _run(fresh, fresh_params, grads[5:])
    for p, q in zip(straight, fresh_params):
        assert torch.equal(p, q)


def test_a_nan_gradient_skips_the_step_on_cuda():
    params = _lora_params(layers=1)
    opt = AdamW(params, lr=1e-3, state_bits=8, paged=True, page_budget_bytes=BUDGET)
    _run(opt, params, _grads(params, 2))
    before = [p.detach().clone() for p in params]
    params[2].grad[3, 5] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1 and all(torch.equal(p, b) for p, b in zip(params, before))
    params[2].grad[3, 5] = float("inf")
    opt.nonfinite = "raise"
    with pytest.raises(FloatingPointError, match=r"parameter 2 \(group 0, shape \(16, 1024\)\)"):
        opt.step()

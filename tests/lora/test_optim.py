"""lora.optim.AdamW, 32-bit and paged, on the CPU: parity with torch.optim.AdamW, the flat-buffer
mechanics, exact resume, non-finite gradients, and errors a user can cause."""
import pytest
import torch
import torch.nn as nn

import lora.optim as optim
from lora.optim import AdamW, load_state, save_state

SHAPES = [(16, 300), (7,), (64, 80), (3, 5), (4096 + 37,), (33, 121)]  # small, odd and >4096 tensors
TINY_BUDGET = 6 * 4096  # pages of a few blocks: many pages and every slot reused each step


def _params(shapes=SHAPES):
    return [nn.Parameter(torch.randn(*s)) for s in shapes]


def _clone(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def _groups(params):
    """Three groups with their own lr and weight decay (the last uses the defaults)."""
    return [{"params": params[:2], "lr": 1e-2, "weight_decay": 0.1},
            {"params": params[2:4], "lr": 3e-3, "betas": (0.8, 0.99)},
            {"params": params[4:]}]


def _loss(params, data):
    """A random least-squares problem over all parameters: every gradient depends on them."""
    x, targets = data
    return sum(((x[: p.numel()] * p.reshape(-1) - t) ** 2).mean() for p, t in zip(params, targets))


def _data(params):
    n = max(p.numel() for p in params)
    return torch.randn(n), [torch.randn(p.numel()) for p in params]


def _backward(params, data):
    loss = _loss(params, data)
    loss.backward()
    return loss.detach()


def _train_in_lockstep(runs, data, steps):
    """`steps` optimizer steps of each (optimizer, its parameters) in `runs`, on the same problem."""
    for _ in range(steps):
        for opt, ps in runs:
            opt.zero_grad()
            _backward(ps, data)
            opt.step()


@pytest.mark.parametrize("paged", [False, True])
def test_matches_torch_adamw_for_100_steps_with_param_groups(paged):
    ours_params = _params()
    torch_params = _clone(ours_params)
    data = _data(ours_params)
    ours = AdamW(_groups(ours_params), lr=1e-3, weight_decay=0.01, paged=paged,
                 page_budget_bytes=TINY_BUDGET if paged else None)
    reference = torch.optim.AdamW(_groups(torch_params), lr=1e-3, weight_decay=0.01)
    for _ in range(100):
        for opt, params in ((ours, ours_params), (reference, torch_params)):
            opt.zero_grad()
            _backward(params, data)
            opt.step()
    for p, q in zip(ours_params, torch_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    state = ours.state_dict()["state"]
    for i, q in enumerate(torch_params):
        torch.testing.assert_close(state[i]["exp_avg"], reference.state[q]["exp_avg"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(state[i]["exp_avg_sq"], reference.state[q]["exp_avg_sq"],
                                   rtol=1e-6, atol=1e-12)
    assert [g["step"] for g in ours.param_groups] == [100, 100, 100]


def test_matches_torch_adamw_under_an_lr_schedule():
    ours_params = _params()
    torch_params = _clone(ours_params)
    data = _data(ours_params)
    ours = AdamW(ours_params, lr=1e-2, weight_decay=0.05)
    reference = torch.optim.AdamW(torch_params, lr=1e-2, weight_decay=0.05)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)) for o in (ours, reference)]
    for _ in range(20):
        for opt, params, schedule in zip((ours, reference), (ours_params, torch_params), schedules):
            opt.zero_grad()
            _backward(params, data)
            opt.step()
            schedule.step()
    assert ours.param_groups[0]["lr"] == reference.param_groups[0]["lr"] == pytest.approx(1e-2 / 21)
    for p, q in zip(ours_params, torch_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [32, 8])
def test_paged_equals_unpaged_bit_for_bit(bits):
    params = _params()
    twins = _clone(params)
    data = _data(params)
    unpaged = AdamW(_groups(params), lr=1e-2, state_bits=bits)
    paged = AdamW(_groups(twins), lr=1e-2, state_bits=bits, paged=True, page_budget_bytes=TINY_BUDGET)
    store = next(iter(paged._stores.values()))
    assert sum(len(s.pages) for s in paged._segments) > 2 * len(store.slots or [0] * 4)
    _train_in_lockstep([(unpaged, params), (paged, twins)], data, steps=12)
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
    a, b = unpaged.state_dict()["state"], paged.state_dict()["state"]
    for i in a:
        for name in a[i]:
            assert torch.equal(a[i][name], b[i][name]), (i, name)
    assert paged.state_bytes()["device"] <= TINY_BUDGET


def test_parameters_and_gradients_live_in_one_flat_buffer():
    params = _params()
    opt = AdamW(params, lr=1e-3)
    (segment,) = opt._segments
    base = segment.flat_param.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == base for p in params)
    assert all(p.data_ptr() % (256 * 4) == base % (256 * 4) for p in params)  # 256-element aligned
    data = _data(params)
    _backward(params, data)
    opt.step()  # the first step copies autograd's fresh gradients in and points p.grad at the buffer
    views = [p.grad for p in params]
    assert all(g is v for g, v in zip(views, segment.grad_views))
    opt.zero_grad()
    assert all(p.grad is v and not v.any() for p, v in zip(params, views))
    _backward(params, data)  # autograd accumulates into the views in place
    assert all(p.grad is v for p, v in zip(params, views))
    twins = _clone(params)
    _backward(twins, data)
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.grad, q.grad)
    assert segment.flat_grad[segment.offsets[1]: segment.offsets[1] + 7].equal(params[1].grad)


def test_set_to_none_and_replaced_tensors_are_copied_back_in():
    """zero_grad(set_to_none=True), a model that zeroes its own grads, and p.data replaced: the
    results stay those of torch.optim.AdamW."""
    ours_params = _params()
    torch_params = _clone(ours_params)
    data = _data(ours_params)
    ours = AdamW(ours_params, lr=1e-2, weight_decay=0.01)
    reference = torch.optim.AdamW(torch_params, lr=1e-2, weight_decay=0.01)
    for step in range(6):
        ours.zero_grad(set_to_none=step % 2 == 0)
        reference.zero_grad()
        if step == 3:  # replace a parameter's data, as load_state_dict(assign=True) would
            new = torch.randn_like(ours_params[2])
            ours_params[2].data = new.clone()
            torch_params[2].data = new.clone()
        _backward(ours_params, data)
        _backward(torch_params, data)
        ours.step()
        reference.step()
        (segment,) = ours._segments
        assert ours_params[2].data_ptr() == segment.param_views[2].data_ptr()
    for p, q in zip(ours_params, torch_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_attach_grads_points_every_grad_at_the_flat_buffer_keeping_values():
    """What CUDA graphs need (lora/graphs.py): after attach_grads every .grad is its fixed view of
    the flat buffer, replaced gradients are copied in, missing ones are zeros, and a later backward
    accumulates there in place."""
    params = _params()
    opt = AdamW(params, lr=1e-3)
    (segment,) = opt._segments
    data = _data(params)
    _backward(params[:3], data)  # fresh autograd tensors for three parameters, None for the rest
    fresh = [p.grad.clone() for p in params[:3]]
    opt.attach_grads()
    assert all(p.grad is v for p, v in zip(params, segment.grad_views))
    for p, g in zip(params[:3], fresh):
        assert p.grad.equal(g)
    assert not any(p.grad.any() for p in params[3:])
    _backward(params, data)
    twins = _clone(params)
    _backward(twins[:3], data)
    _backward(twins, data)
    for p, q, view in zip(params, twins, segment.grad_views):
        assert p.grad is view
        torch.testing.assert_close(p.grad, q.grad)


def test_a_parameter_replaced_by_another_shape_is_named():
    params = _params()
    opt = AdamW(params)
    params[3].data = torch.randn(5, 3)
    _backward(params[:3], _data(params[:3]))
    with pytest.raises(ValueError, match=r"parameter 3 changed from \(3, 5\).* to \(5, 3\)"):
        opt.step()


@pytest.mark.parametrize("bits", [32, 8])
def test_a_parameter_without_gradient_is_untouched(bits):
    params = _params()
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, state_bits=bits)
    data = _data(params)
    for _ in range(3):
        opt.zero_grad()
        _backward(params, data)
        opt.step()
    before = [p.detach().clone() for p in params]
    state_before = opt.state_dict()["state"]
    for i in (1, 4):  # a small tensor and an 8-bit one
        params[i].grad = None
    twins = _clone(params)
    reference = AdamW(twins, lr=1e-2, weight_decay=0.1, state_bits=bits)
    reference.load_state_dict(opt.state_dict())
    twins[1].grad = torch.zeros_like(twins[1])
    twins[4].grad = torch.zeros_like(twins[4])
    for p, q in zip(params, twins):
        if p.grad is not None:
            q.grad = p.grad.clone()
    opt.step()
    reference.step()
    state_after = opt.state_dict()["state"]
    for i in (1, 4):
        assert torch.equal(params[i], before[i])
        for name in state_before[i]:
            assert torch.equal(state_after[i][name], state_before[i][name])
    for i in (0, 2, 3, 5):  # the others take the step as if nothing were missing
        assert not torch.equal(params[i], before[i])
        assert torch.equal(params[i], twins[i])
    assert params[1].grad is None and opt.param_groups[0]["step"] == 4


def _run(opt, params, data, steps):
    for _ in range(steps):
        opt.zero_grad()
        _backward(params, data)
        opt.step()


@pytest.mark.parametrize("bits,paged", [(32, False), (32, True), (8, False), (8, True)])
def test_save_and_load_resume_bit_for_bit(tmp_path, bits, paged):
    kw = dict(lr=1e-2, weight_decay=0.05, state_bits=bits, paged=paged,
              page_budget_bytes=TINY_BUDGET if paged else None)
    straight = _params()
    resumed = _clone(straight)
    data = _data(straight)
    opt = AdamW(_groups(straight), **kw)
    _run(opt, straight, data, 20)

    first = AdamW(_groups(resumed), **kw)
    _run(first, resumed, data, 10)
    save_state(first, tmp_path / "optimizer.safetensors")
    assert not list(tmp_path.glob("*.tmp"))
    fresh_params = _clone(resumed)  # a new process: the model reloaded, a fresh optimizer
    fresh = AdamW(_groups(fresh_params), **dict(kw, paged=not paged))  # the layout does not matter
    load_state(fresh, tmp_path / "optimizer.safetensors")
    assert [g["step"] for g in fresh.param_groups] == [10, 10, 10]
    assert fresh.param_groups[1]["betas"] == (0.8, 0.99)
    _run(fresh, fresh_params, data, 10)
    for p, q in zip(straight, fresh_params):
        assert torch.equal(p, q)


def test_state_dict_is_plain_values_and_tensors():
    params = _params()
    opt = AdamW(_groups(params), state_bits=8)
    _run(opt, params, _data(params), 2)
    sd = opt.state_dict()
    assert sd["format"] == "lora.optim.AdamW/1" and sd["state_bits"] == 8 and sd["skipped_steps"] == 0
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3], [4, 5]]
    eight = {"exp_avg_codes", "exp_avg_sq_codes", "exp_avg_absmax", "exp_avg_sq_absmax"}
    assert [set(sd["state"][i]) == eight for i in range(6)] == [True, False, True, False, True, False]
    assert set(sd["state"][1]) == {"exp_avg", "exp_avg_sq"}  # 7 elements: 32-bit
    assert sd["state"][5]["exp_avg"].shape == (33, 121)  # 3993 elements: under 4096, 32-bit
    assert sd["state"][4]["exp_avg_codes"].shape == (4133,)
    assert sd["state"][4]["exp_avg_absmax"].shape == (17,)
    assert all(t.device.type == "cpu" for entry in sd["state"].values() for t in entry.values())


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")])
def test_a_nonfinite_gradient_skips_the_whole_step(bad):
    params = _params()
    twins = _clone(params)
    data = _data(params)
    opt = AdamW(_groups(params), lr=1e-2, weight_decay=0.1)
    clean = AdamW(_groups(twins), lr=1e-2, weight_decay=0.1)
    _run(opt, params, data, 3)
    _run(clean, twins, data, 3)
    before = [p.detach().clone() for p in params]
    state_before = opt.state_dict()["state"]
    opt.zero_grad()
    _backward(params, data)
    params[3].grad[1, 2] = bad
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    state_after = opt.state_dict()["state"]
    assert all(torch.equal(state_after[i][k], v) for i in state_before for k, v in state_before[i].items())
    assert [g["step"] for g in opt.param_groups] == [3, 3, 3]
    _run(opt, params, data, 2)  # the skipped step left no trace
    _run(clean, twins, data, 2)
    assert all(torch.equal(p, q) for p, q in zip(params, twins))


def test_a_nonfinite_gradient_can_raise_naming_the_parameter():
    params = _params()
    opt = AdamW(params, nonfinite="raise")
    _backward(params, _data(params))
    params[4].grad[100] = float("nan")
    before = [p.detach().clone() for p in params]
    with pytest.raises(FloatingPointError, match=r"parameter 4 \(group 0, shape \(4133,\)\)"):
        opt.step()
    assert opt.skipped_steps == 1 and all(torch.equal(p, b) for p, b in zip(params, before))


def test_a_finite_sum_overflow_is_not_mistaken_for_inf():
    params = [nn.Parameter(torch.ones(4))]
    twins = _clone(params)
    opt = AdamW(params, lr=0.1)
    reference = torch.optim.AdamW(twins, lr=0.1, weight_decay=0.0)
    for p in params + twins:
        p.grad = torch.full((4,), 3e38)  # finite, but their float32 sum overflows
    opt.step()
    reference.step()
    assert opt.skipped_steps == 0 and opt.param_groups[0]["step"] == 1
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], reference.state[twins[0]]["exp_avg"])
    assert torch.equal(params[0], twins[0])


def test_closure_and_add_param_group():
    params = _params()
    data = _data(params)
    opt = AdamW(params[:3], lr=1e-2)
    expected = _loss(_clone(params[:3]), data)
    loss = opt.step(lambda: _backward(params[:3], data))
    torch.testing.assert_close(loss, expected)
    assert opt.param_groups[0]["step"] == 1
    opt.add_param_group({"params": params[3:], "lr": 1e-3})
    twins = _clone(params)
    reference = torch.optim.AdamW(twins[3:], lr=1e-3, weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad()
        reference.zero_grad()
        _backward(params, data)
        _backward(twins, data)
        opt.step()
        reference.step()
    assert opt.param_groups[0]["step"] == 4 and opt.param_groups[1]["step"] == 3
    for p, q in zip(params[3:], twins[3:]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_bfloat16_parameters_keep_float32_state():
    p = nn.Parameter(torch.randn(64, 80).bfloat16())
    opt = AdamW([p], lr=1e-2)
    ref = p.detach().float().clone()
    m, v = torch.zeros_like(ref), torch.zeros_like(ref)
    for t in range(1, 4):
        g = torch.randn(64, 80).bfloat16()
        p.grad = g.clone()
        opt.step()
        constants = optim._step_constants(dict(opt.param_groups[0], step=t))
        optim.adamw_reference_(ref, g.float(), m, v, **constants)
        ref = ref.bfloat16().float()  # the parameter is stored in bfloat16 after every step
    assert p.dtype == torch.bfloat16
    assert torch.equal(p.float(), ref)
    assert opt.state_dict()["state"][0]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("kw,match", [
    (dict(state_bits=16), "state_bits must be 32 or 8"),
    (dict(nonfinite="ignore"), "nonfinite must be 'skip' or 'raise'"),
    (dict(lr=-1.0), "lr must be a float >= 0"),
    (dict(betas=(0.9, 1.0)), r"betas must be two floats in \[0, 1\)"),
    (dict(page_budget_bytes=0), "page_budget_bytes must be a positive int"),
    (dict(paged=True, page_budget_bytes=1000), "page_budget_bytes=1000 is too small"),
])
def test_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        AdamW(_params(), **kw)


def test_integer_parameters_are_refused():
    with pytest.raises(TypeError, match="parameter 1 is torch.int64"):
        AdamW([nn.Parameter(torch.zeros(3)),
               nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)])


def test_load_state_errors_name_the_file_and_the_problem(tmp_path):
    params = _params()
    opt = AdamW(_groups(params), state_bits=8)
    _run(opt, params, _data(params), 1)
    path = tmp_path / "opt.safetensors"
    save_state(opt, path)
    with pytest.raises(ValueError, match=r"opt.safetensors: optimizer state: 'state_bits' is 8 but this "
                                         r"optimizer has 32"):
        load_state(AdamW(_groups(_clone(params))), path)
    with pytest.raises(ValueError, match=r"param_groups' has 3 groups, this optimizer 1"):
        load_state(AdamW(_clone(params), state_bits=8), path)
    other = _params(SHAPES[:4] + [(4096 + 38,), (33, 121)])
    with pytest.raises(ValueError, match=r"state\[4\]\['exp_avg_codes'\] is \(4133,\) torch.uint8, "
                                         r"expected \(4134,\)"):
        load_state(AdamW(_groups(other), state_bits=8), path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors: not a safetensors file"):
        load_state(opt, tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="plain.safetensors: no 'lora.optim' metadata"):
        load_state(opt, tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError, match="no file"):
        load_state(opt, tmp_path / "missing.safetensors")
    fresh = AdamW(_groups(_clone(params)), state_bits=8)
    before = fresh.state_dict()
    with pytest.raises(ValueError):
        load_state(fresh, path.with_name("junk.safetensors"))
    assert fresh.state_dict()["param_groups"] == before["param_groups"]  # nothing half-loaded


@pytest.mark.parametrize("bits", [32, 8])
def test_pages_that_fit_the_budget_stay_resident_and_the_rest_stream(bits):
    params = _params()
    twins = _clone(params)
    data = _data(params)
    unpaged = AdamW(_groups(params), lr=1e-2, state_bits=bits)
    total = sum(p.numel() for p in params) * 8  # at most 8 bytes of state per element
    budget = TINY_BUDGET + total // 2  # the slots, and room for about half of the state
    paged = AdamW(_groups(twins), lr=1e-2, state_bits=bits, paged=True, page_budget_bytes=budget)
    _train_in_lockstep([(unpaged, params), (paged, twins)], data, steps=6)
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
    store = next(iter(paged._stores.values()))
    pages = [page for s in paged._segments for page in s.pages]
    streamed = [page for page in pages if store._on_host(page)]
    assert 0 < len(streamed) < len(pages)  # some of each
    assert store.resident_bytes > 0 and store.host_bytes == sum(page.nbytes for page in streamed)
    assert paged.state_bytes()["device"] <= budget

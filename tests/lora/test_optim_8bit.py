"""8-bit optimizer state: the nearest-code search against quant.dynamic, the dynamic maps' round
trip, the first 8-bit step against the formula, memory, and training quality against 32 bits."""
import pytest
import torch
import torch.nn as nn

import lora.optim as optim
from lora.optim import AdamW
from quant.dynamic import dequantize_blockwise, dynamic_map, quantize_blockwise


def _scaled(codes, absmax, x, blocksize=256):
    """x / absmax of its block, as both quantizers compute it."""
    n = x.numel()
    block = torch.arange(n) // blocksize
    return x.reshape(-1) * (1.0 / absmax)[block]


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_codes_match_quant_dynamic_except_at_exact_midpoints(signed):
    code = dynamic_map(signed)
    midpoints = optim.code_midpoints(code)
    n = 300_000 + 77  # a short last block
    x = torch.randn(n) * 10.0 ** -torch.randint(0, 7, (n,)).float()  # every exponent of the map
    x = x if signed else x.abs()
    # plant exact midpoints: blocks whose absmax is 1 and whose other values are midpoints
    planted = torch.cat([torch.ones(1), midpoints[torch.randint(0, 255, (255,))]])
    x = torch.cat([planted, x])
    ours, our_absmax = optim.quantize_blockwise_nearest(x, code)
    theirs, their_absmax = quantize_blockwise(x, code)
    assert torch.equal(our_absmax, their_absmax)
    differ = ours != theirs
    y = _scaled(ours, our_absmax, x)
    assert torch.isin(y[differ], midpoints).all()  # ties only
    assert (ours[differ] == theirs[differ].long() - 1).all() if differ.any() else True
    assert differ[:256].any()  # the planted ties did exercise the rule ...
    assert differ[256:].sum() <= 2  # ... and random values (almost) never sit on a midpoint
    # and ours is nearest: no map value is closer to y than the chosen one (to float32 rounding
    # of the distances, which decides ties)
    distance = (y[:50_000].unsqueeze(1) - code.unsqueeze(0)).abs()  # (50000, 256)
    chosen = (y - code[ours.long()]).abs()[:50_000]
    assert (chosen <= distance.min(dim=1).values + 2.4e-7 * y[:50_000].abs()).all()


def test_the_binary_search_is_bucketize():
    midpoints = optim.code_midpoints(dynamic_map(True))
    y = torch.cat([torch.rand(100_000) * 2.2 - 1.1, midpoints, torch.tensor([-1.0, 0.0, 1.0])])
    assert torch.equal(optim._count_below(y, midpoints), torch.bucketize(y, midpoints))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_round_trip_error_is_half_a_code_gap(signed):
    code = dynamic_map(signed)
    x = torch.randn(64, 1000) * torch.logspace(-6, 0, 1000)  # magnitudes across the map
    x = x if signed else x.abs()
    codes, absmax = optim.quantize_blockwise_nearest(x, code)
    back = optim.dequantize_blockwise(
        nn.functional.pad(codes, (0, -codes.numel() % 256)), absmax, code)[: x.numel()]
    assert torch.equal(back, dequantize_blockwise(codes, absmax, code))  # same decoding as quant
    gap = torch.diff(code)  # (255,)
    c = codes.long()
    half_gap = torch.maximum(gap[(c - 1).clamp(0, 254)], gap[c.clamp(0, 254)]) / 2
    block = torch.arange(x.numel()) // 256
    assert ((x.reshape(-1) - back).abs() <= (half_gap + 1e-7) * absmax[block] * (1 + 1e-6)).all()
    assert ((x.reshape(-1) - back).abs() / x.abs().reshape(-1).clamp_min(1e-30)).median() < 0.05


def test_a_zero_block_has_zero_absmax_and_the_code_of_zero():
    for signed in (True, False):
        code = dynamic_map(signed)
        codes, absmax = optim.quantize_blockwise_nearest(torch.zeros(300), code)
        zero = int(torch.argmin(code.abs()))
        assert absmax.tolist() == [0.0, 0.0] and (codes == zero).all() and code[zero] == 0
    fresh = optim.STATE8.pieces
    assert (fresh[0].fill, fresh[1].fill) == (127, 0)


def test_the_first_8bit_step_uses_float32_moments_then_stores_their_codes():
    p = nn.Parameter(torch.randn(64, 100))  # 6400 elements: 8-bit, 25 blocks
    twin = nn.Parameter(p.detach().clone())
    opt8 = AdamW([p], lr=1e-2, weight_decay=0.1, state_bits=8)
    opt32 = AdamW([twin], lr=1e-2, weight_decay=0.1)
    g = torch.randn(64, 100)
    p.grad, twin.grad = g.clone(), g.clone()
    opt8.step()
    opt32.step()
    assert torch.equal(p, twin)  # a zero state is exact in 8 bits: the same step
    state8, state32 = opt8.state_dict()["state"][0], opt32.state_dict()["state"][0]
    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        codes, absmax = optim.quantize_blockwise_nearest(state32[name], dynamic_map(signed))
        assert torch.equal(state8[f"{name}_codes"], codes)
        assert torch.equal(state8[f"{name}_absmax"], absmax)


def test_8bit_state_is_about_a_quarter_and_small_tensors_stay_32bit():
    shapes = [(16, 4096), (4096, 16), (4000,), (16, 255)]  # a LoRA pair, a bias, a small matrix
    params = [nn.Parameter(torch.randn(*s)) for s in shapes]
    b32 = AdamW([nn.Parameter(p.detach().clone()) for p in params]).state_bytes()["device"]
    b8 = AdamW(params, state_bits=8).state_bytes()["device"]
    large = 2 * 16 * 4096
    assert b32 == 8 * (large + 4096 + 4096)  # padded to whole blocks of 256
    assert b8 == (2 + 8 / 256) * large + 8 * (4096 + 4096)
    assert b8 / b32 < 0.36 and (2 + 8 / 256) / 8 < 0.26


def _mlp():
    return nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 1))


def _train(model, opt, x, y, steps=200):
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((model(x) - y) ** 2).mean().item()


def test_an_mlp_trained_200_steps_with_8bit_state_ends_near_32bit():
    teacher = _mlp()
    x = torch.randn(256, 32)
    with torch.no_grad():
        y = teacher(x) + 0.01 * torch.randn(256, 1)
    init = _mlp()
    start = ((init(x) - y) ** 2).mean().item()
    losses = {}
    for bits in (32, 8):
        model = _mlp()
        model.load_state_dict(init.state_dict())
        opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, state_bits=bits)
        losses[bits] = _train(model, opt, x, y)
        if bits == 8:
            assert sum(s.bits == 8 for s in opt._segments) == 1  # the two large weights
    assert losses[32] < start / 100  # it did train
    assert abs(losses[8] / losses[32] - 1) < 0.1, (start, losses)

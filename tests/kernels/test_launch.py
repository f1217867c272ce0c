"""kernels.launch.Tuned: the first call per key goes through the autotuner, later ones launch the
JIT function directly with the chosen config, with the same result (CPU: Triton's interpreter);
KERNELS_TUNE=0 leaves one config to choose; choose_config, the same for the kernels tuned by hand."""
import pytest
import torch
import triton
import triton.language as tl

from kernels import launch
from kernels.launch import Tuned


@triton.jit
def _scaled_copy(x_ptr, out_ptr, n, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * factor, mask=offs < n)


def _run(tuned, x, factor):
    out = torch.empty_like(x)
    tuned((x.numel(),), lambda c: (triton.cdiv(x.numel(), c["BLOCK"]),), x, out, x.numel(), factor)
    return out


def test_the_chosen_config_is_reused_per_key_with_the_same_results():
    tuned = Tuned(triton.autotune(configs=[triton.Config({"BLOCK": 32}, num_warps=1)], key=["n"])(_scaled_copy))
    x = torch.randn(100)
    first = _run(tuned, x, 2.0)  # autotuner
    assert list(tuned.chosen) == [(100,)] and tuned.chosen[(100,)].kwargs == {"BLOCK": 32}
    second = _run(tuned, x, 3.0)  # direct launch
    torch.testing.assert_close(first, 2 * x)
    torch.testing.assert_close(second, 3 * x)
    y = torch.randn(7)
    torch.testing.assert_close(_run(tuned, y, 1.0), y)
    assert set(tuned.chosen) == {(100,), (7,)}


def test_a_config_with_a_pre_hook_keeps_going_through_the_autotuner():
    calls = []
    config = triton.Config({"BLOCK": 32}, num_warps=1, pre_hook=lambda args: calls.append(1))
    tuned = Tuned(triton.autotune(configs=[config], key=["n"])(_scaled_copy))
    x = torch.randn(40)
    for factor in (1.0, 2.0):
        torch.testing.assert_close(_run(tuned, x, factor), factor * x)
    assert tuned.chosen == {} and len(calls) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cold_graph_bench_times_what_the_gpu_does():
    from kernels.launch import cold_graph_bench
    small = torch.empty(16 << 20, dtype=torch.uint8, device="cuda")
    large = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    t_small = cold_graph_bench(lambda: small.add_(1))
    t_large = cold_graph_bench(lambda: large.add_(1))
    assert 3 < t_large / t_small < 12  # 8x the bytes; the small one pays launch latency
    assert 2 * large.numel() / (t_large * 1e-3) < 4e12  # below the H100's HBM bandwidth: not 0
    quantiles = cold_graph_bench(lambda: small.add_(1), quantiles=(0.5, 0.2, 0.8))
    assert len(quantiles) == 3 and all(q > 0 for q in quantiles)


def test_kernels_tune_0_keeps_the_first_config(monkeypatch):
    configs = ["a", "b", "c"]
    monkeypatch.delenv("KERNELS_TUNE", raising=False)
    assert launch.timing_configs() and launch.candidates(configs) == configs
    monkeypatch.setenv("KERNELS_TUNE", "0")
    assert not launch.timing_configs() and launch.candidates(configs) == ["a"]
    monkeypatch.setenv("KERNELS_TUNE", "1")
    assert launch.candidates(configs) == configs


def test_choose_config_remembers_its_choice_and_times_nothing_with_kernels_tune_0(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setenv("KERNELS_TUNE", "0")
    chosen, launched = {}, []
    assert launch.choose_config(chosen, ("k",), lambda: ["a", "b"], lambda: "b", launched.append) == "b"
    assert chosen == {("k",): "b"} and launched == []
    monkeypatch.setenv("KERNELS_TUNE", "1")
    assert launch.choose_config(chosen, ("k",), lambda: ["a"], lambda: "a", launched.append) == "b"
    assert launched == []  # remembered: nothing timed


def test_choose_config_while_a_graph_is_captured_keeps_nothing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    chosen, launched = {}, []
    assert launch.choose_config(chosen, ("k",), lambda: ["a", "b"], lambda: "a", launched.append) == "a"
    assert chosen == {} and launched == []

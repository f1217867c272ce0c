"""Launching an autotuned Triton kernel without the autotuner once its config is known.

    tuned = Tuned(autotuned_kernel)
    tuned(key, grid, *args, **meta)     grid: config kwargs -> launch grid; key: what the choice depends on

The first call for a `key` goes through Triton's autotuner (it benchmarks the configs and
launches the best); later calls launch the underlying JIT function directly with that config:
the same kernel and the same config, without the autotuner's per-call work (rebuilding its key
from every argument, the grid callback). At M = 1 the kernel takes a few microseconds of GPU
time, so host time per call is what a decode step pays (benchmarks/nf4_matmul.py --overhead).

The key must hold everything the choice depends on (at least the autotuner's own key fields and
any constexpr that changes the kernel), since a config chosen for one key is reused for it.
A config with a pre_hook keeps going through the autotuner (the hook runs per launch).

Note [timing short kernels]
    Triton's autotuner times each config with triton.testing.do_bench: L2 cleared, then one
    launch through Python. When the launch costs more host time (~90 us for the GEMV with
    Triton 3.6 on the H100) than the kernel and the clearing take on the GPU, every config
    measures about the same and the choice is noise (run 12: 48.6 us chosen at 14336 x 4096,
    M = 1, where the best config takes 31.7). `cold_graph_bench` times what the GPU does:
    REPS pairs (clear L2, call) captured in a CUDA graph, minus a graph of the REPS clearings
    alone. Kernels whose calls are short pass it as the autotuner's do_bench.
"""
import os
from collections.abc import Callable, Sequence

import torch
import triton

__all__ = ["Tuned", "cold_graph_bench", "timing_configs", "candidates", "choose_config"]

_L2_CLEAR_BYTES = 256 << 20  # more than any GPU's L2
_REPS = 20
_TRIALS = 5


def cold_graph_bench(kernel_call: Callable[[], object], quantiles=None, **_ignored) -> float | list[float]:
    """Milliseconds per call of `kernel_call` with L2 cleared before each, without host launch
    cost (Note [timing short kernels]); the median of _TRIALS replays (and `quantiles` of them,
    as triton.testing.do_bench returns them). Compiles before capturing: the first call runs eagerly."""
    clear = torch.empty(_L2_CLEAR_BYTES, dtype=torch.int8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernel_call()
        stream.synchronize()
        graphs = []
        for with_call in (True, False):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(_REPS):
                    clear.zero_()
                    if with_call:
                        kernel_call()
            graphs.append(graph)
        times = []
        for _ in range(_TRIALS):
            pair = []
            for graph in graphs:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                graph.replay()
                end.record(stream)
                end.synchronize()
                pair.append(start.elapsed_time(end))
            times.append(max(pair[0] - pair[1], 0.0) / _REPS)
    torch.cuda.current_stream().wait_stream(stream)
    times.sort()
    if quantiles is None:
        return times[len(times) // 2]
    return [times[min(len(times) - 1, int(q * len(times)))] for q in quantiles]


def timing_configs() -> bool:
    """Whether tuned kernels time their configs per shape (the default). KERNELS_TUNE=0 makes each
    take its first (or untimed) config instead: GPU tests check the math with it, without minutes of
    timing per new shape; benchmarks never set it."""
    return os.environ.get("KERNELS_TUNE", "1") != "0"


def candidates(configs: list) -> list:
    """The configs an autotuned kernel chooses from: all of them, or the first (KERNELS_TUNE=0)."""
    return list(configs) if timing_configs() else list(configs[:1])


def choose_config(chosen: dict, key: tuple, configs: Callable[[], Sequence], untimed: Callable[[], object],
                  launch: Callable[[object], object]):
    """The launch config of a kernel tuned by hand (the per-lane kernels) for `key`, remembered in
    `chosen`: the fastest of configs() by cold_graph_bench, each timed as launch(config); untimed()
    with KERNELS_TUNE=0, and while a CUDA graph is being captured (nothing can be timed then; that
    choice is not remembered)."""
    config = chosen.get(key)
    if config is not None:
        return config
    if torch.cuda.is_current_stream_capturing():
        return untimed()
    if timing_configs():
        times = {c: cold_graph_bench(lambda c=c: launch(c)) for c in configs()}
        config = min(times, key=times.get)
    else:
        config = untimed()
    chosen[key] = config
    return config


class Tuned:
    """An autotuned kernel (`triton.autotune(...)(jit_fn)`) whose chosen config is remembered per key."""

    def __init__(self, autotuned):
        self.autotuned = autotuned
        self.chosen: dict[tuple, triton.Config] = {}

    def __call__(self, key: tuple, grid: Callable[[dict], tuple], *args, **meta):
        config = self.chosen.get(key)
        if config is None:
            self.autotuned[grid](*args, **meta)
            if self.autotuned.best_config.pre_hook is None:  # a pre_hook runs per launch: keep the autotuner
                self.chosen[key] = self.autotuned.best_config
            return
        self.autotuned.fn[grid(config.kwargs)](*args, **meta, **config.all_kwargs())

"""CUDA graphs for training: a micro-batch's forward and backward, captured once per batch shape
and replayed, so the ~10k kernel launches of a Llama-8B QLoRA step cost one launch of host time.

    graphs = StepGraphs(model, optimizer, dtype=torch.bfloat16)
    loss = graphs.forward_backward(batch, scale)   # as (loss_sum(batch) * scale).backward()
    ...clip, optimizer.step(), optimizer.zero_grad() as usual (eager: a few launches)

Without graphs the GPU waits for Python: measured on an H100, an 8B step took ~550 ms of wall
time for ~286 ms of GPU work (benchmarks/RESULTS.md).

Note [what a replay assumes]
    A graph replays the kernels it recorded, on the memory it recorded. So:
    - the batch goes through static device tensors, copied in before each replay; its embeddings
      are looked up eagerly and copied in too (lora.loss.embed: a table in host memory,
      models/offload.py, cannot be read inside a graph), so the embeddings must be frozen;
    - the loss scale (1 / trained tokens of the step) is a device scalar, not a Python number;
    - gradients accumulate in place into the optimizer's flat gradient buffers (lora.optim Note
      [flat buffers]); AdamW.attach_grads() points every `.grad` back at them before each replay,
      so a `zero_grad(set_to_none=True)` in between costs a copy, not a lost gradient;
    - the loss runs over every position with ignore_index (lora.loss, select_trained=False): a
      boolean selection has a data-dependent size and needs a host sync;
    - autocast runs with its weight-cast cache off (the cache would keep tensors of the capture);
    - a batch shape runs eagerly the first time it is seen: that run warms up what must not happen
      during a capture (Triton autotuning, the kernels' weight preparation, lazy CUDA state). The
      second time, it is captured and replayed.
    Graphs are keyed by (batch shape, packed or not, gradient checkpointing); the trainer pads
    rows to a multiple of 64 tokens so a few graphs cover a run. They share one memory pool
    (they never run at the same time), which holds one step's activations, as eager training
    would. Changing the model after a capture (wrap, merge, new adapters) needs reset().
    Dropout works: the CUDA generator advances its offset on every replay, and gradient
    checkpointing restores its state for the recomputation inside the graph.
"""
import torch

from .data import Batch
from .loss import embed, is_packed, loss_sum

__all__ = ["StepGraphs", "PAD_MULTIPLE"]

PAD_MULTIPLE = 64  # the trainer pads T up to this with graphs on (Note [what a replay assumes])


class _Captured:
    """One captured forward + backward and the static tensors it reads and writes."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: Batch, embeds: torch.Tensor, scale: torch.Tensor,
                 loss: torch.Tensor):
        self.graph = graph
        self.inputs = inputs  # static device tensors, each (B, T)
        self.embeds = embeds  # (B, T, D) static device tensor
        self.scale = scale  # () float32
        self.loss = loss  # () float32: scale * loss_sum, written by every replay


class StepGraphs:
    """Runs `(loss_sum(model, batch) * scale).backward()` through CUDA graphs, one per batch shape.

    model: a models.Llama-like module (`.model`, `.lm_head`) on a CUDA device.
    optimizer: lora.optim.AdamW over the trainable parameters (its flat gradient buffers are
        what the graphs write; see Note [what a replay assumes]).
    dtype: the autocast dtype (bf16 or fp16), or None for no autocast.
    max_graphs: shapes beyond this many run eagerly. log: where a failed capture is reported
        (training then goes on without graphs).
    Attributes: captures, replays, eager_runs (counts), enabled."""

    def __init__(self, model, optimizer, dtype: torch.dtype | None = torch.bfloat16, max_graphs: int = 16,
                 log=print):
        if not hasattr(optimizer, "attach_grads"):
            raise TypeError("StepGraphs needs lora.optim.AdamW (flat gradient buffers), got "
                            f"{type(optimizer).__name__}")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not params or params[0].device.type != "cuda":
            raise ValueError("StepGraphs needs the optimizer's parameters on a CUDA device")
        if model.model.embed_tokens.weight.requires_grad:
            raise ValueError("StepGraphs needs frozen embeddings: they are looked up outside the graphs")
        self.model, self.optimizer, self.dtype = model, optimizer, dtype
        self.device = params[0].device
        self.max_graphs, self.log = max_graphs, log
        self.enabled = True
        self.captures = self.replays = self.eager_runs = 0
        self._graphs: dict[tuple, _Captured] = {}
        self._seen: set[tuple] = set()
        self._pool = None

    def reset(self) -> None:
        """Forget every graph (after changing the model); the next batches warm up again."""
        self._graphs.clear()
        self._seen.clear()
        self._pool = None

    def _autocast(self, cache: bool):
        return torch.autocast("cuda", dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None,
                              cache_enabled=cache)

    def forward_backward(self, batch: Batch, scale: float) -> torch.Tensor:
        """Backward of scale * (summed loss of `batch`), accumulated into the gradients; returns that
        scaled loss as a () float32 device tensor (a fresh one: later calls do not change it)."""
        packed = is_packed(batch)
        key = (tuple(batch.input_ids.shape), packed, bool(self.model.gradient_checkpointing))
        captured = self._graphs.get(key)
        if captured is None and self.enabled and key in self._seen and len(self._graphs) < self.max_graphs:
            captured = self._capture(key, batch, packed)
        if captured is None:
            self._seen.add(key)
            self.eager_runs += 1
            loss = loss_sum(self.model, batch, self.device, self._autocast(cache=True), packed) * scale
            loss.backward()
            return loss.detach()
        self.optimizer.attach_grads()
        for static, value in zip(_fields(captured.inputs), _fields(batch)):
            static.copy_(value, non_blocking=True)
        captured.embeds.copy_(embed(self.model, batch.input_ids))
        captured.scale.fill_(scale)
        captured.graph.replay()
        self.replays += 1
        return captured.loss.clone()

    def _capture(self, key: tuple, batch: Batch, packed: bool) -> _Captured | None:
        inputs = Batch(*(t.to(self.device, copy=True) for t in _fields(batch)))  # outside the pool
        embeds = embed(self.model, batch.input_ids).to(self.device, copy=True)  # (B, T, D)
        scale = torch.zeros((), dtype=torch.float32, device=self.device)
        self.optimizer.attach_grads()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the eager run's cached blocks: the graph's pool replaces them
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                loss = loss_sum(self.model, inputs, self.device, self._autocast(cache=False), packed,
                                select_trained=False, inputs_embeds=embeds) * scale
                loss.backward()
        except Exception as error:  # an op that cannot be captured: train on without graphs
            self.enabled = False
            self.log(f"CUDA graphs: capturing the step failed ({type(error).__name__}: "
                     f"{str(error).splitlines()[0] if str(error) else ''}); training continues without them")
            return None
        self._pool = self._pool or graph.pool()
        self.captures += 1
        captured = self._graphs[key] = _Captured(graph, inputs, embeds, scale, loss.detach())
        return captured


def _fields(batch: Batch) -> tuple[torch.Tensor, ...]:
    return batch.input_ids, batch.labels, batch.position_ids, batch.document_ids

"""Host memory for what training does not need on the GPU all the time: the frozen embeddings, the
frozen output head, and the layer inputs that gradient checkpointing keeps for the backward pass.

    models.keep_embeddings_on_host(model)      # embed_tokens -> HostEmbedding, lm_head -> HostHead
    model.model.checkpoint_offload = CheckpointOffload()   # with gradient_checkpointing on

Note [what lives where]
    At Llama-3.1-8B a QLoRA step holds 3.35 GiB of NF4 layers, two bf16 (128256, 4096) matrices
    of 1 GiB each (embeddings and head, both frozen), and 32 checkpointed layer inputs of
    B * T * 4096 * 2 bytes (0.5 GiB at B = 1, T = 2048). None of the last three is needed on the
    GPU for most of the step:
    - the embedding lookup reads B * T rows: HostEmbedding gathers them on the host and copies
      the (B, T, D) result over (16 MiB at T = 2048);
    - the head is read once per forward pass: HostHead.weight_slices() streams it in slices of
      rows through a small ring of GPU buffers, on a side stream, so that copying slice j + 1
      overlaps the work on slice j (lora.loss computes the loss and its gradient in that one
      pass, so the backward pass never needs the head);
    - CheckpointOffload copies each checkpointed layer input to host memory as the forward pass
      goes (on a side stream, overlapping the next layer), and back one layer ahead of the
      backward pass.
    The price is PCIe traffic: the head once per forward pass (~20 ms at 8B over PCIe 5, mostly
    not overlapped: nothing else runs while the loss waits for it), the checkpoints twice
    (overlapped with the layers).

Note [pinned memory and CUDA graphs]
    Asynchronous copies need page-locked host memory (torch's pinned allocator), and a CUDA
    graph capture (lora/graphs.py) accepts no other. Every copy is issued on a side stream that
    first waits for the compute stream and is waited on before its result is used, so a capture
    records the same dependencies as an eager run.
"""
import weakref

import torch
from torch import nn

__all__ = ["HostEmbedding", "HostHead", "CheckpointOffload", "keep_embeddings_on_host", "host_parameter",
           "SLICE_BYTES", "RING"]

# The head streams in slices of about SLICE_BYTES through RING buffers on the GPU: 4 x 32 MiB.
SLICE_BYTES = 32 << 20
RING = 4


def host_parameter(weight: torch.Tensor) -> nn.Parameter:
    """A frozen, pinned CPU copy of `weight`, as the weight of a HostEmbedding or HostHead."""
    return nn.Parameter(_pinned(weight.shape, weight.dtype).copy_(weight.detach()), requires_grad=False)


def _pinned(shape, dtype) -> torch.Tensor:
    """An empty CPU tensor in page-locked memory when CUDA is there (Note [pinned memory and CUDA
    graphs]), in ordinary memory otherwise."""
    return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())


class _HostModule(nn.Module):
    """A frozen (rows, D) weight that stays in host memory while the module computes on `device`.

    `weight` is a host_parameter (two modules may share one: a tied head). `model.to(device)`
    moves the computation, not the weight (`_apply` keeps it on the host; a dtype change converts
    it there)."""

    def __init__(self, weight: nn.Parameter, device):
        super().__init__()
        if weight.device.type != "cpu" or weight.requires_grad:
            raise ValueError(f"{type(self).__name__} needs a frozen host weight (host_parameter), got "
                             f"{weight.device}{', requires_grad' if weight.requires_grad else ''}")
        self.weight = weight
        self.device = torch.device(device)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, dtype=self.weight.dtype, device=self.device))
        self.device = probe.device
        if probe.dtype != self.weight.dtype:  # in place: a tied head shares this Parameter
            self.weight.data = host_parameter(self.weight.to(probe.dtype)).data
        return self

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, {self.weight.dtype}, in host memory, computes on {self.device}"


class HostEmbedding(_HostModule):
    """nn.Embedding whose table stays in host memory: ids (B, T) on any device -> (B, T, D) on
    `device`. The rows are gathered on the host into pinned memory and copied asynchronously;
    ids on the GPU are first copied back (a sync)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to("cpu")
        rows = torch.empty(ids.shape + (self.weight.shape[1],), dtype=self.weight.dtype,
                           pin_memory=self.device.type == "cuda")  # (B, T, D)
        torch.index_select(self.weight, 0, ids.reshape(-1), out=rows.view(-1, rows.shape[-1]))
        return rows.to(self.device, non_blocking=True)


class HostHead(_HostModule):
    """A bias-free output head (V, D) that stays in host memory: hidden (..., D) -> logits (..., V).

    `weight_slices()` is the streaming primitive (Note [what lives where]); forward uses it to
    compute the logits slice by slice (what generation and plain `model(ids)` calls need)."""

    def __init__(self, weight: nn.Parameter, device, slice_bytes: int = SLICE_BYTES, ring: int = RING):
        super().__init__(weight, device)
        self.slice_bytes, self.ring = slice_bytes, ring
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}

    @property
    def rows_per_slice(self) -> int:
        row_bytes = self.weight.shape[1] * self.weight.element_size()
        return max(1, min(self.weight.shape[0], self.slice_bytes // row_bytes))

    def weight_slices(self):
        """Yields (start, w) for consecutive row slices of the weight, w (rows, D) on `device`.

        On CUDA the copies run ahead of the consumer by `ring` slices on a side stream; a slice
        is valid until the consumer asks for the next one (the buffer is then reused)."""
        weight, rows = self.weight, self.rows_per_slice
        starts = range(0, weight.shape[0], rows)
        if self.device.type != "cuda":
            for start in starts:
                yield start, weight[start:start + rows].to(self.device)
            return
        compute = torch.cuda.current_stream(self.device)
        copier = self._copy_streams.get(self.device)
        if copier is None:
            copier = self._copy_streams[self.device] = torch.cuda.Stream(self.device)
        depth = min(self.ring, len(starts))
        buffers = [torch.empty((rows, weight.shape[1]), dtype=weight.dtype, device=self.device)
                   for _ in range(depth)]
        ready = [torch.cuda.Event() for _ in range(depth)]
        free = [torch.cuda.Event() for _ in range(depth)]

        def issue(j: int):
            start, slot = starts[j], j % depth
            n = min(rows, weight.shape[0] - start)
            with torch.cuda.stream(copier):
                if j >= depth:
                    copier.wait_event(free[slot])  # the consumer is done with this buffer
                buffers[slot][:n].copy_(weight[start:start + n], non_blocking=True)
                ready[slot].record(copier)

        copier.wait_stream(compute)  # the buffers were allocated on the compute stream
        try:
            for j in range(depth):
                issue(j)
            for j, start in enumerate(starts):
                slot = j % depth
                compute.wait_event(ready[slot])
                yield start, buffers[slot][:min(rows, weight.shape[0] - start)]
                free[slot].record(compute)
                if j + depth < len(starts):
                    issue(j + depth)
        finally:
            compute.wait_stream(copier)  # before the buffers go back to the allocator

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        parts = [torch.nn.functional.linear(hidden, w) for _, w in self.weight_slices()]
        return torch.cat(parts, dim=-1)  # (..., V)


def keep_embeddings_on_host(model: nn.Module) -> nn.Module:
    """Move a models.Llama's frozen embeddings and head to host memory, in place (Note [what lives
    where]); a tied head shares the embedding's host tensor. A head that is not a bias-free
    nn.Linear (one stored in 4 bits) stays where it is. Computation stays on the device where the
    model's layers are. Returns the model."""
    embed, head = model.model.embed_tokens, model.lm_head
    if isinstance(embed, HostEmbedding):
        return model
    streamable = isinstance(head, nn.Linear) and head.bias is None
    if embed.weight.requires_grad or (streamable and head.weight.requires_grad):
        raise ValueError("keep_embeddings_on_host: the embeddings and the head must be frozen "
                         "(requires_grad=False); lora.wrap freezes them")
    device = model.model.norm.weight.device
    table = host_parameter(embed.weight)
    model.model.embed_tokens = HostEmbedding(table, device)
    if streamable:
        model.lm_head = HostHead(table if head.weight is embed.weight else host_parameter(head.weight), device)
    return model


class _Offloaded:
    """One saved tensor in host memory, and the GPU copy a prefetch brings back."""

    def __init__(self, host: torch.Tensor, tensor: torch.Tensor, index: int, forward_pass: int):
        self.host, self.shape, self.device, self.index = host, tensor.shape, tensor.device, index
        self.source = weakref.ref(tensor)  # dead once the GPU tensor is freed
        self.forward_pass = forward_pass  # which pass wrote `host` (CheckpointOffload._passes)
        self.back: torch.Tensor | None = None  # the prefetched GPU copy
        self.ready: torch.cuda.Event | None = None
        self.unpacked = False  # read back at least once


class CheckpointOffload:
    """Saved-tensor hooks that keep gradient checkpointing's layer inputs in host memory.

    LlamaModel runs its checkpointed layers inside `hooks()` when `model.model.checkpoint_offload`
    is set. Each saved CUDA tensor of at least `min_bytes` goes to a pinned host buffer (the k-th
    of the pass reuses the k-th buffer: they only grow, so a captured CUDA graph's addresses stay
    valid), is released on the GPU once its copy is done, and comes back one tensor ahead of the
    backward pass, which reads them in reverse order. Tensors saved twice are copied once.
    A pass's backward must run before the next forward pass, which reuses the buffers: the
    backward of an older pass raises an error instead of reading the newer pass's tensors.
    """

    def __init__(self, min_bytes: int = 1 << 20):
        self.min_bytes = min_bytes
        self._buffers: list[torch.Tensor] = []  # pinned flat byte buffers, by position in the pass
        self._retired: list[torch.Tensor] = []  # outgrown buffers: a captured graph may still use them
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._saved: list[_Offloaded] = []
        self._by_key: dict[tuple, _Offloaded] = {}
        self._pending: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        self._passes = 0  # forward passes started

    def reset(self) -> None:
        """Drop the host buffers (after the graphs that used them are gone)."""
        self._buffers.clear()
        self._retired.clear()

    def _stream(self, device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _host_buffer(self, index: int, nbytes: int) -> torch.Tensor:
        if index == len(self._buffers):
            self._buffers.append(torch.empty(0, dtype=torch.uint8))
        if self._buffers[index].numel() < nbytes:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("CheckpointOffload: a larger host buffer is needed during a CUDA graph "
                                   "capture; run the shape eagerly once first")
            self._retired.append(self._buffers[index])  # doubling: the retired ones add up to < the live
            size = max(nbytes, 2 * self._buffers[index].numel())
            self._buffers[index] = _pinned(size, torch.uint8)
        return self._buffers[index][:nbytes]

    def _release_copied(self, compute) -> None:
        """Let the GPU tensors whose copies are done go (the compute stream waits for the copies)."""
        for _, done in self._pending:
            compute.wait_event(done)
        self._pending.clear()

    def _pack(self, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device.type != "cuda" or nbytes < self.min_bytes or not tensor.is_contiguous():
            return tensor
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype, tensor._version)
        known = self._by_key.get(key)
        if known is not None and known.source() is tensor:  # the same tensor saved again (cos, sin)
            return known
        # (A tensor at the address of one offloaded and freed earlier in the pass is a new tensor.)
        compute = torch.cuda.current_stream(tensor.device)
        self._release_copied(compute)
        index = len(self._saved)
        host = self._host_buffer(index, nbytes).view(tensor.dtype).view(tensor.shape)
        copier = self._stream(tensor.device)
        copier.wait_stream(compute)
        with torch.cuda.stream(copier):
            host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(copier)
        self._pending.append((tensor, done))  # keeps the GPU tensor alive until the copy is done
        saved = self._by_key[key] = _Offloaded(host, tensor, index, self._passes)
        self._saved.append(saved)
        return saved

    def _prefetch(self, saved: _Offloaded) -> None:
        compute = torch.cuda.current_stream(saved.device)
        back = torch.empty(saved.shape, dtype=saved.host.dtype, device=saved.device)
        copier = self._stream(saved.device)
        copier.wait_stream(compute)
        with torch.cuda.stream(copier):
            back.copy_(saved.host, non_blocking=True)
            saved.ready = torch.cuda.Event()
            saved.ready.record(copier)
        saved.back = back

    def _unpack(self, saved):
        if not isinstance(saved, _Offloaded):
            return saved
        if saved.forward_pass != self._passes:
            raise RuntimeError("CheckpointOffload: this backward pass belongs to an earlier forward pass, "
                               "whose offloaded tensors a newer forward pass has overwritten; run each "
                               "backward before the next forward pass (or set checkpoint_offload = None)")
        compute = torch.cuda.current_stream(saved.device)
        self._release_copied(compute)
        if saved.back is None:
            self._prefetch(saved)
        compute.wait_event(saved.ready)
        tensor, saved.back = saved.back, None
        saved.unpacked = True
        earlier = self._saved[saved.index - 1] if saved.index > 0 else None
        if earlier is not None and not earlier.unpacked and earlier.back is None:
            # The backward pass reads them in reverse. Only a tensor not read yet: every prefetch
            # must be waited on (a CUDA graph capture refuses a side stream's unjoined copy).
            self._prefetch(earlier)
        return tensor

    def hooks(self):
        """The saved_tensors_hooks context for one forward pass (it starts a new pass)."""
        self._saved, self._by_key = [], {}
        self._passes += 1
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def finish_forward(self) -> None:
        """After the last pack of a pass: the compute stream waits for the outstanding copies."""
        if self._pending:
            self._release_copied(torch.cuda.current_stream(self._pending[0][0].device))

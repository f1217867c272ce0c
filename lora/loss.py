"""Next-token cross-entropy from hidden states, so that (tokens, vocab) logits never all exist.

    loss_sum = sum over trained positions t of  -log softmax(h_t W_head^T)[label_{t+1}]

With a 128k vocabulary, full fp32 logits for 8k tokens take 4 GiB, and their gradient as much
again. Two ways around that, the same sum as the plain formula either way:

- One pass over the vocabulary (a frozen, bias-free head: the usual case). See
  Note [one pass over the head]: the loss and its gradient come out of a single read of the
  head, in slices of rows, so the backward pass needs neither the head nor any logits.
- Chunks of positions (any other head, e.g. one with LoRA on it): the head and the loss run over
  CHUNK positions at a time inside torch.utils.checkpoint; the backward pass recomputes each
  chunk's logits, so the peak is one chunk of logits (about CHUNK * 1.5 MiB at a 128k vocabulary).

Note [one pass over the head]
    For one position with hidden state h, label y and logits z = W h (W: (V, D)),
        loss = logsumexp(z) - z_y,        d loss / d h = sum_v softmax(z)_v W_v - W_y.
    Both are sums over the vocabulary, so they can run over row slices W_j of the head with a
    running maximum m, as in flash attention: for each slice, z_j = W_j h and
        m' = max(m, max z_j),   Z <- Z e^(m - m') + sum e^(z_j - m'),
        S <- S e^(m - m') + e^(z_j - m')^T W_j              (S: (D,), the unnormalised gradient)
    and at the end loss = m + log Z - z_y, d loss / d h = S / Z - W_y (z_y and W_y are picked
    from the slice that holds y). The forward pass stores d loss / d h ((n, D), the size of the
    hidden states) and the backward pass scales it by the incoming gradient. The head is read
    once per step, not three times (logits, their recomputation, the gradient), which is what
    lets models/offload.py keep it in host memory and stream it (`head.weight_slices()`).
    Precision: logits in the compute dtype (bf16 under autocast, as `head(h)` gives them), the
    softmax, Z, S and the loss in float32, e^(z_j - m') rounded to the compute dtype for the
    S product.

By default only trained positions (label != IGNORE) go through the head. `select_trained=False`
runs every position and lets cross_entropy's ignore_index drop the rest: a little more work, but
shapes that do not depend on the labels and no host sync, which a captured CUDA graph needs
(lora/graphs.py).
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data import IGNORE

__all__ = ["causal_lm_loss_sum", "reference_loss_sum", "loss_sum", "is_packed", "embed", "CHUNK", "SLICE_ROWS",
           "TILE"]

# Positions per chunk of the head and loss (a module setting; benchmarks/train.py --loss-chunks).
# Measured at Llama-3.1-8B, seq 2048, H100 with CUDA graphs: 256 -> 6.9 GiB peak, 1024 -> 7.8 GiB,
# the same tokens/s (benchmarks/RESULTS.md).
CHUNK = 256
# The one-pass loss reads a device-resident head SLICE_ROWS rows at a time (a head in host memory
# sets its own slices), and holds at most TILE logits (tokens x rows of a slice) at once.
SLICE_ROWS = 4096
TILE = 1 << 24


def _one_pass_head(head) -> bool:
    """Whether Note [one pass over the head] applies: a frozen head without a bias, either streamed
    (`weight_slices()`, models.offload.HostHead) or a plain nn.Linear."""
    if hasattr(head, "weight_slices"):
        return True
    return (isinstance(head, torch.nn.Linear) and head.bias is None and not head.weight.requires_grad)


def _weight_slices(head):
    if hasattr(head, "weight_slices"):
        yield from head.weight_slices()
        return
    for start in range(0, head.weight.shape[0], SLICE_ROWS):
        yield start, head.weight[start:start + SLICE_ROWS]


def _one_pass_loss(h: torch.Tensor, y: torch.Tensor, head, need_grad: bool):
    """(loss sum, d loss / d h or None) for h (n, D), labels y (n,). Note [one pass over the head]."""
    n, D = h.shape
    device = h.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    trained = y != IGNORE  # (n,)
    m = torch.full((n,), float("-inf"), device=device)  # running max of the logits
    Z = torch.zeros(n, device=device)  # running sum of e^(z - m)
    z_y = torch.zeros(n, device=device)
    S = torch.zeros(n, D, device=device) if need_grad else None  # running sum of e^(z - m) W
    w_y = None
    with torch.autocast(device.type, enabled=False):
        for start, w in _weight_slices(head):
            w = w.to(dtype or w.dtype)  # (rows, D)
            rows = w.shape[0]
            if w_y is None:
                hc = h.to(w.dtype)
                w_y = torch.zeros(n, D, dtype=w.dtype, device=device) if need_grad else None
            local = y - start
            inside = (local >= 0) & (local < rows)  # (n,): this slice holds the label
            local = local.clamp(0, rows - 1)
            tile = max(1, TILE // rows)
            for t0 in range(0, n, tile):
                part = slice(t0, t0 + tile)
                z = (hc[part] @ w.T).float()  # (nt, rows)
                m_new = torch.maximum(m[part], z.amax(dim=1))
                rescale = torch.exp(m[part] - m_new)  # (nt,)
                p = torch.exp(z - m_new[:, None])  # (nt, rows)
                Z[part] = Z[part] * rescale + p.sum(dim=1)
                z_y[part] = torch.where(inside[part], z.gather(1, local[part, None])[:, 0], z_y[part])
                m[part] = m_new
                if need_grad:
                    S[part] = S[part] * rescale[:, None] + (p.to(w.dtype) @ w).float()
                    w_y[part] = torch.where(inside[part, None], w[local[part]], w_y[part])
        loss = torch.where(trained, m + torch.log(Z) - z_y, 0.0).sum()
        if not need_grad:
            return loss, None
        grad = torch.where(trained[:, None], S / Z[:, None] - w_y.float(), 0.0)  # (n, D)
    return loss, grad.to(h.dtype)


class _OnePassCrossEntropy(torch.autograd.Function):
    """loss_sum of Note [one pass over the head]; its gradient was computed in the forward pass."""

    @staticmethod
    def forward(ctx, h, y, head):
        loss, grad = _one_pass_loss(h, y, head, need_grad=ctx.needs_input_grad[0])
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None


def _chunk_loss(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (n, vocab)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


def causal_lm_loss_sum(hidden: torch.Tensor, head, labels: torch.Tensor, chunk: int | None = None,
                       select_trained: bool = True) -> torch.Tensor:
    """Summed loss of predicting labels[:, t+1] from hidden[:, t]. hidden (B, T, D), labels (B, T).

    `head` maps (n, D) hidden states to (n, vocab) logits (the model's lm_head module). A frozen,
    bias-free head takes one pass over the vocabulary; any other runs in chunks of `chunk`
    positions (default CHUNK). See the module's docstring."""
    chunk = chunk or CHUNK
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), D)
    y = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    if select_trained:
        keep = y != IGNORE
        h, y = h[keep], y[keep]  # only trained positions pay for the head
    if _one_pass_head(head):
        return _OnePassCrossEntropy.apply(h, y, head)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk):
        part = slice(start, start + chunk)
        if torch.is_grad_enabled():  # the chunk is deterministic: no RNG state to keep
            total = total + checkpoint(_chunk_loss, head, h[part], y[part], use_reentrant=False,
                                       preserve_rng_state=False)
        else:
            total = total + _chunk_loss(head, h[part], y[part])
    return total


def reference_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain formula on full logits (B, T, vocab): what causal_lm_loss_sum must equal."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE, reduction="sum",
    )


def is_packed(batch) -> bool:
    """Whether a batch needs an attention mask: several documents in a row, or padding
    (document id -1). Rows that each hold one unpadded document keep SDPA's causal path."""
    return bool((batch.document_ids != 0).any())


def embed(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The (B, T, D) input embeddings of a models.Llama-like `model`, looked up where the table is:
    on the host for an embedding kept in host memory (models/offload.py), so its ids never have to
    come back from the GPU."""
    table = model.model.embed_tokens
    return table(input_ids.to(table.weight.device))


def loss_sum(model, batch, device: torch.device, autocast, packed: bool | None = None,
             select_trained: bool = True, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token loss of one lora.data.Batch through a models.Llama-like `model` (its
    `.model` decoder stack and `.lm_head`), under the context manager `autocast`. `packed` is
    is_packed(batch) unless given (computing it reads the ids on the host). `inputs_embeds`
    (B, T, D), when given, are the batch's embeddings (lora/graphs.py looks them up outside its
    graphs)."""
    if packed is None:
        packed = is_packed(batch)
    if inputs_embeds is None:
        inputs_embeds = embed(model, batch.input_ids)
    batch = batch.to(device)
    with autocast:
        hidden = model.model(inputs_embeds=inputs_embeds, position_ids=batch.position_ids,
                             document_ids=batch.document_ids if packed else None)  # (B, T, D)
        return causal_lm_loss_sum(hidden, model.lm_head, batch.labels, select_trained=select_trained)

"""Next-token cross-entropy from hidden states, in chunks, so (tokens, vocab) logits never all exist.

    loss_sum = sum over trained positions t of  -log softmax(h_t W_head^T)[label_{t+1}]

With a 128k vocabulary, full fp32 logits for 8k tokens take 4 GiB, and their gradient as much
again. Here the head and the loss run over `chunk` positions at a time inside
torch.utils.checkpoint: the backward pass recomputes each chunk's logits instead of storing them,
so the peak is one chunk of logits. The result is the same sum as the plain formula.
CHUNK (positions per chunk) trades memory for speed: at a 128k vocabulary each chunk holds about
CHUNK * 1.5 MiB of logits and their gradient at its peak.

By default only trained positions (label != IGNORE) go through the head. `select_trained=False`
runs every position and lets cross_entropy's ignore_index drop the rest: a little more work, but
shapes that do not depend on the labels and no host sync, which a captured CUDA graph needs
(lora/graphs.py).
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data import IGNORE

__all__ = ["causal_lm_loss_sum", "reference_loss_sum", "loss_sum", "is_packed", "CHUNK"]

# Positions per chunk of the head and loss (a module setting; benchmarks/train.py --loss-chunks).
# Measured at Llama-3.1-8B, seq 2048, H100 with CUDA graphs: 256 -> 6.9 GiB peak, 1024 -> 7.8 GiB,
# the same tokens/s (benchmarks/RESULTS.md).
CHUNK = 256


def _chunk_loss(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (n, vocab)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


def causal_lm_loss_sum(hidden: torch.Tensor, head, labels: torch.Tensor, chunk: int | None = None,
                       select_trained: bool = True) -> torch.Tensor:
    """Summed loss of predicting labels[:, t+1] from hidden[:, t]. hidden (B, T, D), labels (B, T).

    `head` maps (n, D) hidden states to (n, vocab) logits (the model's lm_head module); `chunk`
    defaults to CHUNK."""
    chunk = chunk or CHUNK
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), D)
    y = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    if select_trained:
        keep = y != IGNORE
        h, y = h[keep], y[keep]  # only trained positions pay for the head
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


def loss_sum(model, batch, device: torch.device, autocast, packed: bool | None = None,
             select_trained: bool = True) -> torch.Tensor:
    """Summed next-token loss of one lora.data.Batch through a models.Llama-like `model` (its
    `.model` decoder stack and `.lm_head`), under the context manager `autocast`. `packed` is
    is_packed(batch) unless given (computing it reads the ids on the host)."""
    if packed is None:
        packed = is_packed(batch)
    batch = batch.to(device)
    with autocast:
        hidden = model.model(batch.input_ids, position_ids=batch.position_ids,
                             document_ids=batch.document_ids if packed else None)  # (B, T, D)
        return causal_lm_loss_sum(hidden, model.lm_head, batch.labels, select_trained=select_trained)

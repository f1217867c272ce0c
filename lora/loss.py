"""Next-token cross-entropy from hidden states, in chunks, so (tokens, vocab) logits never all exist.

    loss_sum = sum over trained positions t of  -log softmax(h_t W_head^T)[label_{t+1}]

With a 128k vocabulary, full fp32 logits for 8k tokens take 4 GiB, and their gradient as much
again. Here the head and the loss run over `chunk` positions at a time inside
torch.utils.checkpoint: the backward pass recomputes each chunk's logits instead of storing them,
so the peak is one chunk of logits. The result is the same sum as the plain formula.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data import IGNORE

__all__ = ["causal_lm_loss_sum", "reference_loss_sum"]


def _chunk_loss(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (n, vocab)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


def causal_lm_loss_sum(hidden: torch.Tensor, head, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Summed loss of predicting labels[:, t+1] from hidden[:, t]. hidden (B, T, D), labels (B, T).

    `head` maps (n, D) hidden states to (n, vocab) logits (the model's lm_head module)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), D)
    y = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    keep = y != IGNORE
    h, y = h[keep], y[keep]  # only trained positions pay for the head
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk):
        part = slice(start, start + chunk)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, h[part], y[part], use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h[part], y[part])
    return total


def reference_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain formula on full logits (B, T, vocab): what causal_lm_loss_sum must equal."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE, reduction="sum",
    )

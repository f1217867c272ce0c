"""lora.loss: the chunked, checkpointed next-token loss equals the plain formula on full logits,
with only trained positions through the head or all of them (the CUDA-graph form), in value and
in gradient; is_packed tells which batches need an attention mask."""
import pytest
import torch
import torch.nn as nn

from lora.data import IGNORE, Batch
from lora.loss import causal_lm_loss_sum, is_packed, reference_loss_sum


def _problem(B=3, T=37, D=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(D, vocab, bias=False).double()
    labels = torch.randint(0, vocab, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.4] = IGNORE  # masked prompts and padding
    return hidden, head, labels


@pytest.mark.parametrize("select_trained", [True, False])
@pytest.mark.parametrize("chunk", [1, 16, 1024])
def test_chunked_loss_equals_the_plain_formula_in_value_and_gradient(select_trained, chunk):
    hidden, head, labels = _problem()
    loss = causal_lm_loss_sum(hidden, head, labels, chunk=chunk, select_trained=select_trained)
    grads = torch.autograd.grad(loss, (hidden, head.weight))
    expected = reference_loss_sum(head(hidden), labels)
    expected_grads = torch.autograd.grad(expected, (hidden, head.weight))
    torch.testing.assert_close(loss, expected.float(), rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_batch_with_no_trained_token_has_zero_loss():
    hidden, head, labels = _problem()
    labels.fill_(IGNORE)
    for select in (True, False):
        assert causal_lm_loss_sum(hidden, head, labels, select_trained=select).item() == 0.0


def test_is_packed_means_several_documents_or_padding():
    ids = torch.zeros(2, 6, dtype=torch.long)
    one_document = Batch(ids, ids, ids, torch.zeros(2, 6, dtype=torch.long))
    padded = Batch(ids, ids, ids, torch.tensor([[0] * 6, [0] * 4 + [-1] * 2]))
    two_documents = Batch(ids, ids, ids, torch.tensor([[0] * 3 + [1] * 3, [0] * 6]))
    assert not is_packed(one_document)
    assert is_packed(padded) and is_packed(two_documents)

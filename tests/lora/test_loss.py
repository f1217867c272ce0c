"""lora.loss: both forms of the next-token loss (one pass over a frozen head's rows, and chunks of
positions for a head that trains) equal the plain formula on full logits, with only trained
positions through the head or all of them (the CUDA-graph form), in value and in gradient;
is_packed tells which batches need an attention mask."""
import copy

import pytest
import torch
import torch.nn as nn

from lora.data import IGNORE, Batch
import lora.loss
from lora.loss import causal_lm_loss_sum, is_packed, reference_loss_sum


def _problem(B=3, T=37, D=16, vocab=50, seed=0, frozen=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(D, vocab, bias=False).double().requires_grad_(not frozen)
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


@pytest.mark.parametrize("select_trained", [True, False])
@pytest.mark.parametrize("slice_rows, tile", [(1, 1), (7, 20), (16, 1 << 24), (4096, 1 << 24)])
def test_one_pass_loss_equals_the_plain_formula_in_value_and_gradient(monkeypatch, select_trained, slice_rows,
                                                                      tile):
    """A frozen head: row slices of 1 (every slice a new running maximum), 7 (a ragged last slice,
    token tiles of 2), 16, and all 50 rows at once."""
    monkeypatch.setattr(lora.loss, "SLICE_ROWS", slice_rows)
    monkeypatch.setattr(lora.loss, "TILE", tile)
    hidden, head, labels = _problem(vocab=50, frozen=True)
    hidden.data.mul_(8)  # logits of tens: the running maximum matters
    loss = causal_lm_loss_sum(hidden, head, labels, select_trained=select_trained)
    (grad,) = torch.autograd.grad(loss * 0.25, hidden)
    expected = reference_loss_sum(head(hidden), labels)
    (expected_grad,) = torch.autograd.grad(expected * 0.25, hidden)
    assert loss.dtype == torch.float32  # its accumulators are float32
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_one_pass_loss_without_gradients_gives_the_same_value():
    hidden, head, labels = _problem(frozen=True)
    with torch.no_grad():
        value = causal_lm_loss_sum(hidden, head, labels)
    torch.testing.assert_close(value, reference_loss_sum(head(hidden), labels).float().detach(),
                               rtol=1e-5, atol=1e-5)


def test_one_pass_loss_in_bfloat16_is_closer_to_float64_than_the_plain_bfloat16_formula():
    hidden, head, labels = _problem(B=2, T=65, D=64, vocab=300, frozen=True)
    head16 = copy.deepcopy(head).bfloat16()
    loss = causal_lm_loss_sum(hidden.bfloat16(), head16, labels)
    (grad,) = torch.autograd.grad(loss, hidden)
    expected = reference_loss_sum(head(hidden), labels)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    hidden16 = hidden.detach().bfloat16().requires_grad_()
    (plain_grad,) = torch.autograd.grad(reference_loss_sum(head16(hidden16), labels), hidden16)
    torch.testing.assert_close(loss.double(), expected.detach().double(), rtol=1e-4, atol=0)
    error, plain_error = ((g.double() - expected_grad).abs().max() for g in (grad, plain_grad))
    assert error < 0.01 * expected_grad.abs().max() and error <= plain_error


def test_a_head_that_trains_or_has_a_bias_takes_the_chunked_form(monkeypatch):
    calls = []
    monkeypatch.setattr(lora.loss, "_one_pass_loss", lambda *a, **k: calls.append(1))
    hidden, head, labels = _problem()  # head.weight requires grad
    causal_lm_loss_sum(hidden, head, labels)
    biased = nn.Linear(16, 50).double().requires_grad_(False)
    causal_lm_loss_sum(hidden, biased, labels)
    assert calls == []


def test_a_batch_with_no_trained_token_has_zero_loss():
    for frozen in (False, True):
        hidden, head, labels = _problem(frozen=frozen)
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

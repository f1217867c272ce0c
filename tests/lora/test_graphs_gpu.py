"""lora.graphs on CUDA: training steps replayed from CUDA graphs equal eager ones (NF4 base, LoRA,
gradient checkpointing, packing, accumulation), a new batch shape gets its own graph, gradients set
to None in between are re-attached, and dropout trains under replay."""
import pytest
import torch

import lora
import lora.optim
import quant
from lora.data import IGNORE, Batch
from lora.graphs import StepGraphs
from lora.train import training_step
from models.llama import Llama, LlamaConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = torch.device("cuda")


def _model(dropout=0.0, seed=0):
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(seed)
    model = Llama(cfg).to(DEVICE, torch.bfloat16)
    quant.quantize(model, compute_dtype=torch.bfloat16)
    lora.wrap(model, r=8, alpha=16, dropout=dropout, init="gaussian")
    model.gradient_checkpointing = True
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, lora.optim.AdamW(params, lr=1e-3)


def _batch(B, T, seed, packed=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (B, T), generator=g)
    labels = ids.clone()
    labels[:, : T // 4] = IGNORE  # a masked prompt
    documents = torch.zeros(B, T, dtype=torch.long)
    positions = torch.arange(T).expand(B, T).clone()
    if packed:  # two documents per row, then padding
        cut, end = T // 2, T - 5
        documents[:, cut:end], documents[:, end:] = 1, -1
        positions[:, cut:] = torch.arange(T - cut)
        labels[:, end:] = IGNORE
    return Batch(ids, labels, positions, documents)


def _autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16)


def _train(steps, graphs_on, set_to_none=False, packed=False, accum=1):
    model, params, optimizer = _model()
    graphs = StepGraphs(model, optimizer, torch.bfloat16) if graphs_on else None
    losses = []
    for step in range(steps):
        batches = [_batch(2, 96, seed=step * accum + i, packed=packed) for i in range(accum)]
        metrics = training_step(model, params, optimizer, batches, 1e-3, 1.0, DEVICE, _autocast, graphs)
        losses.append(metrics["loss"])
        if set_to_none:
            optimizer.zero_grad(set_to_none=True)
    return losses, [p.detach().float().clone() for p in params], graphs


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("accum", [1, 2])
def test_replayed_steps_equal_eager_steps(packed, accum):
    eager, eager_params, _ = _train(5, graphs_on=False, packed=packed, accum=accum)
    graphed, graphed_params, graphs = _train(5, graphs_on=True, packed=packed, accum=accum)
    assert graphs.enabled and graphs.captures == 1 and graphs.eager_runs == 1
    assert graphs.replays == 5 * accum - 1
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=2e-2, atol=0)
    for got, want in zip(graphed_params, eager_params):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3)


def test_gradients_set_to_none_between_steps_are_reattached():
    eager, eager_params, _ = _train(4, graphs_on=False, set_to_none=True)
    graphed, graphed_params, graphs = _train(4, graphs_on=True, set_to_none=True)
    assert graphs.replays == 3
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=2e-2, atol=0)
    for got, want in zip(graphed_params, eager_params):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3)


def test_each_batch_shape_gets_its_own_graph_and_the_limit_holds():
    model, params, optimizer = _model()
    graphs = StepGraphs(model, optimizer, torch.bfloat16, max_graphs=2)
    for T in (64, 128, 64, 128, 192, 192, 64):
        training_step(model, params, optimizer, [_batch(2, T, seed=T)], 1e-3, 1.0, DEVICE, _autocast, graphs)
    assert graphs.captures == 2  # 64 and 128; 192 is past the limit and stays eager
    assert graphs.eager_runs == 4 and graphs.replays == 3


def test_dropout_trains_under_replay():
    model, params, optimizer = _model(dropout=0.1)
    graphs = StepGraphs(model, optimizer, torch.bfloat16)
    batch = _batch(2, 96, seed=0)
    losses = [training_step(model, params, optimizer, [batch], 3e-3, 1.0, DEVICE, _autocast, graphs)["loss"]
              for _ in range(12)]
    assert graphs.enabled and graphs.captures == 1
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses



def test_the_recomputation_sees_the_forward_dropout_masks_under_replay():
    """Gradient checkpointing rewinds the CUDA generator for the recomputation inside the graph: a
    checkpointed replay and a plain one, from the same seed, give the same loss and gradients."""
    results = []
    for checkpointing in (True, False):
        model, params, optimizer = _model(dropout=0.2)
        model.gradient_checkpointing = checkpointing
        graphs = StepGraphs(model, optimizer, torch.bfloat16)
        batch = _batch(2, 96, seed=0)
        for _ in range(3):  # eager, then captured and replayed, then replayed
            optimizer.zero_grad()
            torch.cuda.manual_seed(123)
            loss = graphs.forward_backward(batch, 1e-3)
        assert graphs.replays == 2
        results.append((loss.item(), [p.grad.float().clone() for p in params]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-3)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-5)

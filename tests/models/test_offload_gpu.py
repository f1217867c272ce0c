"""models/offload.py on CUDA: the streamed head and the host embedding equal the resident modules,
also inside a CUDA graph; checkpoint offloading changes no loss or gradient, eagerly or replayed
from CUDA graphs (lora/graphs.py), and takes the checkpointed inputs off the GPU."""
import copy

import pytest
import torch

import lora
import lora.optim
import models
import quant
from lora.data import IGNORE, Batch
from lora.graphs import StepGraphs
from lora.train import training_step
from models.llama import Llama, LlamaConfig
from models.offload import CheckpointOffload, HostEmbedding, HostHead, host_parameter

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = torch.device("cuda")


def test_streamed_head_equals_the_plain_product_eagerly_and_in_a_graph():
    weight = torch.randn(1000, 64, dtype=torch.bfloat16)
    head = HostHead(host_parameter(weight), DEVICE, slice_bytes=64 * 64 * 2, ring=3)  # 16 slices, 3 buffers
    assert head.weight.is_pinned()
    hidden = torch.randn(37, 64, dtype=torch.bfloat16, device=DEVICE)
    expected = hidden @ weight.to(DEVICE).T
    torch.testing.assert_close(head(hidden), expected, rtol=0, atol=0)
    static = hidden.clone()
    head(static)  # warm-up on a side stream is not needed: nothing lazy is left
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = head(static)
    for _ in range(3):
        new = torch.randn_like(hidden)
        static.copy_(new)
        graph.replay()
        torch.testing.assert_close(out, new @ weight.to(DEVICE).T, rtol=0, atol=0)


def test_host_embedding_equals_the_table_on_the_gpu():
    table = torch.randn(300, 48, dtype=torch.bfloat16)
    embedding = HostEmbedding(host_parameter(table), DEVICE)
    ids = torch.randint(0, 300, (3, 17))
    for where in ("cpu", "cuda"):
        got = embedding(ids.to(where))
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), table[ids], rtol=0, atol=0)


def _model(offload_min_bytes=None):
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = Llama(cfg).to(DEVICE, torch.bfloat16)
    quant.quantize(model, compute_dtype=torch.bfloat16)
    lora.wrap(model, r=8, alpha=16, init="gaussian")
    model.gradient_checkpointing = True
    if offload_min_bytes is not None:
        models.keep_embeddings_on_host(model)
        model.model.checkpoint_offload = CheckpointOffload(min_bytes=offload_min_bytes)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, lora.optim.AdamW(params, lr=1e-3)


def _batch(step):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 512, (2, 96), generator=g)
    labels = ids.clone()
    labels[:, :20] = IGNORE
    return Batch(ids, labels, torch.arange(96).expand(2, 96).clone(), torch.zeros(2, 96, dtype=torch.long))


def _train(steps, offload_min_bytes, graphs_on):
    model, params, optimizer = _model(offload_min_bytes)
    graphs = StepGraphs(model, optimizer, torch.bfloat16) if graphs_on else None
    losses = []
    for step in range(steps):
        metrics = training_step(model, params, optimizer, [_batch(step)], 1e-3, 1.0, DEVICE,
                                lambda: torch.autocast("cuda", dtype=torch.bfloat16), graphs)
        losses.append(metrics["loss"])
    return losses, [p.detach().float().clone() for p in params], graphs


@pytest.mark.parametrize("graphs_on", [False, True])
def test_offloaded_training_equals_resident_training(graphs_on):
    """min_bytes=0 offloads every checkpointed tensor (the layer inputs, cos and sin)."""
    resident, resident_params, _ = _train(4, None, graphs_on=False)
    offloaded, offloaded_params, graphs = _train(4, 0, graphs_on=graphs_on)
    if graphs_on:
        assert graphs.enabled and graphs.replays == 3
    torch.testing.assert_close(torch.tensor(offloaded), torch.tensor(resident), rtol=1e-2, atol=0)
    for got, want in zip(offloaded_params, resident_params):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3)


def test_offloaded_gradients_equal_resident_ones_exactly_in_a_deep_model():
    """12 layers: the GPU memory of an offloaded layer input is reused for later ones, so a tensor
    at the address of an earlier one must not be taken for it (offloading is a copy: the
    gradients are equal bit for bit)."""
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=12,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = Llama(cfg).to(DEVICE, torch.bfloat16)
    lora.wrap(model, r=8, alpha=16, init="gaussian")
    model.gradient_checkpointing = True
    ids = _batch(0).input_ids.repeat(2, 1).to(DEVICE)
    grads = []
    for offload in (None, CheckpointOffload(min_bytes=0)):
        model.model.checkpoint_offload = offload
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(ids).float().logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for got, want in zip(grads[1], grads[0]):
        assert torch.equal(got, want)


def test_checkpointed_inputs_leave_the_gpu():
    model, _, _ = _model()
    hosted = copy.deepcopy(model)
    hosted.model.checkpoint_offload = CheckpointOffload(min_bytes=0)
    big = _batch(0)
    big = Batch(*(t.repeat(8, 4) for t in (big.input_ids, big.labels)),
                torch.arange(384).expand(16, 384).clone(), torch.zeros(16, 384, dtype=torch.long))
    kept = []
    for m in (model, hosted):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = m.model(big.input_ids.to(DEVICE))  # the forward pass only: what it keeps
        torch.cuda.synchronize()
        kept.append(torch.cuda.memory_allocated() - before)
        del hidden
    layer_input = 16 * 384 * 256 * 2
    assert kept[0] - kept[1] >= 2 * layer_input  # 3 layer inputs kept on the GPU against ~none


def test_a_backward_after_a_newer_forward_pass_is_refused():
    model, _, _ = _model(offload_min_bytes=0)
    ids = _batch(0).input_ids.to(DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        first = model.model(ids).float().square().mean()
        second = model.model(ids).float().square().mean()
    second.backward()  # the newest pass: fine
    with pytest.raises(RuntimeError, match="belongs to an earlier forward pass"):
        first.backward()

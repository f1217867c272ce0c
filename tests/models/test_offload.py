"""models/offload.py on the CPU: a model whose embeddings and head are kept in host memory computes
what the plain model computes (logits, the training loss and its gradients, generation), keeps
its state-dict keys, stays on the host through `model.to()`, and shares one table when tied.
CheckpointOffload leaves CPU tensors alone. The CUDA paths (streaming, pinned copies, CUDA
graphs) are in test_offload_gpu.py."""
import copy

import pytest
import torch

import lora
import models
from lora.data import Batch
from lora.loss import loss_sum
from models.llama import Llama, LlamaConfig
from models.offload import HostEmbedding, HostHead, host_parameter


def small_model(tied: bool, frozen: bool = False) -> Llama:
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied)
    return Llama(cfg).requires_grad_(not frozen)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_and_state_dict_are_unchanged(tied):
    model = small_model(tied, frozen=True).eval()
    ids = torch.randint(0, 97, (2, 11))
    expected = model(ids)
    keys = set(model.state_dict())
    hosted = models.keep_embeddings_on_host(copy.deepcopy(model))
    assert isinstance(hosted.model.embed_tokens, HostEmbedding) and isinstance(hosted.lm_head, HostHead)
    assert (hosted.lm_head.weight is hosted.model.embed_tokens.weight) == tied
    torch.testing.assert_close(hosted(ids), expected, rtol=0, atol=1e-6)
    assert set(hosted.state_dict()) == keys
    torch.testing.assert_close(hosted.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])


def test_the_head_streams_every_row_once_in_order():
    weight = torch.randn(1000, 8)
    head = HostHead(host_parameter(weight), "cpu", slice_bytes=300 * 8 * 4)
    slices = list(head.weight_slices())
    assert [start for start, _ in slices] == [0, 300, 600, 900]
    torch.testing.assert_close(torch.cat([w for _, w in slices]), weight, rtol=0, atol=0)
    hidden = torch.randn(3, 5, 8)
    torch.testing.assert_close(head(hidden), hidden @ weight.T)


def test_host_modules_refuse_a_weight_that_trains_or_is_not_on_the_host():
    with pytest.raises(ValueError, match="frozen host weight"):
        HostEmbedding(torch.nn.Parameter(torch.zeros(3, 2)), "cpu")
    model = small_model(False)
    with pytest.raises(ValueError, match="must be frozen"):
        models.keep_embeddings_on_host(model)  # nothing frozen yet


def test_model_to_moves_the_computation_not_the_table():
    model = models.keep_embeddings_on_host(small_model(True, frozen=True))
    ids = torch.randint(0, 97, (2, 5))
    expected = model(ids).double()
    model.to(torch.float64)
    assert model.model.embed_tokens.weight.dtype == torch.float64  # converted, on the host
    assert model.model.embed_tokens.weight.device.type == "cpu"
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert model.model.norm.weight.dtype == torch.float64
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_lora_training_loss_gradients_and_generation_are_unchanged(tied):
    model = small_model(tied)
    lora.wrap(model, r=4)
    for layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer[1].lora_B.weight, std=0.1)
    model.gradient_checkpointing = True
    model.model.checkpoint_offload = models.CheckpointOffload()  # CPU tensors: nothing to offload
    hosted = models.keep_embeddings_on_host(copy.deepcopy(model))
    ids = torch.randint(0, 97, (2, 13))
    batch = Batch(ids, ids.clone(), torch.arange(13).expand(2, 13), torch.zeros(2, 13, dtype=torch.long))
    results = []
    for m in (model, hosted):
        loss = loss_sum(m, batch, torch.device("cpu"), torch.autocast("cpu", enabled=False))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in m.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    prompt = ids[0, :5].tolist()
    assert models.generate_ids(hosted, prompt, max_new_tokens=8) == models.generate_ids(model, prompt,
                                                                                           max_new_tokens=8)

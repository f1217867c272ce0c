"""The trainer on CUDA: the same run with and without CUDA graphs gives the same losses, and the
graphs are used; the same with the embeddings, head and checkpoints in host memory (the default)
and without, sample answers included (a tiny random Llama 3 style model with a tokenizer the
tests build, the demo data)."""
import pytest
import torch

import lora.train
import models
from lora.config import Config
from lora.demo import DATA
from tests.models.tokenizer_files import write_llama3_folder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = write_llama3_folder(tmp_path_factory.mktemp("tiny-llama3"))
    vocab = models.Tokenizer.from_pretrained(folder).vocab_size
    cfg = models.LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    models.save_pretrained(models.Llama(cfg), folder)
    return folder


def _run(model_dir, out, graphs: bool, **overrides):
    config = Config(model=str(model_dir), data=str(DATA), output_dir=str(out), quantize="nf4", r=8, alpha=16,
                    dropout=0.0, max_length=192, batch_size=4, lr=2e-3, warmup_steps=2, max_steps=8,
                    eval_every=0, save_every=0, log_every=100, seed=1, cuda_graphs=graphs, device="cuda",
                    **overrides)
    trainer = lora.train.Trainer(config, log=lambda *_: None)
    result = trainer.fit()
    return [h["loss"] for h in trainer.history if "loss" in h], result, trainer


def test_a_run_with_cuda_graphs_equals_one_without(model_dir, tmp_path):
    eager, eager_result, eager_trainer = _run(model_dir, tmp_path / "eager", graphs=False)
    graphed, graphed_result, trainer = _run(model_dir, tmp_path / "graphed", graphs=True)
    assert eager_trainer.graphs is None
    assert trainer.graphs.enabled and trainer.graphs.captures >= 1 and trainer.graphs.replays >= 1
    assert graphed[-1] < graphed[0]
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=3e-2, atol=0)
    assert graphed_result["final_eval_loss"] == pytest.approx(eager_result["final_eval_loss"], rel=3e-2)


def test_host_memory_training_equals_resident_training_and_samples_decode(model_dir, tmp_path):
    samples = dict(samples=["Ana Ruiz (30) - nurse, based in Lima."], sample_tokens=16)
    hosted, hosted_result, trainer = _run(model_dir, tmp_path / "hosted", graphs=True, **samples)
    resident, resident_result, resident_trainer = _run(model_dir, tmp_path / "resident", graphs=True,
                                                       host_embeddings=False, offload_checkpoints=False, **samples)
    assert isinstance(trainer.model.model.embed_tokens, models.HostEmbedding)
    assert isinstance(trainer.model.lm_head, models.HostHead)
    assert trainer.model.model.checkpoint_offload is not None
    assert resident_trainer.model.model.checkpoint_offload is None
    torch.testing.assert_close(torch.tensor(hosted), torch.tensor(resident), rtol=3e-2, atol=0)
    answers = [[s["answer"] for s in h["samples"]] for t in (trainer, resident_trainer) for h in t.history
               if "samples" in h]
    assert len(answers) == 4 and all(isinstance(a, str) for pair in answers for a in pair)
    assert answers[0] == answers[2]  # before training the two models are the same: the same greedy answer

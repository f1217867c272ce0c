"""Generation: the sampling rules, cached against uncached decoding, stop tokens, seeds, chat prompts."""
import pytest
import torch

import models
from models.generate import generate_ids, sample_next_token
from models.llama import Llama, LlamaConfig
from tests.models import tokenizer_files as tf


def tiny_model(vocab_size=96) -> Llama:
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = Llama(cfg).eval()
    with torch.no_grad():  # larger logits than the 0.02 init gives, so greedy paths are not flat
        model.lm_head.weight.mul_(25)
    return model


def frequencies(logits, n=6000, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(logits.numel())
    for _ in range(n):
        counts[sample_next_token(logits, generator=g, **kw)] += 1
    return counts / n


def test_greedy_is_argmax():
    logits = torch.randn(50)
    assert sample_next_token(logits) == int(logits.argmax())
    assert sample_next_token(logits, temperature=0.0, top_k=3, top_p=0.1) == int(logits.argmax())


def test_temperature_top_k_top_p_distributions():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log()
    torch.testing.assert_close(frequencies(logits, temperature=1.0), p, atol=0.03, rtol=0)
    hot = (logits / 2.0).softmax(-1)  # temperature 2 flattens the distribution
    torch.testing.assert_close(frequencies(logits, temperature=2.0), hot, atol=0.03, rtol=0)
    top2 = torch.tensor([0.5, 0.3, 0, 0]) / 0.8
    torch.testing.assert_close(frequencies(logits, temperature=1.0, top_k=2), top2, atol=0.03, rtol=0)
    # top_p: the smallest set of most likely tokens reaching p; 0.5 + 0.3 = 0.8 reaches 0.8
    torch.testing.assert_close(frequencies(logits, temperature=1.0, top_p=0.8), top2, atol=0.03, rtol=0)
    top3 = torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95
    torch.testing.assert_close(frequencies(logits, temperature=1.0, top_p=0.81), top3, atol=0.03, rtol=0)
    assert frequencies(logits, n=200, temperature=1.0, top_p=0.3)[0] == 1.0  # the top token is always kept


def test_cached_and_uncached_agree():
    model = tiny_model()
    prompt = torch.randint(0, 96, (7,)).tolist()
    cached = generate_ids(model, prompt, max_new_tokens=24)
    assert len(cached) == 24 and cached == generate_ids(model, prompt, max_new_tokens=24, use_cache=False)
    # sampled with one seed: the same draws pick the same tokens only if every step's logits agree
    sampled = generate_ids(model, prompt, max_new_tokens=24, temperature=1.0, seed=3)
    assert len(set(sampled)) > 5  # a varied path, not one token repeated
    assert sampled == generate_ids(model, prompt, max_new_tokens=24, temperature=1.0, seed=3, use_cache=False)


def test_stop_ids_seed_and_mode():
    model = tiny_model().train()
    prompt = torch.randint(0, 96, (5,)).tolist()
    full = generate_ids(model, prompt, max_new_tokens=12)
    assert model.training  # restored after generation
    stop = full[4]
    first = full.index(stop)
    assert generate_ids(model, prompt, max_new_tokens=12, stop_ids={stop}) == full[:first]
    a = generate_ids(model, prompt, max_new_tokens=16, temperature=1.0, seed=1)
    assert a == generate_ids(model, prompt, max_new_tokens=16, temperature=1.0, seed=1)
    assert a != generate_ids(model, prompt, max_new_tokens=16, temperature=1.0, seed=2)
    with pytest.raises(ValueError, match="non-empty prompt"):
        generate_ids(model, [])


def test_generate_text_and_chat(tmp_path):
    tf.write_chatml_gguf(tmp_path / "t.gguf")
    tok = models.Tokenizer.from_pretrained(tmp_path / "t.gguf")
    model = tiny_model(tok.vocab_size)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    new = generate_ids(model, prompt, max_new_tokens=10, stop_ids=tok.stop_ids)
    assert models.generate(model, tok, messages, max_new_tokens=10) == tok.decode(new, skip_special=True)
    text_ids = generate_ids(model, tok.encode("Once upon a time"), max_new_tokens=10, stop_ids=tok.stop_ids)
    assert models.generate(model, tok, "Once upon a time", max_new_tokens=10) == tok.decode(text_ids, skip_special=True)


def test_a_decoding_step_at_device_positions_equals_the_cached_step():
    """KVCache.positions (what a CUDA graph of the step needs) against the Python-counted cache."""
    model = Llama(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    ids = torch.randint(0, 64, (1, 9))
    counted, at_positions = model.new_kv_cache(1, 16), model.new_kv_cache(1, 16)
    with torch.no_grad():
        model(ids[:, :6], kv_cache=counted)
        model(ids[:, :6], kv_cache=at_positions)
        for t in range(6, 9):
            expected = model(ids[:, t:t + 1], kv_cache=counted)
            at_positions.positions = torch.tensor([t])
            got = model(ids[:, t:t + 1], kv_cache=at_positions)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert at_positions.length == 6  # positions mode leaves the count alone
    with pytest.raises(ValueError, match=r"positions must be \(T,\) = \(2,\)"):
        model(ids[:, :2], kv_cache=at_positions)
    with pytest.raises(ValueError, match="takes no attention_mask, document_ids or position_ids"):
        model(ids[:, :1], kv_cache=at_positions, position_ids=torch.tensor([[3]]))

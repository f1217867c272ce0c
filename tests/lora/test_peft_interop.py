"""Optional: adapters written by `lora.save` load in PEFT and the other way round, same outputs.

Needs peft and transformers (not installed by CI: this test skips there). Run it with an env that
has them, e.g. `.cache/peer-venv/bin/python -m pytest tests/lora/test_peft_interop.py`.
"""
import pytest
import torch

import lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _tiny_hf_llama(seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("use_dora", [False, True])
def test_our_adapter_loads_in_peft(tmp_path, use_dora):
    ours = lora.wrap(_tiny_hf_llama(0), r=4, alpha=8, use_dora=use_dora)
    with torch.no_grad():
        for _, layer in lora.lora_layers(ours):
            layer.lora_B.weight.normal_(0, 0.05)
    ids = torch.randint(0, 64, (2, 7))
    expected = ours(ids).logits
    lora.save(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(_tiny_hf_llama(0), tmp_path / "a").eval()
    torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_peft_adapter_loads_in_ours(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights="gaussian")
    theirs = peft.get_peft_model(_tiny_hf_llama(1), config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    theirs.eval()
    ids = torch.randint(0, 64, (2, 5))
    expected = theirs(ids).logits
    theirs.save_pretrained(tmp_path / "p")
    ours = lora.load(_tiny_hf_llama(1), tmp_path / "p")
    assert len(lora.lora_layers(ours)) == 2 * 7
    torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-4)

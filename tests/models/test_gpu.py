"""The same paths on CUDA: bf16 forward with packing, GGUF dequantization and NF4 loading on the GPU."""
import numpy as np
import pytest
import torch

import models
from models.gguf import dequantize
from models.llama import Llama, LlamaConfig
from tests.models import gguf_writer as gw
from tests.models.test_load import write_folder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def small_config(**overrides) -> LlamaConfig:
    base = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=512)
    return LlamaConfig(**{**base, **overrides})


def test_bf16_cuda_forward_with_packing_matches_cpu_float32():
    model = Llama(small_config()).eval()
    ids = torch.randint(0, 256, (2, 128))
    doc = torch.cat([torch.zeros(2, 50), torch.ones(2, 60), torch.full((2, 18), -1)], dim=1).long()
    with torch.no_grad():
        expected = model(ids, document_ids=doc)
        got = model.to("cuda", torch.bfloat16)(ids.cuda(), document_ids=doc.cuda()).float().cpu()
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_cuda_kv_cache_and_generation_agree():
    model = Llama(small_config()).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(25)
    prompt = torch.randint(0, 256, (9,)).tolist()
    cached = models.generate_ids(model, prompt, max_new_tokens=20)
    assert cached == models.generate_ids(model, prompt, max_new_tokens=20, use_cache=False)


def test_gguf_dequantize_on_cuda_equals_cpu():
    rng = np.random.default_rng(0)
    blocks = {
        gw.Q8_0: b"".join(gw.q8_0_block(float(rng.normal()), rng.integers(-128, 128, 32)) for _ in range(64)),
        gw.Q4_0: b"".join(gw.q4_0_block(float(rng.normal()), rng.integers(0, 16, 32)) for _ in range(64)),
        gw.Q4_1: b"".join(gw.q4_1_block(float(rng.normal()), float(rng.normal()), rng.integers(0, 16, 32))
                          for _ in range(64)),
    }
    for ggml_type, raw in blocks.items():
        cpu_raw = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        torch.testing.assert_close(dequantize(cpu_raw.cuda(), ggml_type).cpu(), dequantize(cpu_raw, ggml_type),
                                   rtol=0, atol=0)


def test_nf4_load_on_cuda_equals_cpu(tmp_path):
    pytest.importorskip("quant")
    model = Llama(small_config())
    write_folder(tmp_path / "m", model, shards=2)
    on_gpu = models.Llama.from_pretrained(tmp_path / "m", dtype=torch.bfloat16, device="cuda", quantize="nf4")
    on_cpu = models.Llama.from_pretrained(tmp_path / "m", dtype=torch.bfloat16, device="cpu", quantize="nf4")
    # Every tensor is on the GPU but the JSON blobs of quant state, which bitsandbytes keeps on the CPU.
    assert all(t.device.type == "cuda" for k, t in on_gpu.state_dict().items() if ".quant_state." not in k)
    cpu_modules = dict(on_cpu.named_modules())
    for name, module in on_gpu.named_modules():
        if type(module).__name__ == "Linear4bit":  # quantized on the GPU: the same 4-bit weights
            w_gpu, w_cpu = module.dequantize(torch.float32).cpu(), cpu_modules[name].dequantize(torch.float32)
            same = torch.isclose(w_gpu, w_cpu, rtol=1e-5, atol=1e-7)  # reductions may differ in the last bit
            assert same.float().mean() > 0.999, name  # and rare ties may round the other way
            torch.testing.assert_close(w_gpu, w_cpu, rtol=0, atol=0.2 * w_cpu.abs().max().item(), msg=name)
    for (name, a), (_, b) in zip(on_gpu.named_parameters(), on_cpu.named_parameters()):
        if a.is_floating_point():
            assert torch.equal(a.cpu(), b), name
    ids = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        got, expected = on_gpu(ids.cuda()).float().cpu(), on_cpu(ids).float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_rms_norm_of_bfloat16_on_cuda_is_the_float32_formula_rounded_once():
    from models.llama import RMSNorm
    norm = RMSNorm(4096).to("cuda", torch.bfloat16)
    x = (torch.randn(64, 4096, device="cuda") * 5).to(torch.bfloat16)
    x64 = x.double()
    normed = (x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    # float32 reductions in another order may round a value the other way: at most one bf16 ulp
    assert ((norm(x).float() - normed.float()).abs() <= normed.float().abs() * 2 ** -7).all()


def test_fused_rotary_gives_the_unfused_attention_and_gradients(monkeypatch):
    import models.llama as llama
    model = Llama(small_config(hidden_size=512, num_attention_heads=8, num_key_value_heads=2)).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 256, (2, 100), device="cuda")
    results = []
    for threshold in (0, 1 << 62):  # every call fused, then none
        monkeypatch.setattr(llama, "FUSED_ROTARY_MIN", threshold)
        model.zero_grad()
        logits = model(ids).float()
        logits.square().mean().backward()
        results.append((logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.float()))
    (fused, fused_grad), (plain, plain_grad) = results
    assert (fused - plain).abs().max() < 0.02 * plain.abs().max()
    assert (fused_grad - plain_grad).abs().max() < 0.05 * plain_grad.abs().max()


@pytest.mark.parametrize("host_embeddings", [False, True])
def test_decoding_from_a_cuda_graph_equals_eager_decoding(host_embeddings):
    """An NF4 model with LoRA adapters under bf16 autocast, as the trainer's samples run it."""
    import lora
    import quant
    torch.manual_seed(0)
    model = Llama(small_config(num_hidden_layers=3)).to("cuda", torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(25)  # confident logits: greedy tokens do not flip on rounding
    quant.quantize(model, compute_dtype=torch.bfloat16)
    lora.wrap(model, r=4, init="gaussian")
    if host_embeddings:
        models.keep_embeddings_on_host(model)
    prompt = torch.randint(0, 256, (7,)).tolist()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = models.generate_ids(model, prompt, max_new_tokens=24, cuda_graph=False)
        graphed = models.generate_ids(model, prompt, max_new_tokens=24, cuda_graph=True)
        again = models.generate_ids(model, prompt, max_new_tokens=24)  # None: graphed at 24 tokens
    assert graphed == eager and again == eager and len(eager) == 24

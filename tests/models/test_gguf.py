"""GGUF: metadata of every value type, alignment, each dequantizer on hand-made blocks, Llama files
(names, q/k row order, tied and untied heads), and bad files."""
import struct

import numpy as np
import pytest
import torch

import models
from models.gguf import GGUFFile, dequantize
from models.llama import Llama, LlamaConfig
from models.load import config_from_gguf
from tests.models import gguf_writer as gw


def tiny_config(**overrides) -> LlamaConfig:
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5)
    return LlamaConfig(**{**base, **overrides})


def test_metadata_of_every_value_type(tmp_path):
    meta = {
        "u8": (gw.UINT8, 250), "i8": (gw.INT8, -100), "u16": (gw.UINT16, 65000), "i16": (gw.INT16, -30000),
        "u32": (gw.UINT32, 4_000_000_000), "i32": (gw.INT32, -2_000_000_000), "f32": (gw.FLOAT32, 0.1),
        "bool_true": (gw.BOOL, True), "bool_false": (gw.BOOL, False), "str": (gw.STRING, "héllo ✓"),
        "u64": (gw.UINT64, 2**63 + 5), "i64": (gw.INT64, -(2**62)), "f64": (gw.FLOAT64, 0.1),
        "strings": (gw.ARRAY, (gw.STRING, ["a", "", "Ġthe", "<|im_end|>"])),
        "ints": (gw.ARRAY, (gw.INT32, [3, -1, 7])),
        "floats": (gw.ARRAY, (gw.FLOAT32, [0.5, -2.0])),
        "bools": (gw.ARRAY, (gw.BOOL, [True, False, True])),
        "empty": (gw.ARRAY, (gw.UINT8, [])),
        "nested": (gw.ARRAY, (gw.ARRAY, [(gw.UINT16, [1, 2]), (gw.UINT16, [3])])),
    }
    gw.write_gguf(tmp_path / "m.gguf", meta, [])
    with GGUFFile(tmp_path / "m.gguf") as g:
        got = g.metadata
        assert g.version == 3 and g.tensors == {}
    expected = {k: v for k, (_, v) in meta.items()}
    expected["floats"] = [0.5, -2.0]
    expected["strings"] = ["a", "", "Ġthe", "<|im_end|>"]
    expected["ints"], expected["floats"], expected["bools"] = [3, -1, 7], [0.5, -2.0], [True, False, True]
    expected["empty"], expected["nested"] = [], [[1, 2], [3]]
    assert got == expected


@pytest.mark.parametrize("alignment", [None, 64])
def test_alignment_and_tensor_offsets(tmp_path, alignment):
    a = torch.randn(3)  # 12 bytes: the next tensor starts after padding
    b = torch.randn(2, 5)
    gw.write_gguf(tmp_path / "m.gguf", {"general.architecture": "llama"},
                  [("a", gw.F32, (3,), gw.plain_bytes(a, gw.F32)), ("b", gw.F32, (2, 5), gw.plain_bytes(b, gw.F32))],
                  alignment=alignment)
    with GGUFFile(tmp_path / "m.gguf") as g:
        align = alignment or 32
        assert g.alignment == align and g.data_start % align == 0
        assert g.tensors["b"].start == g.data_start + align  # 12 bytes of `a`, padded to one alignment unit
        assert g.tensors["b"].shape == (2, 5)
        torch.testing.assert_close(g.tensor("a"), a, rtol=0, atol=0)
        torch.testing.assert_close(g.tensor("b"), b, rtol=0, atol=0)


@pytest.mark.parametrize("ggml_type,dtype", [(gw.F32, torch.float32), (gw.F16, torch.float16),
                                             (gw.BF16, torch.bfloat16)])
def test_plain_float_types(tmp_path, ggml_type, dtype):
    t = torch.randn(4, 6) * 3
    gw.write_gguf(tmp_path / "m.gguf", {}, [("t", ggml_type, (4, 6), gw.plain_bytes(t, ggml_type))])
    with GGUFFile(tmp_path / "m.gguf") as g:
        torch.testing.assert_close(g.tensor("t"), t.to(dtype).float(), rtol=0, atol=0)


def _raw(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def test_q8_0_hand_blocks():
    q0 = np.arange(-16, 16)  # 32 codes
    q1 = np.array([127, -128, 0, 1] * 8)
    raw = gw.q8_0_block(0.5, q0) + gw.q8_0_block(-0.125, q1)
    expected = np.concatenate([0.5 * q0, -0.125 * q1]).astype(np.float32)
    np.testing.assert_array_equal(dequantize(_raw(raw), gw.Q8_0).numpy(), expected)


def test_q4_0_hand_blocks():
    q = np.array(list(range(16)) + list(range(15, -1, -1)))  # distinct halves: checks low-then-high nibble order
    raw = gw.q4_0_block(0.25, q) + gw.q4_0_block(2.0, np.full(32, 8))
    # first block: 0.25 * (q - 8): values 0..15 then 15..0, shifted by 8
    expected = np.concatenate([0.25 * (q - 8), np.zeros(32)]).astype(np.float32)
    got = dequantize(_raw(raw), gw.Q4_0).numpy()
    np.testing.assert_array_equal(got, expected)
    assert got[0] == -2.0 and got[15] == 1.75 and got[16] == 1.75 and got[31] == -2.0
    assert raw[2] == 0xF0  # byte 0 of the codes: value 0 (low nibble 0) and value 16 (high nibble 15)


def test_q4_1_hand_blocks():
    q = np.array(list(range(16)) + list(range(15, -1, -1)))
    raw = gw.q4_1_block(0.5, -1.0, q) + gw.q4_1_block(0.1, 3.0, np.arange(32) % 16)
    d1 = float(np.float16(0.1))
    expected = np.concatenate([0.5 * q - 1.0, d1 * (np.arange(32) % 16) + 3.0]).astype(np.float32)
    np.testing.assert_allclose(dequantize(_raw(raw), gw.Q4_1).numpy(), expected, rtol=0, atol=1e-6)


def test_quantized_tensor_shape_in_file(tmp_path):
    """Blocks run along the rows of the PyTorch shape (GGUF's dims[0] is the last torch dim)."""
    rows = [gw.q4_1_block(1.0, float(r), np.arange(32) % 16) for r in range(3)]  # 3 rows of 32
    gw.write_gguf(tmp_path / "m.gguf", {}, [("w", gw.Q4_1, (3, 32), b"".join(rows))])
    with GGUFFile(tmp_path / "m.gguf") as g:
        w = g.tensor("w")
    expected = torch.arange(3.0)[:, None] + (torch.arange(32) % 16).float()[None, :]
    torch.testing.assert_close(w, expected, rtol=0, atol=0)


def test_unsupported_type_names_tensor_and_type(tmp_path):
    gw.write_gguf(tmp_path / "m.gguf", {}, [("blk.0.ffn_up.weight", gw.Q4_K, (1, 256), b"\0" * 144),
                                            ("odd", 99, (4,), b"\0" * 16)])
    with GGUFFile(tmp_path / "m.gguf") as g:
        with pytest.raises(ValueError, match=r"m\.gguf.*'blk\.0\.ffn_up\.weight'.*Q4_K"):
            g.tensor("blk.0.ffn_up.weight")
        with pytest.raises(ValueError, match=r"'odd'.*type 99"):
            g.tensor("odd")
    with pytest.raises(ValueError, match="Q4_K is not supported"):
        dequantize(torch.zeros(144, dtype=torch.uint8), gw.Q4_K)


def test_truncated_and_foreign_files(tmp_path):
    t = torch.randn(64, 32)
    gw.write_gguf(tmp_path / "m.gguf", {"general.name": "x" * 100},
                  [("token_embd.weight", gw.F32, (64, 32), gw.plain_bytes(t, gw.F32))])
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut_data.gguf").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"cut_data\.gguf: truncated GGUF file: tensor 'token_embd\.weight'"):
        GGUFFile(tmp_path / "cut_data.gguf")
    (tmp_path / "cut_header.gguf").write_bytes(data[:60])
    with pytest.raises(ValueError, match=r"cut_header\.gguf: truncated or corrupt GGUF file.*'general\.name'"):
        GGUFFile(tmp_path / "cut_header.gguf")
    (tmp_path / "other.gguf").write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ValueError, match=r"other\.gguf: not a GGUF file"):
        GGUFFile(tmp_path / "other.gguf")
    (tmp_path / "v1.gguf").write_bytes(data[:4] + struct.pack("<I", 1) + data[8:])
    with pytest.raises(ValueError, match="version 1 is not supported"):
        GGUFFile(tmp_path / "v1.gguf")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        GGUFFile(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match=r"cut_data\.gguf.*'token_embd\.weight'"):
        models.Llama.from_pretrained(tmp_path / "cut_data.gguf")


def _write_llama_gguf(path, model, ggml_type=gw.F32, extra_meta=None, extra_tensors=()):
    meta = {**gw.llama_metadata(model.config), **(extra_meta or {})}
    gw.write_gguf(path, meta, gw.llama_gguf_tensors(model, ggml_type) + list(extra_tensors))


@pytest.mark.parametrize("tied", [False, True])
def test_llama_from_gguf_matches_model(tmp_path, tied):
    cfg = tiny_config(tie_word_embeddings=tied)
    model = Llama(cfg).eval()
    q = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(gw.permute_for_gguf(q, cfg.num_attention_heads), q)  # the row order matters
    _write_llama_gguf(tmp_path / "m.gguf", model)
    with GGUFFile(tmp_path / "m.gguf") as g:
        assert config_from_gguf(g) == cfg
    loaded = models.Llama.from_pretrained(tmp_path / "m.gguf", dtype=torch.float32).eval()
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("ggml_type", [gw.F16, gw.BF16, gw.Q8_0])
def test_llama_from_gguf_lossy_types(tmp_path, ggml_type):
    """The loaded model equals the original with each weight replaced by its stored (rounded) value."""
    cfg = tiny_config()
    model = Llama(cfg).eval()
    _write_llama_gguf(tmp_path / "m.gguf", model, ggml_type)
    rounded = Llama(cfg).eval()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if p.dim() == 1:
                value = p
            elif ggml_type == gw.Q8_0:
                value = gw.quantize_q8_0(p)[1]
            else:
                value = p.to(torch.float16 if ggml_type == gw.F16 else torch.bfloat16).float()
            rounded.state_dict()[name].copy_(value)
    loaded = models.Llama.from_pretrained(tmp_path / "m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), rounded(ids), rtol=1e-5, atol=1e-5)


def test_gguf_rope_freqs_and_linear_scaling(tmp_path):
    cfg = tiny_config()
    factors = torch.linspace(1.0, 8.0, cfg.head_dim // 2)
    _write_llama_gguf(tmp_path / "m.gguf", Llama(cfg),
                      extra_tensors=[("rope_freqs.weight", gw.F32, tuple(factors.shape), gw.plain_bytes(factors, gw.F32))],
                      extra_meta={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0})
    loaded = models.Llama.from_pretrained(tmp_path / "m.gguf", dtype=torch.float32)
    assert loaded.config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert loaded.config.rope_freq_factors == tuple(factors.tolist())


def test_gguf_bad_llama_files(tmp_path):
    cfg = tiny_config()
    model = Llama(cfg)
    meta = gw.llama_metadata(cfg)
    tensors = gw.llama_gguf_tensors(model)

    gw.write_gguf(tmp_path / "arch.gguf", {**meta, "general.architecture": "gpt2"}, tensors)
    with pytest.raises(ValueError, match=r"arch\.gguf: general\.architecture is 'gpt2'"):
        models.Llama.from_pretrained(tmp_path / "arch.gguf")

    gw.write_gguf(tmp_path / "nokey.gguf", {k: v for k, v in meta.items() if k != "llama.block_count"}, tensors)
    with pytest.raises(ValueError, match=r"nokey\.gguf: missing metadata key 'llama\.block_count'"):
        models.Llama.from_pretrained(tmp_path / "nokey.gguf")

    missing = [t for t in tensors if t[0] != "blk.1.ffn_up.weight"]
    gw.write_gguf(tmp_path / "missing.gguf", meta, missing)
    with pytest.raises(ValueError, match=r"missing\.gguf: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        models.Llama.from_pretrained(tmp_path / "missing.gguf")

    wrong = [(n, k, (s[0] + 1, *s[1:]), gw.plain_bytes(torch.zeros(s[0] + 1, *s[1:]), gw.F32))
             if n == "blk.0.attn_v.weight" else (n, k, s, r) for n, k, s, r in tensors]
    gw.write_gguf(tmp_path / "shape.gguf", meta, wrong)
    with pytest.raises(ValueError, match=r"shape\.gguf \(tensor 'blk\.0\.attn_v\.weight'\).*shape \(33, 64\).*\(32, 64\)"):
        models.Llama.from_pretrained(tmp_path / "shape.gguf")

    extra = tensors + [("blk.0.attn_rot.weight", gw.F32, (4,), gw.plain_bytes(torch.zeros(4), gw.F32))]
    gw.write_gguf(tmp_path / "extra.gguf", meta, extra)
    with pytest.raises(ValueError, match=r"extra\.gguf: tensor 'blk\.0\.attn_rot\.weight' has no place"):
        models.Llama.from_pretrained(tmp_path / "extra.gguf")

    q4k = [(n, gw.Q4_K, s, b"\0" * (s[0] * s[1] // 256 * 144))
           if n == "blk.0.ffn_up.weight" else (n, k, s, r) for n, k, s, r in tensors]
    gw.write_gguf(tmp_path / "q4k.gguf", meta, q4k)
    with pytest.raises(ValueError, match=r"q4k\.gguf.*'blk\.0\.ffn_up\.weight'.*Q4_K"):
        models.Llama.from_pretrained(tmp_path / "q4k.gguf")

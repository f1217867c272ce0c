"""Tokenizers (sentencepiece, tokenizer.json, GGUF vocabularies) and chat templates, against
hand-written strings and against token sequences built the way Meta's reference code builds them."""
import json
import time

import pytest

import models
from models.chat import ChatFormat, detect_chat_format
from tests.models import tokenizer_files as tf

TEXTS = ["Hello world", "The capital of France is Paris.", "  two leading spaces, trailing ", "digits 12345 and 2024",
         "line one\nline two\n\n\ttabbed", "unicode: café, naïve, 日本語, ✓ 🙂", "don't it's I'd"]


@pytest.fixture(scope="module")
def llama2_tok(tmp_path_factory):
    return models.Tokenizer.from_pretrained(tf.write_llama2_folder(tmp_path_factory.mktemp("llama2")))


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory):
    return tf.write_llama3_folder(tmp_path_factory.mktemp("llama3"))


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tok.gguf"
    original = tf.write_chatml_gguf(path)
    return models.Tokenizer.from_pretrained(path), original


# ---- sentencepiece (Llama 2) --------------------------------------------------------------------


def test_sentencepiece_round_trip_and_specials(llama2_tok):
    tok, sp = llama2_tok, llama2_tok._backend.sp
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, tok.add_bos) == (1, 2, 2, 400, True)
    assert tok.stop_ids == {2} and tok.chat_format == ChatFormat("llama2")
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == text
    assert tok.encode("hi", add_bos=True) == [1] + sp.encode("hi")
    ids = tok.encode("<s>hi</s>there")  # special strings in text are the special tokens
    assert ids == [1] + sp.encode("hi") + [2] + sp.encode("there")
    assert tok.decode(ids) == "<s>hi</s>there" and tok.decode(ids, skip_special=True) == "hithere"


def test_llama2_chat_matches_meta_reference(llama2_tok):
    tok, sp = llama2_tok, llama2_tok._backend.sp
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": " Paris. "}, {"role": "user", "content": " And of Italy? "}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert text == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the capital of France? [/INST] Paris. </s>"
                    "<s>[INST] And of Italy? [/INST]")
    # Meta's llama chat_completion: each (user, answer) pair encoded with bos and eos, the last user with bos
    expected = ([1] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the capital of France? [/INST] Paris. ")
                + [2] + [1] + sp.encode("[INST] And of Italy? [/INST]"))
    ids, mask = tok.encode_chat(messages, add_generation_prompt=True)
    assert ids == expected == tok.encode(text)
    assert [i for i, m in zip(ids, mask) if m] == sp.encode("Paris. ") + [2]
    # another format on a sentencepiece vocabulary: the markers are plain text, and still
    # segment-by-segment encoding equals encoding the rendered text
    chatml = models.Tokenizer.from_pretrained(tok.source, chat_format="chatml")
    ids, mask = chatml.encode_chat(messages[1:3])
    assert ids == sp.encode(chatml.apply_chat_template(messages[1:3]))
    # (chatml keeps the reply unstripped; decoding drops the "▁" that opens a run, as for any text)
    assert chatml.decode([i for i, m in zip(ids, mask) if m]) == "Paris. <|im_end|>"
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


# ---- tokenizer.json (Llama 3) ---------------------------------------------------------------------


def test_tokenizer_json_round_trip_and_specials(llama3_folder):
    tok = models.Tokenizer.from_pretrained(llama3_folder)
    from tokenizers import Tokenizer as HF
    tk = HF.from_file(str(llama3_folder / "tokenizer.json"))
    special = {t: tk.token_to_id(t) for t in tf.LLAMA3_SPECIALS}
    assert tok.bos_id == special["<|begin_of_text|>"] and tok.eos_id == special["<|eot_id|>"]
    assert tok.pad_id == tok.eos_id and tok.add_bos  # the post-processor adds <|begin_of_text|>
    assert tok.stop_ids == {special[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")}
    assert tok.chat_format == ChatFormat("llama3")
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == tk.encode(text, add_special_tokens=False).ids and tok.decode(ids) == text
    assert tok.encode("hi", add_bos=True)[0] == special["<|begin_of_text|>"]


def llama3_reference(tok, messages, generation_prompt: bool):
    """Meta's ChatFormat (llama3 repo): header and content encoded separately."""
    sp = tok.special_tokens

    def header(role):
        return [sp["<|start_header_id|>"]] + tok.encode(role) + [sp["<|end_header_id|>"]] + tok.encode("\n\n")

    ids = [sp["<|begin_of_text|>"]]
    for m in messages:
        ids += header(m["role"]) + tok.encode(m["content"].strip()) + [sp["<|eot_id|>"]]
    return ids + (header("assistant") if generation_prompt else [])


def test_llama3_chat_matches_meta_reference(llama3_folder):
    tok = models.Tokenizer.from_pretrained(llama3_folder)
    messages = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris.\n"}, {"role": "user", "content": "And of Italy?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nAnd of Italy?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids, mask = tok.encode_chat(messages, add_generation_prompt=True)
    assert ids == llama3_reference(tok, messages, True) == tok.encode(text)
    assert [i for i, m in zip(ids, mask) if m] == tok.encode("Paris.") + [tok.special_tokens["<|eot_id|>"]]
    assert tok.encode_chat(messages[:3])[0] == llama3_reference(tok, messages[:3], False)


def test_llama31_and_32_knowledge_header(tmp_path):
    messages = [{"role": "user", "content": "Hi"}]
    tok = models.Tokenizer.from_pretrained(tf.write_llama3_folder(tmp_path / "31", tf.LLAMA31_TEMPLATE_PART))
    assert tok.chat_format == ChatFormat("llama3", knowledge_header=True, date_string="26 Jul 2024")
    header = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    assert tok.apply_chat_template(messages) == (
        header + "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>")
    with_system = [{"role": "system", "content": "Be brief. "}] + messages
    assert tok.apply_chat_template(with_system).startswith(header + "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start")
    ids, mask = tok.encode_chat(with_system + [{"role": "assistant", "content": "Hello"}])
    assert ids == tok.encode(tok.apply_chat_template(with_system + [{"role": "assistant", "content": "Hello"}]))
    assert [i for i, m in zip(ids, mask) if m] == tok.encode("Hello<|eot_id|>")
    tok32 = models.Tokenizer.from_pretrained(tf.write_llama3_folder(tmp_path / "32", tf.LLAMA32_TEMPLATE_PART))
    assert tok32.chat_format.date_string is None
    assert f"Today Date: {time.strftime('%d %b %Y')}\n\n" in tok32.apply_chat_template(messages)


# ---- GGUF byte-level BPE and ChatML ----------------------------------------------------------------


def test_gguf_tokenizer_equals_the_trained_tokenizer(chatml):
    tok, original = chatml
    assert tok.vocab_size == original.get_vocab_size()
    for text in TEXTS + ["<|im_start|>user\nhi 42<|im_end|>\n"]:
        ids = tok.encode(text)
        assert ids == original.encode(text).ids, text
        assert tok.decode(ids) == text
    assert [tok.id_to_token(i) for i in tok.encode("12345")] == ["1", "2", "3", "4", "5"]  # the "smollm" pre-tokenizer
    im_start, im_end = original.token_to_id("<|im_start|>"), original.token_to_id("<|im_end|>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (im_start, im_end, im_end, False)
    assert tok.stop_ids == {im_end, original.token_to_id("<|endoftext|>")}


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe"])
def test_gguf_tokenizer_other_pre_tokenizers(tmp_path, pre):
    original = tf.write_chatml_gguf(tmp_path / "t.gguf", pre=pre)
    tok = models.Tokenizer.from_pretrained(tmp_path / "t.gguf")
    for text in TEXTS:
        assert tok.encode(text) == original.encode(text).ids, text


def test_chatml_with_default_system(chatml):
    tok, original = chatml
    assert tok.chat_format == ChatFormat("chatml", default_system="You are a helpful AI assistant named SmolLM, "
                                                                  "trained by Hugging Face")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 42"},
                {"role": "user", "content": "Bye"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! 42<|im_end|>\n"
                    "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    ids, mask = tok.encode_chat(messages, add_generation_prompt=True)
    assert ids == original.encode(text).ids
    assert [i for i, m in zip(ids, mask) if m] == original.encode("Hello! 42<|im_end|>").ids
    own_system = [{"role": "system", "content": "Be terse."}] + messages[:1]
    assert tok.apply_chat_template(own_system) == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_multi_turn_masks_cover_every_reply(chatml):
    tok, original = chatml
    replies = ["First answer.", "Second, with digits 123.", "Third"]
    messages = []
    for i, reply in enumerate(replies):
        messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": reply}]
    ids, mask = tok.encode_chat(messages)
    assert ids == tok.encode(tok.apply_chat_template(messages)) and len(mask) == len(ids)
    im_end = tok.special_tokens["<|im_end|>"]
    expected = sum((original.encode(r).ids + [im_end] for r in replies), [])
    assert [i for i, m in zip(ids, mask) if m] == expected


def test_detect_chat_format():
    assert detect_chat_format(tf.LLAMA3_TEMPLATE) == ChatFormat("llama3")
    assert detect_chat_format("{{ '<|im_start|>' + message['role'] }}") == ChatFormat("chatml")
    assert detect_chat_format(None, {"<|im_start|>"}) == ChatFormat("chatml")
    assert detect_chat_format(None, {"<|start_header_id|>"}) == ChatFormat("llama3")
    assert detect_chat_format(None, (), sentencepiece=True) == ChatFormat("llama2")
    assert detect_chat_format(None, {"<|endoftext|>"}) is None
    # an escaped newline inside a tokenizer_config.json template
    qwen = "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    assert detect_chat_format(qwen).default_system == "You are a helpful assistant."
    # a system turn built from the messages is no default; a literal one later in the template is
    built = "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    assert detect_chat_format(built).default_system is None
    assert detect_chat_format(built + qwen).default_system == "You are a helpful assistant."


# ---- files and bad input -------------------------------------------------------------------------


def test_save_pretrained_round_trips(tmp_path, llama2_tok, llama3_folder, chatml):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    for name, tok in (("sp", llama2_tok), ("json", models.Tokenizer.from_pretrained(llama3_folder)), ("gguf", chatml[0])):
        again = models.Tokenizer.from_pretrained(tok.save_pretrained(tmp_path / name))
        assert (again.bos_id, again.eos_id, again.pad_id, again.stop_ids, again.add_bos, again.chat_format) == \
               (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.add_bos, tok.chat_format), name
        assert again.encode_chat(messages) == tok.encode_chat(messages), name
        assert not any(".tmp" in p.name for p in (tmp_path / name).iterdir())


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such file or folder"):
        models.Tokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no tokenizer.model or tokenizer.json"):
        models.Tokenizer.from_pretrained(tmp_path / "empty")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ValueError, match=r"badjson/tokenizer\.json: not a tokenizers file"):
        models.Tokenizer.from_pretrained(tmp_path / "badjson")
    (tmp_path / "badsp").mkdir()
    (tmp_path / "badsp" / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"badsp/tokenizer\.model: not a sentencepiece model"):
        models.Tokenizer.from_pretrained(tmp_path / "badsp")
    (tmp_path / "badconfig").mkdir()
    (tmp_path / "badconfig" / "tokenizer.model").write_bytes(tf.sentencepiece_model())
    (tmp_path / "badconfig" / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"badconfig/tokenizer_config\.json: not valid JSON"):
        models.Tokenizer.from_pretrained(tmp_path / "badconfig")
    tf.write_chatml_gguf(tmp_path / "spm.gguf", model="llama")
    with pytest.raises(ValueError, match=r"spm\.gguf: tokenizer\.ggml\.model is 'llama'"):
        models.Tokenizer.from_pretrained(tmp_path / "spm.gguf")
    tf.write_chatml_gguf(tmp_path / "qwen.gguf", pre="qwen2")
    with pytest.raises(ValueError, match=r"qwen\.gguf: tokenizer\.ggml\.pre 'qwen2' is not supported"):
        models.Tokenizer.from_pretrained(tmp_path / "qwen.gguf")


def test_chat_input_errors(tmp_path, chatml):
    tok = chatml[0]
    with pytest.raises(ValueError, match="message 1 must be a dict with string 'role' and 'content'"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant"}])
    with pytest.raises(TypeError, match="messages must be a list"):
        tok.encode_chat("hello")
    plain = tf.byte_level_bpe("gpt2", specials=["<|endoftext|>"])
    (tmp_path / "plain").mkdir()
    plain.save(str(tmp_path / "plain" / "tokenizer.json"))
    no_format = models.Tokenizer.from_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no chat format is known"):
        no_format.apply_chat_template([{"role": "user", "content": "a"}])
    no_format.chat_format = ChatFormat("chatml")
    assert no_format.apply_chat_template([{"role": "user", "content": "a"}]) == "<|im_start|>user\na<|im_end|>\n"
    assert json.loads((tmp_path / "plain" / "tokenizer.json").read_text())  # untouched

"""Small tokenizer checkpoints that tests build themselves: a Llama 2 style sentencepiece model, a
Llama 3 style tokenizer.json, and a byte-level BPE stored in a GGUF file with a ChatML template."""
import io
import json

from tests.models import gguf_writer as gw

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "You are a helpful assistant. Be brief and answer in one sentence.",
    "Numbers like 12345 and 2024 appear in text, and so do words like don't and it's.",
    "Hello there! How can I help you today? I'd like a cup of tea, please.",
    "[INST] <<SYS>> system prompt <</SYS>> user question [/INST] assistant answer",
    "user\nassistant\nsystem\n\n",
] * 40

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", "<|eom_id|>"]

# Llama 3 Instruct's template (meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# The part of Llama 3.1's template that matters here (its system header); 3.2's uses strftime_now.
LLAMA31_TEMPLATE_PART = ('{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}'
                         '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}'
                         '{{- "Cutting Knowledge Date: December 2023\\n" }}{{- "Today Date: " + date_string + "\\n\\n" }}')
LLAMA32_TEMPLATE_PART = ('{%- if strftime_now is defined %}{%- set date_string = strftime_now("%d %b %Y") %}'
                         + LLAMA31_TEMPLATE_PART)
# SmolLM2-Instruct's template, as its GGUF file stores it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def sentencepiece_model() -> bytes:
    """A Llama-2-like sentencepiece BPE model: <unk> 0, <s> 1, </s> 2, byte fallback, dummy prefix."""
    import sentencepiece as spm
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=out, vocab_size=400, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, minloglevel=2)
    return out.getvalue()


def write_llama2_folder(folder, with_config: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(sentencepiece_model())
    if with_config:
        config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
                  "chat_template": "{% if messages[0]['role'] == 'system' %}...{{ bos_token + '[INST] ' + "
                                   "content.strip() + ' [/INST]' }}..."}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def byte_level_bpe(pre: str = "llama3", specials=LLAMA3_SPECIALS, vocab_size: int = 600):
    """A byte-level BPE trained on CORPUS with the given pre-tokenizer ("llama3", "gpt2", "digits")."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from models.tokenizer import _LLAMA3_SPLIT
    tk = Tokenizer(models.BPE(ignore_merges=pre == "llama3"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "llama3")
    if pre == "llama3":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                                    byte_level])
    elif pre == "digits":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[AddedToken(s, special=True) for s in specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    return tk


def write_llama3_folder(folder, template: str = LLAMA3_TEMPLATE):
    from tokenizers import processors
    folder.mkdir(parents=True, exist_ok=True)
    tk = byte_level_bpe("llama3")
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      special_tokens=[("<|begin_of_text|>", bos)])
    tk.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ids = [tk.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": ids}))
    return folder


def write_chatml_gguf(path, pre: str = "smollm", template: str = SMOLLM2_TEMPLATE, model: str = "gpt2"):
    """A GGUF holding only a tokenizer (as llama.cpp writes one) with ChatML specials first;
    returns the `tokenizers` tokenizer it was made from. pre: "smollm", "gpt2" or "llama-bpe"."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    kind = {"smollm": "digits", "gpt2": "gpt2", "llama-bpe": "llama3"}.get(pre, "gpt2")
    tk = byte_level_bpe(kind, specials=specials)
    vocab = tk.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tk.to_str())["model"]["merges"]]
    token_type = [3 if t in specials else 1 for t in tokens]
    meta = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": model,
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": (gw.ARRAY, (gw.STRING, tokens)),
        "tokenizer.ggml.token_type": (gw.ARRAY, (gw.INT32, token_type)),
        "tokenizer.ggml.merges": (gw.ARRAY, (gw.STRING, merges)),
        "tokenizer.ggml.bos_token_id": vocab["<|im_start|>"],
        "tokenizer.ggml.eos_token_id": vocab["<|im_end|>"],
        "tokenizer.ggml.padding_token_id": vocab["<|im_end|>"],
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": template,
    }
    gw.write_gguf(path, meta, [])
    return tk

"""Tokenizers: sentencepiece `tokenizer.model` (Llama 2), `tokenizer.json` (Llama 3, SmolLM2, ...) and
the byte-level BPE vocabulary stored in a GGUF file, behind one small interface with chat templates.

Note [special tokens in text]
    `encode(text)` treats the strings of special tokens in `text` ("<|im_start|>", "<s>", ...) as
    those tokens, so a rendered chat template encodes to the right ids. The `tokenizers` library
    does this itself; for sentencepiece the text is split on the special strings and each piece
    in between is encoded on its own, with sentencepiece's leading "▁" (dummy prefix) - the way
    Meta's Llama 2 code encodes each turn and HF's LlamaTokenizer splits on special tokens.

Note [GGUF byte-level BPE]
    A GGUF file stores `tokenizer.ggml.tokens` (id order), `tokenizer.ggml.merges` ("a b" pairs)
    and `tokenizer.ggml.token_type` (1 normal, 3 control, 4 user-defined). We rebuild the
    tokenizer with the `tokenizers` library: a BPE model over those tokens and merges, GPT-2's
    byte-level alphabet without a space prefix, and the pre-tokenizer llama.cpp names in
    `tokenizer.ggml.pre`: "gpt2"/"default" (GPT-2's regex), "smollm" and friends (every digit
    on its own, then GPT-2's regex), "llama-bpe" (Llama 3's regex, whole words in the vocabulary
    kept as they are). Control and user-defined tokens become added tokens matched in text.
"""
import json
import re
from pathlib import Path

from models.chat import ChatFormat, detect_chat_format
from models.jsonfile import read_json_object

__all__ = ["Tokenizer"]

_GPT2_PRE = ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")
_DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "</s>")


class Tokenizer:
    """encode / decode, special token ids, and chat templates for one checkpoint.

    Attributes: bos_id, eos_id, pad_id (the pad token, else eos), stop_ids (ids that end
    generation: eos, the chat format's end of turn and other end tokens the vocabulary has),
    vocab_size, add_bos (whether plain text conventionally starts with bos), chat_format.
    """

    def __init__(self, backend, special_tokens: dict[str, int], *, bos: str | None, eos: str | None,
                 pad: str | None = None, add_bos: bool = False, chat_format: ChatFormat | None = None,
                 extra_stop_ids=(), source: str = "tokenizer", chat_template: str | None = None):
        self._backend = backend
        self.chat_template = chat_template  # the checkpoint's Jinja template text, kept for saving
        self.special_tokens = dict(special_tokens)  # string -> id
        self._special_ids = set(self.special_tokens.values())
        self.source = source
        self.bos_token, self.eos_token = bos, eos
        self.bos_id = self._id_of(bos)
        self.eos_id = self._id_of(eos)
        self.pad_id = self._id_of(pad) if pad is not None else self.eos_id
        self.add_bos = add_bos
        self.chat_format = chat_format
        self.vocab_size = backend.vocab_size
        stops = {self.eos_id} | set(extra_stop_ids)
        stops |= {self.special_tokens[t] for t in _END_TOKENS if t in self.special_tokens}
        self.stop_ids = {i for i in stops if i is not None}

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        if token in self.special_tokens:
            return self.special_tokens[token]
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.source}: special token {token!r} is not in the vocabulary")
        return token_id

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special token strings in it become their ids (Note [special tokens in text])."""
        ids = self._encode(text, continuation=False)
        if add_bos:
            if self.bos_id is None:
                raise ValueError(f"{self.source}: this tokenizer has no bos token")
            ids = [self.bos_id] + ids
        return ids

    def _encode(self, text: str, continuation: bool) -> list[int]:
        """`continuation`: `text` continues earlier text that did not end in a special token."""
        return self._backend.encode(text, continuation)

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of `ids`; special tokens appear as their strings unless skip_special."""
        return self._backend.decode([int(i) for i in ids], skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.special_tokens.get(token, self._backend.token_to_id(token))

    def id_to_token(self, token_id: int) -> str:
        return self._backend.id_to_token(int(token_id))

    # -- chat -------------------------------------------------------------------------------

    def _format(self) -> ChatFormat:
        if self.chat_format is None:
            raise ValueError(f"{self.source}: no chat format is known for this tokenizer; set "
                             f"tok.chat_format = models.ChatFormat('llama2' | 'llama3' | 'chatml')")
        return self.chat_format

    def _segments(self, messages, add_generation_prompt):
        return self._format().segments(messages, add_generation_prompt, bos=self.bos_token or "",
                                       eos=self.eos_token or "")

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
        """The conversation rendered as text in the checkpoint's chat format (see models.chat)."""
        return "".join(text for text, _ in self._segments(messages, add_generation_prompt))

    def encode_chat(self, messages, add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """(ids, assistant_mask): the tokens of the rendered conversation, and True for the tokens of
        assistant replies (content and end-of-turn token). Encoded segment by segment; see
        Note [segment boundaries] in models.chat."""
        ids: list[int] = []
        mask: list[bool] = []
        after_special = True
        for text, is_assistant in self._segments(messages, add_generation_prompt):
            if not text:
                continue
            piece = self._encode(text, continuation=not after_special)
            ids += piece
            mask += [is_assistant] * len(piece)
            after_special = bool(piece) and piece[-1] in self._special_ids
        return ids, mask

    # -- files ------------------------------------------------------------------------------

    def save_pretrained(self, folder) -> Path:
        """Write tokenizer.model or tokenizer.json, tokenizer_config.json (special tokens, add_bos,
        the checkpoint's chat template) and generation_config.json (stop ids) into `folder`."""
        from models.save import atomic_write
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(self._backend, SentencePieceBackend):
            proto = self._backend.sp.serialized_model_proto()
            atomic_write(folder / "tokenizer.model", lambda tmp: tmp.write_bytes(proto))
        else:
            atomic_write(folder / "tokenizer.json", lambda tmp: self._backend.tk.save(str(tmp)))
        pad = self.id_to_token(self.pad_id) if self.pad_id is not None else None
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": pad,
                  "add_bos_token": self.add_bos}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write(folder / "tokenizer_config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
        generation = {"bos_token_id": self.bos_id, "eos_token_id": sorted(self.stop_ids)}
        atomic_write(folder / "generation_config.json", lambda tmp: tmp.write_text(json.dumps(generation, indent=2)))
        return folder

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, chat_format: str | ChatFormat | None = None) -> "Tokenizer":
        """From a folder (tokenizer.model, else tokenizer.json; tokenizer_config.json and
        generation_config.json when present), one of those files, or a .gguf file.
        `chat_format` overrides the format detected from the checkpoint."""
        path = Path(path)
        if path.is_file() and path.suffix == ".gguf":
            tok = _from_gguf(path)
        elif path.is_dir() or path.suffix in (".model", ".json"):
            tok = _from_files(path)
        elif path.exists():
            raise ValueError(f"{path}: not a tokenizer (expected a folder, tokenizer.model, tokenizer.json or .gguf)")
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
        if chat_format is not None:
            tok.chat_format = chat_format if isinstance(chat_format, ChatFormat) else ChatFormat(chat_format)
        return tok


# ----------------------------------------------------------------------------------------------
# Backends: each has encode(text, continuation), decode(ids), token_to_id, id_to_token, vocab_size


class SentencePieceBackend:
    def __init__(self, model_file: Path):
        import sentencepiece
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_file}: not a sentencepiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.specials = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                         if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in sorted(self.specials, key=len, reverse=True))
                                 + ")") if self.specials else None

    def encode(self, text: str, continuation: bool) -> list[int]:
        parts = self._split.split(text) if self._split else [text]
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:  # a special token string
                ids.append(self.specials[part])
            elif part:
                ids += self._encode_plain(part, continuation and k == 0)
        return ids

    def _encode_plain(self, text: str, continuation: bool) -> list[int]:
        if continuation:
            # sentencepiece writes a space as "▁" glued to the next word and opens every text with
            # one more "▁". A continuation that starts with a space is therefore encoded as that
            # space being the dummy prefix (see Note [segment boundaries] in models.chat); any
            # other continuation is encoded after a newline, whose tokens are then dropped.
            if text.startswith(" "):
                return self.sp.encode(text[1:])
            marker = self.sp.encode("\n")
            ids = self.sp.encode("\n" + text)
            if ids[:len(marker)] != marker:
                raise ValueError(f"sentencepiece cannot continue text with {text[:20]!r} here")
            return ids[len(marker):]
        return self.sp.encode(text)

    def decode(self, ids: list[int], skip_special: bool) -> str:
        """The runs between special tokens decoded on their own, as they were encoded."""
        out, run = [], []
        for i in ids:
            if self.sp.is_control(i):
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special:
                    out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if (i == self.sp.unk_id() and token != self.sp.id_to_piece(i)) else i

    def id_to_token(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)


class HFTokenizersBackend:
    def __init__(self, tokenizer, source: str):
        self.tk = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.specials = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str, continuation: bool) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self.tk.id_to_token(token_id)


# ----------------------------------------------------------------------------------------------
# Reading checkpoints


def _token_string(value) -> str | None:
    """tokenizer_config.json spells a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _from_files(path: Path) -> Tokenizer:
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        model_file, json_file = folder / "tokenizer.model", folder / "tokenizer.json"
        if not model_file.is_file() and not json_file.is_file():
            raise FileNotFoundError(f"{folder}: no tokenizer.model or tokenizer.json")
        use_sentencepiece = model_file.is_file()
    else:
        model_file = json_file = path
        use_sentencepiece = path.suffix == ".model"
    config_path = folder / "tokenizer_config.json"
    config = read_json_object(config_path) if config_path.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()

    if use_sentencepiece:
        backend = SentencePieceBackend(model_file)
        source = str(model_file)
        sp = backend.sp
        default_bos = sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None
        default_eos = sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None
        default_pad = sp.id_to_piece(sp.pad_id()) if sp.pad_id() >= 0 else None
        default_add_bos = True
    else:
        from tokenizers import Tokenizer as HFTokenizer
        try:
            backend = HFTokenizersBackend(HFTokenizer.from_file(str(json_file)), str(json_file))
        except Exception as e:  # the library raises its own exception type for malformed files
            raise ValueError(f"{json_file}: not a tokenizers file ({e})") from None
        source = str(json_file)
        names = backend.specials
        default_bos = next((t for t in ("<|begin_of_text|>", "<s>") if t in names), None)
        default_eos = next((t for t in ("<|end_of_text|>", "</s>", "<|endoftext|>") if t in names), None)
        default_pad = None
        default_add_bos = _post_processor_adds_bos(json_file)
    bos = _token_string(config["bos_token"]) if "bos_token" in config else default_bos
    eos = _token_string(config["eos_token"]) if "eos_token" in config else default_eos
    pad = _token_string(config["pad_token"]) if "pad_token" in config else default_pad
    add_bos = bool(config.get("add_bos_token", default_add_bos))
    extra_stops = set()
    for name in ("generation_config.json", "config.json"):
        if (folder / name).is_file():
            eos_ids = read_json_object(folder / name).get("eos_token_id")
            extra_stops |= set(eos_ids if isinstance(eos_ids, list) else [eos_ids] if isinstance(eos_ids, int) else [])
    chat_format = detect_chat_format(template, backend.specials, sentencepiece=use_sentencepiece)
    return Tokenizer(backend, backend.specials, bos=bos, eos=eos, pad=pad, add_bos=add_bos,
                     chat_format=chat_format, extra_stop_ids=extra_stops, source=source, chat_template=template)


def _post_processor_adds_bos(json_file: Path) -> bool:
    """Whether tokenizer.json's post-processor puts a special token before the text (Llama 3 does)."""
    processor = read_json_object(json_file).get("post_processor") or {}
    processors = processor.get("processors", [processor]) if processor.get("type") == "Sequence" else [processor]
    for p in processors:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            return "SpecialToken" in p["single"][0]
    return False


def _from_gguf(path: Path) -> Tokenizer:
    """See Note [GGUF byte-level BPE]."""
    from tokenizers import AddedToken, Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from models.gguf import GGUFFile
    with GGUFFile(path) as gguf:
        meta = gguf.metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') vocabularies are "
                         f"read from GGUF files (for sentencepiece models use the checkpoint's tokenizer.model)")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if key not in meta:
            raise ValueError(f"{path}: missing metadata key {key!r}")
    tokens = meta["tokenizer.ggml.tokens"]
    token_types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    pre = meta.get("tokenizer.ggml.pre", "default")
    merges = []
    for line in meta["tokenizer.ggml.merges"]:
        left, sep, right = line.partition(" ")
        if not sep:
            raise ValueError(f"{path}: tokenizer.ggml.merges entry {line!r} is not 'left right'")
        merges.append((left, right))
    vocab = {token: i for i, token in enumerate(tokens)}
    bpe = models.BPE(vocab, merges, ignore_merges=pre in _LLAMA3_PRE)
    tk = HFTokenizer(bpe)
    if pre in _GPT2_PRE:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in _DIGITS_THEN_GPT2_PRE:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in _LLAMA3_PRE:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise ValueError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported "
                         f"(supported: {', '.join(_GPT2_PRE + _DIGITS_THEN_GPT2_PRE + _LLAMA3_PRE)})")
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i, t in enumerate(token_types) if t == 3])
    tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                   for i, t in enumerate(token_types) if t == 4])
    backend = HFTokenizersBackend(tk, str(path))

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    specials = backend.specials
    template = meta.get("tokenizer.chat_template")
    chat_format = detect_chat_format(template, specials)
    return Tokenizer(backend, specials, bos=token("bos"), eos=token("eos"), pad=token("padding"),
                     add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)), chat_format=chat_format,
                     source=str(path), chat_template=template)

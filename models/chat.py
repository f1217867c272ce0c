"""Chat templates, hand-written: Llama 2, Llama 3 (and 3.1+), ChatML. No Jinja.

A template renders a conversation as a list of segments (text, is_assistant). The text of all
segments joined is what `apply_chat_template` returns; `Tokenizer.encode_chat` encodes segment by
segment, so the tokens of assistant replies are known exactly (no searching in the text).

Note [segment boundaries]
    Encoding segment by segment gives the same tokens as encoding the joined text only if every
    boundary is a place where the tokenizer splits anyway. The templates put boundaries right
    after special tokens, after the newline that ends a header ("assistant\n", "<|end_header_id|>\n\n")
    and before the single space that opens a Llama 2 reply: byte-level BPE pre-tokenizers split
    there as long as the reply does not itself begin with whitespace (Llama 2 and 3 strip
    replies; ChatML keeps them as they are), and sentencepiece starts a new piece at every space.
    Meta's reference code for Llama 3 encodes the header and the content separately, exactly so.

The formats, written out (u = user, a = assistant, s = system):
    llama2:  <s>[INST] <<SYS>>\\n{s}\\n<</SYS>>\\n\\n{u1} [/INST] {a1} </s><s>[INST] {u2} [/INST]
             (contents stripped; roles alternate user/assistant; the prompt for a reply is the
             closing [/INST] itself, so add_generation_prompt changes nothing)
    llama3:  <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>...
             and with add_generation_prompt: <|start_header_id|>assistant<|end_header_id|>\\n\\n
             (contents stripped). Llama 3.1+ templates open with a system header that always
             holds "Cutting Knowledge Date: December 2023\\nToday Date: {date}\\n\\n" before the
             system message (if any): `knowledge_header=True`; the date is "26 Jul 2024" (3.1)
             or today's as "%d %b %Y" (3.2, whose template calls strftime_now).
    chatml:  <|im_start|>{role}\\n{content}<|im_end|>\\n ... and <|im_start|>assistant\\n to prompt;
             some checkpoints (SmolLM2, Qwen2) insert a default system message when the first
             message is not one: `default_system`.
"""
import re
import time
from dataclasses import dataclass

__all__ = ["ChatFormat", "detect_chat_format", "CHAT_FORMATS"]

CHAT_FORMATS = ("llama2", "llama3", "chatml")
_LLAMA31_DATE = "26 Jul 2024"

Segments = list[tuple[str, bool]]


@dataclass(frozen=True)
class ChatFormat:
    """One family's chat format; see the module docstring for the exact texts."""
    name: str
    default_system: str | None = None  # chatml: system message used when none is given
    knowledge_header: bool = False  # llama3: Llama 3.1+'s "Cutting Knowledge Date" system header
    date_string: str | None = _LLAMA31_DATE  # llama3 with knowledge_header; None: today's date

    def __post_init__(self):
        if self.name not in CHAT_FORMATS:
            raise ValueError(f"unknown chat format {self.name!r}; known: {', '.join(CHAT_FORMATS)}")

    @property
    def end_of_turn(self) -> str | None:
        """The token string that ends an assistant reply (None: the tokenizer's eos)."""
        return {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}.get(self.name)

    def segments(self, messages, add_generation_prompt: bool = False, bos: str = "<s>", eos: str = "</s>") -> Segments:
        """The conversation as (text, is_assistant) segments. `bos`/`eos`: the tokenizer's strings."""
        messages = _checked(messages)
        if self.name == "llama2":
            return _llama2(messages, bos, eos)
        if self.name == "llama3":
            return self._llama3(messages, add_generation_prompt, bos)
        return self._chatml(messages, add_generation_prompt)

    def render(self, messages, add_generation_prompt: bool = False, bos: str = "<s>", eos: str = "</s>") -> str:
        return "".join(text for text, _ in self.segments(messages, add_generation_prompt, bos, eos))

    def _llama3(self, messages, add_generation_prompt, bos) -> Segments:
        out: Segments = [(bos, False)]
        if self.knowledge_header:
            system = ""
            if messages and messages[0]["role"] == "system":
                system, messages = messages[0]["content"].strip(), messages[1:]
            date = self.date_string or time.strftime("%d %b %Y")
            out.append(("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                        f"Today Date: {date}\n\n{system}<|eot_id|>", False))
        for m in messages:
            header = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
            body = m["content"].strip() + "<|eot_id|>"
            if m["role"] == "assistant":
                out += [(header, False), (body, True)]
            else:
                out.append((header + body, False))
        if add_generation_prompt:
            out.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
        return out

    def _chatml(self, messages, add_generation_prompt) -> Segments:
        out: Segments = []
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            out.append((f"<|im_start|>system\n{self.default_system}<|im_end|>\n", False))
        for m in messages:
            if m["role"] == "assistant":
                out += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
            else:
                out.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
        if add_generation_prompt:
            out.append(("<|im_start|>assistant\n", False))
        return out


def _llama2(messages, bos, eos) -> Segments:
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    out: Segments = []
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"llama2 chat format: message {i + (system is not None)} has role {m['role']!r}; "
                             f"after an optional system message, roles must alternate user/assistant")
        if expected == "user":
            content = m["content"]
            if i == 0 and system is not None:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            out.append((f"{bos}[INST] {content.strip()} [/INST]", False))
        else:
            out.append((f" {m['content'].strip()} {eos}", True))
    return out


def _checked(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
    return list(messages)


_CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", re.S)


def detect_chat_format(template: str | None, special_tokens=(), sentencepiece: bool = False) -> ChatFormat | None:
    """The format a checkpoint's Jinja chat template (or, without one, its vocabulary) implies."""
    special_tokens = set(special_tokens)
    if template:
        if "<|start_header_id|>" in template:
            knowledge = "Cutting Knowledge Date" in template
            return ChatFormat("llama3", knowledge_header=knowledge,
                              date_string=None if "strftime_now" in template else _LLAMA31_DATE)
        if "<|im_start|>" in template:
            # a literal system turn (no Jinja expression inside) is the default system message
            literals = (m.group(1) for m in _CHATML_DEFAULT_SYSTEM.finditer(template))
            default = next((text for text in literals if not any(c in text for c in "'\"{}+")), None)
            return ChatFormat("chatml", default_system=None if default is None else default.replace("\\n", "\n"))
        if "[INST]" in template:
            return ChatFormat("llama2")
    if "<|start_header_id|>" in special_tokens:
        return ChatFormat("llama3")
    if "<|im_start|>" in special_tokens:
        return ChatFormat("chatml")
    if sentencepiece:
        return ChatFormat("llama2")
    return None

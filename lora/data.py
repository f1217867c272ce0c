"""Training data: JSONL examples -> token rows with loss labels, packed without cross-attention.

Three example formats, one per JSONL line (a file, or a folder of *.jsonl files):

    {"instruction": "...", "input": "...", "output": "..."}     instruction tuning (input optional)
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   chat
    {"text": "..."}                                               raw text, every token trained

Instruction and chat examples go through the model family's chat template (the tokenizer's
`encode_chat`), and only assistant tokens count in the loss: every other label is IGNORE (-100).

Packing (Note [packing]): examples are laid end to end into rows of `max_length` tokens. Each token
carries the index of its document within the row (`document_ids`, -1 for padding) and its position
within the document (`position_ids`), so the model attends only inside a document and rotary
positions restart at 0: a packed row computes the same logits as its documents run one by one. The
first label of each document is IGNORE, so no token learns to predict across a boundary.
"""
import bisect
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "IGNORE", "Example", "read_jsonl", "tokenize", "pack", "pad_rows", "Batch", "split_eval",
    "DataStats",
]

IGNORE = -100


@dataclass
class Example:
    ids: list[int]  # (T,)
    labels: list[int]  # (T,) IGNORE where the token is not trained


@dataclass
class DataStats:
    examples: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, IGNORE where untrained
    position_ids: torch.Tensor  # (B, T) int64, restarting at 0 per document
    document_ids: torch.Tensor  # (B, T) int64, -1 on padding

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.input_ids, self.labels, self.position_ids, self.document_ids)))


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"no *.jsonl files in the folder {path}")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    return [path]


def _check_example(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: messages[{i}] needs a string 'content'")
            if m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"{where}: messages[{i}] has role {m.get('role')!r}; "
                                 f"expected system, user or assistant")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: the conversation has no assistant message to learn")
        return obj
    if "instruction" in obj:
        for key in ("instruction", "output"):
            if not isinstance(obj.get(key), str):
                raise ValueError(f"{where}: an instruction example needs a string {key!r}")
        if not isinstance(obj.get("input", ""), str):
            raise ValueError(f"{where}: 'input' must be a string")
        return obj
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise ValueError(f"{where}: 'text' must be a non-empty string")
        return obj
    raise ValueError(
        f"{where}: unknown example format with keys {sorted(obj)}; expected 'messages', "
        f"'instruction'/'output' or 'text'"
    )


def read_jsonl(path) -> list[dict]:
    """Every example of a JSONL file or folder, validated; errors name the file and line."""
    examples = []
    for file in _files(Path(path)):
        with open(file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{file}, line {lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: malformed JSON: {e.msg}") from None
                examples.append(_check_example(obj, where))
    if not examples:
        raise ValueError(f"the dataset {path} holds no examples")
    return examples


def to_messages(example: dict) -> list[dict] | None:
    """Chat messages of an instruction or chat example; None for raw text."""
    if "messages" in example:
        return example["messages"]
    if "instruction" in example:
        prompt = example["instruction"]
        if example.get("input"):
            prompt = f"{prompt}\n\n{example['input']}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": example["output"]}]
    return None


def tokenize(examples: list[dict], tok, max_length: int, stats: DataStats | None = None) -> list[Example]:
    """Token ids and labels of each example, truncated to max_length (counted in `stats`)."""
    stats = stats if stats is not None else DataStats()
    out = []
    for example in examples:
        messages = to_messages(example)
        if messages is None:
            ids = tok.encode(example["text"], add_bos=True) + [tok.eos_id]
            labels = list(ids)
        else:
            ids, trained = tok.encode_chat(messages)
            labels = [t if keep else IGNORE for t, keep in zip(ids, trained)]
        if len(ids) > max_length:
            stats.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        stats.examples += 1
        stats.tokens += len(ids)
        stats.trained_tokens += sum(label != IGNORE for label in labels[1:])
        out.append(Example(ids, labels))
    return out


def split_eval(examples: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic held-out split: (train, eval). At least one eval example when fraction > 0."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(examples))) if eval_fraction > 0 else 0
    if n_eval >= len(examples):
        raise ValueError(f"{len(examples)} examples are too few to hold out {n_eval} for evaluation")
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [examples[i] for i in sorted(held)]


@dataclass
class _Row:
    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    documents: list[int] = field(default_factory=list)

    def add(self, example: Example) -> None:
        doc = (self.documents[-1] + 1) if self.documents else 0
        self.ids += example.ids
        self.labels += [IGNORE] + example.labels[1:]  # never predict across a document boundary
        self.positions += list(range(len(example.ids)))
        self.documents += [doc] * len(example.ids)


def pack(examples: list[Example], max_length: int) -> list[_Row]:
    """Best-fit-decreasing packing of examples into rows of at most max_length tokens.

    See Note [packing]. Each example, longest first, goes to the row with the least room that
    still holds it. Deterministic for a given input order; O(n log n) searches."""
    rows: list[_Row] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, row index)
    for example in sorted(examples, key=lambda e: -len(e.ids)):
        n = len(example.ids)
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            free, index = room.pop(at)
        else:
            rows.append(_Row())
            free, index = max_length, len(rows) - 1
        rows[index].add(example)
        bisect.insort(room, (free - n, index))
    return rows


def unpacked(examples: list[Example]) -> list[_Row]:
    rows = []
    for example in examples:
        row = _Row()
        row.add(example)
        rows.append(row)
    return rows


def pad_rows(rows: list[_Row], length: int, pad_id: int) -> Batch:
    """Stack rows into a Batch of shape (B, length), padding on the right."""
    def padded(values, fill):
        return [v + [fill] * (length - len(v)) for v in values]

    return Batch(
        input_ids=torch.tensor(padded([r.ids for r in rows], pad_id), dtype=torch.long),
        labels=torch.tensor(padded([r.labels for r in rows], IGNORE), dtype=torch.long),
        position_ids=torch.tensor(padded([r.positions for r in rows], 0), dtype=torch.long),
        document_ids=torch.tensor(padded([r.documents for r in rows], -1), dtype=torch.long),
    )

import json

import pytest
import torch

from lora.data import (
    IGNORE, DataStats, Example, pack, pad_rows, read_jsonl, split_eval, to_messages, tokenize, unpacked,
)


class CharTokenizer:
    """A tiny stand-in with the models.Tokenizer interface: one token per character, a made-up
    chat format '<u>...</u><a>...</a>' where the assistant text and its '</a>' are trained."""
    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text, add_bos=False):
        return ([self.bos_id] if add_bos else []) + [ord(c) for c in text]

    def encode_chat(self, messages, add_generation_prompt=False):
        ids, mask = [self.bos_id], [False]
        for m in messages:
            tag = m["role"][0]
            head, body, tail = self.encode(f"<{tag}>"), self.encode(m["content"]), self.encode(f"</{tag}>")
            trained = m["role"] == "assistant"
            ids += head + body + tail
            mask += [False] * len(head) + [trained] * (len(body) + len(tail))
        return ids, mask


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_three_formats_and_masks(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        {"instruction": "Add", "input": "1 2", "output": "3"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"text": "abc"},
    ])
    examples = read_jsonl(path)
    assert to_messages(examples[0]) == [{"role": "user", "content": "Add\n\n1 2"},
                                        {"role": "assistant", "content": "3"}]
    tok = CharTokenizer()
    rows = tokenize(examples, tok, max_length=100)
    chat = rows[1]
    text = "".join(chr(i) if i > 2 else "|" for i in chat.ids)
    assert text == "|<u>hi</u><a>yo</a>"
    trained = "".join(chr(i) for i, label in zip(chat.ids, chat.labels) if label != IGNORE)
    assert trained == "yo</a>"
    raw = rows[2]
    assert raw.ids == [1, 97, 98, 99, 2] and raw.labels == raw.ids


def test_truncation_is_counted(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"text": "x" * 50}, {"text": "short"}])
    stats = DataStats()
    rows = tokenize(read_jsonl(path), CharTokenizer(), max_length=16, stats=stats)
    assert [len(r.ids) for r in rows] == [16, 7]
    assert (stats.examples, stats.truncated) == (2, 1)


def test_packing_positions_documents_and_boundary_labels():
    a = Example(ids=[5, 6, 7], labels=[5, 6, 7])
    b = Example(ids=[8, 9], labels=[IGNORE, 9])
    c = Example(ids=[10, 11, 12, 13], labels=[10, 11, 12, 13])
    rows = pack([a, b, c], max_length=7)
    assert [r.ids for r in rows] == [[10, 11, 12, 13, 5, 6, 7], [8, 9]]
    first = rows[0]
    assert first.positions == [0, 1, 2, 3, 0, 1, 2]
    assert first.documents == [0, 0, 0, 0, 1, 1, 1]
    assert first.labels == [IGNORE, 11, 12, 13, IGNORE, 6, 7]  # no label crosses a boundary
    batch = pad_rows(rows, 7, pad_id=0)
    assert batch.input_ids.shape == (2, 7)
    assert batch.input_ids[1].tolist() == [8, 9, 0, 0, 0, 0, 0]
    assert batch.labels[1].tolist() == [IGNORE, 9] + [IGNORE] * 5
    assert batch.document_ids[1].tolist() == [0, 0, -1, -1, -1, -1, -1]


def test_packing_never_overflows_and_keeps_every_token():
    examples = [Example(ids=list(range(n)), labels=list(range(n)))
                for n in torch.randint(1, 60, (300,)).tolist()]
    rows = pack(examples, max_length=64)
    assert all(len(r.ids) <= 64 for r in rows)
    assert sum(len(r.ids) for r in rows) == sum(len(e.ids) for e in examples)
    lower_bound = -(-sum(len(e.ids) for e in examples) // 64)
    assert len(rows) <= 1.1 * lower_bound + 1  # best-fit-decreasing packs tightly
    assert len(unpacked(examples)) == 300


def test_eval_split_is_deterministic_and_disjoint():
    items = list(range(50))
    train, held = split_eval(items, 0.2, seed=3)
    assert len(held) == 10 and sorted(train + held) == items
    assert split_eval(items, 0.2, seed=3) == (train, held)
    assert split_eval(items, 0.2, seed=4)[1] != held
    assert split_eval(items, 0.0, seed=3) == (items, [])
    with pytest.raises(ValueError, match="too few"):
        split_eval([1], 0.5, seed=0)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok"', "line 2: malformed JSON"),
        ('[1, 2]', "line 2: expected a JSON object"),
        ('{"prompt": "x"}', "line 2: unknown example format with keys \\['prompt'\\]"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "line 2: messages\\[0\\] has role 'bot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "line 2: the conversation has no assistant"),
        ('{"instruction": "x"}', "line 2: an instruction example needs a string 'output'"),
        ('{"text": ""}', "line 2: 'text' must be a non-empty string"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", ['{"text": "fine"}', line])
    with pytest.raises(ValueError, match=f"bad.jsonl, {message}"):
        read_jsonl(path)


def test_empty_dataset_and_missing_paths(tmp_path):
    with pytest.raises(ValueError, match="holds no examples"):
        read_jsonl(_write(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(FileNotFoundError, match="no such data file"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.jsonl files"):
        read_jsonl(tmp_path / "folder")


def test_a_folder_of_files_is_read_in_name_order(tmp_path):
    (tmp_path / "f").mkdir()
    _write(tmp_path / "f" / "b.jsonl", [{"text": "second"}])
    _write(tmp_path / "f" / "a.jsonl", [{"text": "first"}])
    assert [e["text"] for e in read_jsonl(tmp_path / "f")] == ["first", "second"]

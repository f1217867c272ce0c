"""benchmarks/read_floor.py: the read kernel touches every word (under the interpreter on the CPU)."""
import functools

import pytest
import torch

from benchmarks.read_floor import READ_CONFIGS, read_floor_us, read_words


@pytest.mark.parametrize("numel,block", [(64, 16), (70, 16), (5, 32)])
def test_read_words_xors_every_word_of_each_program(numel, block):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    words = torch.randint(-2**31, 2**31 - 1, (numel,), dtype=torch.int32, device=device)
    got = read_words(words, block, num_warps=1)
    padded = torch.cat([words.cpu(), torch.zeros(-numel % block, dtype=torch.int32)]).view(-1, block)
    want = torch.tensor([functools.reduce(lambda a, b: a ^ b, row.tolist()) for row in padded], dtype=torch.int32)
    assert torch.equal(got.cpu(), want)


def test_read_words_rejects_other_dtypes():
    with pytest.raises(ValueError, match=r"1-D int32 tensor, got torch.uint8 of shape \(8,\)"):
        read_words(torch.zeros(8, dtype=torch.uint8), 16, num_warps=1)


def test_read_floor_is_the_fastest_config_by_the_given_timer():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    outputs = []

    def timer(fn):  # runs the call once; the n-th config "takes" 10 - n us
        outputs.append(fn())
        return 10.0 - len(outputs)

    assert read_floor_us(1000, timer, device=device) == 10.0 - len(READ_CONFIGS)
    assert len(outputs) == len(READ_CONFIGS)
    assert all(out.numel() == -(-250 // block) for out, (block, _) in zip(outputs, READ_CONFIGS))
    assert all(int(out.abs().sum()) == 0 for out in outputs)  # a zero buffer xors to zero

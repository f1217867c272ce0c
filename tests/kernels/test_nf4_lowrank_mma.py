"""kernels/nf4_lowrank_mma.py on the CPU: what it takes, its configs, and its code lookup's PTX
(emulated). The kernel itself is checked on the GPU (test_nf4_lowrank_mma_gpu.py) and compiled
for sm_90 in test_compile_sm90.py."""
import numpy as np
import pytest
import torch

from kernels import nf4_lowrank_mma
from tests.kernels.nf4_inputs import NF4_CODE
from tests.kernels.test_nf4_mma import _run_ptx


@pytest.mark.parametrize("n_cols,rank,address,fits", [
    (4096, 16, 0, True), (96, 1, 4, True), (4096, 64, 0, True), (4096, 65, 0, False), (4096, 0, 0, False),
    (4112, 16, 0, False), (4096, 16, 2, False)])
def test_lowrank_mma_fits(n_cols, rank, address, fits):
    assert nf4_lowrank_mma.lowrank_mma_fits(n_cols, rank, address) is fits


@pytest.mark.parametrize("rank,quads", [(1, {1, 2}), (16, {1, 2}), (32, {1, 2}), (33, {1}), (64, {1})])
def test_configs_keep_the_strip_of_lora_a_in_32_registers(rank, quads):
    configs = nf4_lowrank_mma._configs(rank)
    assert configs and {c.quads for c in configs} == quads
    assert all(c.quads * -(-rank // 16) <= 4 for c in configs)


def test_code_lookup_ptx_gives_a_words_8_codes_in_element_order():
    """(word >> b) & 0x3C | table addresses code[nibble at bit b]; byte i holds elements 2i (high
    nibble) and 2i + 1, as bitsandbytes packs them."""
    table = 0x440  # any 64-byte aligned shared address
    bits = NF4_CODE.view(torch.int32).numpy().astype(np.uint64) & 0xFFFFFFFF
    shared = {table + 4 * i: int(bits[i]) for i in range(16)}
    words = np.concatenate([np.random.default_rng(0).integers(0, 2 ** 32, 2000, dtype=np.uint64),
                            np.array([0x01234567, 0x89ABCDEF, 0, 0xFFFFFFFF], dtype=np.uint64)])
    regs = _run_ptx(nf4_lowrank_mma._LOOKUP8.value, {"$8": words, "$9": np.full_like(words, table)}, shared)
    for element in range(8):
        byte = (words >> (8 * (element // 2))) & 0xFF
        nibble = byte >> 4 if element % 2 == 0 else byte & 0xF
        np.testing.assert_array_equal(regs[f"${element}"], bits[nibble.astype(np.int64)])

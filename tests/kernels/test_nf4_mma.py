"""What of the tensor-core small-M kernel (kernels/nf4_mma.py) can be checked without a GPU.

Its PTX runs only on the device (test_nf4_mma_gpu.py checks its numbers, test_compile_sm90.py
compiles it here); on the CPU: the planes its lookup reads, the PTX of that lookup (run by a small
interpreter of the five instructions it uses), when the kernel applies, the untimed config, and
the errors of matmul_nf4_mma.
"""
import numpy as np
import pytest
import torch

import kernels
from kernels import nf4_matmul, nf4_mma, nf4_mma_t
from tests.kernels.nf4_inputs import NF4_CODE, random_nf4


def _plane_values(planes: torch.Tensor) -> torch.Tensor:
    """(8, 32) int32 planes (low bytes of entries 0-15 in rows 0-3, high bytes in rows 4-7, every
    column one lane's copy) -> (16,) 16-bit patterns, from lane 0."""
    lanes = planes[:, 0].contiguous().view(torch.uint8).view(2, 16).to(torch.int32)  # (low, high) x entry
    return lanes[0] | (lanes[1] << 8)


def test_bfloat16_planes_hold_the_code_rounded_to_bfloat16_in_every_lane():
    planes = kernels.prepare(*random_nf4(8, 64)).code_planes  # (24, 32)
    assert torch.equal(planes[16:], planes[16:, :1].expand(8, 32))
    want = NF4_CODE.bfloat16().view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(_plane_values(planes[16:]), want)
    assert torch.equal(_plane_values(planes[:8]), NF4_CODE.half().view(torch.int16).to(torch.int32) & 0xFFFF)


@pytest.mark.parametrize("blocksize,n_cols,address,fits", [
    (64, 4096, 0, True), (32, 96, 256, True), (256, 14336, 16, True),
    (16, 4096, 0, False), (48, 4800, 0, False), (64, 4100, 0, False), (64, 4096, 8, False)])
def test_mma_fits(blocksize, n_cols, address, fits):
    assert nf4_mma.mma_fits(blocksize, n_cols, address) is fits


@pytest.mark.parametrize("n_rows,warps", [(17, 16), (4096, 16), (8192, 8), (14336, 4), (28672, 2), (128256, 2)])
def test_untimed_config_aims_at_about_4096_warps(n_rows, warps):
    assert nf4_mma.untimed_config(n_rows) == nf4_mma.MmaConfig(warps, 4, 1, depth=1)
    assert nf4_mma.untimed_config(n_rows) in nf4_mma.MMA_CONFIGS
    for m in (17, 33, 64):  # Note [column tiles]: fewer groups per iteration, sums in scratch if too big
        config = nf4_mma.untimed_config(n_rows, m)
        assert config in nf4_mma._timed_configs(m), (n_rows, m, config)


@pytest.mark.parametrize("m,tiles", [(1, 1), (8, 1), (9, 2), (16, 2), (17, 4), (32, 4), (33, 8), (64, 8)])
def test_column_tiles_are_powers_of_two_covering_m(m, tiles):
    assert nf4_mma.column_tiles(m) == tiles


@pytest.mark.parametrize("m,vec", [(64, 2), (20, 1), (33, 4)])
def test_x_fragments_give_each_lane_its_slice_of_x(m, vec):
    """Note [x fragments]: load i of column tile j in group G, lane 4 g + t, holds x[8 j + g, 32 vec G
    + 8 vec t + 8 i : + 8]; rows past M are zero."""
    k = 32 * vec * 3
    x = torch.randn(m, k).to(torch.bfloat16)
    tiles = nf4_mma.column_tiles(m)
    frags = nf4_mma.x_fragments(x, vec, tiles).reshape(-1, 8)  # one row per lane and load
    padded = torch.cat([x, torch.zeros(8 * tiles - m, k, dtype=x.dtype)])
    for group in range(3):
        for j in range(tiles):
            for i in range(vec):
                for lane in (0, 5, 31):
                    g, t = lane // 4, lane % 4
                    at = ((group * tiles + j) * vec + i) * 32 + lane
                    col = 32 * vec * group + 8 * vec * t + 8 * i
                    assert torch.equal(frags[at], padded[8 * j + g, col:col + 8]), (group, j, i, lane)


def test_every_timed_config_fits_the_static_shared_memory_and_the_registers():
    assert nf4_mma._timed_configs(8) == nf4_mma.MMA_CONFIGS_M8 + nf4_mma.MMA_TABLE_CONFIGS
    at_16 = nf4_mma.MMA_CONFIGS + nf4_mma.MMA_TABLE_CONFIGS_M16
    assert nf4_mma._timed_configs(9) == nf4_mma._timed_configs(16) == at_16
    for m in (1, 16, 17, 64):
        timed = nf4_mma._timed_configs(m)
        assert len(timed) >= 7, m
        for config in timed:
            assert nf4_mma.shared_bytes(config, m) <= nf4_mma.STATIC_SHARED_MAX, (config, m)
            assert config.unroll * config.row_tiles * nf4_mma.column_tiles(m) <= 16, (config, m)
    assert nf4_mma.shared_bytes(nf4_mma.MmaConfig(16, 2, 2, table=4), 16) == 32 * 1024 + 4 * 16 * 16 * 32
    assert nf4_mma.shared_bytes(nf4_mma.MmaConfig(8, 2, 1), 64) == 4 * 8 * 64 * 16


def test_a_config_over_the_shared_memory_is_refused_by_name():
    weight = kernels.prepare(*random_nf4(64, 256))
    x = torch.zeros(16, 256, dtype=torch.bfloat16)
    config = nf4_mma.MmaConfig(16, 2, 2, table=4)
    with pytest.raises(ValueError, match=r"table=4.* at M = 16 needs 65536 bytes .* shared_sums=False"):
        nf4_mma.mma_gemv(x, weight, None, torch.empty(16, 64, dtype=torch.bfloat16), config)


def test_several_tiles_per_program_with_loads_two_iterations_ahead_are_refused():
    weight = kernels.prepare(*random_nf4(64, 256))
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    config = nf4_mma.MmaConfig(8, 4, 1, depth=2, tiles=2)
    with pytest.raises(ValueError, match=r"depth=2, .*tiles=2, x_ahead=False\): several tiles per program need "
                                         r"depth=1"):
        nf4_mma.mma_gemv(x, weight, None, torch.empty(1, 64, dtype=torch.bfloat16), config)


@pytest.mark.parametrize("m,depth", [(16, 2), (17, 1)])
def test_x_ahead_is_refused_with_loads_two_iterations_ahead_or_over_16_rows(m, depth):
    weight = kernels.prepare(*random_nf4(64, 256))
    x = torch.zeros(m, 256, dtype=torch.bfloat16)
    config = nf4_mma.MmaConfig(8, 2, 2, depth=depth, x_ahead=True)
    with pytest.raises(ValueError, match=rf"depth={depth}, .*x_ahead=True\) at M = {m}: x ahead needs depth=1 and at "
                                         r"most 16 rows of x"):
        nf4_mma.mma_gemv(x, weight, None, torch.empty(m, 64, dtype=torch.bfloat16), config)


def test_matmul_nf4_mma_says_what_it_needs():
    packed, state = random_nf4(32, 128)
    x = torch.randn(1, 128, dtype=torch.float16)
    with pytest.raises(ValueError, match="needs float16 or bfloat16 x on CUDA .* blocksize 64, K 128.* 16 bytes"):
        nf4_matmul.matmul_nf4_mma(x, packed, state)  # a CPU tensor (here under the interpreter)
    with pytest.raises(ValueError, match=r"bias must have shape \(32,\)"):
        nf4_matmul.matmul_nf4_mma(x, packed, state, torch.zeros(31, dtype=torch.float16))


def test_matmul_nf4_keeps_the_interpreter_on_the_triton_gemv():
    packed, state = random_nf4(32, 128)
    x = torch.randn(2, 128, dtype=torch.float16)
    assert not nf4_matmul._mma_runs(x, kernels.prepare(packed, state))
    want = x.double() @ kernels.reference.dequantize_nf4(packed, state, torch.float64).T
    torch.testing.assert_close(kernels.matmul_nf4(x, packed, state).double(), want, rtol=2e-3, atol=2e-3)


def _run_ptx(asm: str, inputs: dict[str, np.ndarray], shared: dict[int, int] | None = None) -> dict[str, np.ndarray]:
    """Run the straight-line b32 PTX of a lookup (and, shr, shl, mad.lo, prmt, lop3, ld.shared from
    the 32-bit words of `shared` by byte address) on uint32 arrays; registers are `$n` or names,
    immediates are hex or decimal."""
    regs = dict(inputs)

    def value(token: str) -> np.ndarray:
        return regs[token] if token in regs else np.uint64(int(token, 0))

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith((".reg", "{", "}")):
            continue
        op, args = line.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        if op in ("ld.shared.f32", "ld.shared.b32"):  # dst, [address register]
            addresses = regs[src[0].strip("[]")]
            regs[dst] = np.array([shared[int(at)] for at in np.ravel(addresses)], dtype=np.uint64)
            continue
        a, b, c = (value(s) for s in (src + ["0", "0"])[:3])
        if op == "and.b32":
            out = a & b
        elif op == "shr.u32":
            out = a >> b
        elif op == "shl.b32":
            out = (a << b) & 0xFFFFFFFF
        elif op == "mad.lo.u32":
            out = (a * b + c) & 0xFFFFFFFF
        elif op == "lop3.b32":
            lut = int(src[3], 0)
            out = np.zeros_like(a + b + c)
            for index in range(8):  # truth-table entry (a bit, b bit, c bit) = (index >> 2, >> 1, >> 0) & 1
                if lut >> index & 1:
                    pick = [(x if index >> (2 - i) & 1 else ~x & 0xFFFFFFFF) for i, x in enumerate((a, b, c))]
                    out |= pick[0] & pick[1] & pick[2]
        elif op == "prmt.b32":
            source = (b << 32) | a  # bytes 0-3 from a, 4-7 from b
            out = np.zeros_like(a + b + c)
            for k in range(4):
                selector = (c >> (4 * k)) & 0xF
                byte = (source >> (8 * (selector & 7))) & 0xFF
                byte = np.where(selector & 8, np.where(byte & 0x80, 0xFF, 0), byte)  # sign mode
                out |= byte.astype(np.uint64) << (8 * k)
        else:
            raise AssertionError(f"unexpected PTX: {line}")
        regs[dst] = np.asarray(out, dtype=np.uint64) & 0xFFFFFFFF
    return regs


@pytest.mark.parametrize("float16", [False, True])
def test_pair_lookup_ptx_gives_each_byte_its_two_codes_in_order(float16):
    rows = slice(0, 8) if float16 else slice(16, 24)  # NF4Weight.code_planes: float16, then bfloat16 planes
    planes = kernels.prepare(*random_nf4(8, 64)).code_planes[rows, 0]  # lane 0's copy
    words = np.concatenate([np.random.default_rng(0).integers(0, 2 ** 32, 4000, dtype=np.uint64),
                            np.array([0x01234567 * k & 0xFFFFFFFF for k in range(16)], dtype=np.uint64),
                            np.array([0xFEDCBA98, 0x89ABCDEF, 0, 0xFFFFFFFF], dtype=np.uint64)])
    inputs = {"$4": words}
    inputs.update({f"${5 + i}": np.full_like(words, int(planes[i]) & 0xFFFFFFFF) for i in range(8)})
    regs = _run_ptx(nf4_mma._PAIR_ASM.value, inputs)
    table = (NF4_CODE.half() if float16 else NF4_CODE.bfloat16()).view(torch.int16).numpy().astype(np.uint64) & 0xFFFF
    for pair in range(4):  # register $pair: elements 2 pair (low half) and 2 pair + 1; byte i = (high, low) nibble
        byte = (words >> (8 * pair)) & 0xFF
        want = table[(byte >> 4).astype(np.int64)] | (table[(byte & 0xF).astype(np.int64)] << 16)
        np.testing.assert_array_equal(regs[f"${pair}"], want)


@pytest.mark.parametrize("float16", [False, True])
def test_pair_table_ptx_matches_the_permutes_for_every_lane(float16):
    """Note [pair table]: the table as the kernel fills it (entry (b, lane) at 128 b + 4 lane: pair k of
    the permute lookup of the run word (4 q, 4 q + 1, 4 q + 2, 4 q + 3) for b = 4 q + k) and the table
    lookup of words from any lane."""
    rows = slice(0, 8) if float16 else slice(16, 24)
    planes = kernels.prepare(*random_nf4(8, 64)).code_planes[rows, 0]
    plane_inputs = {f"${5 + i}": int(planes[i]) & 0xFFFFFFFF for i in range(8)}
    firsts = np.arange(0, 256, 4, dtype=np.uint64)
    fill_words = firsts * 0x01010101 + 0x03020100
    pairs = _run_ptx(nf4_mma._PAIR_ASM.value, {"$4": fill_words, **{k: np.full_like(fill_words, v)
                                                                     for k, v in plane_inputs.items()}})
    base = 0x2400  # any 16-aligned shared address
    shared = {base + 128 * (4 * q + k) + 4 * lane: int(pairs[f"${k}"][q])
              for q in range(64) for k in range(4) for lane in range(32)}
    rng = np.random.default_rng(1)
    words = np.concatenate([rng.integers(0, 2 ** 32, 4000, dtype=np.uint64),
                            np.array([0, 0xFFFFFFFF, 0x01234567, 0xFEDCBA98], dtype=np.uint64)])
    lanes = rng.integers(0, 32, words.size, dtype=np.uint64)
    got = _run_ptx(nf4_mma._TABLE_ASM.value, {"$4": words, "$5": base + 4 * lanes}, shared)
    want = _run_ptx(nf4_mma._PAIR_ASM.value, {"$4": words, **{k: np.full_like(words, v)
                                                               for k, v in plane_inputs.items()}})
    for pair in range(4):
        np.testing.assert_array_equal(got[f"${pair}"], want[f"${pair}"])


@pytest.mark.parametrize("blocksize,n_rows,n_cols,address,fits", [
    (64, 4096, 4096, 0, True), (256, 2, 128, 16, True), (32, 4096, 4096, 0, False),
    (64, 4095, 4096, 0, False), (64, 4096, 4160 + 32, 0, False), (64, 4096, 4096, 4, False)])
def test_mma_t_fits(blocksize, n_rows, n_cols, address, fits):
    assert nf4_mma_t.mma_t_fits(blocksize, n_rows, n_cols, address) is fits

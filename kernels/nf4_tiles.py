"""Reading an NF4 weight inside Triton kernels: the checked kernel arguments, block scales, W tiles.

Every kernel in this package reads W the same way (kernels/reference.py states the formula):

    scale[b]  = absmax[b]                                              without double quant
              = nested_code[absmax[b]] * nested_absmax[b // 256] + offset   with double quant
    W[n, k]   = code[nibble(n*K + k)] * scale[(n*K + k) // blocksize]       float32

`nf4_tile` returns a float32 tile W[offs_n, k0 : k0 + BLOCK_K] in registers; kernels cast it to the
operand dtype and feed it to `tl.dot` or to an FMA reduction. W never goes to memory.

Note [two tile layouts]
    When K % blocksize == 0 and K % 8 == 0 (the usual case: model widths are multiples of 64),
    each row starts on a block and a 32-bit word boundary. Then a tile row is BLOCK_K/8 contiguous
    words (one wide load), each word is split into its 8 codes by 8 shift-and-masks (no byte
    extraction, no shuffles: the codes land in element order in the same thread), and the scales are
    decoded once per (row, block) and broadcast over the block: the double-quant decode costs one
    gather per `blocksize` weights, not one per weight. Otherwise (K % blocksize != 0, or odd K so
    rows start in the middle of a byte) the tile is read element by element from its flat index
    e = n*K + k: byte e // 2, the high nibble when e is even, scale of block e // blocksize. That
    path is slower but exact for any shape; no kernel falls back to anything else. It still
    decodes scales per (row, block): a row's BLOCK_K elements span at most (BLOCK_K-1)//blocksize
    + 2 blocks, which are decoded once per row and picked per element with tl.where.

Note [tiled codes]
    The packed codes may also be held in the order the tensor-core kernel reads them (NF4Weight.tiled;
    tile_codes / untile_codes convert). W is cut into bands of 16 rows and groups of 32 VEC columns
    (16 VEC bytes per row, VEC = words_per_lane(blocksize): 1, 2 or 4); a band's group is 256 VEC
    consecutive bytes, where lane 4 g + t of kernels/nf4_mma.py (Note [lane map]) finds its 4 VEC
    bytes of row g, then its 4 VEC bytes of row g + 8:

        byte c of row n  ->  (n // 16) 8 K + (c // 16 VEC) 256 VEC + (4 (n % 8) + c % 16 VEC // 4 VEC) 8 VEC
                             + (n % 16 // 8) 4 VEC + c % 4 VEC                                      (code_offset)

    So one load of 8 VEC bytes per lane gives a lane both rows, and a warp's load reads 256 VEC
    consecutive bytes (4 L1 wavefronts at blocksize 64), where in row order each load touches 8 rows
    (8 wavefronts for a quarter of the bytes). Runs of 4 VEC >= 4 bytes stay whole, so the kernels
    that load 32-bit words of a row read them at code_offset. It needs N % 16 == 0 and K a multiple
    of the blocksize, a multiple of 32 (tiles_fit). H100, graph replay, rows -> tiles in one run (run
    151, benchmarks/RESULTS.md): x @ W.T at M = 1 4096 x 4096 8.0 -> 7.2 us, 14336 x 4096 19.8 -> 17.0,
    4096 x 14336 18.3 -> 15.2, 8192 x 8192 19.8 -> 16.5, 28672 x 8192 61.4 -> 52.2 (2.45-2.88x of
    torch's bf16 product -> 2.69-3.47x); M = 16 9.8 -> 9.3, 26.0 -> 21.7, 22.2 -> 20.0, 26.5 -> 22.3,
    81.7 -> 68.4 (1.94-2.38x -> 2.13-2.64x); the same sums, bit-identical outputs. A graphed decoding
    step (GPU time, run 155): Llama-3.1-8B 7.53 -> 7.21 ms, Llama-3.2-1B 2.89 -> 2.85 ms. What it costs
    (the same comparisons): the dequantization kernel for large M 3-6% more time on the four larger
    shapes (run 155, do_bench; kernels/nf4_dequant.py); g @ W at M = 1 (kernels/nf4_mma_t.py) takes
    2-9% less on those shapes and 2% more on 4096 x 4096 (run 156); at M = 4096 both directions
    stayed within the runs' spread (run 153, 0.85-0.95x against 0.85-0.92x). The state dict keeps
    bitsandbytes' row order (quant/linear.py Note [tiled codes on the GPU]).

Note [code lookup]
    The 16-value code (NF4 or FP4) is gathered with tl.load from the 64-byte float32 table in
    global memory. A warp's 32 lookups fall in one 128-byte line, so they cost one L1 wavefront,
    like bitsandbytes' shared-memory table, and need no per-call set-up. Rejected: a tl.where tree
    (15 selects per value, so ALU-bound where the lookup is one load), and a 256-entry table that
    maps a byte to both values (half the lookups, but a warp's gathers then spread over 16 lines).
    The value is looked up in float32 and multiplied by the float32 scale before any rounding, so
    tiles equal the reference's dequantized W. In the tensor-core kernels Triton's pipeliner
    stages this gather through shared memory like an operand load (seen in the sm_90 IR), at
    BLOCK_N * BLOCK_K * 4 bytes per stage, which bounds num_stages. Where the lookup limits the
    small-M path, the M = 1 GEMV uses an in-register table instead (byte permutes in inline PTX:
    Note [prmt lookup] in kernels/nf4_gemv.py).
"""
import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.reference import NESTED_BLOCKSIZE

__all__ = ["NF4Weight", "nf4_weight", "rows_hold_whole_blocks", "words_per_lane", "tiles_fit", "tile_codes",
           "untile_codes", "code_offset", "block_scale", "split_range", "nibble_shifts", "nf4_tile",
           "store_output", "interpreting", "on_device"]

_NESTED_BLOCKSIZE = tl.constexpr(NESTED_BLOCKSIZE)


def on_device(device: torch.device):
    """Launch on `device` (Triton launches on the current CUDA device); a no-op on the CPU and when
    `device` is already current (entering torch.cuda.device costs 2 us of host time per call)."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when the kernel modules are imported.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU tensors; autotuning tries one config), as
    it was when the kernels were imported."""
    return _INTERPRETING


def rows_hold_whole_blocks(n_cols: int, blocksize: int) -> bool:
    """Rows of W start on block and 32-bit word boundaries: see Note [two tile layouts]."""
    return n_cols % max(blocksize, 8) == 0


def words_per_lane(blocksize: int) -> int:
    """VEC: 32-bit words of W per lane, row and group of the tensor-core kernel (kernels/nf4_mma.py
    Note [lane map]), which also sets the tiled layout (Note [tiled codes])."""
    return 4 if blocksize >= 128 else blocksize // 32


def tiles_fit(n_rows: int, n_cols: int, blocksize: int) -> bool:
    """Whether W (n_rows, n_cols) can hold its codes tiled (Note [tiled codes])."""
    return blocksize % 32 == 0 and n_cols % blocksize == 0 and n_rows % 16 == 0


def _tiles_unfit(n_rows: int, n_cols: int, blocksize: int) -> str:
    return (f"tiled codes need N % 16 == 0 and K a multiple of the blocksize (a multiple of 32), got W of "
            f"shape {(n_rows, n_cols)} at blocksize {blocksize}")


def _tile_view(n_rows: int, n_cols: int, blocksize: int) -> tuple[int, ...]:
    """Row-order bytes as (band, half, g, group, t, run): row 16 band + 8 half + g, byte 16 VEC group
    + 4 VEC t + run."""
    if not tiles_fit(n_rows, n_cols, blocksize):
        raise ValueError(_tiles_unfit(n_rows, n_cols, blocksize))
    vec = words_per_lane(blocksize)
    return n_rows // 16, 2, 8, n_cols // (32 * vec), 4, 4 * vec


def tile_codes(packed: torch.Tensor, n_rows: int, n_cols: int, blocksize: int) -> torch.Tensor:
    """Packed codes of W (n_rows, n_cols) in row order -> tiled (Note [tiled codes]), a new (N K / 2,) tensor."""
    view = packed.reshape(_tile_view(n_rows, n_cols, blocksize))  # band, half, g, group, t, run
    return view.permute(0, 3, 2, 4, 1, 5).contiguous().view(-1)  # band, group, g, t, half, run


def untile_codes(tiled: torch.Tensor, n_rows: int, n_cols: int, blocksize: int) -> torch.Tensor:
    """The inverse of tile_codes: row order, a new (N K / 2,) tensor."""
    band, half, g, group, t, run = _tile_view(n_rows, n_cols, blocksize)
    view = tiled.reshape(band, group, g, t, half, run)
    return view.permute(0, 4, 2, 1, 3, 5).contiguous().view(-1)


@triton.jit
def code_offset(row, byte, K, BLOCKSIZE: tl.constexpr, TILED: tl.constexpr):
    """int64 offset of byte `byte` of row `row` of the packed codes (rows hold whole blocks, K even):
    row order, or tiled (Note [tiled codes]); tensors or scalars."""
    if TILED:
        VEC: tl.constexpr = 4 if BLOCKSIZE >= 128 else BLOCKSIZE // 32  # words_per_lane
        RUN: tl.constexpr = 4 * VEC
        in_band = row % 16
        lane = 4 * (in_band % 8) + (byte % (4 * RUN)) // RUN
        return ((row // 16).to(tl.int64) * (8 * K) + (byte // (4 * RUN)).to(tl.int64) * (64 * RUN)
                + lane * (2 * RUN) + (in_band // 8) * RUN + byte % RUN)
    else:
        return row.to(tl.int64) * (K // 2) + byte


@dataclass(frozen=True)
class NF4Weight:
    """(packed, state) checked once and laid out as kernel arguments."""
    packed: torch.Tensor         # uint8 ((N*K + 1) // 2,)
    absmax: torch.Tensor         # float32 (nblocks,), or uint8 (nblocks,) codes with double quant
    nested_absmax: torch.Tensor  # float32 (ceil(nblocks / 256),); `absmax` again without double quant
    nested_code: torch.Tensor    # float32 (256,); `code` again without double quant
    offset: torch.Tensor | float  # a one-element float32 tensor on the device, or a float
    code: torch.Tensor           # float32 (16,)
    n_rows: int                  # N, out_features
    n_cols: int                  # K, in_features
    blocksize: int
    double_quant: bool
    byte_code: torch.Tensor      # float32 (256, 2): the two values a packed byte holds, high nibble first
    code_planes: torch.Tensor    # int32 (24, 32): byte planes of `code` as float16, as filled bfloat16, as bfloat16
                                 # (kernels/nf4_gemv.py Note [prmt lookup], kernels/nf4_mma.py Note [pair
                                 # lookup]), one copy per lane
    tiled: bool = False          # packed holds the codes tiled (Note [tiled codes]), else in row order

    @property
    def offset_is_pointer(self) -> bool:
        return isinstance(self.offset, torch.Tensor)

    @property
    def whole_blocks(self) -> bool:
        return rows_hold_whole_blocks(self.n_cols, self.blocksize)

    @property
    def row_bytes(self) -> int:
        """Bytes per row of W in the whole-blocks layout (K is even there)."""
        return self.n_cols // 2


def _small_table(tensor, name: str, numel: int, device: torch.device) -> torch.Tensor:
    if tensor is None or tensor.numel() != numel:
        got = None if tensor is None else tuple(tensor.shape)
        raise ValueError(f"NF4 weight: state.{name} must have {numel} values, got shape {got}")
    _check_device(tensor, f"state.{name}", device)
    return tensor.reshape(-1).float().contiguous()


def _check_device(tensor: torch.Tensor, name: str, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"NF4 weight: {name} is on {tensor.device}, the input is on {device}")


def nf4_weight(packed: torch.Tensor, state, device: torch.device, tiled: bool = False) -> NF4Weight:
    """Check `packed` and `state` against each other and `device`; one clear error names the field.
    tiled: `packed` holds the codes tiled (Note [tiled codes]). A `state` that is already an NF4Weight
    (from kernels.prepare) is returned as it is."""
    if isinstance(state, NF4Weight):
        return state
    try:
        n_rows, n_cols = (int(d) for d in state.shape)
    except (TypeError, ValueError):
        raise ValueError(f"NF4 weight: state.shape must be (out_features, in_features), got {state.shape!r}") from None
    if n_rows <= 0 or n_cols <= 0:
        raise ValueError(f"NF4 weight: state.shape must be positive, got {(n_rows, n_cols)}")
    blocksize = int(state.blocksize)
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"NF4 weight: state.blocksize must be a power of two >= 2, got {blocksize}")
    numel = n_rows * n_cols
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 1) // 2:
        raise ValueError(
            f"NF4 weight: packed must be uint8 with (N*K + 1) // 2 = {(numel + 1) // 2} bytes for "
            f"state.shape {(n_rows, n_cols)}, got {packed.dtype} of shape {tuple(packed.shape)}")
    _check_device(packed, "packed", device)
    nblocks = (numel + blocksize - 1) // blocksize
    double_quant = state.nested_absmax is not None
    absmax = state.absmax
    if absmax is None or absmax.numel() != nblocks:
        got = None if absmax is None else tuple(absmax.shape)
        raise ValueError(f"NF4 weight: state.absmax must have {nblocks} values (one per block of "
                         f"{blocksize}), got shape {got}")
    _check_device(absmax, "state.absmax", device)
    code = _small_table(state.code, "code", 16, device)
    if double_quant:
        if absmax.dtype != torch.uint8:
            raise ValueError(f"NF4 weight: with double quant state.absmax must be uint8 codes, got {absmax.dtype}")
        nested_absmax = _small_table(state.nested_absmax, "nested_absmax",
                                     (nblocks + NESTED_BLOCKSIZE - 1) // NESTED_BLOCKSIZE, device)
        nested_code = _small_table(state.nested_code, "nested_code", 256, device)
        offset = state.offset
        if isinstance(offset, torch.Tensor):
            if offset.numel() != 1:
                raise ValueError(f"NF4 weight: state.offset must be one value, got shape {tuple(offset.shape)}")
            # On the device: read by the kernel (no host sync). Elsewhere: a plain float.
            offset = offset.reshape(1).float() if offset.device == device else float(offset)
        elif offset is None:
            raise ValueError("NF4 weight: with double quant state.offset must be set (the mean absmax)")
        else:
            offset = float(offset)
        absmax = absmax.reshape(-1).contiguous()
    else:
        absmax = absmax.reshape(-1).float().contiguous()
        nested_absmax, nested_code, offset = absmax, code, 0.0
    if tiled and not tiles_fit(n_rows, n_cols, blocksize):
        raise ValueError("NF4 weight: " + _tiles_unfit(n_rows, n_cols, blocksize))
    byte_code, code_planes = _code_tables(code)
    return NF4Weight(packed=packed.reshape(-1).contiguous(), absmax=absmax, nested_absmax=nested_absmax,
                     nested_code=nested_code, offset=offset, code=code, n_rows=n_rows, n_cols=n_cols,
                     blocksize=blocksize, double_quant=double_quant, byte_code=byte_code,
                     code_planes=code_planes, tiled=tiled)


# Tables derived from a code tensor, by (device, address, version): (code, byte_code, code_planes).
# The entry holds the code tensor itself, so no other tensor can take its address while cached.
_CODE_TABLES: dict[tuple, tuple] = {}
_CODE_TABLES_MAX = 16


def _code_tables(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (256, 2) byte -> two values table and the (24, 32) int32 prmt planes of a (16,) float32
    code (Note [prmt lookup] in kernels/nf4_gemv.py, Note [pair lookup] in kernels/nf4_mma.py).
    Built by a dozen small kernels, so cached per code tensor: a raw QuantState passed on every call
    (not kernels.prepare'd) pays it once. Not cached while a CUDA graph is being captured (the
    tables would be written only on replay)."""
    key = (code.device, code.data_ptr(), code._version)
    capturing = code.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and key in _CODE_TABLES:
        return _CODE_TABLES[key][1:]
    byte = torch.arange(256, device=code.device)
    byte_code = torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous()  # (256, 2)
    halves = torch.stack([code.half().view(torch.int16), _filled_bf16(code),
                          code.bfloat16().view(torch.int16)])  # (3, 16) 16-bit patterns
    code_bytes = halves.contiguous().view(torch.uint8).view(3, 16, 2)  # (3, 16, 2): low, high byte of each
    code_planes = code_bytes.transpose(1, 2).contiguous().view(torch.int32).reshape(24, 1).expand(24, 32)
    code_planes = code_planes.contiguous()
    if not capturing:
        if len(_CODE_TABLES) >= _CODE_TABLES_MAX:
            _CODE_TABLES.pop(next(iter(_CODE_TABLES)))  # the oldest
        _CODE_TABLES[key] = (code, byte_code, code_planes)
    return byte_code, code_planes


def _filled_bf16(code: torch.Tensor) -> torch.Tensor:
    """int16 (16,): for each value v of `code` the top half h of a float32 whose low half is 16 copies
    of h's sign bit (0x0000 or 0xFFFF) and whose value is nearest to v: the "prmt_bf16" table of
    kernels/nf4_gemv.py builds such float32s with byte permutes alone (Note [prmt lookup])."""
    top = (code.view(torch.int32).to(torch.int64) & 0xFFFFFFFF) >> 16  # (16,)
    candidates = (top[:, None] + torch.arange(-1, 2, device=code.device)) & 0xFFFF  # (16, 3)
    bits = (candidates << 16) | torch.where(candidates >= 0x8000, 0xFFFF, 0)
    values = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32).view(torch.float32)
    error = (values - code[:, None]).abs().nan_to_num(float("inf"))
    best = candidates.gather(1, error.argmin(1, keepdim=True))[:, 0]  # (16,)
    return torch.where(best >= 0x8000, best - 0x10000, best).to(torch.int16)


@triton.jit
def split_range(n_chunks, split_id, SPLIT: tl.constexpr):
    """[first, last) of the n_chunks reduction chunks that split `split_id` of SPLIT owns."""
    per_split = tl.cdiv(n_chunks, SPLIT)
    first = split_id * per_split
    return first, tl.minimum(first + per_split, n_chunks)


@triton.jit
def block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask,
                DOUBLE_QUANT: tl.constexpr, OFFSET_IS_POINTER: tl.constexpr):
    """float32 scale of the blocks `block` (any shape); finite where ~mask."""
    if DOUBLE_QUANT:
        code_index = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // _NESTED_BLOCKSIZE, mask=mask, other=0.0)
        if OFFSET_IS_POINTER:
            shift = tl.load(offset)
        else:
            shift = offset
        scale = tl.load(nested_code_ptr + code_index) * nested + shift
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def nibble_shifts():
    """Bit offsets of the 8 codes of a little-endian 32-bit word, in element order: byte i holds
    elements 2i (high nibble) and 2i+1 (low nibble), so the shifts are 4, 0, 12, 8, 20, 16, 28, 24."""
    j = tl.arange(0, 8)
    return 8 * (j // 2) + 4 - 4 * (j % 2)


@triton.jit
def nf4_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
             offs_n, k0, N, K, row_bytes,
             BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, OFFSET_IS_POINTER: tl.constexpr,
             WHOLE_BLOCKS: tl.constexpr, TILED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[offs_n, k0 : k0 + BLOCK_K] in float32, (BLOCK_N, BLOCK_K); k0 is a multiple of BLOCK_K. TILED:
    the codes are tiled (Note [tiled codes]; whole blocks only).

    Entries outside W are finite (not zero): callers multiply them by zeros of a masked operand.
    See Note [two tile layouts] and Note [code lookup]."""
    row_in = offs_n < N  # (BLOCK_N,)
    if WHOLE_BLOCKS:
        WORDS: tl.constexpr = BLOCK_K // 8  # 8 codes per 32-bit word
        row_words = row_bytes // 4
        offs_word = k0 // 8 + tl.arange(0, WORDS)  # (BLOCK_K/8,)
        words_ptr = packed_ptr.to(tl.pointer_type(tl.int32))
        if TILED:
            at = words_ptr + code_offset(offs_n[:, None], 4 * offs_word[None, :], K, BLOCKSIZE, TILED) // 4
        else:
            at = words_ptr + offs_n.to(tl.int64)[:, None] * row_words + offs_word[None, :]  # (BLOCK_N, BLOCK_K/8)
        mask = row_in[:, None] & (offs_word < row_words)[None, :]
        words = tl.load(at, mask=mask, other=0)  # (BLOCK_N, BLOCK_K/8)
        nibbles = tl.reshape((words[:, :, None] >> nibble_shifts()[None, None, :]) & 0xF, (BLOCK_N, BLOCK_K))
        values = tl.load(code_ptr + nibbles)  # (BLOCK_N, BLOCK_K)
        blocks_per_row = K // BLOCKSIZE
        if BLOCK_K >= BLOCKSIZE:
            NB: tl.constexpr = BLOCK_K // BLOCKSIZE
            col_block = k0 // BLOCKSIZE + tl.arange(0, NB)  # (NB,)
            block = offs_n[:, None] * blocks_per_row + col_block[None, :]  # (BLOCK_N, NB)
            scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block,
                                row_in[:, None] & (col_block < blocks_per_row)[None, :],
                                DOUBLE_QUANT, OFFSET_IS_POINTER)  # (BLOCK_N, NB)
            scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, NB, BLOCKSIZE)),
                               (BLOCK_N, BLOCK_K))
        else:
            block = offs_n * blocks_per_row + k0 // BLOCKSIZE  # (BLOCK_N,): the tile is inside one block
            scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, row_in,
                                DOUBLE_QUANT, OFFSET_IS_POINTER)[:, None]  # (BLOCK_N, 1)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        mask = row_in[:, None] & (offs_k < K)[None, :]
        row_start = offs_n.to(tl.int64) * K  # (BLOCK_N,) flat index of W[n, 0]
        element = row_start[:, None] + offs_k[None, :]  # (BLOCK_N, BLOCK_K) flat index e
        bytes_ = tl.load(packed_ptr + element // 2, mask=mask, other=0).to(tl.int32)
        shift = (4 - 4 * (element % 2)).to(tl.int32)  # even e: high nibble
        values = tl.load(code_ptr + ((bytes_ >> shift) & 0xF))
        # A row's BLOCK_K elements span at most SPAN blocks: decode those per row, pick per element.
        SPAN: tl.constexpr = (BLOCK_K - 1) // BLOCKSIZE + 2
        first = (row_start + k0) // BLOCKSIZE  # (BLOCK_N,)
        last = (row_start + tl.minimum(k0 + BLOCK_K, K) - 1) // BLOCKSIZE  # (BLOCK_N,)
        which = (element // BLOCKSIZE - first[:, None]).to(tl.int32)  # (BLOCK_N, BLOCK_K) in [0, SPAN)
        scale = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for j in tl.static_range(SPAN):
            scale_j = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, first + j,
                                  row_in & (first + j <= last), DOUBLE_QUANT, OFFSET_IS_POINTER)  # (BLOCK_N,)
            scale = tl.where(which == j, scale_j[:, None], scale)
    return values * scale


@triton.jit
def store_output(acc, rows, cols, out_ptr, stride_out, bias_ptr, n_out_rows, n_out_cols, split_id,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """out[rows, cols] = acc (+ bias[cols]); `rows`, `cols` broadcast to acc's shape.

    With SPLIT > 1 the partial sums of the splits are atomically added to a zeroed float32 `out`,
    and only split 0 adds the bias."""
    mask = (rows < n_out_rows) & (cols < n_out_cols)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=cols < n_out_cols, other=0.0).to(tl.float32)
        acc += tl.where(split_id == 0, bias, 0.0)
    pointers = out_ptr + rows.to(tl.int64) * stride_out + cols
    if SPLIT == 1:
        tl.store(pointers, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(pointers, acc, mask=mask)

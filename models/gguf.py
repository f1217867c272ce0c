"""A GGUF reader: metadata, tensor infos, and dequantizers for F32, F16, BF16, Q8_0, Q4_0 and Q4_1.

Note [the GGUF layout]
    All little-endian. A file is
        magic b"GGUF", version u32 (2 or 3), tensor_count u64, kv_count u64,
        kv_count x (key: string, value_type: u32, value),
        tensor_count x (name: string, n_dims: u32, dims: n_dims x u64, ggml_type: u32, offset: u64),
        padding to `general.alignment` (default 32), then the tensor data.
    A string is a u64 byte length and UTF-8 bytes. An array value is an element type u32, a
    count u64 and the elements. A tensor's bytes start at data_start + offset. dims[0] varies
    fastest, so the PyTorch shape is dims reversed.

Note [GGUF block formats]
    Quantized types store blocks of 32 consecutive values of the flattened tensor:
      Q8_0: fp16 d, 32 x int8 q                  (34 bytes)  x = d * q
      Q4_0: fp16 d, 16 bytes of nibbles           (18 bytes)  x = d * (q - 8)
      Q4_1: fp16 d, fp16 m, 16 bytes of nibbles   (20 bytes)  x = d * q + m
    In the 4-bit types byte j holds value j in its low nibble and value j + 16 in its high one.
"""
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["GGUFFile", "GGUFTensorInfo", "GGML_TYPES", "dequantize"]

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ggml type id -> (name, values per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
}
GGML_TYPE_IDS = {name: type_id for type_id, (name, _, _) in GGML_TYPES.items()}

# metadata value type id -> struct format (scalars) ; 7 bool, 8 string, 9 array are special
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
                 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (dims reversed)
    ggml_type: int
    start: int  # absolute byte offset in the file
    nbytes: int  # -1 when the type's block size is unknown

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.ggml_type, (f"type {self.ggml_type}",))[0]


class _Reader:
    """Sequential little-endian reads from a buffer, with errors that say what was being read."""

    def __init__(self, buffer, path: Path):
        self.buffer, self.path, self.pos = buffer, path, 0

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buffer):
            raise ValueError(f"{self.path}: truncated or corrupt GGUF file: needs {n} bytes at offset {start} "
                             f"for {what}, file has {len(self.buffer)}")
        self.pos += n
        return start

    def scalar(self, value_type: int, what: str):
        fmt = _SCALAR_FORMATS[value_type]
        return struct.unpack_from(fmt, self.buffer, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar(10, what)
        start = self.take(n, what)
        try:
            return bytes(self.buffer[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: {what} is not valid UTF-8 (offset {start})") from None

    def value(self, value_type: int, what: str):
        if value_type == _STRING:
            return self.string(what)
        if value_type == _ARRAY:
            element_type = self.scalar(4, what)
            count = self.scalar(10, what)
            if element_type == _STRING:
                return [self.string(f"{what}[{i}]") for i in range(count)]
            if element_type == _ARRAY:
                return [self.value(_ARRAY, f"{what}[{i}]") for i in range(count)]
            if element_type not in _NUMPY_DTYPES:
                raise ValueError(f"{self.path}: {what} has an unknown array element type {element_type}")
            dtype = np.dtype(_NUMPY_DTYPES[element_type])
            start = self.take(count * dtype.itemsize, what)
            values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=start)
            return values.astype(bool).tolist() if element_type == 7 else values.tolist()
        if value_type not in _SCALAR_FORMATS:
            raise ValueError(f"{self.path}: {what} has an unknown value type {value_type}")
        value = self.scalar(value_type, what)
        if value_type == 6:  # float32: the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)
            value = float(str(np.float32(value)))
        return value


class GGUFFile:
    """A parsed GGUF file: `metadata` (dict), `tensors` (name -> GGUFTensorInfo), `tensor(name)`.

    The file is memory-mapped; `tensor()` reads one tensor's bytes and dequantizes them, so a
    model can be streamed tensor by tensor. Use as a context manager or call close().
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such GGUF file")
        self._file = open(self.path, "rb")
        try:
            size = self.path.stat().st_size
            if size < 4 or self._file.read(4) != GGUF_MAGIC:
                raise ValueError(f"{self.path}: not a GGUF file (the first bytes are not b'GGUF')")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._parse_header()
        except BaseException:
            self.close()
            raise

    def _parse_header(self):
        r = _Reader(self._map, self.path)
        r.take(4, "the magic")
        self.version = r.scalar(4, "the version")
        if self.version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {self.version} is not supported (only 2 and 3)")
        tensor_count = r.scalar(10, "the tensor count")
        kv_count = r.scalar(10, "the metadata count")
        self.metadata: dict = {}
        for i in range(kv_count):
            key = r.string(f"metadata key #{i}")
            value_type = r.scalar(4, f"the type of metadata {key!r}")
            self.metadata[key] = r.value(value_type, f"metadata {key!r}")
        self.alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise ValueError(f"{self.path}: general.alignment {self.alignment} is not a power of two")
        infos = []
        for i in range(tensor_count):
            name = r.string(f"the name of tensor #{i}")
            n_dims = r.scalar(4, f"tensor {name!r} n_dims")
            dims = [r.scalar(10, f"tensor {name!r} dims") for _ in range(n_dims)]
            ggml_type = r.scalar(4, f"tensor {name!r} type")
            offset = r.scalar(10, f"tensor {name!r} offset")
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        self.data_start = -(-r.pos // self.alignment) * self.alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, ggml_type, offset in infos:
            numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
            nbytes = -1
            if ggml_type in GGML_TYPES:
                _, block_values, block_bytes = GGML_TYPES[ggml_type]
                if numel % block_values:
                    raise ValueError(f"{self.path}: tensor {name!r} has {numel} values, not a multiple of "
                                     f"the {GGML_TYPES[ggml_type][0]} block size {block_values}")
                nbytes = numel // block_values * block_bytes
            info = GGUFTensorInfo(name, shape, ggml_type, self.data_start + offset, nbytes)
            if info.start + max(nbytes, 0) > len(self._map):
                raise ValueError(f"{self.path}: truncated GGUF file: tensor {name!r} needs bytes "
                                 f"{info.start}..{info.start + nbytes}, the file has {len(self._map)}")
            self.tensors[name] = info

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor `name` (a read-only uint8 view into the mapped file)."""
        info = self._info(name)
        if info.nbytes < 0:
            raise ValueError(f"{self.path}: tensor {name!r} has type {info.type_name}, which this reader "
                             f"cannot size or dequantize (supported: {', '.join(DEQUANTIZABLE)})")
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.start)

    def tensor(self, name: str, device="cpu") -> torch.Tensor:
        """Tensor `name` dequantized to float32 in its PyTorch shape, computed on `device`."""
        info = self._info(name)
        if GGML_TYPES.get(info.ggml_type, ("",))[0] not in DEQUANTIZABLE:
            raise ValueError(f"{self.path}: tensor {name!r} has type {info.type_name}, which is not supported "
                             f"(supported: {', '.join(DEQUANTIZABLE)})")
        raw = torch.from_numpy(self.raw(name).copy()).to(device)
        return dequantize(raw, info.ggml_type).reshape(info.shape)

    def _info(self, name: str) -> GGUFTensorInfo:
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        return self.tensors[name]

    def close(self):
        if getattr(self, "_map", None) is not None:
            self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fp16_column(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Bytes start..start+2 of every block as float32 (nblocks, 1)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(nblocks, 16) bytes -> (nblocks, 32) values: low nibbles first, then high nibbles."""
    return torch.cat((packed & 0x0F, packed >> 4), dim=1)


def dequantize(raw: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Flat float32 values from the uint8 bytes `raw` (1-D) of one tensor of `ggml_type`.

    See Note [GGUF block formats]. Vectorized over blocks; runs where `raw` is (CPU or GPU).
    """
    name = GGML_TYPES.get(ggml_type, (f"type {ggml_type}",))[0]
    raw = raw.contiguous()
    if name == "F32":
        return raw.view(torch.float32)
    if name == "F16":
        return raw.view(torch.float16).float()
    if name == "BF16":
        return raw.view(torch.bfloat16).float()
    if name == "Q8_0":
        blocks = raw.view(-1, 34)
        return (_fp16_column(blocks, 0) * blocks[:, 2:].contiguous().view(torch.int8).float()).reshape(-1)
    if name == "Q4_0":
        blocks = raw.view(-1, 18)
        return (_fp16_column(blocks, 0) * (_nibbles(blocks[:, 2:]).float() - 8.0)).reshape(-1)
    if name == "Q4_1":
        blocks = raw.view(-1, 20)
        scale, minimum = _fp16_column(blocks, 0), _fp16_column(blocks, 2)
        return (scale * _nibbles(blocks[:, 4:]).float() + minimum).reshape(-1)
    raise ValueError(f"GGUF tensor type {name} is not supported (supported: {', '.join(DEQUANTIZABLE)})")


DEQUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

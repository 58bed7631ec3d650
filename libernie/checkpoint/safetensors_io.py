"""Reading and writing safetensors files without a framework, bit-exact for every dtype.

Reading parses the header ourselves and memory-maps the data, so a tensor costs nothing until it
is touched and a truncated file is caught before any byte is trusted. bf16 and fp8 have no numpy
dtype: we carry them as their storage type (uint16, uint8) plus the safetensors dtype name, so
transposes, splits and concatenations move bits and never round. Writing goes through the
safetensors library's own serializer (pointer specs, no extra copy), to a temp name, then rename.
"""
from __future__ import annotations

import json
import mmap
import os
import struct

import numpy as np
import safetensors

from libernie.errors import CheckpointError

# safetensors dtype -> numpy storage dtype (bit pattern preserved)
STORAGE = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_,
           "F8_E4M3": np.uint8, "F8_E5M2": np.uint8}
# safetensors dtype -> name the serializer takes
_SERIALIZER_NAME = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
                    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One .safetensors file: `names`, `dtype(name)`, `shape(name)`, `get(name)` -> memory-mapped array."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{path}: truncated (shorter than the 8-byte header length); re-copy the file")
                (n,) = struct.unpack("<Q", raw)
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{path}: corrupt header length {n}; is this a safetensors file?")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: not found; the index names it but the file is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt header (not JSON); re-copy or regenerate the file") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._header = header
        data_len = size - self._start
        for name, info in header.items():
            begin, end = info.get("data_offsets", (0, -1))
            dtype = info.get("dtype")
            if dtype not in STORAGE:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype!r}")
            want = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(STORAGE[dtype]).itemsize
            if end > data_len or end - begin != want or begin < 0:
                raise CheckpointError(f"{path}: truncated or corrupt at tensor {name} (bytes {begin}..{end} of "
                                      f"{data_len}); re-copy the file")
        self._mmap = None

    @property
    def names(self) -> list[str]:
        return list(self._header)

    def dtype(self, name: str) -> str:
        return self._header[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def span(self, name: str) -> tuple[int, int]:
        """(absolute byte offset, byte length) of tensor `name` in the file, for plain reads and copies."""
        begin, end = self._header[name]["data_offsets"]
        return self._start + begin, end - begin

    def release(self, name: str) -> None:
        """Drop the file pages of tensor `name` from this process's resident set (after copying it).

        A mapped page stays in RSS for as long as the map is open, so loading a model through get()
        would otherwise hold the whole checkpoint resident beside the weights copied out of it (about
        twice the model's size at the end of loading). The pages stay in the page cache; a later get()
        of the same tensor faults them back in."""
        if self._mmap is not None and self._mmap.size:
            drop_pages(self.get(name))

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array of its storage dtype."""
        info = self._header[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._start) \
                if os.path.getsize(self.path) > self._start else np.zeros(0, np.uint8)
        begin, end = info["data_offsets"]
        return self._mmap[begin:end].view(STORAGE[info["dtype"]]).reshape(info["shape"])


def drop_pages(view: np.ndarray) -> None:
    """Drop the mapped file pages under `view` (a C-contiguous slice of a get() array) from RSS.

    For copying one large tensor in blocks without holding all of its pages resident. A no-op unless
    `view` lies in a read-only file mapping (on anonymous memory MADV_DONTNEED would zero data)."""
    base = view
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is None or not view.flags.c_contiguous or not view.nbytes or not hasattr(base, "madvise"):
        return
    start = np.frombuffer(base, np.uint8).ctypes.data
    page = mmap.PAGESIZE
    lo = (view.ctypes.data - start) // page * page
    hi = min(len(base), -(-(view.ctypes.data - start + view.nbytes) // page) * page)
    if hi > lo:
        base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def write_safetensors(path: str, tensors: dict[str, tuple[np.ndarray, str]], metadata: dict | None = None) -> int:
    """Write {name: (array, safetensors_dtype)} to `path` atomically. Returns the bytes of tensor data."""
    keep, specs, total = [], {}, 0
    for name, (arr, dtype) in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype != np.dtype(STORAGE[dtype]):
            raise CheckpointError(f"{path}: tensor {name} is stored as {arr.dtype}, not as {dtype}")
        keep.append(arr)  # the serializer reads raw pointers: keep every buffer alive until it returns
        specs[name] = safetensors.TensorSpec(dtype=_SERIALIZER_NAME[dtype], shape=list(arr.shape),
                                             data_ptr=arr.ctypes.data, data_len=arr.nbytes)
        total += arr.nbytes
    tmp = f"{path}.partial"
    safetensors.serialize_file(specs, tmp, {k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
    return total


# ---- dtype helpers ------------------------------------------------------------------------------
def to_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Exact widening of F32/F16/BF16 storage to float32."""
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("F32", "F16", "F64"):
        return arr.astype(np.float32)
    raise CheckpointError(f"cannot compute with {dtype} tensors here; dequantize first")


def from_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """float32 to F32/F16/BF16 storage; bf16 rounds to nearest even, as torch and paddle do."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if dtype == "BF16":
        bits = arr.view(np.uint32)
        rounded = bits + (0x7FFF + ((bits >> 16) & 1))
        out = (rounded >> 16).astype(np.uint16)
        return np.where(np.isnan(arr), np.uint16(0x7FC0), out)
    return arr.astype(STORAGE[dtype])

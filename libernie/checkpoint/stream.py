"""Bounded-memory checkpoint streaming: read one tensor with plain file reads, write shards whose layout is
planned up front, and copy a tensor's bytes without ever holding it whole.

Why not the memory maps of CheckpointReader: every page of a mapped shard that has been touched counts toward
the process's resident set until the map is closed, so streaming a 300B model through maps "uses" the whole
model. Here a tensor is read into a fresh buffer (`read_array`) that is freed when the caller drops it, and
bytes that need no arithmetic go file to file in small chunks (`StreamingWriter.copy`).

StreamingWriter knows every output tensor (name, dtype, shape) before the first byte is written, so it can
write each shard's safetensors header first and then the data in order: nothing waits in memory for a shard
to fill. The file format is the standard one (docs/formats/checkpoint.md).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from libernie.checkpoint.safetensors_io import STORAGE, SafetensorsFile
from libernie.checkpoint.sharded import INDEX
from libernie.errors import CheckpointError

CHUNK_BYTES = 64 << 20  # file-to-file copy granularity: large enough for full disk speed
BLOCK_BYTES = 1 << 20   # fp32 bytes per block that is widened, edited and cast back: fits in L2, so the
                        # handful of numpy passes a cast takes run from cache, not from memory


def widen(block: np.ndarray, dtype: str) -> np.ndarray:
    """A new, C-contiguous float32 array with the values of storage `block` (F32/F16/BF16/F64; exact)."""
    if dtype == "BF16":
        out = np.empty(block.shape, np.float32)
        bits = out.view(np.uint32)
        bits[...] = block
        bits <<= 16
        return out
    if dtype not in ("F32", "F16", "F64"):
        raise CheckpointError(f"cannot compute with {dtype} tensors here; dequantize first")
    return np.array(block, dtype=np.float32, order="C", copy=True)


def narrow(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 array `x` (C-contiguous; consumed: it may be overwritten) as storage of `dtype`.
    Same bits as safetensors_io.from_float32 (its slow twin; tests compare them): bf16 rounds to nearest
    even, NaN becomes the canonical quiet NaN 0x7FC0. Works in place to spare the temporaries."""
    if dtype != "BF16":
        return x.astype(STORAGE[dtype], copy=False)
    nan = np.isnan(x)
    bits = x.view(np.uint32)
    t = bits >> 16
    t &= 1
    t += 0x7FFF
    bits += t
    bits >>= 16
    out = bits.astype(np.uint16)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def tensor_span(sf: SafetensorsFile, name: str) -> tuple[int, int]:
    """(absolute byte offset, byte length) of tensor `name` inside its file."""
    return sf.span(name)


def read_array(sf: SafetensorsFile, name: str) -> np.ndarray:
    """Tensor `name` as a new, writable array of its storage dtype (bf16 as uint16), read with plain reads."""
    offset, length = tensor_span(sf, name)
    out = np.empty(sf.shape(name), dtype=STORAGE[sf.dtype(name)])
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(sf.path, "rb") as f:
        f.seek(offset)
        got = f.readinto(view) if length else 0
    if got != length:
        raise CheckpointError(f"{sf.path}: truncated at tensor {name} (read {got} of {length} bytes); re-copy the file")
    return out


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str                 # safetensors dtype written
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(STORAGE[self.dtype]).itemsize


def plan_shards(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    """Split entries, in order, into shards; a shard closes when the next tensor would pass max_bytes
    (the same rule as ShardedWriter, so a tensor larger than max_bytes gets a shard of its own)."""
    shards, cur, size = [], [], 0
    for e in entries:
        if cur and size + e.nbytes > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += e.nbytes
    if cur or not shards:
        shards.append(cur)
    return shards


def _header_bytes(entries: list[Entry], metadata: dict) -> bytes:
    header, pos = {}, 0
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so the data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


class StreamingWriter:
    """Write `entries` as model-0000i-of-0000N.safetensors + index into `out_dir`, each tensor at its planned place.

    The plan (shard and byte offset of every tensor) is fixed up front, so every tensor goes straight to disk, in
    any order, and several processes can fill one plan (`create=False` attaches to shards another writer made).
    `write(name, arr, arr_dtype)` casts block by block when arr_dtype differs from the planned dtype;
    `copy(name, sf, src_name)` moves raw bytes. `close()` checks every tensor was written (pass the names other
    processes wrote) and writes the index. Args: metadata goes into every shard's `__metadata__` (as strings).
    """

    def __init__(self, out_dir: str, entries: list[Entry], max_bytes: int, metadata: dict | None = None,
                 create: bool = True):
        self.out_dir, self.metadata = out_dir, metadata or {}
        self.shards = plan_shards(entries, max_bytes)
        n = len(self.shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.place: dict[str, tuple[int, int, Entry]] = {}  # name -> (shard, absolute offset, entry)
        for i, shard in enumerate(self.shards):
            header = _header_bytes(shard, self.metadata)
            pos = len(header)
            if create:  # header now, data later: the file has its final size from the start (sparse until filled)
                with open(os.path.join(out_dir, self.files[i]), "wb") as f:
                    f.write(header)
                    f.truncate(pos + sum(e.nbytes for e in shard))
            for e in shard:
                self.place[e.name] = (i, pos, e)
                pos += e.nbytes
        self.written: set[str] = set()
        self.bytes_written = 0
        self._fds: dict[int, int] = {}
        self._pool = None

    def _start(self, name: str) -> tuple[int, int, Entry]:
        if name not in self.place or name in self.written:
            raise RuntimeError(f"StreamingWriter: {name} is not planned or was already written")  # a caller bug
        shard, offset, entry = self.place[name]
        if shard not in self._fds:
            self._fds[shard] = os.open(os.path.join(self.out_dir, self.files[shard]), os.O_WRONLY)
        return self._fds[shard], offset, entry

    def _done(self, name: str, entry: Entry) -> None:
        self.written.add(name)
        self.bytes_written += entry.nbytes

    def write(self, name: str, arr: np.ndarray, arr_dtype: str, fix=None) -> None:
        """Write array `arr` (storage of safetensors dtype `arr_dtype`, any strides) as tensor `name`.

        Rows go out in blocks of about a megabyte, so widening, `fix` and the cast back stay in cache.
        fix(block, first_row): optional, edits an fp32 copy of each block in place before the cast
        (how ernie-merge adds a LoRA delta without ever holding the whole tensor in fp32).
        """
        fd, offset, entry = self._start(name)
        if tuple(arr.shape) != entry.shape:
            raise RuntimeError(f"StreamingWriter: {name} has shape {arr.shape}, planned {entry.shape}")
        flat = arr.reshape(1, -1) if arr.ndim < 2 else arr
        compute = fix is not None or arr_dtype != entry.dtype
        row_bytes = max(1, flat[0].size * (4 if compute else flat.itemsize))
        # small blocks also when transposing: a strided copy is only fast while its source rows stay in cache
        small = compute or not flat.flags.c_contiguous
        rows = max(1, (BLOCK_BYTES if small else CHUNK_BYTES) // row_bytes)
        out_row = flat[0].size * np.dtype(STORAGE[entry.dtype]).itemsize

        def prepare(i: int) -> np.ndarray:
            block = flat[i:i + rows]
            if compute:
                block = widen(block, arr_dtype)
                if fix is not None:
                    fix(block, i)
                block = narrow(block, entry.dtype)
            return np.ascontiguousarray(block).reshape(-1).view(np.uint8)

        starts = range(0, flat.shape[0], rows)
        if compute or not small or len(starts) == 1:
            for i in starts:
                _pwrite_all(fd, prepare(i), offset + i * out_row)
        else:
            # A transpose: copy block k+1 on a helper thread while block k is written (numpy's strided copy and
            # write() drop the GIL). Measured here: a 1.2 GB HF -> Paddle conversion 5.6-7.8 s -> 3.2-3.5 s. Not for
            # computed blocks: their many small numpy calls ran slower threaded (2.4-2.6 s -> 3.5-4.1 s).
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-writer")
            nxt = self._pool.submit(prepare, starts[0])
            for k, i in enumerate(starts):
                data = nxt.result()
                if k + 1 < len(starts):
                    nxt = self._pool.submit(prepare, starts[k + 1])
                _pwrite_all(fd, data, offset + i * out_row)
        self._done(name, entry)

    def copy(self, name: str, sf: SafetensorsFile, src_name: str) -> None:
        """Copy tensor `src_name` of `sf` byte for byte as `name` (same dtype and shape): in the kernel
        (copy_file_range, as cp does) where the OS allows, else in chunks through a small buffer."""
        fd, dst, entry = self._start(name)
        offset, length = tensor_span(sf, src_name)
        if length != entry.nbytes or sf.dtype(src_name) != entry.dtype:
            raise RuntimeError(f"StreamingWriter: {src_name} does not match planned {name}")
        with open(sf.path, "rb", buffering=0) as f:
            done = 0
            while done < length:
                n = min(CHUNK_BYTES, length - done)
                try:
                    got = os.copy_file_range(f.fileno(), fd, n, offset + done, dst + done)
                except (AttributeError, OSError):  # no copy_file_range here (other OS, file system)
                    buf = os.pread(f.fileno(), n, offset + done)
                    got = len(buf)
                    _pwrite_all(fd, buf, dst + done)
                if got == 0:
                    raise CheckpointError(f"{sf.path}: truncated at tensor {src_name}; re-copy the file")
                done += got
        self._done(name, entry)

    def close(self, written_elsewhere=()) -> dict:
        """Check every planned tensor was written (here or, `written_elsewhere`, by other processes) and write
        model.safetensors.index.json. Returns the index dict."""
        self.release()
        done = self.written | set(written_elsewhere)
        missing = [n for n in self.place if n not in done]
        if missing:
            raise RuntimeError(f"StreamingWriter: {len(missing)} planned tensors never written, first {missing[0]}")
        weight_map = {name: self.files[shard] for name, (shard, _, _) in self.place.items()}
        total = sum(e.nbytes for _, _, e in self.place.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        tmp = os.path.join(self.out_dir, INDEX + ".partial")
        with open(tmp, "w") as f:
            json.dump(index, f, indent=2)
        os.replace(tmp, os.path.join(self.out_dir, INDEX))
        return index

    def release(self) -> None:
        """Close the shard files and the helper thread (after the last write, or on an error)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    abort = release


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n

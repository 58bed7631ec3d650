"""One shard: `NAME.npy` (tokens) + `NAME.idx` (sequences, segments, loss runs). Spec: docs/formats/shards.md.

`ShardWriter` is a context manager that streams tokens to `NAME.npy.tmp` and keeps the (small)
index tables in memory; `finish()` completes both temp files and `publish()` renames them, so a
reader never sees a half-written shard. `ShardIndex` memory-maps a finished `.idx` and checks every
invariant of the spec before it hands anything out.
"""
from __future__ import annotations

import hashlib
import os
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from libernie.errors import ShardFormatError

MAGIC = b"ERNPACK\x00"
VERSION = 1
MODES = {"pretrain": 0, "sft": 1, "dpo": 2}
ROLE_DOC, ROLE_PROMPT, ROLE_CHOSEN, ROLE_REJECTED = 0, 1, 2, 3
FLAG_CONTINUED = 0x80
HEADER = struct.Struct("<8sIBBHIIQQQQQ")  # magic, version, mode, itemsize, 0, seq_len, 0, S, D, R, T, 0
NPY_HEADER_BYTES = 128  # fixed, so the header can be rewritten in place once the length is known
_U64_LIMIT = 2**63  # offsets stay below this so they also fit a signed int64 in every reader


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id of a `vocab_size` vocabulary fits 16 bits by the issue's rule (<= 65535), else uint32."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def npy_header(dtype: np.dtype, length: int) -> bytes:
    """A 128-byte .npy v1.0 header for a 1-D little-endian array of `length` items."""
    text = "{'descr': '%s', 'fortran_order': False, 'shape': (%d,), }" % (dtype.str, length)
    body = text.ljust(NPY_HEADER_BYTES - 11) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardInfo:
    """A finished shard: file names (relative to the manifest's folder later), counts and hashes."""

    npy: str
    idx: str
    sequences: int
    tokens: int
    npy_sha256: str
    idx_sha256: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


class ShardWriter:
    """Write one shard. `base` is the path without extension (e.g. `out/train-00003`).

    Args:
        base: output path without `.npy`/`.idx`.
        mode: "pretrain", "sft" or "dpo".
        seq_len: the longest sequence allowed, 1 <= seq_len < 2**32.
        dtype: token dtype from `token_dtype()`.
    """

    def __init__(self, base: str | os.PathLike, mode: str, seq_len: int, dtype: np.dtype):
        if mode not in MODES:
            raise ShardFormatError(f"{base}: unknown mode {mode!r}; use one of {sorted(MODES)}")
        if not 1 <= seq_len < 2**32:
            raise ShardFormatError(f"{base}: seq_len {seq_len} must be in [1, 2**32); pick a smaller --seq-len")
        self.base, self.mode, self.seq_len, self.dtype = Path(base), mode, seq_len, np.dtype(dtype)
        if self.dtype.str not in ("<u2", "<u4"):
            raise ShardFormatError(f"{base}: token dtype {self.dtype} is not uint16 or uint32")
        self._max_id = np.iinfo(self.dtype).max
        self.seq_offsets, self.seq_segments, self.seq_runs = array("Q", [0]), array("Q", [0]), array("Q", [0])
        self.seg_starts, self.seg_flags, self.runs = array("I"), array("B"), array("I")
        self._file = None
        self.info: ShardInfo | None = None

    @property
    def tmp_npy(self) -> Path:
        return self.base.with_name(self.base.name + ".npy.tmp")

    @property
    def tmp_idx(self) -> Path:
        return self.base.with_name(self.base.name + ".idx.tmp")

    @property
    def tokens(self) -> int:
        return self.seq_offsets[-1]

    @property
    def sequences(self) -> int:
        return len(self.seq_offsets) - 1

    def __enter__(self) -> "ShardWriter":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.publish(self.finish())
        elif self._file is not None:  # keep the temp files: a resumed run may continue them
            self._file.close()
            self._file = None

    def open(self) -> None:
        """Create `NAME.npy.tmp` with a placeholder header."""
        self.base.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp_npy, "wb")
        self._file.write(npy_header(self.dtype, 0))

    def add(self, tokens: np.ndarray, segments: list[tuple[int, int]], runs: list[tuple[int, int]]) -> None:
        """Append one sequence.

        Args:
            tokens: 1-D integer ids, 1 <= len <= seq_len, each fitting the dtype.
            segments: `(start, flags)` per segment, first start 0, starts strictly increasing.
            runs: loss runs `(start, length)`, sorted, non-overlapping, inside the sequence.
        """
        n = len(tokens)
        if not 1 <= n <= self.seq_len:
            raise ShardFormatError(f"{self.base}: sequence of {n} tokens, expected 1..{self.seq_len}")
        if n and (int(tokens.min()) < 0 or int(tokens.max()) > self._max_id):
            raise ShardFormatError(f"{self.base}: token id outside 0..{self._max_id} for {self.dtype}; "
                                   "is the tokenizer's vocab_size right?")
        _check_segments(self.base, segments, n)
        _check_runs(self.base, runs, n)
        end = self.seq_offsets[-1] + n
        if end >= _U64_LIMIT:
            raise ShardFormatError(f"{self.base}: token offset overflow; use a smaller --shard-tokens")
        self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.seq_offsets.append(end)
        for start, flags in segments:
            self.seg_starts.append(start)
            self.seg_flags.append(flags)
        self.seq_segments.append(len(self.seg_starts))
        for start, length in runs:
            self.runs.extend((start, length))
        self.seq_runs.append(len(self.runs) // 2)

    def flush(self) -> None:
        """Push written tokens to the OS so a checkpoint that counts them survives a kill."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def finish(self) -> ShardInfo:
        """Complete both temp files (final .npy header, whole .idx) and hash them; nothing is renamed yet."""
        if self.sequences == 0:
            raise ShardFormatError(f"{self.base}: refusing to write an empty shard")
        self._file.seek(0)
        self._file.write(npy_header(self.dtype, self.tokens))
        self.flush()
        self._file.close()
        self._file = None
        s, d, r = self.sequences, len(self.seg_starts), len(self.runs) // 2
        header = HEADER.pack(MAGIC, VERSION, MODES[self.mode], self.dtype.itemsize, 0, self.seq_len, 0,
                             s, d, r, self.tokens, 0)
        with open(self.tmp_idx, "wb") as f:
            f.write(header)
            for table in (self.seq_offsets, self.seq_segments, self.seq_runs, self.runs, self.seg_starts,
                          self.seg_flags):
                f.write(table.tobytes())  # array typecodes Q/I/B are little-endian on every host we run
            f.flush()
            os.fsync(f.fileno())
        self.info = ShardInfo(self.base.name + ".npy", self.base.name + ".idx", s, self.tokens,
                              file_sha256(self.tmp_npy), file_sha256(self.tmp_idx))
        return self.info

    def publish(self, info: ShardInfo | None = None) -> None:
        """Rename the finished temp files to their final names (atomic on POSIX); .idx first, .npy last."""
        info = info or self.info
        os.replace(self.tmp_idx, self.base.parent / info.idx)
        os.replace(self.tmp_npy, self.base.parent / info.npy)

    def state(self) -> dict:
        """The in-memory tables, for a resume checkpoint (the tokens are in `NAME.npy.tmp`)."""
        return {"tokens": self.tokens, **{k: getattr(self, k).tolist() for k in _TABLES}}

    @classmethod
    def reopen(cls, base, mode: str, seq_len: int, dtype: np.dtype, state: dict) -> "ShardWriter":
        """Continue a shard from a checkpoint: cut `NAME.npy.tmp` back to the checkpointed length."""
        w = cls(base, mode, seq_len, dtype)
        size = NPY_HEADER_BYTES + state["tokens"] * w.dtype.itemsize
        if not w.tmp_npy.exists() or w.tmp_npy.stat().st_size < size:
            raise ShardFormatError(f"{w.tmp_npy}: missing or shorter than the checkpoint says; rerun without --resume")
        for k in _TABLES:
            getattr(w, k)[:] = array(getattr(w, k).typecode, state[k])
        w._file = open(w.tmp_npy, "r+b")
        w._file.truncate(size)
        w._file.seek(size)
        return w


_TABLES = ("seq_offsets", "seq_segments", "seq_runs", "seg_starts", "seg_flags", "runs")


def _check_segments(base, segments, n: int) -> None:
    if not segments or segments[0][0] != 0:
        raise ShardFormatError(f"{base}: a sequence needs a first segment starting at 0")
    prev = -1
    for start, flags in segments:
        if not prev < start < n or flags & 0x7C or not 0 <= flags <= 0xFF:
            raise ShardFormatError(f"{base}: bad segment ({start}, {flags}) in a sequence of {n} tokens")
        prev = start


def _check_runs(base, runs, n: int) -> None:
    end = 0
    for start, length in runs:
        if start < end or length < 1 or start + length > n:
            raise ShardFormatError(f"{base}: bad loss run ({start}, {length}) in a sequence of {n} tokens")
        end = start + length


class ShardIndex:
    """A memory-mapped, validated `.idx`. Arrays are read-only views; nothing is loaded whole."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:  # ValueError: empty file cannot be mapped
            raise ShardFormatError(f"{self.path}: cannot map ({e}); was it written by ernie-pack?") from None
        if len(mm) < HEADER.size:
            raise ShardFormatError(f"{self.path}: {len(mm)} bytes is shorter than the 64-byte header; file truncated?")
        (magic, version, mode, itemsize, res0, seq_len, res1, s, d, r, t, res2) = HEADER.unpack(bytes(mm[:64]))
        if magic != MAGIC:
            raise ShardFormatError(f"{self.path}: bad magic {magic!r}; was it written by ernie-pack?")
        if version != VERSION:
            raise ShardFormatError(f"{self.path}: index version {version}, this reader knows {VERSION}; "
                                   "upgrade ernie-tools or repack")
        modes = {v: k for k, v in MODES.items()}
        if mode not in modes or itemsize not in (2, 4) or res0 or res1 or res2 or seq_len < 1:
            raise ShardFormatError(f"{self.path}: corrupt header (mode {mode}, itemsize {itemsize}); repack")
        expected = HEADER.size + 24 * (s + 1) + 8 * r + 5 * d
        if len(mm) != expected:
            raise ShardFormatError(f"{self.path}: {len(mm)} bytes, header implies {expected}; file truncated?")
        self.mode, self.itemsize, self.seq_len = modes[mode], itemsize, seq_len
        self.num_sequences, self.num_segments, self.num_runs, self.num_tokens = s, d, r, t
        pos = HEADER.size

        def take(dtype: str, count: int) -> np.ndarray:
            nonlocal pos
            view = mm[pos:pos + count * np.dtype(dtype).itemsize].view(dtype)
            pos += count * np.dtype(dtype).itemsize
            return view

        self.seq_offsets, self.seq_segments, self.seq_runs = take("<u8", s + 1), take("<u8", s + 1), take("<u8", s + 1)
        self.runs = take("<u4", 2 * r).reshape(r, 2)
        self.seg_starts, self.seg_flags = take("<u4", d), take("u1", d)
        self._validate()

    def _validate(self) -> None:
        bad = lambda what: ShardFormatError(f"{self.path}: {what}; the shard is corrupt, repack it")  # noqa: E731
        for name, arr, last in (("seq_offsets", self.seq_offsets, self.num_tokens),
                                ("seq_segments", self.seq_segments, self.num_segments),
                                ("seq_runs", self.seq_runs, self.num_runs)):
            if arr[0] != 0 or arr[-1] != last or np.any(np.diff(arr.astype(np.int64)) < 0):
                raise bad(f"{name} is not 0..{last} non-decreasing")
        lengths = np.diff(self.seq_offsets.astype(np.int64))
        if self.num_sequences and (lengths.min() < 1 or lengths.max() > self.seq_len):
            raise bad(f"a sequence length is outside 1..{self.seq_len}")
        nseg = np.diff(self.seq_segments.astype(np.int64))
        if self.num_sequences and nseg.min() < 1:
            raise bad("a sequence has no segment")
        owner = np.repeat(np.arange(self.num_sequences), nseg)
        starts = self.seg_starts.astype(np.int64)
        first = np.zeros(self.num_segments, dtype=bool)
        first[self.seq_segments[:-1].astype(np.int64)] = True
        if np.any(starts[first] != 0) or np.any(starts >= lengths[owner]) \
                or np.any(np.diff(starts)[~first[1:]] <= 0) or np.any(self.seg_flags & 0x7C):
            raise bad("segment starts or flags break the spec")
        if self.num_runs:
            rowner = np.repeat(np.arange(self.num_sequences), np.diff(self.seq_runs.astype(np.int64)))
            rs, rl = self.runs[:, 0].astype(np.int64), self.runs[:, 1].astype(np.int64)
            rfirst = np.zeros(self.num_runs, dtype=bool)
            rfirst[self.seq_runs[:-1][np.diff(self.seq_runs.astype(np.int64)) > 0].astype(np.int64)] = True
            if rl.min() < 1 or np.any(rs + rl > lengths[rowner]) or np.any((rs[1:] < (rs + rl)[:-1])[~rfirst[1:]]):
                raise bad("loss runs overlap or leave their sequence")

    def sequence(self, i: int) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
        """(token start, token end, segment starts, segment flags, runs [k, 2]) of sequence i."""
        a, b = int(self.seq_segments[i]), int(self.seq_segments[i + 1])
        ra, rb = int(self.seq_runs[i]), int(self.seq_runs[i + 1])
        return (int(self.seq_offsets[i]), int(self.seq_offsets[i + 1]), self.seg_starts[a:b], self.seg_flags[a:b],
                self.runs[ra:rb])

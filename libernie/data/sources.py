"""Input side of packing: open JSONL files (plain, .gz, .zst, or "-" for stdin), interleave several inputs by
weight, and assign each record to a train/valid/test split. All of it deterministic and resumable by line count.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path

from libernie.errors import DataError, PackError

SPLIT_NAMES = ("train", "valid", "test")


@contextmanager
def open_lines(path: str):
    """Binary line iterator over a JSONL input; `-` is stdin, `.gz`/`.zst` are decompressed on the fly."""
    if path == "-":
        yield sys.stdin.buffer
        return
    p = Path(path)
    if not p.is_file():
        raise PackError(f"{path}: no such input file; check the path (use - for stdin)")
    if p.suffix == ".gz":
        f = gzip.open(p, "rb")
    elif p.suffix == ".zst":
        try:
            import zstandard  # optional at import time so plain/gz packing needs no extra package
        except ImportError:
            raise PackError(f"{path}: reading .zst needs the zstandard package; pip install zstandard") from None
        raw = open(p, "rb")
        f = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), 1 << 20)
    else:
        f = open(p, "rb", buffering=1 << 20)
    try:
        yield f
    finally:
        f.close()


_DECODE_ERRORS = (EOFError, OSError, zlib.error)  # gzip raises BadGzipFile (an OSError) or EOFError when cut short


class Source:
    """One input: its path, weight, and how many lines have been read (1-based numbers follow from it)."""

    def __init__(self, path: str, weight: float):
        self.path, self.weight, self.lines, self.done = path, weight, 0, False
        self._cm, self._it = None, None

    def open(self, skip: int) -> None:
        """Open and skip `skip` lines (a resumed run re-reads its inputs instead of seeking)."""
        self._cm = open_lines(self.path)
        self._it = iter(self._cm.__enter__())
        for _ in range(skip):
            if self.next() is None:
                raise PackError(f"{self.path}: has fewer than {skip} lines but the checkpoint read that many; "
                                "the input changed, rerun without --resume")

    def next(self) -> bytes | None:
        try:
            line = next(self._it, None)
        except _DECODE_ERRORS as e:
            raise DataError(self.path, self.lines + 1, "corrupt_input", f"cannot decompress or read ({e}); "
                            "check the file") from None
        except Exception as e:  # zstandard.ZstdError has no importable base here
            if type(e).__name__ == "ZstdError":
                raise DataError(self.path, self.lines + 1, "corrupt_input", f"cannot decompress ({e}); "
                                "check the file") from None
            raise
        if line is None:
            self.done = True
            return None
        self.lines += 1
        return line

    def close(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None


class MixedReader:
    """Interleave inputs: the next record comes from the unfinished input with the smallest (taken + 1) / weight.

    With weights 3 and 1, records alternate A A A B A A A B ... until an input runs out; the others then
    continue alone, so every record is used exactly once. No randomness, so the order is reproducible.
    """

    def __init__(self, paths: list[str], weights: list[float] | None = None):
        weights = weights or [1.0] * len(paths)
        if len(weights) != len(paths) or any(not w > 0 for w in weights):
            raise PackError(f"--weights needs {len(paths)} positive numbers, one per input; got {weights}")
        if sum(p == "-" for p in paths) > 1:
            raise PackError("stdin (-) can be given once; pass the other inputs as files")
        self.sources = [Source(p, w) for p, w in zip(paths, weights)]
        self.taken = [0] * len(paths)

    def state(self) -> dict:
        return {"lines": [s.lines for s in self.sources], "done": [s.done for s in self.sources],
                "taken": list(self.taken)}

    def open(self, state: dict | None = None) -> None:
        for k, s in enumerate(self.sources):
            s.open(state["lines"][k] if state else 0)
            if state:
                s.done = state["done"][k]
        if state:
            self.taken = list(state["taken"])

    def close(self) -> None:
        for s in self.sources:
            s.close()

    def next(self) -> tuple[int, str, int, bytes] | None:
        """(source index, path, 1-based line number, raw line) or None at the end of every input."""
        while True:
            live = [k for k, s in enumerate(self.sources) if not s.done]
            if not live:
                return None
            k = min(live, key=lambda j: ((self.taken[j] + 1) / self.sources[j].weight, j))
            line = self.sources[k].next()
            if line is not None:
                self.taken[k] += 1
                return k, self.sources[k].path, self.sources[k].lines, line


def parse_split(text: str | None) -> list[float] | None:
    """"98,1,1" -> [0.98, 0.01, 0.01] (normalized); None -> None. Two numbers mean train,valid."""
    if text is None:
        return None
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        raise PackError(f"--split {text!r}: expected numbers like 98,1,1") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise PackError(f"--split {text!r}: give 1 to 3 non-negative weights (train,valid,test) with a positive sum")
    total = sum(parts)
    return [p / total for p in parts]


def assign_split(fractions: list[float], seed: int, source: int, lineno: int) -> int:
    """Split index of record (source, lineno): a hash, so it depends on neither order nor worker count."""
    h = hashlib.blake2b(f"{seed}:{source}:{lineno}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "little") / 2**64
    acc = 0.0
    for k, f in enumerate(fractions):
        acc += f
        if u < acc:
            return k
    return max(k for k, f in enumerate(fractions) if f > 0)  # u landed in float rounding slack at the top

"""`DatasetWriter`: packed sequences -> numbered shards + counts, for one dataset prefix (one split).

Shard i of prefix `out/train` is `out/train-0000i.npy/.idx`. A shard is closed at the first record
boundary at or after it holds `shard_tokens` tokens (`close_if_full`), so a checkpoint always falls
between two input records; see tools/ernie-pack for the resume protocol built on `state()`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from libernie.data.manifest import Manifest
from libernie.data.packing import Sequence
from libernie.data.shard import ShardInfo, ShardWriter


def shard_base(prefix: str | os.PathLike, index: int) -> Path:
    """`out/train`, 3 -> `out/train-00003` (five digits, more when a dataset has over 99,999 shards)."""
    p = Path(prefix)
    return p.with_name(f"{p.name}-{index:05d}")


class DatasetWriter:
    """Rotate shards for one dataset and count what went in.

    Args:
        prefix: dataset prefix; shards and `PREFIX.json` go next to it.
        mode, seq_len, dtype: as in ShardWriter.
        shard_tokens: target tokens per shard (default 2**28, i.e. 512 MiB of uint16).
    """

    def __init__(self, prefix, mode: str, seq_len: int, dtype: np.dtype, shard_tokens: int = 2**28):
        self.prefix, self.mode, self.seq_len, self.dtype = Path(prefix), mode, seq_len, np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[ShardInfo] = []
        self.current: ShardWriter | None = None
        self.counts = {"documents": 0, "segments": 0, "sequences": 0, "tokens": 0, "loss_tokens": 0}

    def add(self, seq: Sequence, documents: int = 0) -> None:
        """Append one sequence to the open shard (opening one if needed)."""
        if self.current is None:
            self.current = ShardWriter(shard_base(self.prefix, len(self.shards)), self.mode, self.seq_len, self.dtype)
            self.current.open()
        self.current.add(seq.tokens, seq.segments, seq.runs)
        c = self.counts
        c["sequences"] += 1
        c["tokens"] += len(seq.tokens)
        c["segments"] += len(seq.segments)
        c["loss_tokens"] += sum(n for _, n in seq.runs)

    def full(self) -> bool:
        return self.current is not None and self.current.tokens >= self.shard_tokens

    def finish_current(self) -> ShardWriter | None:
        """Finish (not yet publish) the open shard; returns its writer for `publish()`, or None if none is open."""
        w, self.current = self.current, None
        if w is None:
            return None
        info = w.finish()
        self.shards.append(info)
        return w

    def manifest(self, tokenizer: dict, skipped: dict, options: dict, split: str | None) -> Manifest:
        c = dict(self.counts)
        eff = c["tokens"] / (c["sequences"] * self.seq_len) if c["sequences"] else 0.0
        return Manifest(self.mode, self.seq_len, "uint16" if self.dtype.itemsize == 2 else "uint32", tokenizer, c,
                        round(eff, 6), dict(skipped), options, split, [s.to_json() for s in self.shards])

    def state(self) -> dict:
        return {"shards": [s.to_json() for s in self.shards], "counts": dict(self.counts),
                "current": self.current.state() if self.current else None}

    def load_state(self, state: dict) -> None:
        self.shards = [ShardInfo(**s) for s in state["shards"]]
        self.counts = dict(state["counts"])
        self.current = None
        if state["current"] is not None:
            self.current = ShardWriter.reopen(shard_base(self.prefix, len(self.shards)), self.mode, self.seq_len,
                                              self.dtype, state["current"])

    def abandon(self) -> None:
        """Close the open shard's file without finishing it (its temp files stay for a resume)."""
        if self.current is not None and self.current._file is not None:
            self.current._file.close()
            self.current._file = None

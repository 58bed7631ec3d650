"""Read a packed dataset through memory maps: `PackedDataset(prefix)[i] -> PackedSample`.

Only the manifest is read up front. Each shard's `.npy` and `.idx` are memory-mapped (and the
`.idx` validated) the first time a sequence of that shard is asked for, so opening a dataset of
thousands of shards is cheap and no shard is ever loaded whole.
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

import numpy as np

from libernie.data.manifest import Manifest, manifest_path
from libernie.data.shard import (FLAG_CONTINUED, NPY_HEADER_BYTES, ROLE_CHOSEN, ROLE_DOC, ROLE_PROMPT,
                                 ROLE_REJECTED, ShardIndex, file_sha256)
from libernie.errors import ShardFormatError


@dataclass
class PackedSample:
    """One sequence, padded to seq_len unless asked not to. See docs/formats/shards.md "Reading a sequence".

    input_ids int64, doc_ids int32 (-1 on padding), position_ids int32, loss_mask uint8,
    roles uint8 (ROLE_*); `length` is the number of real tokens; `continued[k]` tells whether
    document k of this sequence continues one cut at the end of the previous sequence.
    """

    input_ids: np.ndarray
    doc_ids: np.ndarray
    position_ids: np.ndarray
    loss_mask: np.ndarray
    roles: np.ndarray
    length: int
    continued: list[bool]


def attention_mask(sample: PackedSample) -> np.ndarray:
    """Dense reference mask, bool [L, L]: query q sees key k (the slow twin of any fused kernel)."""
    doc, role = sample.doc_ids, sample.roles
    n = len(doc)
    causal = np.tril(np.ones((n, n), dtype=bool))
    same = (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0)
    blocked = (role[:, None] == ROLE_REJECTED) & (role[None, :] == ROLE_CHOSEN)
    return causal & same & ~blocked


class PackedDataset:
    """The sequences of `PREFIX.json`.

    Args:
        prefix: dataset prefix (`out/train`) or its manifest path (`out/train.json`).
        pad: pad samples to seq_len (default True) with pad_id, doc id -1, mask 0, position 0.
    """

    def __init__(self, prefix: str | os.PathLike, pad: bool = True):
        self.path = manifest_path(prefix)
        self.manifest = Manifest.read(self.path)
        self.pad = pad
        self.root = self.path.parent
        self.mode, self.seq_len = self.manifest.mode, int(self.manifest.seq_len)
        self.tokenizer_sha256 = self.manifest.tokenizer.get("sha256")
        self.pad_id = int(self.manifest.tokenizer.get("pad_id", 0))
        self._ends, total = [], 0
        for shard in self.manifest.shards:
            for key in ("npy", "idx"):
                if not (self.root / shard[key]).is_file():
                    raise ShardFormatError(f"{self.root / shard[key]}: listed in {self.path} but missing; "
                                           "copy it back or repack")
            total += int(shard["sequences"])
            self._ends.append(total)
        self._open: dict[int, tuple[np.ndarray, ShardIndex]] = {}

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    @property
    def dtype(self) -> str:
        return self.manifest.dtype

    def verify(self) -> None:
        """Check every shard file's sha256 against the manifest; raises ShardFormatError on the first mismatch."""
        for shard in self.manifest.shards:
            for key in ("npy", "idx"):
                path = self.root / shard[key]
                if file_sha256(path) != shard[f"{key}_sha256"]:
                    raise ShardFormatError(f"{path}: sha256 differs from {self.path}; the file changed, repack it")

    def shard(self, s: int) -> tuple[np.ndarray, ShardIndex]:
        """(tokens memmap, ShardIndex) of shard s, opened and checked on first use."""
        if s not in self._open:
            info = self.manifest.shards[s]
            npy_path = self.root / info["npy"]
            index = ShardIndex(self.root / info["idx"])
            try:
                tokens = np.load(npy_path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise ShardFormatError(f"{npy_path}: not a readable .npy ({e}); repack") from None
            if tokens.ndim != 1 or tokens.dtype.itemsize != index.itemsize or tokens.dtype.kind != "u" \
                    or len(tokens) != index.num_tokens or tokens.offset != NPY_HEADER_BYTES:
                raise ShardFormatError(f"{npy_path}: {tokens.dtype}[{len(tokens)}] does not match its .idx "
                                       f"({index.itemsize}-byte x {index.num_tokens}); repack")
            if index.mode != self.mode or index.seq_len != self.seq_len or index.num_sequences != info["sequences"]:
                raise ShardFormatError(f"{index.path}: mode/seq_len/sequences differ from {self.path}; repack")
            self._open[s] = (tokens, index)
        return self._open[s]

    def locate(self, i: int) -> tuple[int, int]:
        """Global sequence index -> (shard, index within the shard)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        i %= len(self)
        s = bisect.bisect_right(self._ends, i)
        return s, i - (self._ends[s - 1] if s else 0)

    def __getitem__(self, i: int) -> PackedSample:
        s, j = self.locate(i)
        tokens, index = self.shard(s)
        start, end, seg_starts, seg_flags, runs = index.sequence(j)
        n = end - start
        size = self.seq_len if self.pad else n
        input_ids = np.full(size, self.pad_id, dtype=np.int64)
        input_ids[:n] = tokens[start:end]
        doc_ids = np.full(size, -1, dtype=np.int32)
        position_ids = np.zeros(size, dtype=np.int32)
        roles = np.zeros(size, dtype=np.uint8)
        loss_mask = np.zeros(size, dtype=np.uint8)
        bounds = [int(x) for x in seg_starts] + [n]
        doc, prompt_len, continued = -1, 0, []
        for k, flags in enumerate(int(f) for f in seg_flags):
            a, b, role = bounds[k], bounds[k + 1], flags & 0x3
            if role in (ROLE_DOC, ROLE_PROMPT) or doc < 0:  # a new document starts here
                doc, prompt_len = doc + 1, 0
                continued.append(bool(flags & FLAG_CONTINUED))
            base = prompt_len if role in (ROLE_CHOSEN, ROLE_REJECTED) else 0
            position_ids[a:b] = np.arange(base, base + b - a, dtype=np.int32)
            doc_ids[a:b], roles[a:b] = doc, role
            if role == ROLE_PROMPT:
                prompt_len = b - a
        for r_start, r_len in runs.tolist():
            loss_mask[r_start:r_start + r_len] = 1
        return PackedSample(input_ids, doc_ids, position_ids, loss_mask, roles, n, continued)

    def segments(self, i: int) -> list[tuple[int, int, int]]:
        """(start, end, flags) of every segment of sequence i, for decoding and inspection."""
        s, j = self.locate(i)
        start, end, seg_starts, seg_flags, _ = self.shard(s)[1].sequence(j)
        bounds = [int(x) for x in seg_starts] + [end - start]
        return [(bounds[k], bounds[k + 1], int(f)) for k, f in enumerate(seg_flags)]

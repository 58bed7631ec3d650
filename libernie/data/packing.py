"""Packing tokenized examples (`Item`s) into sequences of at most seq_len tokens.

Two policies, both streaming with bounded memory and fully deterministic (same items in the same
order give the same sequences, whatever produced them):

- `ConcatPacker` (Megatron style): documents back to back, cut at every seq_len boundary. No
  padding at all except in the last sequence; the piece after a cut is flagged CONTINUED.
- `BestFitPacker`: whole items, best-fit decreasing over a window of `window` items, with up to
  `open_bins` partly filled sequences kept open across windows, so small items of the next window
  still fill gaps that this window left. ERNIEKit's greedy_intokens instead closes every bin after
  a 500-example worst-fit pass, which wastes the tail of every buffer (scripts/bench/pack.py).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from libernie.data.shard import FLAG_CONTINUED, ROLE_DOC


@dataclass
class Item:
    """A tokenized example: ids, segments `(start, flags)` and loss runs `(start, length)`, relative to the item."""

    tokens: np.ndarray
    segments: list[tuple[int, int]]
    runs: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.tokens)

    def to_json(self) -> dict:
        return {"tokens": self.tokens.tolist(), "segments": self.segments, "runs": self.runs}

    @classmethod
    def from_json(cls, d: dict) -> "Item":
        return cls(np.asarray(d["tokens"], dtype=np.int64), [tuple(s) for s in d["segments"]],
                   [tuple(r) for r in d["runs"]])


def document(tokens: np.ndarray, continued: bool = False) -> Item:
    """A pretrain document (or a piece of one): one DOC segment, every token a loss target."""
    return Item(tokens, [(0, ROLE_DOC | (FLAG_CONTINUED if continued else 0))], [(0, len(tokens))])


@dataclass
class Sequence:
    """A packed sequence, ready for ShardWriter.add(); `items` counts the items (pieces) in it."""

    tokens: np.ndarray
    segments: list[tuple[int, int]]
    runs: list[tuple[int, int]]
    items: int


def build(items: list[Item]) -> Sequence:
    """Concatenate items into one sequence, shifting their segments and merging touching loss runs."""
    segments, runs, offset = [], [], 0
    for item in items:
        segments.extend((offset + s, f) for s, f in item.segments)
        for s, n in item.runs:
            if runs and runs[-1][0] + runs[-1][1] == offset + s:
                runs[-1] = (runs[-1][0], runs[-1][1] + n)
            else:
                runs.append((offset + s, n))
        offset += len(item)
    tokens = np.concatenate([i.tokens for i in items]) if len(items) > 1 else items[0].tokens
    return Sequence(tokens, segments, runs, len(items))


def cut_document(tokens: np.ndarray, seq_len: int) -> list[Item]:
    """A pretrain document longer than seq_len -> full seq_len pieces and a tail, all but the first CONTINUED."""
    return [document(tokens[a:a + seq_len], continued=a > 0) for a in range(0, len(tokens), seq_len)]


class ConcatPacker:
    """Concatenate pretrain documents and cut every seq_len tokens (no waste but the very end)."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self._pieces: list[Item] = []
        self._fill = 0

    def add(self, item: Item) -> list[Sequence]:
        """Add one single-segment document; returns the sequences it completed."""
        out, tokens, cut = [], item.tokens, bool(item.segments[0][1] & FLAG_CONTINUED)
        while len(tokens):
            take = min(self.seq_len - self._fill, len(tokens))
            self._pieces.append(document(tokens[:take], continued=cut))
            self._fill += take
            tokens, cut = tokens[take:], True
            if self._fill == self.seq_len:
                out.append(build(self._pieces))
                self._pieces, self._fill = [], 0
        return out

    def flush(self) -> list[Sequence]:
        """The last, partly filled sequence (if any)."""
        out = [build(self._pieces)] if self._pieces else []
        self._pieces, self._fill = [], 0
        return out

    def state(self) -> dict:
        return {"pieces": [p.to_json() for p in self._pieces]}

    def load_state(self, state: dict) -> None:
        self._pieces = [Item.from_json(p) for p in state["pieces"]]
        self._fill = sum(len(p) for p in self._pieces)


class BestFitPacker:
    """Best-fit decreasing over a bounded window, with a bounded set of open sequences.

    Args:
        seq_len: capacity of a sequence; every item must have 1 <= len <= seq_len.
        window: items collected before a best-fit-decreasing pass (default 1000). Larger packs
            tighter and holds more items in memory.
        open_bins: partly filled sequences kept open across windows (default 256); when there are
            more, the fullest is emitted. Memory is at most (window + open_bins * seq_len) tokens.
    """

    def __init__(self, seq_len: int, window: int = 1000, open_bins: int = 256):
        if window < 1 or open_bins < 1:
            raise ValueError("window and open_bins must be >= 1")
        self.seq_len, self.window, self.open_bins = seq_len, window, open_bins
        self._buffer: list[Item] = []
        self._bins: dict[int, list[Item]] = {}  # bin id -> items, ids increase in creation order
        self._free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id) of open bins
        self._next_id = 0

    def add(self, item: Item) -> list[Sequence]:
        """Queue one item; returns the sequences closed by the pass it may trigger."""
        if not 1 <= len(item) <= self.seq_len:
            raise ValueError(f"item of {len(item)} tokens does not fit seq_len {self.seq_len}")
        self._buffer.append(item)
        return self._pass() if len(self._buffer) >= self.window else []

    def flush(self) -> list[Sequence]:
        """Pack what is queued, then close every open sequence in creation order."""
        out = self._pass()
        out.extend(build(self._bins.pop(b)) for b in sorted(self._bins))
        self._free = []
        return out

    def _pass(self) -> list[Sequence]:
        out = []
        # Stable sort: equal lengths keep arrival order, so the result never depends on dict/set order.
        for item in sorted(self._buffer, key=lambda it: -len(it)):
            n = len(item)
            k = bisect.bisect_left(self._free, (n, -1))  # the open bin with the least room that still fits
            if k < len(self._free):
                room, b = self._free.pop(k)
                self._bins[b].append(item)
            else:
                room, b = self.seq_len, self._next_id
                self._next_id += 1
                self._bins[b] = [item]
            if room - n == 0:
                out.append(build(self._bins.pop(b)))
            else:
                bisect.insort(self._free, (room - n, b))
            if len(self._free) > self.open_bins:  # bounded memory: emit the fullest open bin
                _, full = self._free.pop(0)
                out.append(build(self._bins.pop(full)))
        self._buffer = []
        return out

    def state(self) -> dict:
        return {"buffer": [i.to_json() for i in self._buffer], "next_id": self._next_id,
                "bins": [[b, [i.to_json() for i in items]] for b, items in self._bins.items()],
                "free": self._free}

    def load_state(self, state: dict) -> None:
        self._buffer = [Item.from_json(i) for i in state["buffer"]]
        self._bins = {b: [Item.from_json(i) for i in items] for b, items in state["bins"]}
        self._free = [tuple(f) for f in state["free"]]
        self._next_id = state["next_id"]

"""Batches from ernie-pack shards, in an order that depends only on (seed, global position).

Step k of a run consumes global sample positions [k*G, (k+1)*G) where G = per-device batch x
gradient accumulation x world size. Position p is sample perm_e[p % n] of epoch e = p // n, with
perm_e a permutation seeded by (seed, e). So the data position of a checkpoint is just its step, a
resumed run sees exactly the samples it would have seen, and each rank reads only its own slice.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from libernie.data import PackedDataset


@dataclass
class Batch:
    input_ids: np.ndarray      # int64 [b, s]
    doc_ids: np.ndarray        # int32 [b, s]  (-1 on padding)
    position_ids: np.ndarray   # int64 [b, s]  restart at each document
    loss_mask: np.ndarray      # int32 [b, s]  1 where the token is a target
    targets: int               # tokens that count in the loss (next-token, same document, loss_mask 1); dpo: pairs
    roles: np.ndarray | None = None        # uint8 [b, s] segment roles (dpo: prompt / chosen / rejected)
    indices: list = field(default_factory=list)   # dataset index of each row
    pairs: object = None                   # dpo: ernie_train.dpo.PairIndex


def count_targets(loss_mask: np.ndarray, doc_ids: np.ndarray) -> int:
    """Targets the causal-LM loss will count: position t+1 with loss_mask 1 in the same document as t."""
    return int(((loss_mask[:, 1:] > 0) & (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, 1:] >= 0)).sum())


class Sampler:
    """Maps global positions to dataset indices: a fresh seeded permutation each epoch."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle

    @functools.lru_cache(maxsize=2)
    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        return int(self._perm(epoch)[offset]) if self.shuffle else offset

    def epoch(self, position: int) -> float:
        return position / self.n


def collate(ds: PackedDataset, indices: list[int], seq_len: int) -> Batch:
    samples = [ds[i] for i in indices]
    input_ids = np.stack([s.input_ids[:seq_len] for s in samples]).astype(np.int64)
    doc_ids = np.stack([s.doc_ids[:seq_len] for s in samples]).astype(np.int32)
    position_ids = np.stack([s.position_ids[:seq_len] for s in samples]).astype(np.int64)
    loss_mask = np.stack([s.loss_mask[:seq_len] for s in samples]).astype(np.int32)
    roles = np.stack([s.roles[:seq_len] for s in samples])
    return Batch(input_ids, doc_ids, position_ids, loss_mask, count_targets(loss_mask, doc_ids), roles, list(indices))


class StepBatches:
    """The micro-batches one rank processes at optimizer step `step`."""

    def __init__(self, ds: PackedDataset, seq_len: int, micro_batch: int, accum: int, rank: int, world: int,
                 seed: int, collate_fn=None):
        self.ds, self.seq_len, self.collate = ds, seq_len, collate_fn or collate
        self.micro, self.accum, self.rank, self.world = micro_batch, accum, rank, world
        self.global_batch = micro_batch * accum * world
        self.sampler = Sampler(len(ds), seed)

    def __call__(self, step: int) -> list[Batch]:
        base = step * self.global_batch
        out = []
        for a in range(self.accum):  # micro-batch a of every rank, then a+1: rank slices interleave
            start = base + (a * self.world + self.rank) * self.micro
            out.append(self.collate(self.ds, [self.sampler.index(p) for p in range(start, start + self.micro)],
                                    self.seq_len))
        return out


def eval_batches(ds: PackedDataset, seq_len: int, batch: int, iters: int, rank: int, world: int, collate_fn=None):
    """The first iters*batch*world sequences of the eval set, in order, this rank's share."""
    n = min(len(ds), iters * batch * world)
    mine = list(range(rank, n, world))
    for i in range(0, len(mine), batch):
        yield (collate_fn or collate)(ds, mine[i:i + batch], seq_len)

"""The ernie-pack API: `pack(PackOptions) -> PackSummary` and `inspect(prefix, index) -> dict`.

No click, no printing: the CLI (cli.py) parses options into PackOptions, calls one of these, and prints
the result. Progress goes through an optional callback.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Callable

import orjson

from libernie.data.sources import parse_split
from libernie.errors import PackError
from libernie.paths import check_writable

MODES = ("pretrain", "sft", "dpo")


@dataclass
class PackOptions:
    """Everything a pack run depends on. Each field is one CLI option.

    Args:
        mode: "pretrain", "sft" or "dpo".
        tokenizer: directory holding tokenizer.model, or the .model file.
        seq_len: tokens per packed sequence (>= 2).
        output: output prefix; writes PREFIX.json and PREFIX-00000.npy/.idx (PREFIX-train... with split).
        inputs: JSONL paths (.gz/.zst read transparently); "-" or an empty list means stdin.
        text_field: pretrain text field (default "text"; ERNIEKit {"tgt": [...]} is the fallback).
        policy: pretrain packing: "bfd" (whole documents, best-fit decreasing; default) or "concat"
            (Megatron style: concatenate and cut at seq_len, no padding). sft/dpo always use bfd.
        overflow: sft/dpo example over seq_len: "truncate" (drop oldest turns; default) or "reject".
        window: items per best-fit-decreasing pass (default 1000).
        open_bins: partly filled sequences kept open across passes (default 256).
        workers: tokenizing threads (default 1); output bytes do not depend on it.
        shard_tokens: target tokens per shard (default 2**28); a shard closes at the first record after it.
        split: "98,1,1" splits records into train/valid/test by a seeded hash; None writes one dataset.
        seed: seed of the split hash (default 0).
        weights: one positive weight per input for interleaving them (default equal).
        skip_bad: count and skip bad records instead of stopping at the first one.
        allow_empty: write an empty dataset (manifest with no shards) when the input holds no record;
            without it, zero records (an empty file, only blank lines, every record skipped) is an error
            and nothing is written.
        resume: continue an interrupted run from its checkpoint (PREFIX.pack-state).
        chunk_records: records per unit of work (default 512); part of the checkpoint, not of the output.
    """

    mode: str
    tokenizer: str
    seq_len: int
    output: str
    inputs: list[str] = field(default_factory=list)
    text_field: str = "text"
    policy: str = "bfd"
    overflow: str = "truncate"
    window: int = 1000
    open_bins: int = 256
    workers: int = 1
    shard_tokens: int = 2**28
    split: str | None = None
    seed: int = 0
    weights: list[float] | None = None
    skip_bad: bool = False
    allow_empty: bool = False
    resume: bool = False
    chunk_records: int = 512

    def check(self) -> None:
        """Raise PackError for options that cannot work together (the CLI maps it to a usage error)."""
        problems = []
        if self.output in ("", "-"):
            problems.append("-o needs a file prefix such as data/train; shards cannot go to stdout")
        if self.mode not in MODES:
            problems.append(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.seq_len < 2 or self.seq_len >= 2**32:
            problems.append(f"--seq-len {self.seq_len} must be in [2, 2**32)")
        if self.policy not in ("bfd", "concat"):
            problems.append(f"--policy {self.policy!r} must be bfd or concat")
        if self.policy == "concat" and self.mode != "pretrain":
            problems.append("--policy concat cuts examples apart; it is for pretrain only")
        if self.overflow not in ("truncate", "reject"):
            problems.append(f"--overflow {self.overflow!r} must be truncate or reject")
        for name in ("window", "open_bins", "workers", "shard_tokens", "chunk_records"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        if self.weights is not None and (len(self.weights) != max(1, len(self.inputs))
                                         or any(not w > 0 for w in self.weights)):
            problems.append(f"--weights needs one positive number per input ({max(1, len(self.inputs))})")
        try:
            parse_split(self.split)
        except PackError as e:
            problems.append(str(e))
        if problems:
            raise PackError("; ".join(problems))

    def recorded(self) -> dict:
        """The options that decide the output bytes (written into each manifest; workers/resume excluded)."""
        d = asdict(self)
        for k in ("workers", "resume", "chunk_records", "allow_empty"):
            d.pop(k)
        d["inputs"] = list(self.inputs) or ["-"]
        return d

    def fingerprint(self, tokenizer_sha256: str) -> str:
        """Hash of what a checkpoint must match to be resumed (chunking included: it fixes record positions)."""
        d = {**self.recorded(), "chunk_records": self.chunk_records, "tokenizer_sha256": tokenizer_sha256}
        return hashlib.sha256(orjson.dumps(d, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass
class PackSummary:
    """What `pack` did; the CLI prints it as one JSON object on stdout."""

    mode: str
    documents: int
    tokens: int
    sequences: int
    packing_efficiency: float
    skipped: dict[str, int]
    notes: dict[str, int]
    seconds: float
    tokens_per_s: float
    manifests: list[str]
    splits: dict[str, dict]
    options: dict

    def to_json(self) -> dict:
        return asdict(self)


ProgressFn = Callable[[int, int], None]  # (documents so far, tokens so far)


def pack(options: PackOptions, progress: ProgressFn | None = None) -> PackSummary:
    """Tokenize and pack `options.inputs` into shards; see PackOptions. Raises ErnieError subclasses."""
    from ernie_pack.run import PackRun  # keeps `ernie-pack --help` from importing numpy and sentencepiece

    options.check()
    check_writable(options.output, prefix=True)  # before the tokenizer or any input is read: a typo fails in seconds
    return PackRun(options, progress).run()


def inspect(prefix: str, index: int | None = 0, verify: bool = False, tokenizer: str | None = None) -> dict:
    """Stats of dataset `prefix` and, unless index is None, sequence `index` decoded per segment.

    Each segment is `{"role", "start", "end", "continued", "text", "loss_text"}`; loss_text shows the
    text again with the trained spans wrapped in « and ».
    """
    from ernie_pack.inspect_data import inspect_dataset

    return inspect_dataset(prefix, index, verify, tokenizer)


"""One ernie-pack run: read -> tokenize (threads) -> pack -> write shards, with checkpoints for --resume.

Determinism: records are cut into chunks by count alone, chunks are tokenized by a pool of threads
but consumed strictly in input order, and packing sees one record at a time. So the shards are the
same bytes for any --workers, and a checkpoint taken between two records pins the run exactly.

Resume protocol (PREFIX.pack-state, written by temp name + rename):
1. when a shard reaches --shard-tokens at a record boundary, it is finished under its temp names;
2. every other open shard's tokens are flushed to disk;
3. the checkpoint is written: reader position (lines per input at the chunk start + records done in
   the chunk), packer contents, every writer's tables, all counters;
4. the finished shard is renamed to its final name.
A resumed run renames any shard the checkpoint calls finished (step 4 may not have happened), cuts
open temp shards back to the checkpointed length, re-reads inputs up to the chunk and carries on.
"""
from __future__ import annotations

import os
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

from libernie.data.encode import EncodeOptions, encode_lines
from libernie.data.manifest import manifest_path
from libernie.data.packing import BestFitPacker, ConcatPacker
from libernie.data.shard import token_dtype
from libernie.data.sources import SPLIT_NAMES, MixedReader, assign_split, parse_split
from libernie.data.writer import DatasetWriter, shard_base
from libernie.errors import DataError, PackError
from libernie.tokenizer import ErnieTokenizer

from ernie_pack.api import PackOptions, PackSummary

CHUNK_BYTES = 8 << 20  # a chunk also ends at 8 MiB of raw lines, so a few huge records cannot blow up memory
EXPECTED_SKIPS = ("too_long",)  # counted under any --overflow policy; not "bad input"


class PackRun:
    """State of one run; `run()` does the work and returns the summary."""

    def __init__(self, options: PackOptions, progress=None):
        self.o, self.progress = options, progress
        self.start = time.perf_counter()
        self.tok = ErnieTokenizer.from_pretrained(options.tokenizer)
        self.dtype = token_dtype(self.tok.vocab_size)
        self.fractions = parse_split(options.split)
        self.enc = EncodeOptions(options.mode, options.seq_len, options.text_field, options.policy, options.overflow)
        names = [None] if self.fractions is None else [SPLIT_NAMES[k] for k in range(len(self.fractions))]
        self.prefixes = {k: options.output + (f"-{n}" if n else "") for k, n in enumerate(names)}
        self.names = names
        self.outputs = {k: DatasetWriter(p, options.mode, options.seq_len, self.dtype, options.shard_tokens)
                        for k, p in self.prefixes.items()}
        self.packers = {k: self._packer() for k in self.prefixes}
        self.skipped, self.notes = Counter(), Counter()
        self.documents = self.tokens_in = 0  # tokens_in: tokenized so far (progress), not yet all written
        self.state_path = Path(options.output + ".pack-state")
        self.fingerprint = options.fingerprint(self.tok.sha256)
        self.reader = MixedReader(list(options.inputs) or ["-"], options.weights)

    def _packer(self):
        if self.o.policy == "concat":
            return ConcatPacker(self.o.seq_len)
        return BestFitPacker(self.o.seq_len, self.o.window, self.o.open_bins)

    # ---- the run ----------------------------------------------------------------------------------------
    def run(self) -> PackSummary:
        skip, done = 0, False
        try:
            if self.o.resume and self.state_path.exists():
                reader_state, skip, done = self._restore()
            else:
                reader_state = None
                for prefix in self.prefixes.values():
                    manifest_path(prefix).unlink(missing_ok=True)  # a manifest must never describe a half-new dataset
            if not done:
                self.reader.open(reader_state)
                self._consume(skip)
                if self.documents == 0 and not self.o.allow_empty:
                    self._discard()
                    raise PackError(self._empty_message())
                self._finish()
            self._write_manifests()
            self.state_path.unlink(missing_ok=True)
        except DataError:
            self._discard()
            raise
        except BaseException:
            for out in self.outputs.values():  # keep temp shards and the checkpoint for --resume
                out.abandon()
            raise
        finally:
            self.reader.close()
        return self._summary()

    def _chunks(self):
        while True:
            state, records, size = self.reader.state(), [], 0
            while len(records) < self.o.chunk_records and size < CHUNK_BYTES:
                rec = self.reader.next()
                if rec is None:
                    break
                records.append(rec)
                size += len(rec[3])
            if not records:
                return
            yield state, records

    def _consume(self, skip: int) -> None:
        workers = self.o.workers
        with ThreadPoolExecutor(workers, thread_name_prefix="ernie-pack") as pool:
            pending = deque()
            try:
                for state, records in self._chunks():
                    lines = [(path, lineno, raw) for _, path, lineno, raw in records]
                    pending.append((state, records, pool.submit(encode_lines, lines, self.tok, self.enc)))
                    while len(pending) > 2 * workers:  # bounded look-ahead keeps memory flat
                        self._apply(*pending.popleft(), skip)
                        skip = 0
                while pending:
                    self._apply(*pending.popleft(), skip)
                    skip = 0
            except BaseException:
                for *_, fut in pending:
                    fut.cancel()
                raise

    def _apply(self, state: dict, records: list, future, skip: int) -> None:
        outcomes = future.result()
        for i, ((src, path, lineno, _), o) in enumerate(zip(records, outcomes)):
            if i < skip:  # consumed before the checkpoint we resumed from
                continue
            if o.blank:
                self.notes["blank_lines"] += 1
            elif o.error is not None:
                if not self.o.skip_bad and o.error.reason not in EXPECTED_SKIPS:
                    raise o.error
                self.skipped[o.error.reason] += 1
            else:
                k = assign_split(self.fractions, self.o.seed, src, lineno) if self.fractions else 0
                out, packer = self.outputs[k], self.packers[k]
                self.documents += 1
                out.counts["documents"] += 1
                self.notes.update(o.notes)
                for item in o.items:
                    self.tokens_in += len(item)
                    for seq in packer.add(item):
                        out.add(seq)
            if any(out.full() for out in self.outputs.values()):
                self._checkpoint(state, i + 1)
        if self.progress:
            self.progress(self.documents, self.tokens_in)

    def _finish(self) -> None:
        for k, packer in self.packers.items():
            for seq in packer.flush():
                self.outputs[k].add(seq)
        finished = [(out, out.finish_current()) for out in self.outputs.values()]
        self._save_state(None, 0, done=True)
        for _, w in finished:
            if w is not None:
                w.publish()

    def _checkpoint(self, reader_state: dict, records_done: int) -> None:
        finished = [out.finish_current() for out in self.outputs.values() if out.full()]
        for out in self.outputs.values():
            if out.current is not None:
                out.current.flush()
        self._save_state(reader_state, records_done)
        for w in finished:
            w.publish()

    # ---- checkpoint file -------------------------------------------------------------------------------
    def _save_state(self, reader_state: dict | None, records_done: int, done: bool = False) -> None:
        state = {"fingerprint": self.fingerprint, "done": done, "reader": reader_state, "records_done": records_done,
                 "documents": self.documents, "tokens_in": self.tokens_in, "skipped": dict(self.skipped),
                 "notes": dict(self.notes),
                 "outputs": {str(k): out.state() for k, out in self.outputs.items()},
                 "packers": {str(k): p.state() for k, p in self.packers.items()}}
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)  # no shard may have created it (an empty dataset)
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(state, option=orjson.OPT_SERIALIZE_NUMPY))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    def _restore(self) -> tuple[dict | None, int, bool]:
        try:
            state = orjson.loads(self.state_path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as e:
            raise PackError(f"{self.state_path}: unreadable checkpoint ({e}); rerun without --resume") from None
        if state.get("fingerprint") != self.fingerprint:
            raise PackError(f"{self.state_path}: checkpoint was written with other options, inputs or tokenizer; "
                            "rerun with the same ones, or without --resume")
        self.documents, self.tokens_in = state["documents"], state["tokens_in"]
        self.skipped, self.notes = Counter(state["skipped"]), Counter(state["notes"])
        for k, out in self.outputs.items():
            for info in state["outputs"][str(k)]["shards"]:  # roll forward renames that a kill interrupted
                base = out.prefix.parent / info["npy"][:-4]
                for ext in ("idx", "npy"):
                    tmp, final = Path(f"{base}.{ext}.tmp"), Path(f"{base}.{ext}")
                    if tmp.exists() and not final.exists():
                        os.replace(tmp, final)
                    if not final.exists():
                        raise PackError(f"{final}: the checkpoint lists it but it is gone; rerun without --resume")
            out.load_state(state["outputs"][str(k)])
            self.packers[k].load_state(state["packers"][str(k)])
        return state["reader"], state["records_done"], state["done"]

    def _discard(self) -> None:
        """Bad input stops the run: remove everything it wrote, so nothing looks usable."""
        for out in self.outputs.values():
            out.abandon()
            names = [(out.prefix.parent / s.npy, out.prefix.parent / s.idx) for s in out.shards]
            base = shard_base(out.prefix, len(out.shards))
            names.append((Path(f"{base}.npy.tmp"), Path(f"{base}.idx.tmp")))
            for pair in names:
                for p in pair:
                    p.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)

    def _empty_message(self) -> str:
        names = ", ".join(self.o.inputs) if self.o.inputs and self.o.inputs != ["-"] else "stdin"
        seen = [f"{n} {k.replace('_', ' ')}" for k, n in sorted({**self.notes, **self.skipped}.items()) if n]
        return (f"{names}: no records to pack{' (' + ', '.join(seen) + ')' if seen else ''}; nothing was "
                "written; pass --allow-empty to write an empty dataset")

    # ---- results ---------------------------------------------------------------------------------------
    def _write_manifests(self) -> None:
        tokenizer = {"sha256": self.tok.sha256, "vocab_size": self.tok.vocab_size, "pad_id": self.tok.pad_id,
                     "bos_id": self.tok.bos_id, "eos_id": self.tok.eos_id}
        self.manifests = []
        for k, out in self.outputs.items():
            m = out.manifest(tokenizer, dict(self.skipped), self.o.recorded(), self.names[k])
            self.manifests.append(str(m.write(self.prefixes[k])))

    def _summary(self) -> PackSummary:
        seconds = time.perf_counter() - self.start
        counts = {self.names[k] or "all": dict(out.counts) for k, out in self.outputs.items()}
        tokens = sum(c["tokens"] for c in counts.values())
        sequences = sum(c["sequences"] for c in counts.values())
        eff = tokens / (sequences * self.o.seq_len) if sequences else 0.0
        return PackSummary(self.o.mode, self.documents, tokens, sequences, round(eff, 6),
                           dict(sorted(self.skipped.items())), dict(sorted(self.notes.items())), round(seconds, 3),
                           round(tokens / seconds, 1) if seconds > 0 else 0.0, self.manifests, counts,
                           {**self.o.recorded(), "workers": self.o.workers, "resume": self.o.resume})


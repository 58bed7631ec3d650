"""Continuous batching: one thread owns the model and steps a batch that requests join and leave.

Each loop iteration (1) admits waiting requests while there is room, prefilling each one alone
(batch of 1, no padding) and merging its KV rows into the running batch, then (2) runs one
decode step for every running sequence and (3) drops the rows that finished or were aborted.

The batch cache is [B, T, nkv, hd] per layer, left padded: a row's own tokens are its last
columns, `mask` says which columns are real, and position ids are passed per row, so a row's
arithmetic does not depend on who else is in the batch (up to fp rounding of batched matmuls).
Sampling runs per row in numpy with the row's own Generator, seeded np.random.default_rng([seed,
index]) exactly as libernie.generate does, so a seed gives the same text alone and in a crowd.

No asyncio here: each request carries an `on_event` callback, called from the engine thread.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import paddle

from libernie.model import KVCache
from libernie.sampling import SamplingParams, sample

log = logging.getLogger("ernie_serve")


class QueueFull(Exception):
    """The waiting queue is full; the HTTP layer answers 429."""


@dataclass(frozen=True)
class GenParams:
    """What to generate for one prompt. stop_token_ids end a sequence (eos and <|end_of_sentence|>
    are added by the caller); `stop` strings end it too and are cut from the text."""
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset = frozenset()
    logprobs: int | None = None          # None: off; k >= 0: chosen token's logprob + top k alternatives


@dataclass
class Event:
    """Output of one sequence since its previous event. finish_reason: None (more to come),
    "stop", "length", "abort" or "error" (then `error` holds the message)."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list | None
    finish_reason: str | None = None
    error: str | None = None


class _Seq:
    def __init__(self, req: "Request", index: int):
        self.req, self.index = req, index
        self.rng = np.random.default_rng(None if req.params.seed is None else [req.params.seed, index])
        self.ids: list[int] = []        # generated tokens, a stop token included
        self.text_ids: list[int] = []   # tokens that make up the text (stop token excluded)
        self.emitted = 0                # characters of text already sent
        self.finish: str | None = None


class Request:
    """One prompt with n choices. Built by Engine.submit; `abort()` may be called from any thread."""

    def __init__(self, prompt_ids: list[int], params: GenParams, n: int, first_index: int,
                 on_event: Callable[[Event], None]):
        self.prompt_ids, self.params, self.n = list(prompt_ids), params, n
        self.on_event = on_event
        self.seqs = [_Seq(self, first_index + j) for j in range(n)]
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.ids) for s in self.seqs)


class BatchCache(KVCache):
    """KV cache of the running batch: per layer [B, nkv, T, hd] (libernie's head-major layout), left
    padded. Adds to what the model needs (`update`, `seq_len`) `merge` (new rows join) and `keep`
    (rows leave)."""

    def merge(self, other) -> None:
        """Append other's rows (any cache with keys/values [n, nkv, L, hd]), left padding the shorter."""
        if self.keys[0] is None:
            self.keys, self.values = list(other.keys), list(other.values)
            return
        t = max(self.seq_len, other.keys[0].shape[2])
        for store in ("keys", "values"):
            mine, theirs = getattr(self, store), getattr(other, store)
            setattr(self, store, [paddle.concat([_left_pad(a, t), _left_pad(b, t)], axis=0)
                                  for a, b in zip(mine, theirs)])

    def keep(self, rows: list[int], first_col: int) -> None:
        """Keep batch rows `rows` and columns from `first_col` on (columns before are padding for all)."""
        index = paddle.to_tensor(rows, dtype="int64")
        for store in ("keys", "values"):  # contiguous: the attention kernel would copy a strided view every step
            setattr(self, store, [paddle.gather(x, index)[:, :, first_col:].contiguous() for x in getattr(self, store)])


def _left_pad(x, t):                                       # [n, nkv, L, hd] -> [n, nkv, t, hd]
    if x.shape[2] == t:
        return x
    pad = paddle.zeros([x.shape[0], x.shape[1], t - x.shape[2], x.shape[3]], dtype=x.dtype)
    return paddle.concat([pad, x], axis=2)


class Engine:
    """Owns the model on one thread. max_batch: sequences decoded together; max_waiting: requests
    (counted in sequences) that may wait for a slot before submit raises QueueFull."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_waiting: int = 64,
                 on_step: Callable[[int], None] | None = None):
        self.model, self.tok = model, tokenizer
        self._on_step = on_step                            # called with the batch size of each decode step
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Owned by the engine thread:
        self._rows: list[_Seq] = []                        # running sequences, in cache row order
        self._cache = BatchCache(model.config.num_hidden_layers)
        self._mask = np.zeros((0, 0), dtype=np.int64)       # [B, T] 1 = real token
        self.steps = 0

    # ---- any thread ------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="ernie-serve-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, requests: list[Request]) -> None:
        """Queue requests (one per prompt) together, or raise QueueFull for all of them."""
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            self._drop_aborted_waiting()
            waiting = sum(r.n for r in self._waiting)
            if waiting + sum(r.n for r in requests) > self.max_waiting:
                raise QueueFull(f"{waiting} sequences are waiting (--max-waiting {self.max_waiting})")
            self._waiting.extend(requests)
            self._cv.notify()

    def _drop_aborted_waiting(self) -> None:
        """Requests whose client left while waiting give their place back (caller holds the lock)."""
        if any(r.aborted for r in self._waiting):
            for r in [r for r in self._waiting if r.aborted]:
                self._finish_all(r, "abort")
            self._waiting = collections.deque(r for r in self._waiting if not r.aborted)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len({id(s.req) for s in self._rows})

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort whatever is left and stop the thread (the HTTP layer drains requests before this)."""
        with self._cv:
            self._stopping = True
            for r in self._waiting:
                r.abort()
            for s in self._rows:
                s.req.abort()
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._rows and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._rows:
                    for r in self._waiting:
                        self._finish_all(r, "abort")
                    self._waiting.clear()
                    return
                self._drop_aborted_waiting()
                admit = []
                room = self.max_batch - len(self._rows)
                while self._waiting and (self._waiting[0].n <= room or (not self._rows and not admit)):
                    r = self._waiting.popleft()
                    room -= r.n
                    admit.append(r)
            try:
                for r in admit:
                    self._prefill(r)
                self._drop_finished()
                if self._rows:
                    self._decode()
                    self._drop_finished()
            except Exception as e:  # a bad step must not kill the server: fail those requests, go on
                log.exception("engine step failed")
                failed = {id(r): r for r in admit} | {id(s.req): s.req for s in self._rows}
                for r in failed.values():
                    self._finish_all(r, "error", error=f"{type(e).__name__}: {e}")
                self._reset_batch()

    def _reset_batch(self) -> None:
        self._rows = []
        self._cache = BatchCache(self.model.config.num_hidden_layers)
        self._mask = np.zeros((0, 0), dtype=np.int64)

    @paddle.no_grad()
    def _prefill(self, r: Request) -> None:
        if r.aborted:
            self._finish_all(r, "abort")
            return
        ids = paddle.to_tensor(np.asarray([r.prompt_ids], dtype=np.int64))   # [1, L]
        cache = _RowCache(self.model.config.num_hidden_layers)
        # Alone, unpadded, nothing cached: plain causal attention, no mask to build.
        logits = self.model(ids, cache=cache, logits_to_keep=1).logits
        row = logits[0, -1].astype("float32").numpy()                       # [V]
        r.first_token_at = time.monotonic()
        live = [s for s in r.seqs if not self._advance(s, row)]
        if not live:
            return
        if len(live) > 1:                                                    # n choices share one prefill
            cache.repeat(len(live))
        self._cache.merge(cache)
        t = self._cache.seq_len
        pad = np.zeros((len(live), t), dtype=np.int64)
        pad[:, t - len(r.prompt_ids):] = 1
        old = np.zeros((len(self._rows), t), dtype=np.int64)
        old[:, t - self._mask.shape[1]:] = self._mask
        self._mask = np.concatenate([old, pad], axis=0)
        self._rows.extend(live)

    @paddle.no_grad()
    def _decode(self) -> None:
        step = np.asarray([[s.ids[-1]] for s in self._rows], dtype=np.int64)                      # [B, 1]
        pos = np.asarray([[len(s.req.prompt_ids) + len(s.ids) - 1] for s in self._rows], dtype=np.int64)
        self._mask = np.concatenate([self._mask, np.ones((len(self._rows), 1), dtype=np.int64)], axis=1)
        out = self.model(paddle.to_tensor(step), attention_mask=paddle.to_tensor(self._mask),
                         position_ids=paddle.to_tensor(pos), cache=self._cache, logits_to_keep=1)
        logits = out.logits[:, -1].astype("float32").numpy()                                      # [B, V]
        self.steps += 1
        if self._on_step is not None:
            self._on_step(len(self._rows))
        for i, s in enumerate(self._rows):
            if not s.req.aborted:
                self._advance(s, logits[i])

    def _drop_finished(self) -> None:
        for s in self._rows:
            if s.req.aborted and s.finish is None:
                s.finish = "abort"
                self._emit(s, "", [], None)
        keep = [i for i, s in enumerate(self._rows) if s.finish is None]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset_batch()
            return
        mask = self._mask[keep]
        first_col = int(np.argmax(mask.any(axis=0)))        # columns before it are padding in every row
        self._cache.keep(keep, first_col)
        self._mask = mask[:, first_col:]
        self._rows = [self._rows[i] for i in keep]

    def _advance(self, s: _Seq, logits: np.ndarray) -> bool:
        """Sample s's next token from logits [V], emit its text; return True if s finished."""
        r, p = s.req, s.req.params
        seen = np.asarray(r.prompt_ids + s.ids, dtype=np.int64)
        tok = sample(logits, p.sampling, s.rng, seen=seen, generated=np.asarray(s.ids, dtype=np.int64))
        lps = _logprobs(logits, tok, p.logprobs) if p.logprobs is not None else None
        s.ids.append(tok)
        finish = None
        if tok in p.stop_token_ids:
            finish = "stop"
        elif tok < self.tok.vocab_size:  # a model vocabulary wider than the tokenizer's: no text for those ids
            s.text_ids.append(tok)
        text = self.tok.decode(s.text_ids, skip_special_tokens=True)
        cut = _find_stop(text, p.stop, s.emitted)
        if cut is not None:
            text, finish = text[:cut], "stop"
        if finish is None and len(s.ids) >= p.max_tokens:
            finish = "length"
        safe = len(text) if finish else _safe_prefix(text, p.stop)
        delta = text[s.emitted:safe] if safe > s.emitted else ""
        s.emitted = max(s.emitted, safe)
        s.finish = finish
        self._emit(s, delta, [tok], lps)
        return finish is not None

    def _emit(self, s: _Seq, text: str, ids: list[int], lps, error: str | None = None) -> None:
        try:
            s.req.on_event(Event(s.index, text, ids, None if lps is None else [lps], s.finish, error))
        except Exception:  # a broken consumer (e.g. its event loop closed) must not stop the engine
            log.exception("on_event failed")
            s.req.abort()

    def _finish_all(self, r: Request, reason: str, error: str | None = None) -> None:
        for s in r.seqs:
            if s.finish is None:
                s.finish = reason
                self._emit(s, "", [], None, error)


class _RowCache(BatchCache):
    """The prefill cache of one request (batch 1); `repeat(n)` copies its row for n choices."""

    def repeat(self, n: int) -> None:
        for store in ("keys", "values"):
            setattr(self, store, [paddle.concat([x] * n, axis=0) for x in getattr(self, store)])


def _logprobs(logits: np.ndarray, tok: int, k: int) -> dict:
    """Log-probabilities of the model's distribution (before penalties and temperature)."""
    x = logits.astype(np.float64)
    lp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
    top = np.argsort(-lp, kind="stable")[:k] if k else np.zeros(0, dtype=np.int64)
    return {"token": tok, "logprob": float(lp[tok]), "top": [(int(i), float(lp[i])) for i in top]}


def _find_stop(text: str, stops: tuple[str, ...], emitted: int) -> int | None:
    """Index where the earliest stop string starts, searching only text not yet sent."""
    hits = [i for i in (text.find(s, max(0, emitted - len(s) + 1)) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _safe_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of text that may be sent now: hold back an unfinished UTF-8 character (decoded as
    U+FFFD) and any tail that could be the start of a stop string."""
    end = len(text.rstrip("\ufffd"))
    safe = end
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                safe = min(safe, end - k)
                break
    return safe

"""OpenAI response bodies and stream chunks, built from engine Events.

A format object collects one HTTP request's events: `add` for a whole response (`final`), or
`head`/`chunk`/`usage_chunk` for a stream.
"""
from __future__ import annotations

import time
import uuid


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class _Format:
    object_name = ""
    chunk_name = ""

    def __init__(self, tok, model: str, n_choices: int, prefix: str):
        self.tok, self.model = tok, model
        self.id, self.created = _new_id(prefix), int(time.time())
        self.text = [""] * n_choices
        self.finish = [None] * n_choices
        self.lps: list[list] = [[] for _ in range(n_choices)]

    def add(self, ev) -> None:
        self.text[ev.index] += ev.text
        if ev.finish_reason is not None:
            self.finish[ev.index] = _reason(ev.finish_reason)
        if ev.logprobs:
            self.lps[ev.index].extend(ev.logprobs)

    def _envelope(self, name: str, choices: list) -> dict:
        return {"id": self.id, "object": name, "created": self.created, "model": self.model, "choices": choices}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._envelope(self.chunk_name, []), "usage": usage}

    def token_text(self, token_id: int) -> str:
        return self.tok.decode([token_id])


def _reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"  # an abort ends the text like a stop


class CompletionFormat(_Format):
    object_name = chunk_name = "text_completion"

    def __init__(self, tok, model: str, body, prompts: list[list[int]]):
        super().__init__(tok, model, body.n * len(prompts), "cmpl")
        self.n, self.prompts = body.n, prompts
        self.echo = body.echo
        self.offsets = [0] * (body.n * len(prompts))

    def head(self) -> list[dict]:
        return []

    def _logprobs(self, index: int, entries: list) -> dict | None:
        if not entries:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            piece = self.token_text(e["token"])
            out["tokens"].append(piece)
            out["token_logprobs"].append(e["logprob"])
            out["top_logprobs"].append({self.token_text(t): lp for t, lp in e["top"]})
            out["text_offset"].append(self.offsets[index])
            self.offsets[index] += len(piece)
        return out

    def chunk(self, ev) -> dict | None:
        if not ev.text and ev.finish_reason is None and not ev.logprobs:
            return None
        choice = {"index": ev.index, "text": ev.text,
                  "logprobs": self._logprobs(ev.index, ev.logprobs or []) if ev.logprobs else None,
                  "finish_reason": None if ev.finish_reason is None else _reason(ev.finish_reason)}
        return self._envelope(self.chunk_name, [choice])

    def final(self, usage: dict) -> dict:
        choices = []
        for i, text in enumerate(self.text):
            if self.echo:
                text = self.tok.decode(self.prompts[i // self.n]) + text
            choices.append({"index": i, "text": text, "logprobs": self._logprobs(i, self.lps[i]),
                            "finish_reason": self.finish[i]})
        return {**self._envelope(self.object_name, choices), "usage": usage}


class ChatFormat(_Format):
    object_name, chunk_name = "chat.completion", "chat.completion.chunk"

    def __init__(self, tok, model: str, body):
        super().__init__(tok, model, body.n, "chatcmpl")
        self.n = body.n

    def _logprobs(self, entries: list) -> dict | None:
        if not entries:
            return None
        content = []
        for e in entries:
            piece = self.token_text(e["token"])
            content.append({"token": piece, "logprob": e["logprob"], "bytes": list(piece.encode("utf-8")),
                            "top_logprobs": [{"token": (p := self.token_text(t)), "logprob": lp,
                                              "bytes": list(p.encode("utf-8"))} for t, lp in e["top"]]})
        return {"content": content}

    def head(self) -> list[dict]:
        return [self._envelope(self.chunk_name, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}])
                for i in range(self.n)]

    def chunk(self, ev) -> dict | None:
        if not ev.text and ev.finish_reason is None and not ev.logprobs:
            return None
        choice = {"index": ev.index, "delta": {"content": ev.text} if ev.text else {},
                  "logprobs": self._logprobs(ev.logprobs or []),
                  "finish_reason": None if ev.finish_reason is None else _reason(ev.finish_reason)}
        return self._envelope(self.chunk_name, [choice])

    def final(self, usage: dict) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": text},
                    "logprobs": self._logprobs(self.lps[i]), "finish_reason": self.finish[i]}
                   for i, text in enumerate(self.text)]
        return {**self._envelope(self.object_name, choices), "usage": usage}

"""Tokenize parsed records into packing `Item`s (tokens + segments + loss runs), one function per mode.

`encode_lines` is the unit of parallel work in ernie-pack: it takes raw JSONL lines and returns one
`Outcome` per line, in order, so results never depend on how many workers ran. Text of a whole chunk
is encoded in one batched SentencePiece call (the GIL is released inside it, so threads scale).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from libernie.data.packing import Item, cut_document, document
from libernie.data.records import Chat, Preference, dpo_pair, load_record, pretrain_text, sft_chat
from libernie.data.shard import ROLE_CHOSEN, ROLE_DOC, ROLE_PROMPT, ROLE_REJECTED
from libernie.errors import DataError


@dataclass
class EncodeOptions:
    """What turns records into items.

    Args:
        mode: "pretrain", "sft" or "dpo".
        seq_len: sequence capacity.
        text_field: pretrain text field (default "text", falling back to ERNIEKit "tgt").
        policy: pretrain packing, "concat" (cut anywhere) or "bfd" (whole documents, long ones cut to seq_len).
        overflow: sft/dpo examples longer than seq_len: "truncate" drops oldest turns, "reject" skips them.
    """

    mode: str
    seq_len: int
    text_field: str = "text"
    policy: str = "bfd"
    overflow: str = "truncate"


@dataclass
class Outcome:
    """What one input line became: items (maybe several pieces), or an error, plus counted notes."""

    items: list[Item] = field(default_factory=list)
    error: DataError | None = None
    notes: dict[str, int] = field(default_factory=dict)  # e.g. {"truncated": 1, "dropped_turns": 2}
    blank: bool = False


def encode_lines(lines: list[tuple[str, int, bytes]], tok, opts: EncodeOptions, num_threads: int = 1) -> list[Outcome]:
    """Encode `(path, lineno, raw line)` triples; never raises DataError (it is put in the Outcome)."""
    out, parsed = [], []
    for path, lineno, raw in lines:
        o = Outcome()
        out.append(o)
        if not raw.strip():
            o.blank = True
            continue
        try:
            obj = load_record(raw, path, lineno)
            if opts.mode == "pretrain":
                parsed.append((o, pretrain_text(obj, path, lineno, opts.text_field)))
            elif opts.mode == "sft":
                parsed.append((o, sft_chat(obj, path, lineno), path, lineno))
            else:
                parsed.append((o, dpo_pair(obj, path, lineno), path, lineno))
        except DataError as e:
            o.error = e
    if opts.mode == "pretrain":
        _encode_pretrain(parsed, tok, opts, num_threads)
    else:
        for o, example, path, lineno in parsed:
            try:
                fn = encode_chat_example if opts.mode == "sft" else encode_preference
                o.items, o.notes = fn(example, tok, opts.seq_len, opts.overflow, path, lineno)
            except DataError as e:
                o.error = e
    return out


def _encode_pretrain(parsed: list, tok, opts: EncodeOptions, num_threads: int) -> None:
    ids = tok.encode_batch([text for _, text in parsed], num_threads=num_threads)
    for (o, _), seq in zip(parsed, ids):
        # One array per document, not views into a chunk-wide buffer: a view would pin its whole chunk in
        # memory for as long as the document waits in an open bin.
        tokens = np.empty(len(seq) + 1, dtype=np.uint32)
        tokens[:-1] = seq
        tokens[-1] = tok.eos_id  # every document ends with EOS, so the model learns where documents stop
        if opts.policy == "bfd" and len(tokens) > opts.seq_len:
            o.items, o.notes = cut_document(tokens, opts.seq_len), {"cut_documents": 1}
        else:
            o.items = [document(tokens)]


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """Runs of ones in a 0/1 list -> [(start, length)]."""
    m = np.concatenate([[0], np.asarray(mask, dtype=np.int8), [0]])
    edges = np.flatnonzero(np.diff(m))
    return [(int(a), int(b - a)) for a, b in zip(edges[0::2], edges[1::2])]


def _drop_oldest_turn(messages: list[dict]) -> list[dict] | None:
    """Remove the oldest user turn and everything up to the next user turn; keep system messages."""
    users = [k for k, m in enumerate(messages) if m["role"] == "user"]
    if len(users) < 2:
        return None
    return [m for k, m in enumerate(messages) if not users[0] <= k < users[1] or m["role"] == "system"]


def encode_chat_example(chat: Chat, tok, seq_len: int, overflow: str, path: str, lineno: int):
    """Chat -> ([Item], notes). Loss runs cover assistant replies whose label is 1."""
    messages, labels, dropped = chat.messages, list(chat.labels), 0
    while True:
        ids, mask = tok.encode_chat(messages)
        if len(ids) <= seq_len:
            break
        shorter = _drop_oldest_turn(messages) if overflow == "truncate" else None
        if shorter is None:
            raise DataError(path, lineno, "too_long", f"{len(ids)} tokens do not fit --seq-len {seq_len}"
                            + (" even with only the last turn" if overflow == "truncate" else "")
                            + "; raise --seq-len or shorten the example")
        labels = labels[sum(m["role"] == "assistant" for m in messages) - sum(
            m["role"] == "assistant" for m in shorter):]
        messages, dropped = shorter, dropped + 1
    runs = _runs(mask)  # one run per assistant message: its content plus the closing <|end_of_sentence|>
    runs = [r for r, keep in zip(runs, labels) if keep]
    if not runs:
        raise DataError(path, lineno, "no_loss_tokens", "every reply has label 0, nothing to train on; "
                        "fix 'label' or pass --skip-bad")
    notes = {"truncated": 1, "dropped_turns": dropped} if dropped else {}
    return [Item(np.asarray(ids, dtype=np.uint32), [(0, ROLE_DOC)], runs)], notes


def encode_preference(pref: Preference, tok, seq_len: int, overflow: str, path: str, lineno: int):
    """Preference -> ([Item], notes): one item prompt + chosen + rejected with three segments."""
    messages, dropped = pref.messages, 0
    while True:
        prompt, chosen = _prompt_and_reply(tok, messages, pref.chosen, path, lineno)
        prompt_r, rejected = _prompt_and_reply(tok, messages, pref.rejected, path, lineno)
        if prompt_r != prompt:  # cannot happen with encode_chat's per-segment encoding; never pack a wrong pair
            raise DataError(path, lineno, "tokenization", "prompt tokenizes differently before chosen and "
                            "rejected; report this record")
        total = len(prompt) + len(chosen) + len(rejected)
        if total <= seq_len:
            break
        shorter = _drop_oldest_turn(messages) if overflow == "truncate" else None
        if shorter is None:
            raise DataError(path, lineno, "too_long", f"prompt+chosen+rejected is {total} tokens, over --seq-len "
                            f"{seq_len}; raise --seq-len or shorten the example")
        messages, dropped = shorter, dropped + 1
    p, c = len(prompt), len(chosen)
    tokens = np.asarray(prompt + chosen + rejected, dtype=np.uint32)
    item = Item(tokens, [(0, ROLE_PROMPT), (p, ROLE_CHOSEN), (p + c, ROLE_REJECTED)],
                [(p, c), (p + c, len(rejected))])
    return [item], ({"truncated": 1, "dropped_turns": dropped} if dropped else {})


def _prompt_and_reply(tok, messages: list[dict], reply: str, path: str, lineno: int) -> tuple[list, list]:
    ids, mask = tok.encode_chat(messages + [{"role": "assistant", "content": reply}])
    start = len(mask) - _runs(mask)[-1][1]  # the last run is the reply and its closing <|end_of_sentence|>
    return ids[:start], ids[start:]

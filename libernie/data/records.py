"""Parse one JSONL record for each mode into plain Python values; every problem is a DataError(path, line, reason).

Formats (ERNIE-FACTS "Data formats"):
- pretrain: `{"text": str}` (field name configurable), else ERNIEKit's `{"tgt": [str, ...]}` (joined with "\\n").
- sft, ERNIEKit: `{"system"?: str, "src": [str], "tgt": [str], "label"?: [0|1], "is_system"?: 0|1}`.
  `is_system: 1` (with no "system" field) means src[0] is the system prompt and tgt pairs with src[1:].
- sft, alpaca: `{"instruction": str, "input"?: str, "output": str, "history"?: [[q, a]], "system"?: str}`.
- dpo, ERNIEKit: `{"system"?, "src": [n str], "tgt": [n-1 str], "response": [[str], [str]], "sort": [x, y]}`;
  the response with the higher sort is chosen.
- dpo, alpaca: `{"system"?: str, "question": str, "chosen": str, "rejected": str}`.
"""
from __future__ import annotations

from dataclasses import dataclass

import orjson

from libernie.errors import DataError

_SKIP_HINT = "fix the record or pass --skip-bad to count and skip it"


@dataclass
class Chat:
    """An SFT example: messages for ErnieTokenizer.encode_chat and a 0/1 label per assistant message."""

    messages: list[dict]
    labels: list[int]


@dataclass
class Preference:
    """A DPO example: the prompt messages (ending with a user turn) and the two replies."""

    messages: list[dict]
    chosen: str
    rejected: str


def load_record(line: bytes, path: str, lineno: int) -> dict:
    """One JSONL line -> dict; raises DataError("invalid_json" | "not_an_object")."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise DataError(path, lineno, "invalid_json", f"invalid JSON ({str(e).split(':')[0]}); {_SKIP_HINT}") from None
    if not isinstance(obj, dict):
        raise DataError(path, lineno, "not_an_object", f"expected a JSON object, got {type(obj).__name__}; "
                        f"{_SKIP_HINT}")
    return obj


def _str(obj: dict, key: str, path: str, lineno: int, required: bool = True, allow_empty: bool = False) -> str:
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(path, lineno, "missing_field", f"missing field {key!r}; {_SKIP_HINT}")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(path, lineno, "wrong_type", f"field {key!r} must be a string, got "
                        f"{type(value).__name__}; {_SKIP_HINT}")
    if required and not allow_empty and not value.strip():
        raise DataError(path, lineno, "empty_text", f"field {key!r} is empty; {_SKIP_HINT}")
    return value


def _str_list(obj: dict, key: str, path: str, lineno: int, min_len: int = 1) -> list[str]:
    if key not in obj:
        raise DataError(path, lineno, "missing_field", f"missing field {key!r}; {_SKIP_HINT}")
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(path, lineno, "wrong_type", f"field {key!r} must be a list of strings; {_SKIP_HINT}")
    if len(value) < min_len:
        raise DataError(path, lineno, "empty_text", f"field {key!r} has no entries; {_SKIP_HINT}")
    if any(not v.strip() for v in value):
        raise DataError(path, lineno, "empty_text", f"field {key!r} holds an empty string; {_SKIP_HINT}")
    return value


def pretrain_text(obj: dict, path: str, lineno: int, field: str = "text") -> str:
    """The document text: obj[field], or ERNIEKit's obj["tgt"] list joined with newlines when field is absent."""
    if field not in obj and "tgt" in obj:
        return "\n".join(_str_list(obj, "tgt", path, lineno))
    if field not in obj:
        raise DataError(path, lineno, "missing_field", f"missing field {field!r} (or ERNIEKit 'tgt'); "
                        f"set --text-field or {_SKIP_HINT}")
    return _str(obj, field, path, lineno)


def _system(obj: dict, path: str, lineno: int) -> list[dict]:
    system = _str(obj, "system", path, lineno, required=False)
    return [{"role": "system", "content": system}] if system else []


def _turns(src: list[str], tgt: list[str]) -> list[dict]:
    out = []
    for user, reply in zip(src, tgt):
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return out


def sft_chat(obj: dict, path: str, lineno: int) -> Chat:
    """An SFT record in ERNIEKit or alpaca format -> Chat."""
    if "src" in obj or "tgt" in obj:
        src, tgt = _str_list(obj, "src", path, lineno), _str_list(obj, "tgt", path, lineno)
        head = _system(obj, path, lineno)
        is_system = obj.get("is_system", 0)
        if is_system not in (0, 1, True, False):
            raise DataError(path, lineno, "wrong_type", f"field 'is_system' must be 0 or 1; {_SKIP_HINT}")
        if is_system and not head:
            head, src = [{"role": "system", "content": src[0]}], src[1:]
        if len(src) != len(tgt) or not src:
            raise DataError(path, lineno, "src_tgt_mismatch", f"'src' has {len(src)} turns but 'tgt' has "
                            f"{len(tgt)}; they must pair up; {_SKIP_HINT}")
        labels = obj.get("label", [1] * len(tgt))
        if not isinstance(labels, list) or len(labels) != len(tgt) or any(x not in (0, 1) for x in labels) \
                or any(isinstance(x, bool) for x in labels):
            raise DataError(path, lineno, "bad_label", f"'label' must be a list of {len(tgt)} zeros and ones; "
                            f"{_SKIP_HINT}")
        return Chat(head + _turns(src, tgt), [int(x) for x in labels])
    if "instruction" in obj or "output" in obj:
        instruction, output = _str(obj, "instruction", path, lineno), _str(obj, "output", path, lineno)
        extra = _str(obj, "input", path, lineno, required=False)
        history = obj.get("history") or []
        if not isinstance(history, list) or not all(
                isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history):
            raise DataError(path, lineno, "wrong_type", f"'history' must be a list of [question, answer] string "
                            f"pairs; {_SKIP_HINT}")
        user = instruction + ("\n" + extra if extra else "")
        messages = _system(obj, path, lineno) + _turns([q for q, _ in history] + [user],
                                                       [a for _, a in history] + [output])
        return Chat(messages, [1] * (len(history) + 1))
    raise DataError(path, lineno, "missing_field", "no 'src'/'tgt' (ERNIEKit) or 'instruction'/'output' (alpaca) "
                    f"fields; {_SKIP_HINT}")


def dpo_pair(obj: dict, path: str, lineno: int) -> Preference:
    """A DPO record in ERNIEKit or alpaca format -> Preference."""
    if "src" in obj or "response" in obj:
        src = _str_list(obj, "src", path, lineno)
        tgt = obj.get("tgt", [])
        if not isinstance(tgt, list) or not all(isinstance(t, str) for t in tgt):
            raise DataError(path, lineno, "wrong_type", f"field 'tgt' must be a list of strings; {_SKIP_HINT}")
        if len(tgt) != len(src) - 1:
            raise DataError(path, lineno, "src_tgt_mismatch", f"'src' has {len(src)} turns, so 'tgt' needs "
                            f"{len(src) - 1}, got {len(tgt)}; {_SKIP_HINT}")
        response, sort = obj.get("response"), obj.get("sort")
        replies = [_reply(r) for r in response] if isinstance(response, list) and len(response) == 2 else None
        if replies is None or None in replies:
            raise DataError(path, lineno, "wrong_type", f"'response' must be two replies, each a string or a "
                            f"one-string list; {_SKIP_HINT}")
        if not isinstance(sort, list) or len(sort) != 2 or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) for s in sort):
            raise DataError(path, lineno, "wrong_type", f"'sort' must be two numbers; {_SKIP_HINT}")
        if sort[0] == sort[1]:
            raise DataError(path, lineno, "sort_tie", f"'sort' {sort} does not say which reply is chosen; "
                            f"{_SKIP_HINT}")
        if any(not r.strip() for r in replies):
            raise DataError(path, lineno, "empty_text", f"a 'response' is empty; {_SKIP_HINT}")
        chosen, rejected = (replies[0], replies[1]) if sort[0] > sort[1] else (replies[1], replies[0])
        messages = _system(obj, path, lineno) + _turns(src[:-1], tgt) + [{"role": "user", "content": src[-1]}]
        return Preference(messages, chosen, rejected)
    if "question" in obj or "chosen" in obj:
        question = _str(obj, "question", path, lineno)
        chosen, rejected = _str(obj, "chosen", path, lineno), _str(obj, "rejected", path, lineno)
        return Preference(_system(obj, path, lineno) + [{"role": "user", "content": question}], chosen, rejected)
    raise DataError(path, lineno, "missing_field", "no 'src'/'response'/'sort' (ERNIEKit) or "
                    f"'question'/'chosen'/'rejected' (alpaca) fields; {_SKIP_HINT}")


def _reply(r) -> str | None:
    if isinstance(r, str):
        return r
    if isinstance(r, list) and len(r) == 1 and isinstance(r[0], str):
        return r[0]
    return None

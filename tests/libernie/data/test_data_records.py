"""Record parsing and encoding for the three modes, including the bad-input matrix at the record level."""
import numpy as np
import orjson
import pytest

from libernie.data.encode import EncodeOptions, encode_lines
from libernie.data.records import dpo_pair, load_record, pretrain_text, sft_chat
from libernie.errors import DataError


def rec(obj):
    return orjson.dumps(obj) if not isinstance(obj, bytes) else obj


BAD = [
    ("pretrain", b'{"text": "unterminated', "invalid_json"),
    ("pretrain", b'[1, 2]', "not_an_object"),
    ("pretrain", {"body": "x"}, "missing_field"),
    ("pretrain", {"text": 7}, "wrong_type"),
    ("pretrain", {"text": "   "}, "empty_text"),
    ("pretrain", {"tgt": ["ok", ""]}, "empty_text"),
    ("sft", {"src": ["a", "b"], "tgt": ["c"]}, "src_tgt_mismatch"),
    ("sft", {"src": "a", "tgt": ["c"]}, "wrong_type"),
    ("sft", {"src": ["a"], "tgt": ["c"], "label": [2]}, "bad_label"),
    ("sft", {"src": ["a"], "tgt": ["c"], "label": [0]}, "no_loss_tokens"),
    ("sft", {"instruction": "a"}, "missing_field"),
    ("sft", {"instruction": "a", "output": ""}, "empty_text"),
    ("sft", {"text": "pretrain record"}, "missing_field"),
    ("dpo", {"src": ["q"], "tgt": [], "response": [["a"], ["b"]], "sort": [1, 1]}, "sort_tie"),
    ("dpo", {"src": ["q", "r"], "tgt": [], "response": [["a"], ["b"]], "sort": [1, 0]}, "src_tgt_mismatch"),
    ("dpo", {"src": ["q"], "tgt": [], "response": [["a"]], "sort": [1, 0]}, "wrong_type"),
    ("dpo", {"question": "q", "chosen": "a"}, "missing_field"),
]


@pytest.mark.parametrize("mode, line, reason", BAD)
def test_bad_records_name_file_line_and_reason(tok, mode, line, reason):
    out = encode_lines([("in.jsonl", 7, rec(line))], tok, EncodeOptions(mode, 64))
    err = out[0].error
    assert isinstance(err, DataError) and err.reason == reason
    assert str(err).startswith("in.jsonl:7: ") and "\n" not in str(err)


def test_pretrain_field_and_fallback():
    assert pretrain_text({"text": "hi"}, "f", 1) == "hi"
    assert pretrain_text({"tgt": ["a", "b"]}, "f", 1) == "a\nb"
    assert pretrain_text({"body": "x"}, "f", 1, field="body") == "x"
    with pytest.raises(DataError, match="missing field 'body'"):
        pretrain_text({"text": "x"}, "f", 1, field="body")


def test_sft_formats_render_expected_messages():
    c = sft_chat({"system": "S", "src": ["u1", "u2"], "tgt": ["a1", "a2"], "label": [0, 1]}, "f", 1)
    assert [m["role"] for m in c.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert c.labels == [0, 1]
    c = sft_chat({"is_system": 1, "src": ["S", "u"], "tgt": ["a"]}, "f", 1)
    assert c.messages[0] == {"role": "system", "content": "S"} and len(c.messages) == 3
    c = sft_chat({"instruction": "i", "input": "x", "output": "o", "history": [["q", "a"]]}, "f", 1)
    assert [m["content"] for m in c.messages] == ["q", "a", "i\nx", "o"]


def test_dpo_sort_picks_chosen():
    p = dpo_pair({"src": ["q1", "q2"], "tgt": ["t1"], "response": [["worse"], "better"], "sort": [0, 3]}, "f", 1)
    assert (p.chosen, p.rejected) == ("better", "worse") and p.messages[-1] == {"role": "user", "content": "q2"}


def test_sft_loss_mask_follows_labels(tok):
    line = rec({"src": ["Hi", "Bye"], "tgt": ["Hello", "Ciao"], "label": [0, 1]})
    item = encode_lines([("f", 1, line)], tok, EncodeOptions("sft", 256))[0].items[0]
    assert len(item.runs) == 1
    s, n = item.runs[0]
    assert tok.decode(item.tokens[s:s + n]) == "Ciao<|end_of_sentence|>"
    assert tok.decode(item.tokens) == tok.render_chat([{"role": "user", "content": "Hi"},
                                                       {"role": "assistant", "content": "Hello"},
                                                       {"role": "user", "content": "Bye"},
                                                       {"role": "assistant", "content": "Ciao"}])


def test_overflow_truncates_oldest_turns_or_rejects(tok):
    turns = {"src": [f"question number {i} " * 4 for i in range(6)], "tgt": [f"answer {i} " * 4 for i in range(6)]}
    full = len(tok.encode_chat(sft_chat(turns, "f", 1).messages)[0])
    seq_len = full - 10
    o = encode_lines([("f", 1, rec(turns))], tok, EncodeOptions("sft", seq_len, overflow="truncate"))[0]
    assert o.error is None and o.notes["truncated"] == 1 and len(o.items[0]) <= seq_len
    assert "question number 0" not in tok.decode(o.items[0].tokens)
    assert "answer 5" in tok.decode(o.items[0].tokens)
    o = encode_lines([("f", 1, rec(turns))], tok, EncodeOptions("sft", seq_len, overflow="reject"))[0]
    assert o.error.reason == "too_long"
    o = encode_lines([("f", 1, rec(turns))], tok, EncodeOptions("sft", 8, overflow="truncate"))[0]
    assert o.error.reason == "too_long" and "even with only the last turn" in str(o.error)


def test_pretrain_appends_eos_and_cuts_long_documents(tok):
    o = encode_lines([("f", 1, rec({"text": "one two three four five six seven"}))], tok,
                     EncodeOptions("pretrain", 4, policy="bfd"))[0]
    ids = np.concatenate([i.tokens for i in o.items])
    assert ids[-1] == tok.eos_id and tok.decode(ids[:-1]) == "one two three four five six seven"
    assert all(len(i) <= 4 for i in o.items) and [bool(i.segments[0][1] & 0x80) for i in o.items][1:] == \
        [True] * (len(o.items) - 1)


def test_blank_lines_are_not_records(tok):
    o = encode_lines([("f", 1, b"  \n")], tok, EncodeOptions("pretrain", 8))[0]
    assert o.blank and o.error is None and o.items == []


def test_load_record_messages_are_one_line():
    with pytest.raises(DataError) as e:
        load_record(b'{"a": }', "x.jsonl", 3)
    assert str(e.value).startswith("x.jsonl:3: invalid JSON") and "--skip-bad" in str(e.value)

"""JSONL -> shards -> decode gives back the input (pretrain) or the rendered chat (sft, dpo)."""
from collections import Counter

import numpy as np
import pytest
from pack_corpus import dpo_records, pretrain_docs, sft_records, write_jsonl

from ernie_pack.api import PackOptions, pack
from libernie.data import ROLE_CHOSEN, ROLE_PROMPT, ROLE_REJECTED, PackedDataset
from libernie.data.records import dpo_pair, sft_chat


def segments_text(ds, tok):
    for i in range(len(ds)):
        s = ds[i]
        for a, b, flags in ds.segments(i):
            yield flags, s.input_ids[a:b], s.loss_mask[a:b]


def test_pretrain_bfd_round_trip(tmp_path, tokenizer_path, tok):
    docs = pretrain_docs(300)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in docs])
    summary = pack(PackOptions("pretrain", tokenizer_path, 1024, str(tmp_path / "out"), [str(inp)]))
    ds = PackedDataset(tmp_path / "out")
    got = Counter(tok.decode(ids) for _, ids, _ in segments_text(ds, tok))
    assert got == Counter(d + "</s>" for d in docs)  # nothing cut at 1024: every document is whole
    assert summary.documents == 300 and summary.tokens == sum(len(tok.encode(d)) + 1 for d in docs)
    assert summary.sequences == len(ds) and ds.manifest.counts["loss_tokens"] == summary.tokens
    assert summary.packing_efficiency == pytest.approx(summary.tokens / (len(ds) * 1024), abs=1e-6)


def test_pretrain_concat_round_trip_in_order(tmp_path, tokenizer_path, tok):
    docs = pretrain_docs(120, seed=1)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"tgt": [d]} for d in docs])  # ERNIEKit fallback field
    summary = pack(PackOptions("pretrain", tokenizer_path, 64, str(tmp_path / "out"), [str(inp)], policy="concat"))
    ds = PackedDataset(tmp_path / "out", pad=False)
    assert all(ds[i].length == 64 for i in range(len(ds) - 1))  # no padding but in the very last sequence
    stream = np.concatenate([ds[i].input_ids for i in range(len(ds))])
    assert tok.decode(stream).split("</s>")[:-1] == docs
    assert summary.notes == {}


def test_pretrain_bfd_cuts_only_documents_longer_than_seq_len(tmp_path, tokenizer_path, tok):
    docs = pretrain_docs(60, seed=2)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in docs])
    seq_len = 96
    summary = pack(PackOptions("pretrain", tokenizer_path, seq_len, str(tmp_path / "out"), [str(inp)]))
    long_docs = sum(len(tok.encode(d)) + 1 > seq_len for d in docs)
    assert long_docs > 0 and summary.notes["cut_documents"] == long_docs
    ds = PackedDataset(tmp_path / "out")
    whole = Counter(tok.decode(ids) for f, ids, _ in segments_text(ds, tok) if not f & 0x80)
    short = Counter(d + "</s>" for d in docs if len(tok.encode(d)) + 1 <= seq_len)
    assert short - whole == Counter()  # every short document is one whole segment


def test_sft_round_trip_renders_chat_and_masks_replies(tmp_path, tokenizer_path, tok):
    records = sft_records(200)
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    summary = pack(PackOptions("sft", tokenizer_path, 512, str(tmp_path / "out"), [str(inp)]))
    ds = PackedDataset(tmp_path / "out")
    expected = Counter(tok.render_chat(sft_chat(r, "f", 1).messages) for r in records)
    got = Counter(tok.decode(ids) for _, ids, _ in segments_text(ds, tok))
    assert got == expected and summary.documents == 200 and summary.skipped == {}
    for _, ids, mask in segments_text(ds, tok):  # trained text always ends a reply
        assert mask.any() and tok.decode(ids[mask.astype(bool)]).endswith("<|end_of_sentence|>")
        assert mask[0] == 0


def test_dpo_round_trip_prompt_chosen_rejected(tmp_path, tokenizer_path, tok):
    records = dpo_records(100)
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    pack(PackOptions("dpo", tokenizer_path, 512, str(tmp_path / "out"), [str(inp)]))
    ds = PackedDataset(tmp_path / "out")
    got = []
    for i in range(len(ds)):
        s, segs = ds[i], ds.segments(i)
        for k in range(0, len(segs), 3):
            (p0, p1, fp), (c0, c1, fc), (r0, r1, fr) = segs[k:k + 3]
            assert (fp & 3, fc & 3, fr & 3) == (ROLE_PROMPT, ROLE_CHOSEN, ROLE_REJECTED)
            assert s.position_ids[r0] == p1 - p0 == s.position_ids[c0]
            ids = s.input_ids
            got.append((tok.decode(np.concatenate([ids[p0:p1], ids[c0:c1]])),
                        tok.decode(np.concatenate([ids[p0:p1], ids[r0:r1]]))))
    expected = []
    for r in records:
        p = dpo_pair(r, "f", 1)
        expected.append((tok.render_chat(p.messages + [{"role": "assistant", "content": p.chosen}]),
                         tok.render_chat(p.messages + [{"role": "assistant", "content": p.rejected}])))
    assert Counter(got) == Counter(expected)

"""PackedDataset: per-token arrays from the spec's rules, padding, attention reference, verify, missing files."""
import numpy as np
import pytest

from libernie.data import (FLAG_CONTINUED, ROLE_CHOSEN, ROLE_DOC, ROLE_PROMPT, ROLE_REJECTED, DatasetWriter, Item,
                           PackedDataset, attention_mask, build)
from libernie.errors import ShardFormatError

TOK = {"sha256": "ab" * 32, "vocab_size": 100, "pad_id": 0, "eos_id": 2}


def make(tmp_path, mode, items_per_seq, seq_len=12, shard_tokens=10**9):
    w = DatasetWriter(tmp_path / "ds", mode, seq_len, np.dtype("<u2"), shard_tokens)
    for items in items_per_seq:
        w.add(build(items), documents=len(items))
        if w.full():
            w.finish_current().publish()
    if w.current is not None:
        w.finish_current().publish()
    w.manifest(TOK, {}, {}, None).write(tmp_path / "ds")
    return PackedDataset(tmp_path / "ds")


def dpo_item(p, c, r, first=10):
    toks = np.arange(first, first + p + c + r)
    return Item(toks, [(0, ROLE_PROMPT), (p, ROLE_CHOSEN), (p + c, ROLE_REJECTED)], [(p, c), (p + c, r)])


def test_dpo_sample_positions_docs_roles_mask(tmp_path):
    ds = make(tmp_path, "dpo", [[dpo_item(3, 2, 2), dpo_item(1, 1, 2, first=40)]])
    s = ds[0]
    assert (len(ds), ds.mode, ds.seq_len, ds.tokenizer_sha256, s.length) == (1, "dpo", 12, "ab" * 32, 11)
    assert s.input_ids.tolist() == list(range(10, 17)) + [40, 41, 42, 43] + [0]
    assert s.doc_ids.tolist() == [0] * 7 + [1] * 4 + [-1]
    # prompt 0..2; chosen 3,4; rejected restarts at the prompt end: 3,4. Second example: prompt 0, chosen 1, rej 1,2.
    assert s.position_ids.tolist() == [0, 1, 2, 3, 4, 3, 4, 0, 1, 1, 2, 0]
    assert s.roles.tolist() == [1, 1, 1, 2, 2, 3, 3, 1, 2, 3, 3, 0]
    assert s.loss_mask.tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0]
    assert s.input_ids.dtype == np.int64 and s.doc_ids.dtype == np.int32 and s.loss_mask.dtype == np.uint8


def test_attention_reference_hides_chosen_from_rejected(tmp_path):
    s = make(tmp_path, "dpo", [[dpo_item(2, 1, 1)]], seq_len=5)[0]
    m = attention_mask(s).astype(int)
    assert m.tolist() == [[1, 0, 0, 0, 0],
                          [1, 1, 0, 0, 0],
                          [1, 1, 1, 0, 0],   # chosen sees the prompt
                          [1, 1, 0, 1, 0],   # rejected sees the prompt, not chosen
                          [0, 0, 0, 0, 0]]   # padding sees nothing


def test_pretrain_documents_restart_positions(tmp_path):
    a = Item(np.array([5, 6, 2]), [(0, ROLE_DOC | FLAG_CONTINUED)], [(0, 3)])
    b = Item(np.array([7, 2]), [(0, ROLE_DOC)], [(0, 2)])
    s = make(tmp_path, "pretrain", [[a, b]], seq_len=6)[0]
    assert s.position_ids.tolist() == [0, 1, 2, 0, 1, 0]
    assert s.doc_ids.tolist() == [0, 0, 0, 1, 1, -1] and s.continued == [True, False]
    unpadded = PackedDataset(tmp_path / "ds", pad=False)[0]
    assert unpadded.input_ids.tolist() == [5, 6, 2, 7, 2] and len(unpadded.loss_mask) == 5


def test_sequences_across_shards_and_negative_index(tmp_path):
    seqs = [[Item(np.array([i, i + 1]), [(0, 0)], [(0, 2)])] for i in range(10, 20)]
    ds = make(tmp_path, "pretrain", seqs, seq_len=4, shard_tokens=6)
    assert len(ds.manifest.shards) == 4 and len(ds) == 10
    assert [ds[i].input_ids[0] for i in range(10)] == list(range(10, 20)) and ds[-1].input_ids[0] == 19
    with pytest.raises(IndexError):
        ds[10]
    ds.verify()


def test_verify_and_missing_shard(tmp_path):
    ds = make(tmp_path, "pretrain", [[Item(np.array([3, 4]), [(0, 0)], [(0, 2)])]], seq_len=4)
    npy = tmp_path / "ds-00000.npy"
    raw = bytearray(npy.read_bytes())
    raw[-1] ^= 1
    npy.write_bytes(bytes(raw))
    with pytest.raises(ShardFormatError, match="sha256 differs"):
        ds.verify()
    npy.unlink()
    with pytest.raises(ShardFormatError, match="missing"):
        PackedDataset(tmp_path / "ds")
    with pytest.raises(ShardFormatError, match="no such manifest"):
        PackedDataset(tmp_path / "nope")


def test_empty_dataset(tmp_path):
    w = DatasetWriter(tmp_path / "e", "sft", 8, np.dtype("<u2"))
    w.manifest(TOK, {"too_long": 3}, {}, "test").write(tmp_path / "e")
    ds = PackedDataset(tmp_path / "e.json")
    assert len(ds) == 0 and ds.manifest.skipped == {"too_long": 3} and ds.manifest.shards == []

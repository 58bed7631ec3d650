"""Determinism across workers, resume after interruption (in-process and SIGKILL), splits, mixing weights."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from pack_corpus import pretrain_docs, sft_records, write_jsonl

from ernie_pack.api import PackOptions, pack
from libernie.data import PackedDataset


def digests(folder: Path) -> dict:
    """sha256 of every file; manifests without options.output, which names the (different) folder."""
    out = {}
    for p in sorted(folder.iterdir()):
        data = p.read_bytes()
        if p.suffix == ".json":
            m = orjson.loads(data)
            m["options"].pop("output")
            data = orjson.dumps(m)
        out[p.name] = hashlib.sha256(data).hexdigest()
    return out


def run(tmp_path, name, tokenizer_path, inputs, mode="pretrain", **kw):
    out = tmp_path / name
    out.mkdir()
    kw.setdefault("chunk_records", 16)
    summary = pack(PackOptions(mode, tokenizer_path, kw.pop("seq_len", 128), str(out / "d"), inputs, **kw))
    return out, summary


@pytest.mark.parametrize("mode, records", [
    ("pretrain", lambda: [{"text": d} for d in pretrain_docs(400)]),
    ("sft", lambda: sft_records(300)),
])
def test_same_bytes_for_any_worker_count(tmp_path, tokenizer_path, mode, records):
    inp = str(write_jsonl(tmp_path / "in.jsonl", records()))
    small = dict(shard_tokens=3000, window=40, open_bins=8)
    ref, s1 = run(tmp_path, "w1", tokenizer_path, [inp], mode, workers=1, **small)
    assert len([p for p in ref.iterdir() if p.suffix == ".npy"]) > 3  # several shards, several chunks
    for n in (2, 3):
        out, s = run(tmp_path, f"w{n}", tokenizer_path, [inp], mode, workers=n, **small)
        assert digests(out) == digests(ref)
        assert (s.tokens, s.sequences, s.documents) == (s1.tokens, s1.sequences, s1.documents)


class Stop(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("stop_after", [2, 9, 17])
def test_resume_after_interrupt_gives_same_bytes(tmp_path, tokenizer_path, stop_after):
    inp = str(write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in pretrain_docs(500, seed=3)]))
    opts = dict(shard_tokens=2500, split="80,10,10", window=30, open_bins=8)
    ref, _ = run(tmp_path, "ref", tokenizer_path, [inp], **opts)
    out = tmp_path / "cut"
    out.mkdir()
    calls = []

    def interrupt(docs, tokens):
        calls.append(docs)
        if len(calls) == stop_after:
            raise Stop()

    with pytest.raises(Stop):
        pack(PackOptions("pretrain", tokenizer_path, 128, str(out / "d"), [inp], chunk_records=16, **opts), interrupt)
    assert not list(out.glob("*.json"))  # no manifest for an unfinished run
    assert (out / "d.pack-state").exists() == (stop_after > 2)  # the first checkpoint comes with shard 0
    for npy in out.glob("*.npy"):  # every shard under a final name is complete (readable, hash in the checkpoint)
        assert npy.stat().st_size > 128
    pack(PackOptions("pretrain", tokenizer_path, 128, str(out / "d"), [inp], chunk_records=16, resume=True,
                     workers=2, **opts))
    assert digests(out) == digests(ref)


def test_resume_refuses_other_options(tmp_path, tokenizer_path):
    inp = str(write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in pretrain_docs(200)]))
    calls = []

    def interrupt(docs, tokens):
        calls.append(1)
        if len(calls) == 5:
            raise Stop()

    with pytest.raises(Stop):
        pack(PackOptions("pretrain", tokenizer_path, 128, str(tmp_path / "d"), [inp], chunk_records=8,
                         shard_tokens=1000, window=8, open_bins=2), interrupt)
    from libernie.errors import PackError
    with pytest.raises(PackError, match="other options"):
        pack(PackOptions("pretrain", tokenizer_path, 256, str(tmp_path / "d"), [inp], chunk_records=8,
                         shard_tokens=1000, window=8, open_bins=2, resume=True))


def test_resume_after_sigkill(tmp_path, tokenizer_path):
    inp = str(write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in pretrain_docs(6000, seed=5, max_sentences=30)]))
    args = ["pretrain", "--tokenizer", tokenizer_path, "--seq-len", "256", "--shard-tokens", "20000", "-q", inp]
    code = "from ernie_pack.cli import main; main()"
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-c", code, *args, "-o", str(ref / "d")], check=True, capture_output=True)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", code, *args, "-o", str(out / "d")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list(out.glob("d-00002.npy")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.fail("ernie-pack finished before it could be killed; make the input larger")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "d.json").exists()
    r = subprocess.run([sys.executable, "-c", code, *args, "-o", str(out / "d"), "--resume"], capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    assert digests(out) == digests(ref)


def test_split_is_by_record_deterministic_and_complete(tmp_path, tokenizer_path, tok):
    docs = pretrain_docs(400, seed=4)
    inp = str(write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in docs]))
    out, s = run(tmp_path, "a", tokenizer_path, [inp], split="80,10,10", seed=7, seq_len=2048)
    names = {k: Counter(tok.decode(PackedDataset(out / f"d-{k}")[i].input_ids[a:b])
                        for i in range(len(PackedDataset(out / f"d-{k}")))
                        for a, b, _ in PackedDataset(out / f"d-{k}").segments(i))
             for k in ("train", "valid", "test")}
    assert sum(names.values(), Counter()) == Counter(d + "</s>" for d in docs)
    assert 260 < s.splits["train"]["documents"] < 360 and s.splits["valid"]["documents"] > 10
    out2, _ = run(tmp_path, "b", tokenizer_path, [inp], split="80,10,10", seed=7, seq_len=2048, workers=2)
    assert digests(out2) == digests(out)
    out3, s3 = run(tmp_path, "c", tokenizer_path, [inp], split="80,10,10", seed=8, seq_len=2048)
    assert s3.splits["valid"] != s.splits["valid"]


def test_weights_interleave_inputs(tmp_path, tokenizer_path, tok):
    a = str(write_jsonl(tmp_path / "a.jsonl", [{"text": f"alpha {i}"} for i in range(9)]))
    b = str(write_jsonl(tmp_path / "b.jsonl", [{"text": f"beta {i}"} for i in range(3)]))
    out, s = run(tmp_path, "m", tokenizer_path, [a, b], policy="concat", weights=[3, 1], seq_len=4096)
    text = tok.decode(PackedDataset(out / "d")[0].input_ids[:s.tokens])
    order = [t.split()[0][0] for t in text.split("</s>")[:-1]]
    assert "".join(order) == "aaabaaabaaab"

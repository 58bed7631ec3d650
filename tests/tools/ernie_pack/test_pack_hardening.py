"""Issue 12 cases as a new user meets them: empty input, an unwritable output, a .model file of any name.

Each checks the one-line error, the exit status, and that nothing was written."""
import shutil

import orjson
import pytest
from click.testing import CliRunner
from pack_corpus import pretrain_docs, write_jsonl

from ernie_pack.cli import cli
from libernie.data import PackedDataset


def invoke(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("content, seen", [
    (b"", ""),                                                    # zero bytes: the traceback of issue 12
    (b"\n   \n\t\n", " (3 blank lines)"),
])
def test_empty_input_is_one_line_exit_1_nothing_written(tmp_path, tokenizer_path, content, seen):
    inp = tmp_path / "empty.jsonl"
    inp.write_bytes(content)
    r = invoke("pretrain", "--tokenizer", tokenizer_path, "--seq-len", 64, "-o", tmp_path / "out" / "e", inp)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr == (f"Error: {inp}: no records to pack{seen}; nothing was written; pass --allow-empty to "
                        "write an empty dataset\n")
    assert _files(tmp_path) == ["empty.jsonl"]


def test_every_record_skipped_is_empty_too(tmp_path, tokenizer_path):
    inp = tmp_path / "bad.jsonl"
    inp.write_bytes(b'{"text": ""}\n{"body": 1}\n')
    r = invoke("pretrain", "--tokenizer", tokenizer_path, "--seq-len", 64, "-o", tmp_path / "o", "--skip-bad", inp)
    assert r.exit_code == 1 and "no records to pack (1 empty text, 1 missing field)" in r.stderr
    assert r.stderr.count("\n") == 1 and _files(tmp_path) == ["bad.jsonl"]


def test_allow_empty_writes_a_readable_empty_dataset(tmp_path, tokenizer_path):
    inp = tmp_path / "empty.jsonl"
    inp.write_bytes(b"\n")
    r = invoke("sft", "--tokenizer", tokenizer_path, "--seq-len", 64, "-o", tmp_path / "out" / "e", "--allow-empty",
               "-q", inp)
    assert r.exit_code == 0 and orjson.loads(r.stdout)["documents"] == 0
    assert _files(tmp_path / "out") == ["e.json"]  # no shard, no pack-state left over
    ds = PackedDataset(tmp_path / "out" / "e")
    assert len(ds) == 0 and ds.manifest.shards == [] and ds.manifest.counts["documents"] == 0
    r = invoke("inspect", tmp_path / "out" / "e", "--json")  # stats of an empty set, not an index error
    assert r.exit_code == 0 and orjson.loads(r.stdout)["sequences"] == 0


@pytest.mark.parametrize("output", ["/proc/nope/x", "{file}/x"])
def test_unwritable_output_fails_before_any_input_is_read(tmp_path, tokenizer_path, output):
    (tmp_path / "file").write_text("a file, not a directory")
    inp = tmp_path / "bad.jsonl"
    inp.write_bytes(b"{not json\n")  # were the input read first, this would be the error
    out = output.format(file=tmp_path / "file")
    r = invoke("pretrain", "--tokenizer", tokenizer_path, "--seq-len", 64, "-o", out, inp)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.startswith(f"Error: {out}: ") and r.stderr.count("\n") == 1 and "bad.jsonl" not in r.stderr
    assert _files(tmp_path) == ["bad.jsonl", "file"]


def test_a_model_file_of_any_name_packs_the_same_bytes(tmp_path, tokenizer_path):
    shutil.copy(f"{tokenizer_path}/tokenizer.model", tmp_path / "tok.model")
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in pretrain_docs(30)])
    for name, tok in (("dir", tokenizer_path), ("file", tmp_path / "tok.model")):
        r = invoke("pretrain", "--tokenizer", tok, "--seq-len", 64, "-o", tmp_path / name, "-q", inp)
        assert r.exit_code == 0, r.stderr
    assert (tmp_path / "dir-00000.npy").read_bytes() == (tmp_path / "file-00000.npy").read_bytes()
    r = invoke("inspect", tmp_path / "file", "--tokenizer", tmp_path / "tok.model", "--json")
    assert r.exit_code == 0 and orjson.loads(r.stdout)["sequence"]["segments"]

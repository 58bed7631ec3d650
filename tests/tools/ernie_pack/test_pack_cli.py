"""The CLI contract: exit codes, one JSON object on stdout, progress/errors on stderr, outputs read back."""
import gzip
import re
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from pack_corpus import pretrain_docs, sft_records, write_jsonl

from ernie_pack.cli import cli
from libernie.data import PackedDataset

README = Path(__file__).resolve().parents[3] / "tools" / "ernie-pack" / "README.md"


def invoke(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


@pytest.mark.parametrize("command", ["pretrain", "sft", "dpo", "inspect"])
def test_every_command_has_help_with_example_and_readme_entry(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0 and "ernie-pack " + command in r.stdout
    assert f"ernie-pack {command}" in README.read_text()


def test_pretrain_summary_on_stdout_progress_on_stderr(tmp_path, tokenizer_path, tok):
    docs = pretrain_docs(50)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in docs])
    r = invoke("pretrain", "--tokenizer", tokenizer_path, "--seq-len", 256, "-o", tmp_path / "out", inp)
    assert r.exit_code == 0, r.stderr
    summary = orjson.loads(r.stdout)  # exactly one JSON object
    assert r.stdout.count("\n") == 1
    for key in ("documents", "tokens", "sequences", "packing_efficiency", "skipped", "seconds", "tokens_per_s"):
        assert key in summary
    assert summary["documents"] == 50 and summary["skipped"] == {}
    assert re.search(r"ernie-pack pretrain: 50 docs .* tokens/s", r.stderr)
    ds = PackedDataset(tmp_path / "out")
    assert ds.manifest.counts["tokens"] == summary["tokens"] == sum(len(tok.encode(d)) + 1 for d in docs)


@pytest.mark.parametrize("stdin_arg", [["-"], []])
def test_stdin_and_quiet(tmp_path, tokenizer_path, stdin_arg):
    data = b"".join(orjson.dumps({"text": d}) + b"\n" for d in pretrain_docs(10))
    r = invoke("pretrain", "--tokenizer", tokenizer_path, "--seq-len", 128, "-o", tmp_path / "o", "-q", *stdin_arg,
               input=data)
    assert r.exit_code == 0 and r.stderr == "" and orjson.loads(r.stdout)["documents"] == 10


def test_gz_and_zst_inputs_match_plain(tmp_path, tokenizer_path):
    zstandard = pytest.importorskip("zstandard", reason="zstandard not installed (requirements/base.txt)")
    records = sft_records(40)
    plain = write_jsonl(tmp_path / "in.jsonl", records)
    (tmp_path / "in.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    (tmp_path / "in.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    results = []
    for name in ("in.jsonl", "in.jsonl.gz", "in.jsonl.zst"):
        r = invoke("sft", "--tokenizer", tokenizer_path, "--seq-len", 512, "-o", tmp_path / "out" / name, "-q",
                   tmp_path / name)
        assert r.exit_code == 0, r.stderr
        results.append((tmp_path / "out" / f"{name}-00000.npy").read_bytes())
    assert results[0] == results[1] == results[2]


BAD_LINES = [
    (b'{"text": "fine"}\n{"text": \n', 2, "invalid JSON", "invalid_json"),
    (b'{"text": "fine"}\n{"body": "x"}\n', 2, "missing field 'text'", "missing_field"),
    (b'{"text": ""}\n', 1, "field 'text' is empty", "empty_text"),
    (b'{"text": ["a"]}\n', 1, "field 'text' must be a string", "wrong_type"),
    (b'"just a string"\n', 1, "expected a JSON object", "not_an_object"),
]


@pytest.mark.parametrize("content, line, message, reason", BAD_LINES)
def test_bad_input_stops_with_file_line_and_no_output(tmp_path, tokenizer_path, content, line, message, reason):
    inp = tmp_path / "bad.jsonl"
    inp.write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()
    r = invoke("pretrain", "--tokenizer", tokenizer_path, "--seq-len", 64, "-o", out / "d", "-q", inp)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.startswith(f"Error: {inp}:{line}: {message}") and r.stderr.count("\n") == 1
    assert list(out.iterdir()) == []  # no manifest, no shard, no temp file, no checkpoint
    # Some inputs hold no good record at all: --allow-empty says an empty dataset is what we want then.
    r = invoke("pretrain", "--tokenizer", tokenizer_path, "--seq-len", 64, "-o", out / "d", "-q", "--skip-bad",
               "--allow-empty", inp)
    assert r.exit_code == 0 and orjson.loads(r.stdout)["skipped"] == {reason: 1}
    assert PackedDataset(out / "d").manifest.skipped == {reason: 1}


def test_src_tgt_mismatch_and_too_long_are_counted(tmp_path, tokenizer_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [
        {"src": ["a", "b"], "tgt": ["c"]},
        {"src": ["word " * 200], "tgt": ["ok"]},
        {"src": ["hi"], "tgt": ["there"]},
    ])
    r = invoke("sft", "--tokenizer", tokenizer_path, "--seq-len", 64, "-o", tmp_path / "a", "-q", inp)
    assert r.exit_code == 1 and f"{inp}:1: 'src' has 2 turns" in r.stderr
    r = invoke("sft", "--tokenizer", tokenizer_path, "--seq-len", 64, "-o", tmp_path / "b", "-q", "--skip-bad", inp)
    assert orjson.loads(r.stdout)["skipped"] == {"src_tgt_mismatch": 1, "too_long": 1}
    assert orjson.loads(r.stdout)["documents"] == 1


def test_wrong_tokenizer_and_missing_input_exit_1(tmp_path, tokenizer_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    r = invoke("pretrain", "--tokenizer", tmp_path / "nope", "--seq-len", 64, "-o", tmp_path / "o", inp)
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: {tmp_path / 'nope'}: no such file or directory")
    r = invoke("pretrain", "--tokenizer", tokenizer_path, "--seq-len", 64, "-o", tmp_path / "o", tmp_path / "x.jsonl")
    assert r.exit_code == 1 and "no such input file" in r.stderr
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("args, message", [
    (["pretrain", "--seq-len", "64", "-o", "x"], "Missing option '--tokenizer'"),
    (["sft", "--tokenizer", "t", "--seq-len", "1", "-o", "x"], "--seq-len"),
    (["pretrain", "--tokenizer", "t", "--seq-len", "64", "-o", "x", "--policy", "best"], "--policy"),
    (["pretrain", "--tokenizer", "t", "--seq-len", "64", "-o", "x", "--weights", "1,2", "a"], "--weights"),
    (["sft", "--tokenizer", "t", "--seq-len", "64", "-o", "x", "--split", "1,x"], "--split"),
    (["pretrain", "--tokenizer", "t", "--seq-len", "64", "-o", "-"], "shards cannot go to stdout"),
])
def test_usage_errors_exit_2(args, message):
    r = invoke(*args)
    assert r.exit_code == 2 and message in r.stderr and r.stdout == ""


def test_inspect_text_and_json(tmp_path, tokenizer_path):
    record = {"question": "Where is the cat?", "chosen": "Home.", "rejected": "Mars."}
    inp = write_jsonl(tmp_path / "in.jsonl", [record])
    r = invoke("dpo", "--tokenizer", tokenizer_path, "--seq-len", 128, "-o", tmp_path / "d", "-q", inp)
    assert r.exit_code == 0
    r = invoke("inspect", tmp_path / "d", "--verify")
    assert r.exit_code == 0
    assert "--- segment 1: chosen" in r.stdout and "\u00abHome.<|end_of_sentence|>\u00bb" in r.stdout
    assert "User: Where is the cat?" in r.stdout and "sha256 of every shard matches" in r.stdout
    report = orjson.loads(invoke("inspect", tmp_path / "d", "--json").stdout)
    assert [s["role"] for s in report["sequence"]["segments"]] == ["prompt", "chosen", "rejected"]
    r = invoke("inspect", tmp_path / "d", "-i", 5)
    assert r.exit_code == 1 and "out of range" in r.stderr


def test_empty_input_writes_an_empty_dataset_only_when_asked(tmp_path, tokenizer_path):
    r = invoke("sft", "--tokenizer", tokenizer_path, "--seq-len", 64, "-o", tmp_path / "e", "-q", input=b"")
    assert r.exit_code == 1 and r.stdout == "" and list(tmp_path.iterdir()) == []
    assert r.stderr == "Error: stdin: no records to pack; nothing was written; pass --allow-empty to write an " \
                       "empty dataset\n"
    r = invoke("sft", "--tokenizer", tokenizer_path, "--seq-len", 64, "-o", tmp_path / "e", "-q", "--allow-empty",
               input=b"")
    assert r.exit_code == 0 and orjson.loads(r.stdout)["sequences"] == 0
    ds = PackedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.manifest.shards == [] and not list(tmp_path.glob("*.npy"))

"""The CLI contract: exit codes, one JSON object on stdout, progress and errors on stderr, outputs read back."""
import re
from pathlib import Path

import numpy as np
import orjson
import pytest
from click.testing import CliRunner
from merge_testlib import logits, make_adapter, make_base

from ernie_merge.cli import cli
from libernie.checkpoint import CheckpointReader

README = Path(__file__).resolve().parents[3] / "tools" / "ernie-merge" / "README.md"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def pair(tmp_path):
    model = make_base(tmp_path / "base", tied=False, layout="paddle")
    make_adapter(model, tmp_path / "ad", tmp_path / "base", targets=("qkv_proj", "lm_head"))
    return tmp_path / "base", tmp_path / "ad", model


def test_help_starts_with_an_example_that_the_readme_has():
    r = invoke("--help")
    assert r.exit_code == 0
    example = re.search(r"^\s+(ernie-merge --base .*)$", r.stdout, re.M).group(1)
    assert example in README.read_text()


def test_merge_prints_one_json_summary_and_progress_on_stderr(tmp_path, pair):
    base, ad, model = pair
    r = invoke("--base", base, "--adapter", ad, "-o", tmp_path / "out", "--layout", "hf", "--max-shard-size", "30KB",
               "--verify")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.count("\n") == 1
    s = orjson.loads(r.stdout)
    for key in ("tensors", "tensors_merged", "bytes", "seconds", "gb_per_s", "peak_rss_mb", "shards", "scaling"):
        assert key in s
    assert s["tensors_merged"] == 3 and s["layout"] == "hf" and s["verify"]["max_abs_diff"] < 1e-5
    assert re.fullmatch(r"ernie-merge: \d+ tensor groups .* MB/s  done\n", r.stderr)  # not a TTY: plain lines
    reader = CheckpointReader(tmp_path / "out")
    assert s["bytes"] == sum(reader.get(n)[0].nbytes for n in reader.keys())
    np.testing.assert_allclose(logits(tmp_path / "out"), logits(model), atol=1e-5, rtol=0)


def test_quiet_and_no_adapter(tmp_path, pair):
    base, _, _ = pair
    r = invoke("--base", base, "-o", tmp_path / "out", "--dtype", "bf16", "-q")
    assert r.exit_code == 0 and r.stderr == ""
    s = orjson.loads(r.stdout)
    assert s["adapter"] is None and s["tensors_merged"] == 0 and s["layout"] == "paddle"
    reader = CheckpointReader(tmp_path / "out")
    assert {reader.get(n)[1] for n in reader.keys()} == {"BF16"}


def test_existing_output_is_exit_1_with_one_line(tmp_path, pair):
    base, ad, _ = pair
    (tmp_path / "out").mkdir()
    r = invoke("--base", base, "--adapter", ad, "-o", tmp_path / "out")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr == f"Error: {tmp_path / 'out'}: already exists; choose another path or pass --force\n"
    assert invoke("--base", base, "--adapter", ad, "-o", tmp_path / "out", "--force", "-q").exit_code == 0


def test_wrong_adapter_is_exit_1(tmp_path, pair):
    base, _, _ = pair
    r = invoke("--base", base, "--adapter", tmp_path / "nope", "-o", tmp_path / "out")
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: {tmp_path / 'nope'}: not found;")
    assert r.stderr.count("\n") == 1


@pytest.mark.parametrize("args", [["--layout", "torch"], ["--dtype", "int8"], ["--max-shard-size", "lots"], []])
def test_usage_errors_exit_2(tmp_path, pair, args):
    base, ad, _ = pair
    required = ["--base", base, "-o", tmp_path / "out"] if args else ["--base", base]
    r = invoke(*required, *args)
    assert r.exit_code == 2 and r.stdout == "" and "Error:" in r.stderr
    assert not (tmp_path / "out").exists()


def test_adapter_from_another_base_config_warns_on_stderr(tmp_path, pair):
    base, ad, _ = pair
    cfg = (base / "config.json").read_text()
    (base / "config.json").write_text(cfg.replace("{", '{"note": "edited",', 1))  # same shapes, other bytes
    r = invoke("--base", base, "--adapter", ad, "-o", tmp_path / "out")
    assert r.exit_code == 0
    assert f"Warning: {ad}: trained on a base whose config.json differs" in r.stderr
    assert orjson.loads(r.stdout)["warnings"][0].startswith(f"{ad}: trained on a base")

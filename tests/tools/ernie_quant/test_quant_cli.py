"""The CLI contract: one JSON summary on stdout, progress on stderr (-q silences it), help with an example."""
import json
import os

from click.testing import CliRunner

from ernie_quant.cli import EXAMPLE, cli
from libernie.checkpoint import CheckpointReader

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_json_summary_on_stdout_and_quiet(assets, tmp_path):
    out = tmp_path / "w8"
    res = CliRunner().invoke(cli, ["wint8", "-q", "--model", str(assets / "base"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    s = json.loads(res.stdout)
    assert s["method"] == "wint8" and s["format"] == "fastdeploy" and s["quantized"] == 8
    assert 0 < s["bytes_after"] < s["bytes_before"] and len(CheckpointReader(out).keys()) == s["tensors"]
    assert set(s["layer_error"]) == {f"ernie.layers.{i}.{m}.weight" for i in range(2) for m in
                                     ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.up_gate_proj", "mlp.down_proj")}
    assert s["config"]["group_size"] == -1


def test_progress_goes_to_stderr(assets, tmp_path):
    res = CliRunner().invoke(cli, ["fp8", "--model", str(assets / "base"), "--calib", str(assets / "calib"),
                                   "--calib-samples", "4", "--format", "compressed-tensors", "-o", str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    assert "ernie-quant calibrate" in res.stderr and "ernie-quant write" in res.stderr
    s = json.loads(res.stdout)
    assert s["calib"]["sequences"] == 4 and s["layout"] == "hf" and s["group_size"] is None


def test_help_starts_with_a_runnable_example_and_readme_documents_it():
    res = CliRunner().invoke(cli, ["--help"])
    assert res.exit_code == 0 and EXAMPLE in res.output
    readme = open(os.path.join(ROOT, "tools", "ernie-quant", "README.md")).read()
    assert EXAMPLE in readme
    for opt in ("--calib", "--algo", "--group-size", "--skip", "--format", "--eval", "--tokenizer"):
        assert opt in res.output and opt in readme

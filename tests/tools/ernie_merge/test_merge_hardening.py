"""Issue 12 classes of defect in ernie-merge: an unwritable OUTDIR is found before any input is read, and a
diverged (NaN) adapter is refused instead of merged into NaN weights. One line, exit 1, nothing written."""
import numpy as np
import pytest
from click.testing import CliRunner
from merge_testlib import make_base, write_json, write_safetensors_np

from ernie_merge.cli import cli


@pytest.fixture
def base(tmp_path):
    make_base(tmp_path / "base", tied=True, layout="hf", shard="20KB")
    return tmp_path / "base"


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "base" not in p.parts)


@pytest.mark.parametrize("out", ["/proc/nope/merged", "{tmp}/file/merged"])
def test_unwritable_outdir_fails_before_the_base_is_read(tmp_path, out):
    (tmp_path / "file").write_text("x")
    out = out.format(tmp=tmp_path)
    r = CliRunner().invoke(cli, ["--base", str(tmp_path / "no-such-base"), "-o", out])  # base unread: not its error
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.startswith(f"Error: {out}: ") and r.stderr.count("\n") == 1 and "no-such-base" not in r.stderr
    assert _listing(tmp_path) == ["file"]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_an_adapter_with_non_finite_values_is_refused(tmp_path, base, bad):
    a = np.full((2, 64), 0.1, np.float32)
    b = np.zeros((96, 2), np.float32)
    b[3, 1] = bad
    ad = tmp_path / "ad"
    ad.mkdir()
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    write_safetensors_np(ad / "adapter_model.safetensors", {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b})
    write_json(ad / "adapter_config.json", {"peft_type": "LORA", "r": 2, "lora_alpha": 4})
    r = CliRunner().invoke(cli, ["--base", str(base), "--adapter", str(ad), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1
    assert f"{name}.lora_A.weight (A or B) holds NaN or infinite values" in r.stderr
    assert _listing(tmp_path) == ["ad", "ad/adapter_config.json", "ad/adapter_model.safetensors"]

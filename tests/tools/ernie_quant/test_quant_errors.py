"""Bad input: one line naming the file and what to do, exit 1 (2 for usage), and no output directory."""
import json
import os
import shutil

import pytest
from click.testing import CliRunner

from ernie_quant.cli import cli


def invoke(args):
    return CliRunner().invoke(cli, args)


def check_error(res, out, *needles, code=1, last_line=False):
    assert res.exit_code == code, res.output
    err = res.stderr.strip()
    if last_line:  # failed mid-run: progress lines came first, the error is the last line
        err = err.splitlines()[-1]
    assert err.count("\n") == 0 or code == 2, err          # one line (click's usage errors add a usage line)
    for n in needles:
        assert n in err, err
    assert res.stdout == ""
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(os.path.dirname(out)) if ".tmp-" in f]   # no half-written temp dir


def test_unknown_method(assets, tmp_path):
    out = str(tmp_path / "o")
    check_error(invoke(["int3", "--model", str(assets / "base"), "-o", out]), out, "unknown method 'int3'", code=2)


def test_fp8_without_calib(assets, tmp_path):
    out = str(tmp_path / "o")
    check_error(invoke(["fp8", "--model", str(assets / "base"), "-o", out]), out, "fp8 needs --calib")


def test_gptq_without_calib(assets, tmp_path):
    out = str(tmp_path / "o")
    check_error(invoke(["wint4", "--algo", "gptq", "--group-size", "16", "--model", str(assets / "base"), "-o", out]),
                out, "--algo gptq needs --calib")


def test_already_quantized_input(assets, tmp_path):
    first = str(tmp_path / "w8")
    assert invoke(["wint8", "-q", "--model", str(assets / "base"), "-o", first]).exit_code == 0
    out = str(tmp_path / "o")
    check_error(invoke(["wint4", "--group-size", "16", "--model", first, "-o", out]), out, "already quantized",
                first)
    # also caught from the tensors alone (config stripped of its quantization_config)
    cfg = json.load(open(os.path.join(first, "config.json")))
    del cfg["quantization_config"]
    json.dump(cfg, open(os.path.join(first, "config.json"), "w"))
    check_error(invoke(["wint8", "--model", first, "-o", out]), out, "already quantized", ".quant_weight")


def test_group_size_that_does_not_divide(assets, tmp_path):
    out = str(tmp_path / "o")
    check_error(invoke(["wint4", "--model", str(assets / "base"), "-o", out]), out,
                "--group-size 128 does not divide the input width 64", "qkv_proj")
    check_error(invoke(["wint8", "--group-size", "48", "--model", str(assets / "base"), "-o", out]), out,
                "does not divide")


def test_calibration_packed_with_another_tokenizer(assets, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(assets, other, ignore=shutil.ignore_patterns("base*"))
    m = json.load(open(other / "calib.json"))
    m["tokenizer"]["sha256"] = "0" * 64                    # as if packed with a different tokenizer.model
    json.dump(m, open(other / "calib.json", "w"))
    out = str(tmp_path / "o")
    check_error(invoke(["fp8", "--model", str(assets / "base"), "--calib", str(other / "calib"), "-o", out]), out,
                "packed with another tokenizer", "calib.json")


def test_missing_calib_prefix_and_model(assets, tmp_path):
    out = str(tmp_path / "o")
    check_error(invoke(["fp8", "--model", str(assets / "base"), "--calib", str(tmp_path / "nope"), "-o", out]),
                out, "nope.json")
    check_error(invoke(["wint8", "--model", str(tmp_path / "nomodel"), "-o", out]), out, "nomodel")


def test_existing_output_needs_force(assets, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    res = invoke(["wint8", "--model", str(assets / "base"), "-o", str(out)])
    assert res.exit_code == 1 and "already exists" in res.stderr and os.listdir(out) == []


@pytest.mark.parametrize("method", ["wint8", "fp8"])
def test_non_finite_weights(assets, tmp_path, method):
    from quant_testlib import make_model
    from libernie.model import ErnieForCausalLM
    import numpy as np
    make_model(tmp_path / "nan")
    m = ErnieForCausalLM.from_pretrained(tmp_path / "nan")
    w = m.ernie.layers[1].mlp.down_proj.weight
    a = w.numpy()
    a[3, 5] = np.nan
    w.set_value(a)
    m.save_pretrained(tmp_path / "nan", layout="paddle", max_shard_size="200KB")
    out = str(tmp_path / "o")
    extra = ["--calib", str(assets / "calib"), "--calib-samples", "2"] if method == "fp8" else []
    check_error(invoke([method, "--model", str(tmp_path / "nan"), "-o", out, *extra]), out,
                "ernie.layers.1.mlp.down_proj.weight", ".safetensors", "non-finite", last_line=True)


def test_skip_pattern_that_matches_nothing(assets, tmp_path):
    out = str(tmp_path / "o")
    check_error(invoke(["wint8", "--skip", "model.layers.0.*", "--model", str(assets / "base"), "-o", out]), out,
                "--skip 'model.layers.0.*' matches no quantizable Linear", "ernie.layers.0.self_attn.qkv_proj")


def test_unwritable_output_fails_before_the_model_is_read(tmp_path):
    """The model path does not even exist: the output check must come first (issue 12's rule for every tool)."""
    res = invoke(["wint8", "--model", str(tmp_path / "no-such-model"), "-o", "/proc/nope/x"])
    assert res.exit_code == 1, res.output
    assert "/proc/nope/x" in res.stderr and "no-such-model" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and res.stdout == ""

"""The divergence guard: a non-finite step stops the run (exit 1, one line, nothing saved from it) or is
skipped up to --skip-nan-inf-steps times; every rank reaches the same verdict; metrics.jsonl stays JSON."""
import json
import os
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from ernie_train.cli import cli
from ernie_train.guard import NonFiniteGuard
from libernie.model import ErnieForCausalLM
from train_helpers import base_args, srun_ranks

DIVERGE = {"--learning-rate": "1e6", "--max-grad-norm": "0", "--save-steps": "1"}  # step 3's gradient is NaN


def _strict(line):
    """json.loads that refuses NaN/Infinity, as jq and RFC 8259 parsers do."""
    def refuse(tok):
        raise ValueError(f"non-JSON token {tok}")
    return json.loads(line, parse_constant=refuse)


def _checkpoints(out):
    return sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))


def _all_finite(ckpt):
    return all(np.isfinite(p.numpy()).all() for _, p in ErnieForCausalLM.from_pretrained(ckpt).named_parameters())


def test_verdicts_and_the_skip_budget():
    g = NonFiniteGuard(skip_budget=2)
    assert g.verdict(7.6, 0) == "ok" and g.skipped == 0
    assert g.verdict(float("nan"), 0) == "skip"       # loss
    assert g.verdict(7.6, 1) == "skip"                # one rank's gradient norm
    assert g.skipped == 2
    assert g.verdict(float("inf"), 0) == "stop" and g.skipped == 2
    assert NonFiniteGuard().verdict(7.6, 2) == "stop"  # default: no skipping
    assert NonFiniteGuard.local_flag(float("nan")) == NonFiniteGuard.local_flag(float("-inf")) == 1.0
    assert NonFiniteGuard.local_flag(3.0) == 0.0


def test_divergence_stops_with_one_line_naming_step_and_last_good_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["pretrain", *base_args(data, out, **DIVERGE), "-q"])
    assert r.exit_code == 1 and r.stdout == ""
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in r.stderr
    assert err.startswith("Error: step 3: non-finite loss") and "grad_norm nan" in err
    assert f"last good checkpoint: {out / 'checkpoint-00000002'}" in err
    assert _checkpoints(out) == ["checkpoint-00000001", "checkpoint-00000002"]  # none from step 3
    assert all(_all_finite(out / c) for c in _checkpoints(out))
    recs = [_strict(line) for line in open(out / "metrics.jsonl")]
    assert [x["step"] for x in recs] == [1, 2, 3]
    assert recs[2]["grad_norm"] is None and recs[2]["skipped_steps"] == 0


def test_first_step_divergence_says_no_checkpoint_was_written(data, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["pretrain", *base_args(data, out, **{**DIVERGE, "--save-steps": "0"}), "-q"])
    assert r.exit_code == 1 and "step 3:" in r.stderr and "no checkpoint was written before it" in r.stderr
    assert _checkpoints(out) == []


def test_skipped_steps_are_counted_and_not_applied(data, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["pretrain", *base_args(data, out, **{**DIVERGE, "--skip-nan-inf-steps": "10"}),
                                 "-q"])
    assert r.exit_code == 0, r.stderr
    summary = _strict(r.stdout)
    recs = [_strict(line) for line in open(out / "metrics.jsonl")]
    # Step 2 left weights that give a NaN gradient on every later batch: steps 3..6 are all skipped.
    assert [x["skipped_steps"] for x in recs] == [0, 0, 1, 2, 3, 4] and summary["skipped_steps"] == 4
    assert all(x["grad_norm"] is None for x in recs[2:])
    # No update was applied after step 2: checkpoints 4 and 6 both hold step 2's weights exactly.
    assert _checkpoints(out) == ["checkpoint-00000004", "checkpoint-00000005", "checkpoint-00000006"]
    a = dict(ErnieForCausalLM.from_pretrained(out / "checkpoint-00000006").named_parameters())
    b = dict(ErnieForCausalLM.from_pretrained(out / "checkpoint-00000004").named_parameters())
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert json.load(open(out / "checkpoint-00000006" / "trainer_state.json"))["skipped_steps"] == 4


def test_a_spent_budget_stops_and_says_how_many_were_skipped(data, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["pretrain", *base_args(data, out, **{**DIVERGE, "--skip-nan-inf-steps": "2"}),
                                 "-q"])
    assert r.exit_code == 1 and "Error: step 5:" in r.stderr and "after skipping 2" in r.stderr
    assert _checkpoints(out)[-1] == "checkpoint-00000004"  # 3 and 4 were skipped, so 4 holds step 2's state


_RANK_SCRIPT = """
import math, sys
from ernie_train import dist
from ernie_train.guard import NonFiniteGuard
info = dist.init()
g = NonFiniteGuard(skip_budget=1)
# rank 1 alone sees the trouble: first a NaN loss, then a NaN gradient norm, then both finite
local = [(1.0, 1.0), (float("nan"), 1.0), (2.0, float("inf")), (1.5, 0.5)] if info.rank == 1 else \\
        [(1.0, 1.0), (1.0, 1.0), (2.0, 1.0), (1.5, 0.5)]
out = []
for loss, gn in local:
    loss_sum, bad = dist.all_reduce_sum([loss, g.local_flag(gn)], info)
    out.append(g.verdict(loss_sum, bad))
print(" ".join(out))
"""


@pytest.mark.slow
def test_ranks_agree_when_only_one_rank_sees_a_non_finite_value(tmp_path):
    """Two gloo processes (started the way srun starts them); only rank 1 has the NaN. Both decide alike."""
    codes, outs = srun_ranks([sys.executable, "-c", _RANK_SCRIPT])
    assert codes == [0, 0], outs[1][1][-2000:]
    verdicts = [o[0].split() for o in outs]
    assert verdicts[0] == verdicts[1] == ["ok", "skip", "stop", "ok"]


@pytest.mark.slow
def test_data_parallel_run_stops_on_every_rank_at_the_same_step(data, tmp_path):
    out = tmp_path / "dp"
    args = ["pretrain", *base_args(data, out, **{**DIVERGE, "--per-device-train-batch-size": "1"}), "-q"]
    exe = os.path.join(os.path.dirname(sys.executable), "ernie-train")
    codes, outs = srun_ranks([exe, *args])  # a rank that decided otherwise would hang in a collective
    assert codes == [1, 1]
    lines = [[ln for ln in o[1].splitlines() if ln.startswith("Error:")] for o in outs]
    assert len(lines[0]) == len(lines[1]) == 1
    step = lines[0][0].split(":")[1]
    assert lines[1][0].split(":")[1] == step and "step" in step
    assert all(_all_finite(out / c) for c in _checkpoints(out))


def test_emit_json_is_strict(capsysbinary):
    from ernie_cli import emit_json
    emit_json({"loss": float("nan"), "x": [float("inf"), np.float32("nan"), 1.5]})
    assert _strict(capsysbinary.readouterr().out) == {"loss": None, "x": [None, None, 1.5]}


def test_metrics_log_writes_null_for_non_finite(tmp_path):
    from ernie_train.metrics import MetricsLog
    log = MetricsLog(str(tmp_path))
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("-inf"), "lr": np.float32(0.5)})
    log.close()
    assert _strict(open(tmp_path / "metrics.jsonl").read()) == {"step": 1, "loss": None, "grad_norm": None,
                                                                 "lr": 0.5}


@pytest.mark.parametrize("opt,value", [("--learning-rate", "nan"), ("--max-grad-norm", "inf"),
                                       ("--learning-rate", "-1"), ("--skip-nan-inf-steps", "-1")])
def test_non_finite_or_negative_options_fail_before_any_output(data, tmp_path, opt, value):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["pretrain", *base_args(data, out, **{opt: value}), "-q"])
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: {opt} must be") and r.stderr.count("\n") == 1
    assert not out.exists()


def test_the_skip_count_survives_resume(data, tmp_path):
    out = tmp_path / "run"
    opts = {**DIVERGE, "--skip-nan-inf-steps": "3", "--max-steps": "4"}
    r = CliRunner().invoke(cli, ["pretrain", *base_args(data, out, **opts), "-q"])
    assert r.exit_code == 0 and _strict(r.stdout)["skipped_steps"] == 2  # steps 3 and 4
    # Resumed for 2 more steps: the budget of 3 is spent by step 5, so step 6 stops the run.
    r = CliRunner().invoke(cli, ["pretrain", *base_args(data, out, **{**opts, "--max-steps": "6"}), "--resume", "-q"])
    assert r.exit_code == 1 and "Error: step 6:" in r.stderr and "after skipping 3" in r.stderr
    assert [_strict(x)["skipped_steps"] for x in open(out / "metrics.jsonl")] == [0, 0, 1, 2, 3, 3]

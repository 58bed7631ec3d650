"""ernie-train on a tiny MoE: the router loss is in the loss, the aux-free bias moves as documented, the
expert load reaches metrics.jsonl once per token, and resume, data parallel and the divergence guard hold."""
import json
import os
import shutil
import sys

import numpy as np
import paddle
import pytest
from click.testing import CliRunner

from ernie_train.cli import cli
from ernie_train.data import StepBatches, collate
from libernie.config import ernie_tiny_moe
from libernie.data import PackedDataset
from libernie.model import ErnieForCausalLM
from libernie.model.moe import moe_blocks, router_loss, set_token_mask
from libernie.tokenizer import ErnieTokenizer
from train_helpers import ROOT, TOKENIZER, base_args, losses, srun_ranks

MOE = {"--init-config": "ernie-tiny-moe", "--max-steps": "4", "--save-steps": "2"}


def _run(data, out, mode="pretrain", **over):
    return CliRunner().invoke(cli, [mode, *base_args(data, out, **{**MOE, **over}), "-q"])


def _records(out):
    def refuse(tok):
        raise ValueError(tok)
    return [json.loads(line, parse_constant=refuse) for line in open(os.path.join(out, "metrics.jsonl"))]


def _biases(ckpt):
    return {b.layer_idx: b.moe_statics.e_score_correction_bias.numpy()[0]
            for b in moe_blocks(ErnieForCausalLM.from_pretrained(ckpt))}


@pytest.fixture(scope="module")
def moe_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe") / "run"
    r = _run(data, out, **{"--save-steps": "1", "--save-total-limit": "10"})
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


@pytest.mark.parametrize("z", [None, 1e-3])
def test_router_loss_of_the_first_step_is_the_library_value(data, tmp_path, z):
    """Step 1's router_loss = libernie's router_loss(model) on the same SFT batch with padding masked
    (aux x 1e-5, plus z x --moe-z-loss-lambda when given)."""
    out = tmp_path / "sft"
    extra = {"--moe-z-loss-lambda": str(z)} if z else {}
    r = _run(data, out, "sft", **{"--data": data["sft"], "--max-steps": "1", "--save-steps": "0", **extra})
    assert r.exit_code == 0, r.output
    paddle.seed(42)  # --seed: the trainer's model init
    cfg = ernie_tiny_moe(vocab_size=ErnieTokenizer.from_pretrained(TOKENIZER).vocab_size)
    cfg.moe_z_loss_lambda = z or 0.0
    model = ErnieForCausalLM(cfg)
    model.train()
    ds = PackedDataset(data["sft"])
    (b,) = StepBatches(ds, ds.seq_len, 2, 1, 0, 1, 42, collate_fn=collate)(0)
    assert (b.doc_ids < 0).any()  # the batch has padding, so the mask matters
    set_token_mask(model, paddle.to_tensor(b.doc_ids >= 0))
    model(paddle.to_tensor(b.input_ids), position_ids=paddle.to_tensor(b.position_ids),
          doc_ids=paddle.to_tensor(b.doc_ids))
    want = float(router_loss(model))
    z_sum = sum(float(blk.z_loss) for blk in moe_blocks(model)) if z else 0.0
    assert want == pytest.approx(1e-5 * sum(float(blk.aux_loss) for blk in moe_blocks(model)) + (z or 0) * z_sum,
                                 rel=1e-6)
    assert z is None or z * z_sum > 1e-5  # the z term is not negligible against aux here
    set_token_mask(model, None)
    model(paddle.to_tensor(b.input_ids), position_ids=paddle.to_tensor(b.position_ids),
          doc_ids=paddle.to_tensor(b.doc_ids))
    assert float(router_loss(model)) != pytest.approx(want, rel=1e-5)  # counting padding would differ
    assert _records(out)[0]["router_loss"] == pytest.approx(want, rel=1e-5)


def test_the_aux_loss_weight_changes_the_update(data, tmp_path):
    """A large --moe-aux-loss-lambda gives a different step 2 than 0 (the term reaches the gradients),
    while step 1's LM loss (before any update) is the same."""
    a, b = tmp_path / "a", tmp_path / "b"
    for out, lam in ((a, "0"), (b, "10")):
        assert _run(data, out, **{"--max-steps": "2", "--moe-aux-loss-lambda": lam, "--save-steps": "0"}).exit_code == 0
    ra, rb = _records(a), _records(b)
    assert ra[0]["loss"] == rb[0]["loss"] and ra[0]["router_loss"] == 0.0 and rb[0]["router_loss"] > 1.0
    assert ra[1]["loss"] != rb[1]["loss"]
    assert json.load(open(b / "checkpoint-00000002" / "config.json"))["moe_aux_loss_lambda"] == 10.0


def test_load_is_in_metrics_and_the_bias_moves_against_it(moe_run):
    """Each step: tokens per expert sum to k x real tokens; after the step bias += 1e-3 * sign(mean - load)."""
    out, summary = moe_run
    recs = _records(out)
    seen = [0] + [r["tokens_seen"] for r in recs]
    prev = {1: np.zeros(8, np.float32), 2: np.zeros(8, np.float32)}
    for i, rec in enumerate(recs):
        assert set(rec["moe_load"]) == {"layer.1", "layer.2"}
        bias = _biases(out / f"checkpoint-{i + 1:08d}")
        for layer, st in rec["moe_load"].items():
            load = np.array(st["tokens"], np.float64)
            assert load.sum() == 2 * (seen[i + 1] - seen[i])           # k=2, padding left out
            assert st["min_max_ratio"] == pytest.approx(load.min() / load.max())
            L = int(layer.split(".")[1])
            np.testing.assert_allclose(bias[L] - prev[L], 1e-3 * np.sign(load.mean() - load), atol=1e-7)
            over = load > load.mean()
            assert (bias[L][over] < prev[L][over]).all()                # overloaded experts go DOWN
            prev[L] = bias[L]
        assert rec["moe_min_max_ratio"] == min(s["min_max_ratio"] for s in rec["moe_load"].values())


def test_recompute_counts_each_token_once(data, moe_run, tmp_path):
    out, _ = moe_run
    r = _run(data, tmp_path / "rc", **{"--recompute": True, "--max-steps": "2", "--save-steps": "0"})
    assert r.exit_code == 0, r.output
    got, want = _records(tmp_path / "rc"), _records(out)[:2]
    assert [x["moe_load"] for x in got] == [x["moe_load"] for x in want]
    np.testing.assert_allclose([x["loss"] for x in got], [x["loss"] for x in want], rtol=1e-6)


def test_resume_is_exact_and_carries_the_bias(data, tmp_path):
    ref = tmp_path / "ref"
    assert _run(data, ref).exit_code == 0
    cut = tmp_path / "cut"
    shutil.copytree(ref, cut)
    shutil.rmtree(cut / "checkpoint-00000004")                          # as if killed after step 2's save
    r = _run(data, cut, **{"--resume": True})
    assert r.exit_code == 0, r.output and json.loads(r.stdout)["start_step"] == 2
    assert losses(cut) == losses(ref)
    assert [x["moe_load"] for x in _records(cut)] == [x["moe_load"] for x in _records(ref)]
    a, b = _biases(cut / "checkpoint-00000004"), _biases(ref / "checkpoint-00000004")
    assert all(np.array_equal(a[k], b[k]) and np.abs(a[k]).sum() > 0 for k in a)


@pytest.mark.parametrize("lora", [False, True])
def test_hooks_move_the_bias_only_without_lora(lora):
    """A LoRA checkpoint holds only the adapter, so the bias must not move under --lora (it could not be saved)."""
    from types import SimpleNamespace
    from ernie_train.dist import DistInfo
    from ernie_train.moe import MoEHooks
    paddle.seed(1)
    model = ErnieForCausalLM(ernie_tiny_moe(vocab_size=64))
    model.train()
    cfg = SimpleNamespace(moe_aux_loss_lambda=None, moe_z_loss_lambda=None, moe_aux_free_coef=1e-3, lora=lora)
    hooks = MoEHooks(model, cfg, DistInfo(rank=0, world_size=1, local_rank=0, launcher="single"))
    hooks.before_forward(paddle.zeros([2, 16], "int32"))
    model(paddle.randint(0, 64, [2, 16]))
    hooks.after_step(applied=True, n_micro=1)
    moved = [np.abs(b.moe_statics.e_score_correction_bias.numpy()).sum() > 0 for b in moe_blocks(model)]
    assert moved == [not lora, not lora]
    assert all(sum(st["tokens"]) == 2 * 32 for st in hooks.metrics()["moe_load"].values())


def test_lora_sft_on_experts_logs_load_and_router_loss(data, moe_run, tmp_path):
    out, _ = moe_run
    r = CliRunner().invoke(cli, ["sft", "--data", data["sft"], "--model", str(out / "checkpoint-00000004"), "--lora",
                                 "-o", str(tmp_path / "lora"), "--max-steps", "2", "--logging-steps", "1", "-q",
                                 "--lora-target-modules", "experts.up_gate_proj"])
    assert r.exit_code == 0, r.output
    assert all("moe_load" in x and x["router_loss"] > 0 for x in _records(tmp_path / "lora"))


def test_divergence_guard_skips_the_bias_update_and_stops(data, tmp_path):
    diverge = {"--learning-rate": "1e6", "--max-grad-norm": "0", "--save-steps": "1", "--max-steps": "6",
               "--save-total-limit": "10"}
    out = tmp_path / "skip"
    r = _run(data, out, **{**diverge, "--skip-nan-inf-steps": "10"})
    assert r.exit_code == 0, r.output
    recs = _records(out)
    skipped = [x["step"] for x, prev in zip(recs, [{"skipped_steps": 0}] + recs) if x["skipped_steps"] > prev["skipped_steps"]]
    assert skipped and skipped[-1] == 6
    first = skipped[0]
    a = _biases(out / f"checkpoint-{first - 1:08d}") if first > 1 else None
    b = _biases(out / "checkpoint-00000006")
    if a is not None:
        assert all(np.array_equal(a[k], b[k]) for k in a)  # no skipped step moved the bias
    stop = _run(data, tmp_path / "stop", **diverge)
    assert stop.exit_code == 1 and stop.stderr.startswith(f"Error: step {first}: non-finite")


@pytest.mark.slow
def test_two_data_parallel_ranks_match_one_process(data, tmp_path):
    """Two srun-style gloo ranks (batch 1 each) = one process accumulating two micro-batches of 1: losses,
    global load, router loss (computed per micro-batch, as ERNIEKit computes it per forward), bias."""
    out = tmp_path / "one"
    r = _run(data, out, **{"--per-device-train-batch-size": "1", "--gradient-accumulation-steps": "2"})
    assert r.exit_code == 0, r.output
    exe = os.path.join(os.path.dirname(sys.executable), "ernie-train")
    args = ["pretrain", *base_args(data, tmp_path / "two", **{**MOE, "--per-device-train-batch-size": "1"}), "-q"]
    codes, outs = srun_ranks([exe, *args])
    assert codes == [0, 0], outs[1][1][-2000:]
    two, one = _records(tmp_path / "two"), _records(out)
    np.testing.assert_allclose([x["loss"] for x in two], [x["loss"] for x in one], rtol=0, atol=1e-5)
    assert [x["moe_load"] for x in two] == [x["moe_load"] for x in one]
    np.testing.assert_allclose([x["router_loss"] for x in two], [x["router_loss"] for x in one], rtol=1e-5)
    a, b = _biases(tmp_path / "two" / "checkpoint-00000004"), _biases(out / "checkpoint-00000004")
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_on_an_moe_counts_only_the_policy_forward(data, moe_run, tmp_path, lora):
    """DPO's reference forward (a frozen copy, or the policy with its adapter off, under no_grad) routes
    tokens too; only the policy's are counted: k x tokens per step."""
    from ernie_pack.api import PackOptions, pack
    prefs = os.path.join(ROOT, "assets", "dpo", "arithmetic-pref.jsonl")
    pack(PackOptions(mode="dpo", tokenizer=TOKENIZER, seq_len=64, output=str(tmp_path / "dpo"), inputs=[prefs]))
    out, _ = moe_run
    args = ["dpo", "--data", str(tmp_path / "dpo"), "--model", str(out / "checkpoint-00000004"), "-o", str(tmp_path / "run"),
            "--max-steps", "2", "--logging-steps", "1", "--per-device-train-batch-size", "2", "-q"]
    r = CliRunner().invoke(cli, args + (["--lora"] if lora else []))
    assert r.exit_code == 0, r.output
    recs = _records(tmp_path / "run")
    seen = [0] + [x["tokens_seen"] for x in recs]
    for i, rec in enumerate(recs):
        assert all(sum(st["tokens"]) == 2 * (seen[i + 1] - seen[i]) for st in rec["moe_load"].values())
        assert rec["router_loss"] > 0

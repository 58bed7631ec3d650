"""ernie-train dpo and dpo-ref end to end on a tiny model: the reference file, the three reference modes,
metrics, exact resume, data parallel, bad input."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from ernie_pack.api import PackOptions, pack

from ernie_train.cli import cli
from libernie.checkpoint import SafetensorsFile, write_safetensors
from train_helpers import ROOT, TOKENIZER, base_args, losses

PREFS = os.path.join(ROOT, "assets", "dpo")


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def dpo(data, tmp_path_factory):
    """Packed preference pairs (train and held-out), a tiny base model, and its cached reference."""
    root = tmp_path_factory.mktemp("dpo")
    for name, src in (("train", "arithmetic-pref.jsonl"), ("eval", "arithmetic-pref-eval.jsonl")):
        pack(PackOptions(mode="dpo", tokenizer=TOKENIZER, seq_len=64, output=str(root / name),
                         inputs=[os.path.join(PREFS, src)]))
    r = run(["pretrain", *base_args(data, root / "pt", **{"--max-steps": "4", "--save-steps": "0"}), "-q"])
    assert r.exit_code == 0, r.output
    base = json.loads(r.stdout)["checkpoint"]
    r = run(["dpo-ref", "--data", str(root / "train"), "--model", base, "--batch-size", "5", "-q"])
    assert r.exit_code == 0, r.output
    return {"root": root, "train": str(root / "train"), "eval": str(root / "eval"), "base": base,
            "ref": json.loads(r.stdout)}


def dpo_args(d, out, **over):
    opts = {"--data": d["train"], "--model": d["base"], "-o": str(out), "--max-steps": "3", "--logging-steps": "1",
            "--save-steps": "0", "--learning-rate": "2e-3", "--per-device-train-batch-size": "4"}
    opts.update(over)
    args = []
    for k, v in opts.items():
        if v is not None:
            args += [k] if v is True else [k, str(v)]
    return args


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_dpo_ref_writes_the_documented_file(dpo):
    s = dpo["ref"]
    assert s["output"] == dpo["train"] + ".ref-logps.safetensors" and s["pairs"] == 360
    f = SafetensorsFile(s["output"])
    meta = f.metadata
    assert meta["format"] == "ernie-dpo-ref" and meta["version"] == "1" and meta["pairs"] == "360"
    manifest = json.load(open(dpo["train"] + ".json"))
    import hashlib
    key = "".join(f"{x['npy_sha256']} {x['idx_sha256']}\n" for x in manifest["shards"])
    assert meta["data_sha256"] == hashlib.sha256(key.encode()).hexdigest()
    offsets = np.asarray(f.get("pair_offsets"))
    assert offsets[0] == 0 and offsets[-1] == 360 and len(offsets) == manifest["counts"]["sequences"] + 1
    # token counts read back from the shards: each response is its digits + <|end_of_sentence|>
    assert int(np.asarray(f.get("chosen_tokens")).sum() + np.asarray(f.get("rejected_tokens")).sum()) == \
        manifest["counts"]["loss_tokens"]
    # batch composition does not matter: one sequence at a time gives the same numbers
    r = run(["dpo-ref", "--data", dpo["train"], "--model", dpo["base"], "--batch-size", "1", "-o",
             str(dpo["root"] / "one"), "-q"])
    assert r.exit_code == 0
    g = SafetensorsFile(str(dpo["root"] / "one.safetensors"))
    np.testing.assert_allclose(g.get("chosen_logps"), f.get("chosen_logps"), rtol=0, atol=1e-4)
    assert np.abs(np.asarray(f.get("chosen_logps"))).min() > 1.0


def test_dpo_ref_resumes_from_its_partial_file(dpo, tmp_path):
    from ernie_train.dpo_ref import compute_ref_logps

    class Stop(Exception):
        pass

    def stop_in_the_third_batch(done, tokens):
        if done >= 30:
            raise Stop
    out = str(tmp_path / "ref")
    with pytest.raises(Stop):
        compute_ref_logps(dpo["train"], dpo["base"], out, batch_size=10, save_every=0,
                          on_progress=stop_in_the_third_batch)
    assert not os.path.exists(out + ".safetensors") and os.path.exists(out + ".safetensors.partial")
    import shutil
    shutil.copy(out + ".safetensors.partial", tmp_path / "renamed.safetensors")
    r = run(["dpo", *dpo_args(dpo, tmp_path / "x", **{"--ref-logps": str(tmp_path / "renamed")})])
    assert r.exit_code == 1 and "do not match" in r.stderr          # a partial file is never used
    with pytest.raises(Exception, match="written for another model config sha256"):
        _other_model_resume(dpo, out)
    summary = compute_ref_logps(dpo["train"], dpo["base"], out, batch_size=7, resume=True)
    # saved after every batch of 10 (save_every=0); the stop came during the third, before its save
    assert summary["resumed_at"] == 20 and not os.path.exists(out + ".safetensors.partial")
    got, want = SafetensorsFile(out + ".safetensors"), SafetensorsFile(dpo["ref"]["output"])
    for name in ("pair_offsets", "chosen_tokens", "rejected_tokens"):
        assert np.array_equal(got.get(name), want.get(name)), name
    np.testing.assert_allclose(got.get("rejected_logps"), want.get("rejected_logps"), rtol=0, atol=1e-4)


def _other_model_resume(dpo, out):
    import shutil

    from ernie_train.dpo_ref import compute_ref_logps
    other = dpo["root"] / "other-model"
    if not other.exists():
        shutil.copytree(dpo["base"], other)
        cfg = json.load(open(other / "config.json"))
        cfg["rms_norm_eps"] = 1e-6
        json.dump(cfg, open(other / "config.json", "w"))
    compute_ref_logps(dpo["train"], str(other), out, resume=True)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_three_reference_modes_give_the_same_losses(dpo, tmp_path, lora):
    """cached (dpo-ref), a frozen reference model, and the default (frozen copy of the start; with LoRA the
    adapter switched off) agree within 1e-5 on every step."""
    extra = {"--lora": True, "--lora-rank": "4", "--learning-rate": "1e-2"} if lora else {}
    runs = {"cached": {"--ref-logps": dpo["train"] + ".ref-logps"}, "model": {"--ref-model": dpo["base"]},
            "default": {}}
    got = {}
    for name, over in runs.items():
        r = run(["dpo", *dpo_args(dpo, tmp_path / name, **extra, **over), "-q"])
        assert r.exit_code == 0, r.output
        got[name] = records(tmp_path / name)
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
    for name in ("model", "default"):
        for a, b in zip(got["cached"], got[name]):
            for k in keys:
                assert a[k] == pytest.approx(b[k], abs=1e-5), (name, k)
    assert got["cached"][0]["loss"] == pytest.approx(np.log(2), abs=1e-5)   # policy == reference at step 1
    assert got["cached"][-1]["rewards/margins"] != 0.0


def test_lora_with_recompute_trains_like_without(dpo, tmp_path):
    """--recompute with LoRA once trained nothing (frozen embeddings: the recomputed block saw no input that
    needs a gradient, so the adapter got none). Same losses and gradient norms with and without it."""
    got = {}
    for name, rc in (("plain", None), ("recompute", True)):
        over = {"--lora": True, "--lora-rank": "4", "--learning-rate": "1e-2", "--recompute": rc}
        assert run(["dpo", *dpo_args(dpo, tmp_path / name, **over), "-q"]).exit_code == 0
        got[name] = records(tmp_path / name)
    assert got["recompute"][0]["grad_norm"] > 0
    for a, b in zip(got["plain"], got["recompute"]):
        assert (a["loss"], a["grad_norm"]) == pytest.approx((b["loss"], b["grad_norm"]), abs=1e-6)


def test_metrics_eval_and_summary(dpo, tmp_path):
    r = run(["dpo-ref", "--data", dpo["eval"], "--model", dpo["base"], "-q"])
    assert r.exit_code == 0, r.output
    r = run(["dpo", *dpo_args(dpo, tmp_path, **{"--ref-logps": dpo["train"] + ".ref-logps",
                                                 "--eval-data": dpo["eval"], "--eval-steps": "2",
                                                 "--max-steps": "4"}), "-q"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    recs = records(tmp_path)
    stat_keys = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"}
    assert stat_keys <= set(recs[0]) and stat_keys <= set(summary)
    for rec in recs:
        assert rec["rewards/margins"] == pytest.approx(rec["rewards/chosen"] - rec["rewards/rejected"], abs=1e-6)
        assert 0.0 <= rec["rewards/accuracies"] <= 1.0
    assert {"eval_loss", "eval_rewards/accuracies", "eval_pairs"} <= set(recs[1]) and "eval_loss" not in recs[0]
    assert summary["eval_pairs"] == 40


@pytest.mark.parametrize("over", [{"--lora": True}, {"--loss-type": "simpo"}], ids=["adapter-off", "reference-free"])
def test_eval_with_a_live_or_no_reference(dpo, tmp_path, over):
    """Without a cache the eval set uses the same reference as training (or none): no eval cache needed."""
    r = run(["dpo", *dpo_args(dpo, tmp_path, **{"--eval-data": dpo["eval"], "--max-steps": "2", **over}), "-q"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["eval_pairs"] == 40 and np.isfinite(summary["eval_loss"])
    assert 0.0 <= summary["eval_rewards/accuracies"] <= 1.0


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "simpo", "orpo", "dpop"])
def test_every_loss_type_trains(dpo, tmp_path, loss_type):
    over = {"--loss-type": loss_type, "--max-steps": "2", "--sft-loss-ratio": "0" if loss_type == "hinge" else "0.5"}
    if loss_type not in ("simpo", "orpo"):
        over["--ref-logps"] = dpo["train"] + ".ref-logps"
    r = run(["dpo", *dpo_args(dpo, tmp_path, **over), "-q"])
    assert r.exit_code == 0, r.output
    assert all(np.isfinite(losses(tmp_path)))
    if loss_type == "hinge":
        assert losses(tmp_path)[0] == pytest.approx(1.0, abs=1e-5)  # margin 0 at the start: max(0, 1 - 0)


def test_sigkill_then_resume_gives_bit_identical_losses(dpo, tmp_path):
    over = {"--max-steps": "8", "--save-steps": "3", "--lora": True, "--lora-rank": "4", "--learning-rate": "1e-2",
            "--ref-logps": dpo["train"] + ".ref-logps", "--gradient-accumulation-steps": "2",
            "--per-device-train-batch-size": "2", "--lora-dropout": "0.1"}
    assert run(["dpo", *dpo_args(dpo, tmp_path / "ref", **over), "-q"]).exit_code == 0
    killed = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "ernie_train.cli", "dpo", *dpo_args(dpo, killed, **over), "-q"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import time
    t = time.time()
    while not (killed / "checkpoint-00000006").exists():
        assert time.time() - t < 180 and p.poll() is None, p.stderr.read() if p.poll() is not None else "timeout"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (killed / "checkpoint-00000008").exists()
    r = run(["dpo", *dpo_args(dpo, killed, **over), "--resume", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["start_step"] == 6
    assert records(killed) == [dict(x, tokens_per_s=y["tokens_per_s"], memory_mb=y["memory_mb"])
                               for x, y in zip(records(tmp_path / "ref"), records(killed))]


def test_divergence_guard_stops_a_dpo_run(dpo, tmp_path):
    """Inherited from the trainer: a non-finite loss or gradient norm stops the run, nothing saved from it."""
    _expect_error(["dpo", *dpo_args(dpo, tmp_path, **{"--learning-rate": "1e6", "--max-grad-norm": "0",
                                                      "--max-steps": "8", "--save-steps": "1"})], "non-finite")
    last = records(tmp_path)[-1]
    assert not (tmp_path / f"checkpoint-{last['step']:08d}").exists()


@pytest.mark.slow
def test_two_processes_match_one(dpo, tmp_path):
    over = {"--ref-logps": dpo["train"] + ".ref-logps", "--lora": True, "--lora-rank": "4", "--learning-rate": "1e-2"}
    assert run(["dpo", *dpo_args(dpo, tmp_path / "one", **over), "-q"]).exit_code == 0
    r = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                        str(tmp_path / "log"), os.path.join(os.path.dirname(sys.executable), "ernie-train"), "dpo",
                        *dpo_args(dpo, tmp_path / "two", **over, **{"--per-device-train-batch-size": "2"}), "-q"],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stderr[-2000:], open(tmp_path / "log" / "workerlog.0").read()[-2000:])
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    for a, b in zip(one, two):
        for k in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert a[k] == pytest.approx(b[k], abs=1e-5), k


# ---- bad input: one line, exit 1 ---------------------------------------------------------------------
def _expect_error(args, pattern, code=1):
    r = run(args)
    assert r.exit_code == code, r.output
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: "), r.stderr
    assert pattern in err[0], err[0]


def test_bad_inputs(dpo, data, tmp_path):
    cached = dpo["train"] + ".ref-logps"
    _expect_error(["dpo", *dpo_args({**dpo, "train": data["sft"]}, tmp_path / "a")], "packed for 'sft'")
    _expect_error(["dpo-ref", "--data", data["sft"], "--model", dpo["base"]], "need dpo shards")
    _expect_error(["dpo", *dpo_args(dpo, tmp_path / "b", **{"--loss-type": "kto"})], "--loss-type 'kto' is unknown")
    _expect_error(["dpo", *dpo_args(dpo, tmp_path / "c", **{"--reference-free": True})],
                  "--reference-free: loss type sigmoid needs a reference")
    _expect_error(["dpo", *dpo_args(dpo, tmp_path / "d", **{"--ref-logps": str(tmp_path / "nope")})],
                  "nope.safetensors: not found; compute it with `ernie-train dpo-ref")
    # the eval set's reference used for the train set: another dataset
    r = run(["dpo-ref", "--data", dpo["eval"], "--model", dpo["base"], "-o", str(tmp_path / "ev"), "-q"])
    assert r.exit_code == 0
    _expect_error(["dpo", *dpo_args(dpo, tmp_path / "e", **{"--ref-logps": str(tmp_path / "ev")})],
                  "rerun `ernie-train dpo-ref` on these shards")
    # right dataset key, wrong pair count
    f = SafetensorsFile(cached + ".safetensors")
    arrays = {n: (np.asarray(f.get(n))[:-1], f.dtype(n)) for n in f.names}
    write_safetensors(str(tmp_path / "short.safetensors"), arrays, {**f.metadata, "pairs": "359"})
    _expect_error(["dpo", *dpo_args(dpo, tmp_path / "f", **{"--ref-logps": str(tmp_path / "short")})],
                  "do not match")
    assert not (tmp_path / "f").exists()
    _expect_error(["dpo", *dpo_args(dpo, tmp_path / "g", **{"--loss-type": "simpo", "--ref-logps": cached})],
                  "simpo is reference-free")
    _expect_error(["dpo", *dpo_args(dpo, tmp_path / "h", **{"--offset-alpha": "0.5"})], "--offset-alpha needs")
    _expect_error(["dpo", *dpo_args(dpo, tmp_path / "i", **{"--max-seq-len": "32"})], "DPO pairs are never cut")
    r = run(["sft", "--data", data["sft"], "--model", dpo["base"], "-o", str(tmp_path / "j"), "--beta", "1"])
    assert r.exit_code == 2 and "No such option '--beta'" in r.stderr    # DPO options only on `dpo`


@pytest.mark.parametrize("command", ["pretrain", "sft", "dpo", "dpo-ref"])
def test_every_command_has_help_with_example_and_readme_entry(command):
    r = run([command, "--help"])
    assert r.exit_code == 0 and f"ernie-train {command} --data" in r.stdout
    assert f"ernie-train {command} --data" in open(os.path.join(ROOT, "tools", "ernie-train", "README.md")).read()

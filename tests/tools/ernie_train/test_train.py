"""ernie-train end to end on tiny models: checkpoints, exact resume, signals, accumulation, LoRA, bad input."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from ernie_train.cli import cli
from ernie_train.optim import lr_at
from libernie.checkpoint import CheckpointReader
from libernie.model import ErnieForCausalLM
from train_helpers import ROOT, base_args, losses

TRAIN = [sys.executable, "-m", "ernie_train.cli"]


def run(args):
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    return r


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pt")
    r = run(["pretrain", *base_args(data, out, **{"--eval-data": data["pt_valid"], "--eval-steps": "3",
                                                  "--save-total-limit": "1"}), "-q"])
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def test_pretrain_summary_checkpoints_and_metrics(pretrained):
    out, summary = pretrained
    assert summary["steps"] == 6 and summary["stopped"] is None
    assert summary["eval_ppl"] == pytest.approx(math.exp(summary["eval_loss"]))
    assert sorted(os.listdir(out)) == ["checkpoint-00000006", "metrics.jsonl", "train_config.json"]  # limit 1
    ls = losses(out)
    assert len(ls) == 6 and ls[-1] < ls[0] - 0.2  # lr 3e-3 on a tiny model: it learns
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "memory_mb"} <= set(recs[0])
    assert "eval_loss" in recs[2] and "eval_loss" not in recs[1]
    assert [r["lr"] for r in recs] == [lr_at(s, lr=3e-3, min_lr=0.0, warmup=0, total=6, kind="cosine") for s in range(6)]
    ckpt = out / "checkpoint-00000006"
    assert CheckpointReader(ckpt).layout == "hf" and (ckpt / "tokenizer.model").exists()
    model = ErnieForCausalLM.from_pretrained(ckpt)
    assert model.config.vocab_size == 2048 and model.config.hidden_size == 64
    st = json.load(open(ckpt / "trainer_state.json"))
    assert st["step"] == 6 and st["data_position"] == 12 and st["config"]["max_steps"] == 6


def test_gradient_accumulation_takes_the_same_steps(data, tmp_path):
    a = run(["pretrain", *base_args(data, tmp_path / "a", **{"--save-steps": "0"}), "-q"])
    b = run(["pretrain", *base_args(data, tmp_path / "b", **{"--save-steps": "0", "--per-device-train-batch-size": "1",
                                                             "--gradient-accumulation-steps": "2"}), "-q"])
    assert a.exit_code == b.exit_code == 0
    np.testing.assert_allclose(losses(tmp_path / "a"), losses(tmp_path / "b"), rtol=0, atol=1e-5)


def test_recompute_changes_memory_not_numbers(data, tmp_path):
    a = run(["pretrain", *base_args(data, tmp_path / "a", **{"--save-steps": "0", "--max-steps": "3"}), "-q"])
    b = run(["pretrain", *base_args(data, tmp_path / "b", **{"--save-steps": "0", "--max-steps": "3",
                                                             "--recompute": True}), "-q"])
    assert a.exit_code == b.exit_code == 0, b.output
    np.testing.assert_allclose(losses(tmp_path / "a"), losses(tmp_path / "b"), rtol=0, atol=1e-6)


def _spawn(args, **kw):
    return subprocess.Popen(TRAIN + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(path, timeout=120):
    t = time.time()
    while not os.path.exists(path):
        if time.time() - t > timeout:
            raise TimeoutError(path)
        time.sleep(0.02)


def test_sigkill_then_resume_gives_bit_identical_losses(data, tmp_path):
    args = base_args(data, tmp_path / "ref", **{"--max-steps": "12", "--save-steps": "4", "--warmup-steps": "3",
                                                "--gradient-accumulation-steps": "2", "--per-device-train-batch-size": "1"})
    assert run(["pretrain", *args, "-q"]).exit_code == 0
    killed = tmp_path / "killed"
    p = _spawn(["pretrain", *[str(killed) if a == str(tmp_path / "ref") else a for a in args], "-q"])
    _wait_for(killed / "checkpoint-00000008")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (killed / "checkpoint-00000012").exists()
    r = run(["pretrain", *[str(killed) if a == str(tmp_path / "ref") else a for a in args], "--resume", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["start_step"] >= 8
    assert losses(killed) == losses(tmp_path / "ref")  # bit for bit, every step


def test_sigterm_checkpoints_and_exits_zero(data, tmp_path):
    out = tmp_path / "run"
    p = _spawn(["pretrain", *base_args(data, out, **{"--max-steps": "100000", "--save-steps": "0"})])
    _wait_for(out / "metrics.jsonl")
    while len(open(out / "metrics.jsonl").readlines()) < 2:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["stopped"] == "SIGTERM"
    step = summary["steps"]
    assert os.path.basename(summary["checkpoint"]) == f"checkpoint-{step:08d}"
    assert json.load(open(os.path.join(summary["checkpoint"], "trainer_state.json")))["step"] == step


def test_lora_sft_writes_only_an_adapter_that_loads_on_the_base(pretrained, data, tmp_path):
    base = pretrained[0] / "checkpoint-00000006"
    before = {n: np.array(a) for n, (a, _) in ((n, CheckpointReader(base).get(n)) for n in CheckpointReader(base).keys())}
    r = run(["sft", "--data", data["sft"], "--model", str(base), "--lora", "--lora-rank", "4", "-o", str(tmp_path),
             "--max-steps", "8", "--logging-steps", "1", "--learning-rate", "5e-3", "--per-device-train-batch-size", "4",
             "--lora-plus-scale", "4", "-q"])
    assert r.exit_code == 0, r.output
    ckpt = tmp_path / "checkpoint-00000008"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.model"} <= set(os.listdir(ckpt))
    assert not list(ckpt.glob("model-*.safetensors"))
    meta = json.load(open(ckpt / "adapter_config.json"))
    assert meta["r"] == 4 and meta["lora_alpha"] == 8 and meta["base_model"] == str(base)
    ls = losses(tmp_path)
    assert ls[-1] < ls[0]
    after = CheckpointReader(base)
    assert all(np.array_equal(before[n], after.get(n)[0]) for n in before)  # the base is untouched
    model = ErnieForCausalLM.from_pretrained(base, adapter=ckpt)
    assert any(".lora_B" in n and float(abs(p).sum()) > 0 for n, p in model.named_parameters())


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(data, tmp_path):
    one = run(["pretrain", *base_args(data, tmp_path / "one", **{"--save-steps": "0"}), "-q"])
    assert one.exit_code == 0
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                        str(tmp_path / "log"), os.path.join(os.path.dirname(sys.executable), "ernie-train"), "pretrain",
                        *base_args(data, tmp_path / "two", **{"--save-steps": "0", "--per-device-train-batch-size": "1"}),
                        "-q"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stderr[-2000:], open(tmp_path / "log" / "workerlog.0").read()[-2000:])
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=0, atol=1e-5)


# ---- bad input: one line, exit 1, nothing written -------------------------------------------------------
def _expect_error(args, pattern):
    r = run(args)
    assert r.exit_code == 1, r.output
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: "), r.stderr
    assert pattern in err[0], err[0]


def test_corrupt_shard_is_caught_by_its_sha256(data, tmp_path):
    import shutil
    for f in os.listdir(data["root"]):
        if f.startswith("pt-train"):
            shutil.copy(data["root"] / f, tmp_path / f)
    npy = tmp_path / "pt-train-00000.npy"
    raw = bytearray(npy.read_bytes())
    raw[-1] ^= 0xFF
    npy.write_bytes(bytes(raw))
    _expect_error(["pretrain", *base_args({**data, "pt": str(tmp_path / "pt-train")}, tmp_path / "o")],
                  "sha256 differs")
    assert not (tmp_path / "o").exists()


def test_other_bad_inputs(data, pretrained, tmp_path):
    from libernie.tokenizer import train_tokenizer
    train_tokenizer([os.path.join(ROOT, "assets", "corpus", "numbers.txt")], str(tmp_path / "tok"), vocab_size=600)
    _expect_error(["pretrain", *base_args(data, tmp_path / "a", **{"--tokenizer": str(tmp_path / "tok")})],
                  "packed with tokenizer sha256")
    _expect_error(["pretrain", *base_args(data, tmp_path / "b", **{"--max-seq-len": "65"})],
                  "larger than the shards' seq_len 64")
    base = str(pretrained[0] / "checkpoint-00000006")
    _expect_error(["sft", "--data", data["sft"], "--model", base, "--lora", "--lora-target-modules", "q_proj",
                   "-o", str(tmp_path / "c")], "'q_proj' matches no Linear")
    _expect_error(["sft", *base_args(data, tmp_path / "d")], "packed for 'pretrain'")
    _expect_error(["pretrain", *base_args(data, pretrained[0])], "already holds checkpoints; pass --resume")
    r = run(["pretrain", "--max-steps", "x"])
    assert r.exit_code == 2


def test_visualdl_scalars_follow_metrics_jsonl(data, tmp_path, monkeypatch):
    """VisualDL is optional (not installed here); a stand-in with its LogWriter API records what we send."""
    import types
    calls = []

    class LogWriter:
        def __init__(self, logdir):
            calls.append(("open", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "visualdl", types.SimpleNamespace(LogWriter=LogWriter))
    r = run(["pretrain", *base_args(data, tmp_path / "o", **{"--max-steps": "2", "--save-steps": "0",
                                                           "--visualdl-logdir": str(tmp_path / "vdl")}), "-q"])
    assert r.exit_code == 0, r.output
    assert calls[0] == ("open", str(tmp_path / "vdl")) and calls[-1] == ("close",)
    recs = [json.loads(x) for x in open(tmp_path / "o" / "metrics.jsonl")]
    assert [(t, v, s) for t, v, s in calls[1:-1] if t == "loss"] == [("loss", r["loss"], r["step"]) for r in recs]


def test_visualdl_missing_is_a_one_line_error(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "visualdl", None)  # import visualdl -> ImportError
    _expect_error(["pretrain", *base_args(data, tmp_path / "o", **{"--visualdl-logdir": str(tmp_path / "v")})],
                  "pip install visualdl")
    assert not (tmp_path / "o").exists()


def test_lora_runs_are_reproducible_from_the_seed(pretrained, data, tmp_path):
    base = str(pretrained[0] / "checkpoint-00000006")
    args = ["sft", "--data", data["sft"], "--model", base, "--lora", "--max-steps", "2", "--logging-steps", "1",
            "--learning-rate", "5e-3", "-q"]
    for name in ("a", "b"):
        assert run([*args, "-o", str(tmp_path / name)]).exit_code == 0
    assert run([*args, "-o", str(tmp_path / "c"), "--seed", "7"]).exit_code == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b")       # LoRA's random A comes from --seed
    assert losses(tmp_path / "a")[1] != losses(tmp_path / "c")[1]

"""DPO with cached reference log-probs vs a live reference model: tokens/s and peak memory, in one run.

    .venv/bin/python scripts/bench/dpo.py [--preset ernie-4.5-0.3b] [--layers N] [--steps 3] [--seq-len 256]
                                          [--batch 1] [--recompute] [--pairs N] [--lora-targets LIST]

Models (random weights, fp32 on CPU, LoRA rank 8, as a DPO run on one machine usually is):
- ernie-4.5-0.3b (default): ERNIE-4.5-0.3B's shapes (hidden 1024, 16/2 heads of 128, intermediate 3072, vocab
  103424, tied) with --layers 12 (keeps the live-reference run under 4 GB); LoRA on qkv/o/up_gate/down.
  Weights 56 MB per layer plus a 424 MB embedding; fp32 activations of 256 tokens about 24 MB per layer.
- ernie-4.5-21b-a3b: ERNIE-4.5-21B-A3B's widths (hidden 2560, 20/4 heads of 128, layer 0 dense 12288, then MoE
  layers of 64 experts of 1536, top-6, 2 shared; vocab 103424, tied) with --layers 2 (one dense, one MoE layer:
  4.6 GB of weights, so the live run holds ~9.5 GB); LoRA on qkv/o (attention), as usual for MoE models.
The saving in memory depends on how much of it the weights are; --recompute shrinks the activations and adds a
forward to every step. The model is built and saved in a child process (this script stays small).
Data: synthetic preference pairs packed by ernie-pack dpo. Each mode runs in its own process (so its peak
RSS is its own) through ernie_train.trainer.train, as `ernie-train dpo` does, with the same thread settings:

  cached       --ref-logps (computed once by `ernie-train dpo-ref`; its time is reported on its own line)
  ref-model    --ref-model DIR: a second, frozen copy of the weights run forward every step
  adapter-off  the default with --lora: the policy with its adapter off, no second copy, a second forward

tokens/s is the median over steps 2..N of the trainer's own metrics.jsonl; the modes run --rounds times in
turn (cached, ref-model, adapter-off, cached, ...) and each keeps its best round, because other jobs on a
shared machine slow whichever run they overlap. Memory: a thread samples the resident set (/proc/self/statm)
every 5 ms, in the step too (the largest over rounds):
- training peak: steps 2..N, i.e. what a run holds while it trains, activations included;
- process peak: the whole run, loading the model(s) included. (getrusage's max RSS is not used: Linux
  carries it across fork+exec, so a child would report this script's own peak from building the model.)
Goal (issue 9): cached >= 1.4x the tokens/s of ref-model, <= 0.6x its peak memory.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def sh(*args):
    r = subprocess.run(list(args), capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit(f"{' '.join(args[:3])} failed:\n{r.stderr[-2000:]}")
    return r.stdout


def make_data(tmp, n_pairs, seq_len):
    words = open(os.path.join(ROOT, "assets", "corpus", "stories.txt")).read().split()
    rng = random.Random(0)
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    with open(os.path.join(tmp, "pairs.jsonl"), "w") as f:
        for _ in range(n_pairs):  # about seq_len/2 tokens of prompt, seq_len/5 per response
            f.write(json.dumps({"question": text(seq_len // 3), "chosen": text(seq_len // 8),
                                "rejected": text(seq_len // 8)}) + "\n")
    sh(f"{BIN}/ernie-pack", "dpo", "-q", "--tokenizer", "assets/tokenizer", "--seq-len", str(seq_len),
       "--overflow", "reject", "-o", os.path.join(tmp, "dpo"), os.path.join(tmp, "pairs.jsonl"))


PRESETS = {"ernie-4.5-0.3b": {"layers": 12, "targets": "qkv_proj,o_proj,up_gate_proj,down_proj"},
           "ernie-4.5-21b-a3b": {"layers": 2, "targets": "qkv_proj,o_proj"}}


def make_model(tmp, preset, layers):
    """Random weights of `preset` with `layers` decoder layers, saved to tmp/model (run in a child process)."""
    import libernie  # noqa: F401
    import paddle

    from libernie.config import PRESETS as CONFIGS
    from libernie.model import ErnieForCausalLM
    cfg = CONFIGS[preset]()
    cfg.num_hidden_layers = layers
    if cfg.is_moe:
        cfg.moe_layer_end_index = min(cfg.moe_layer_end_index, layers - 1)
    cfg.validate()
    paddle.seed(0)
    ErnieForCausalLM(cfg).save_pretrained(os.path.join(tmp, "model"))


def child(argv):
    """One `ernie-train dpo` run through its Python API (as the CLI runs it), sampling RSS every 5 ms."""
    import threading
    import time

    import libernie  # noqa: F401
    from ernie_train.config import resolve
    from ernie_train.trainer import train
    out, extra = argv[0], json.loads(argv[1])
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20  # noqa: E731
    peak = {"run": 0.0, "steps": 0.0}
    phase = ["run"]

    def sample():
        while True:
            r = rss()
            peak["run"] = max(peak["run"], r)
            if phase[0] == "steps":
                peak["steps"] = max(peak["steps"], r)
            time.sleep(0.005)
    threading.Thread(target=sample, daemon=True).start()
    train(resolve("dpo", {}, {**extra, "output_dir": out}), on_log=lambda rec: phase.__setitem__(0, "steps"))
    recs = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    print(json.dumps({"tokens_per_s": statistics.median(r["tokens_per_s"] for r in recs[1:]),
                      "process_peak_mb": peak["run"], "train_peak_mb": peak["steps"],
                      "loss": [r["loss"] for r in recs]}))


def run_mode(tmp, name, extra, args):
    opts = {"data": os.path.join(tmp, "dpo"), "model": os.path.join(tmp, "model"), "lora": True,
            "lora_target_modules": args.lora_targets,
            "max_steps": args.steps + 1, "logging_steps": 1, "save_steps": 0, "learning_rate": 1e-4,
            "per_device_train_batch_size": args.batch, "verify_data": False, "recompute": args.recompute, **extra}
    return json.loads(sh(sys.executable, os.path.abspath(__file__), "--child", os.path.join(tmp, "run-" + name),
                         json.dumps(opts)))


def main():
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2:])
    if sys.argv[1:2] == ["--make-model"]:
        return make_model(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="ernie-4.5-0.3b")
    ap.add_argument("--layers", type=int, help="decoder layers (default: 12 for 0.3b, 2 for 21b-a3b)")
    ap.add_argument("--lora-targets", help="LoRA target modules (default: per preset, see above)")
    ap.add_argument("--pairs", type=int, default=64, help="preference pairs in the synthetic set")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    args.layers = args.layers or PRESETS[args.preset]["layers"]
    args.lora_targets = args.lora_targets or PRESETS[args.preset]["targets"]
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        make_data(tmp, args.pairs, args.seq_len)
        sh(sys.executable, os.path.abspath(__file__), "--make-model", tmp, args.preset, str(args.layers))
        ref = json.loads(sh(f"{BIN}/ernie-train", "dpo-ref", "--data", os.path.join(tmp, "dpo"), "--model",
                            os.path.join(tmp, "model"), "--batch-size", str(args.batch), "-q"))
        modes = {"cached": {"ref_logps": os.path.join(tmp, "dpo.ref-logps")},
                 "ref-model": {"ref_model": os.path.join(tmp, "model")}, "adapter-off": {}}
        res = {}
        for k in range(args.rounds):
            for name, extra in modes.items():
                r = run_mode(tmp, f"{name}-{k}", extra, args)
                best = res.setdefault(name, r)
                best["tokens_per_s"] = max(best["tokens_per_s"], r["tokens_per_s"])
                for m in ("train_peak_mb", "process_peak_mb"):
                    best[m] = max(best[m], r[m])
    print(f"{args.preset} shapes x {args.layers} layers, LoRA r8 on {args.lora_targets}, recompute {args.recompute}, "
          f"batch {args.batch} x "
          f"{args.seq_len}, {args.steps} timed steps, best of {args.rounds} rounds, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"dpo-ref (once): {ref['pairs']} pairs in {ref['seconds']:.1f} s")
    for k, v in res.items():
        print(f"  {k:12} {v['tokens_per_s']:8.1f} tokens/s   training peak {v['train_peak_mb']:6.0f} MB   process peak "
              f"{v['process_peak_mb']:6.0f} MB   loss {v['loss'][0]:.4f} -> {v['loss'][-1]:.4f}")
    c = res["cached"]
    for other in ("ref-model", "adapter-off"):
        o = res[other]
        print(f"cached vs {other}: {c['tokens_per_s'] / o['tokens_per_s']:.2f}x tokens/s, "
              f"{c['train_peak_mb'] / o['train_peak_mb']:.2f}x training peak, "
              f"{c['process_peak_mb'] / o['process_peak_mb']:.2f}x process peak"
              + ("   (goal >= 1.4x, <= 0.6x)" if other == "ref-model" else ""))


if __name__ == "__main__":
    main()

"""DPO with cached reference log-probs vs a live reference model: tokens/s and peak memory, in one run.

    .venv/bin/python scripts/bench/dpo.py [--layers 6] [--steps 4] [--seq-len 256] [--batch 2]

Model: ERNIE-4.5-0.3B's shapes (hidden 1024, 16/2 heads of 128, intermediate 3072, vocab 103424, tied) with
--layers decoder layers, random weights, fp32 on CPU; LoRA rank 8 on the usual targets, as a DPO run on one
machine usually is. Data: synthetic preference pairs packed by ernie-pack dpo. Each mode is a separate
`ernie-train dpo` process (so its peak RSS is its own), one after another with the same thread settings:

  cached       --ref-logps (computed once by `ernie-train dpo-ref`; its time is reported on its own line)
  ref-model    --ref-model DIR: a second, frozen copy of the weights run forward every step
  adapter-off  the default with --lora: the policy with its adapter off, no second copy, a second forward

tokens/s is the median over steps 2..N of the trainer's own metrics.jsonl; peak memory is the process's
max RSS (metrics.jsonl memory_mb). Goal (issue 9): cached >= 1.4x the tokens/s of ref-model, <= 0.6x its
peak memory.
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


def make_model(tmp, layers):
    import libernie  # noqa: F401
    import paddle

    from libernie.config import ernie_4_5_0_3b
    from libernie.model import ErnieForCausalLM
    cfg = ernie_4_5_0_3b()
    cfg.num_hidden_layers = layers
    paddle.seed(0)
    ErnieForCausalLM(cfg).save_pretrained(os.path.join(tmp, "model"))


def run_mode(tmp, name, extra, args):
    out = os.path.join(tmp, "run-" + name)
    sh(f"{BIN}/ernie-train", "dpo", "--data", os.path.join(tmp, "dpo"), "--model", os.path.join(tmp, "model"),
       "--lora", "-o", out, "--max-steps", str(args.steps + 1), "--logging-steps", "1", "--save-steps", "0",
       "--per-device-train-batch-size", str(args.batch), "--learning-rate", "1e-4", "--no-verify-data", "-q", *extra)
    recs = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in recs[1:]),
            "peak_mb": max(r["memory_mb"] for r in recs), "loss": [r["loss"] for r in recs]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        make_data(tmp, 64, args.seq_len)
        make_model(tmp, args.layers)
        ref = json.loads(sh(f"{BIN}/ernie-train", "dpo-ref", "--data", os.path.join(tmp, "dpo"), "--model",
                            os.path.join(tmp, "model"), "--batch-size", str(args.batch), "-q"))
        res = {"cached": run_mode(tmp, "cached", ["--ref-logps", os.path.join(tmp, "dpo.ref-logps")], args),
               "ref-model": run_mode(tmp, "ref-model", ["--ref-model", os.path.join(tmp, "model")], args),
               "adapter-off": run_mode(tmp, "adapter-off", [], args)}
    print(f"ERNIE-4.5-0.3B shapes x {args.layers} layers, LoRA r8, batch {args.batch} x {args.seq_len}, "
          f"{args.steps} timed steps, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"dpo-ref (once): {ref['pairs']} pairs in {ref['seconds']:.1f} s")
    for k, v in res.items():
        print(f"  {k:12} {v['tokens_per_s']:8.1f} tokens/s   peak RSS {v['peak_mb']:7.0f} MB   "
              f"loss {v['loss'][0]:.4f} -> {v['loss'][-1]:.4f}")
    c, m = res["cached"], res["ref-model"]
    print(f"cached vs ref-model: {c['tokens_per_s'] / m['tokens_per_s']:.2f}x tokens/s (goal >= 1.4), "
          f"{c['peak_mb'] / m['peak_mb']:.2f}x peak memory (goal <= 0.6)")
    a = res["adapter-off"]
    print(f"cached vs adapter-off: {c['tokens_per_s'] / a['tokens_per_s']:.2f}x tokens/s, "
          f"{c['peak_mb'] / a['peak_mb']:.2f}x peak memory")


if __name__ == "__main__":
    main()

"""Training tokens/s: ernie-train's step next to PaddleFormers and transformers, same config, same threads.

    .venv/bin/python scripts/bench/train.py [--steps 5]      (peers: scripts/bench/setup_peers.sh, make oracle)

Config (issue #4): hidden 512, 8 layers, 8 heads / 2 kv heads, intermediate 1408, vocab 32000, batch 4 x 512,
fp32, AdamW, grad clipping. All three run in this invocation with the same OMP_NUM_THREADS / MKL settings,
alternating over --rounds rounds (ours, PaddleFormers, transformers, then again), so a burst of load from
elsewhere hits every side alike; each ratio is the median of the per-round ratios. "packed" feeds 4 documents per row (block-diagonal
attention, positions restarting), which is what ernie-train does with ernie-pack data.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import libernie  # noqa: F401  (thread defaults before paddle)
import numpy as np
import paddle

from libernie.config import ernie_small
from libernie.model import ErnieForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools", "ernie-train"))
from ernie_train import optim  # noqa: E402
from ernie_train.config import TrainConfig  # noqa: E402
from ernie_train.trainer import LossHead  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def ours(cfg, batch, seq, steps, packed):
    paddle.seed(0)
    model = ErnieForCausalLM(cfg)
    model.train()
    opt, params = optim.build(model, TrainConfig(data="x", output_dir="x", init_config="x", learning_rate=1e-4))
    head = LossHead(model)
    ids = paddle.to_tensor(np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, seq)))
    doc = np.repeat(np.arange(4), seq // 4)[None].repeat(batch, 0) if packed else np.zeros((batch, seq), np.int64)
    pos = (np.arange(seq) % (seq // 4) if packed else np.arange(seq))[None].repeat(batch, 0)
    doc_ids = paddle.to_tensor(doc) if packed else None
    pos, mask = paddle.to_tensor(pos), paddle.ones([batch, seq], "int32")
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        s, n = head(ids, pos, doc_ids, mask)
        (s / n).backward()
        optim.clip_grad_norm(params, 1.0)
        opt.step()
        opt.clear_grad()
        float(s)
        if i:
            times.append(time.perf_counter() - t)
    return batch * seq / statistics.median(times)


def peer(python, script, cfg_json, batch, seq, steps):
    if not os.path.exists(python):
        return None
    r = subprocess.run([python, os.path.join(HERE, script), cfg_json, str(batch), str(seq), str(steps)],
                       capture_output=True, text=True)
    if r.returncode:
        sys.stderr.write(f"{script} failed:\n{r.stderr[-2000:]}\n")
        return None
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["tokens"] / statistics.median(out["seconds"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg = ernie_small()
    hf_cfg = json.dumps({k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings")})
    res = {"config": "hidden 512, 8 layers, 8/2 heads, inter 1408, vocab 32000", "batch": args.batch,
           "seq": args.seq, "threads": os.environ["OMP_NUM_THREADS"]}
    runs = {"ours": [], "packed": [], "pf": [], "hf": []}
    for _ in range(args.rounds):
        runs["ours"].append(ours(cfg, args.batch, args.seq, args.steps, packed=False))
        runs["packed"].append(ours(cfg, args.batch, args.seq, args.steps, packed=True))
        runs["pf"].append(peer(os.path.join(ROOT, ".venv-pf", "bin", "python"), "_train_pf.py", hf_cfg, args.batch,
                               args.seq, args.steps))
        runs["hf"].append(peer(os.path.join(ROOT, ".venv-oracle", "bin", "python"), "_train_hf.py", hf_cfg,
                               args.batch, args.seq, args.steps))
    res["rounds"] = args.rounds
    res["ernie_train_tok_s"] = round(statistics.median(runs["ours"]), 1)
    res["ernie_train_packed_tok_s"] = round(statistics.median(runs["packed"]), 1)
    for key, name in (("pf", "paddleformers"), ("hf", "transformers")):
        if all(runs[key]):
            res[f"{name}_tok_s"] = round(statistics.median(runs[key]), 1)
            per_round = [a / b for a, b in zip(runs["ours"], runs[key])]
            res[f"ratio_vs_{name}"] = round(statistics.median(per_round), 3)
            res[f"ratio_vs_{name}_rounds"] = [round(r, 3) for r in per_round]
    print(json.dumps(res))


if __name__ == "__main__":
    main()

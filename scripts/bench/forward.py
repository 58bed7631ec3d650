"""Forward tokens/s: libernie (Paddle) next to transformers (torch), same config, weights and threads.

    .venv/bin/python scripts/bench/forward.py [--preset ernie-small] [--batch 4] [--seq 512] [--iters 3]

Both run in this one invocation, alternating, with the same OMP_NUM_THREADS/MKL settings; the
ratio is what to read (these machines are noisy). Also prints achieved GFLOP/s against a plain
square matmul measured in the same run, the practical limit of this CPU.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import libernie  # noqa: F401  (sets MKL_DEBUG_CPU_TYPE / OMP_NUM_THREADS before paddle)
import paddle

from libernie.config import PRESETS
from libernie.model import ErnieForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ORACLE = os.path.join(ROOT, ".venv-oracle", "bin", "python")


def forward_flops(cfg, batch, seq):
    """2 FLOPs per multiply-add: projections, MLP, head, plus causal attention scores and values."""
    per_tok_layer = 2 * (cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.hidden_size
                         + 3 * cfg.hidden_size * cfg.intermediate_size)
    attn = 2 * 2 * cfg.q_size * seq / 2                     # QK^T and PV, causal half, per token per layer
    head = 2 * cfg.hidden_size * cfg.vocab_size
    return batch * seq * (cfg.num_hidden_layers * (per_tok_layer + attn) + head)


def matmul_gflops(n=2048, iters=5):
    a, b = paddle.randn([n, n]), paddle.randn([n, n])
    paddle.matmul(a, b).numpy()
    t = time.perf_counter()
    for _ in range(iters):
        paddle.matmul(a, b).numpy()
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="ernie-small", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="alternate libernie/transformers this many times")
    args = ap.parse_args()
    cfg = PRESETS[args.preset]()
    paddle.seed(0)
    model = ErnieForCausalLM(cfg)
    model.eval()
    ids = paddle.randint(3, cfg.vocab_size, [args.batch, args.seq])
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, layout="hf")
        with paddle.no_grad():
            model(ids)
            for _ in range(args.rounds):
                for _ in range(args.iters):
                    t = time.perf_counter()
                    model(ids).logits.numpy()
                    ours.append(time.perf_counter() - t)
                if os.path.exists(ORACLE):
                    r = subprocess.run([ORACLE, os.path.join(os.path.dirname(__file__), "_hf_forward.py"), d,
                                        str(args.batch), str(args.seq), str(args.iters)],
                                       capture_output=True, text=True, check=True)
                    theirs += json.loads(r.stdout.strip().splitlines()[-1])["seconds"]
    tokens = args.batch * args.seq
    peak = matmul_gflops()
    flops = forward_flops(cfg, args.batch, args.seq)
    res = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "threads": os.environ["OMP_NUM_THREADS"],
           "libernie_tok_s": round(tokens / statistics.median(ours), 1),
           "libernie_gflops": round(flops / statistics.median(ours) / 1e9, 1),
           "matmul_peak_gflops": round(peak, 1)}
    if theirs:
        res["transformers_tok_s"] = round(tokens / statistics.median(theirs), 1)
        res["ratio_libernie_over_transformers"] = round(statistics.median(theirs) / statistics.median(ours), 3)
    res["ratio_libernie_over_matmul_peak"] = round(res["libernie_gflops"] / peak, 3)
    print(json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())

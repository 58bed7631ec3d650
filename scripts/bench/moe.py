"""MoE forward+backward tokens/s: libernie (Paddle) next to transformers' Ernie4_5_MoeForCausalLM (torch), and
the dispatch overhead of routing against a dense model with the same active parameters.

    .venv/bin/python scripts/bench/moe.py [--batch 4] [--seq 256] [--iters 3] [--rounds 2]

1. vs transformers (goal >= 1.0x): the same small MoE config and the same weights (libernie saves an HF
   checkpoint, transformers loads it, so both route every token to the same experts), fp32, LM loss + backward,
   median step, alternating rounds, same OMP_NUM_THREADS / MKL settings.
2. dispatch overhead (goal <= 1.5x): an all-MoE model with k routed + s shared experts of width m against a dense
   model whose every MLP has width (k + s) * m (the same active parameters per token, bar the tiny router),
   both libernie, same step. The ratio is the price of the gate, the sort and the per-expert loop.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import libernie  # noqa: F401  (thread defaults before paddle)
import numpy as np
import paddle

from libernie.config import ErnieConfig
from libernie.model import ErnieForCausalLM
from libernie.model.moe import router_loss

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ORACLE = os.path.join(ROOT, ".venv-oracle", "bin", "python")
HERE = os.path.dirname(os.path.abspath(__file__))

# A small 21B-A3B look-alike: layer 0 dense, then MoE; 16 experts of 256, 4 routed + 1 shared per token.
BASE = dict(vocab_size=8000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, rope_theta=500000.0,
            moe_num_experts=16, moe_k=4, moe_intermediate_size=256, moe_num_shared_experts=1,
            moe_layer_start_index=1, moe_use_aux_free=True)


def step_times(model, ids, iters, with_router_loss=True):
    """Median seconds of forward (LM loss [+ router loss]) + backward."""
    model.train()
    times = []
    for i in range(iters + 1):
        t = time.perf_counter()
        out = model(ids, labels=ids)
        loss = out.loss
        rl = router_loss(model) if with_router_loss else None
        if rl is not None:
            loss = loss + rl
        loss.backward()
        model.clear_gradients()
        float(loss)
        if i:
            times.append(time.perf_counter() - t)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="alternate libernie/transformers this many times")
    ap.add_argument("--experts", type=int, default=BASE["moe_num_experts"])
    ap.add_argument("--k", type=int, default=BASE["moe_k"])
    ap.add_argument("--shared", type=int, default=BASE["moe_num_shared_experts"])
    ap.add_argument("--expert-width", type=int, default=BASE["moe_intermediate_size"])
    args = ap.parse_args()
    BASE.update(moe_num_experts=args.experts, moe_k=args.k, moe_num_shared_experts=args.shared,
                moe_intermediate_size=args.expert_width)
    cfg = ErnieConfig(**BASE)
    paddle.seed(0)
    model = ErnieForCausalLM(cfg)
    ids_np = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.seq)).astype(np.int64)
    ids = paddle.to_tensor(ids_np)
    tokens = ids_np.size
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(os.path.join(d, "m"), layout="hf")
        np.save(os.path.join(d, "ids.npy"), ids_np)
        for _ in range(args.rounds):
            ours += step_times(model, ids, args.iters)
            if os.path.exists(ORACLE):
                r = subprocess.run([ORACLE, os.path.join(HERE, "_moe_hf.py"), os.path.join(d, "m"),
                                    os.path.join(d, "ids.npy"), str(args.iters)], capture_output=True, text=True)
                if r.returncode:
                    sys.stderr.write(f"_moe_hf.py failed:\n{r.stderr[-2000:]}\n")
                else:
                    theirs += json.loads(r.stdout.strip().splitlines()[-1])["seconds"]
    res = {"config": f"hidden 256, 4 layers (0 dense), 4/2 heads of 64, vocab 8000, {args.experts} experts x "
                     f"{args.expert_width}, k {args.k}, {args.shared} shared",
           "batch": args.batch, "seq": args.seq, "threads": os.environ["OMP_NUM_THREADS"],
           "libernie_fwd_bwd_tok_s": round(tokens / statistics.median(ours), 1)}
    if theirs:
        res["transformers_fwd_bwd_tok_s"] = round(tokens / statistics.median(theirs), 1)
        res["ratio_libernie_over_transformers"] = round(statistics.median(theirs) / statistics.median(ours), 3)
        # the fastest step of each: what each reaches when the shared machine leaves it alone
        res["ratio_best_step"] = round(min(theirs) / min(ours), 3)

    # dispatch overhead: every layer MoE vs every layer dense of width (k + s) * m
    k, s, m = cfg.moe_k, cfg.moe_num_shared_experts, cfg.moe_intermediate_size
    all_moe = ErnieConfig(**{**BASE, "moe_layer_start_index": 0})
    dense = ErnieConfig(**{kk: v for kk, v in BASE.items() if not kk.startswith("moe_")}
                        | {"intermediate_size": (k + s) * m})
    paddle.seed(1)
    moe_model, dense_model = ErnieForCausalLM(all_moe), ErnieForCausalLM(dense)
    t_moe, t_dense = [], []
    for _ in range(2 * args.rounds):  # in-process, so alternate more often: load on this machine drifts
        t_moe += step_times(moe_model, ids, args.iters)
        t_dense += step_times(dense_model, ids, args.iters)
    res["all_moe_fwd_bwd_tok_s"] = round(tokens / statistics.median(t_moe), 1)
    res["dense_same_active_fwd_bwd_tok_s"] = round(tokens / statistics.median(t_dense), 1)
    res["dispatch_overhead_moe_time_over_dense"] = round(statistics.median(t_moe) / statistics.median(t_dense), 3)
    res["dispatch_overhead_best_step"] = round(min(t_moe) / min(t_dense), 3)
    print(json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())

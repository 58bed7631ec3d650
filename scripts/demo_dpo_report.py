"""The demo's DPO report: on held-out preference pairs, how often the model ranks the correct answer above
the wrong one, before (the SFT model) and after DPO, and the reward accuracy DPO optimises.

    python scripts/demo_dpo_report.py --sft DIR --adapter DIR --data PREFIX --run OUTDIR [--beta 0.1] [--eval JSONL]

- likelihood accuracy: log p(chosen) > log p(rejected) (length-normalised as the loss uses them);
- reward accuracy: beta * log(p / p_ref)(chosen) > the same for rejected, with the SFT model as reference.
  Before DPO the policy is the reference, every reward is 0 and this is 0 by definition;
- with --eval, exact answers to held-out sums (as demo_report.py counts them), before and after.
"""
import argparse
import json
import os

import libernie  # noqa: F401
import numpy as np
import paddle

from ernie_train.dpo import normalize, pair_logps
from ernie_train.dpo_ref import batch_tensors, collate
from libernie.data import PackedDataset
from libernie.model import ErnieForCausalLM


def logps(model, ds):
    out_c, out_r = [], []
    for start in range(0, len(ds), 8):
        b = collate(ds, list(range(start, min(len(ds), start + 8))), ds.seq_len)
        with paddle.no_grad():
            c, r = (x.numpy() for x in pair_logps(model, *batch_tensors(b)))
        c, r = normalize(c, r, b.pairs.chosen_tokens, b.pairs.rejected_tokens, loss_type="sigmoid",
                         normalize_logps=True)
        out_c.append(c), out_r.append(r)
    return np.concatenate(out_c), np.concatenate(out_r)


def main():
    ap = argparse.ArgumentParser()
    for a in ("--sft", "--adapter", "--data", "--run"):
        ap.add_argument(a, required=True)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--eval", default=None)
    args = ap.parse_args()
    ds = PackedDataset(args.data)
    sft = ErnieForCausalLM.from_pretrained(args.sft)
    tuned = ErnieForCausalLM.from_pretrained(args.sft, adapter=args.adapter)
    sft_c, sft_r = logps(sft, ds)
    dpo_c, dpo_r = logps(tuned, ds)
    reward_acc = float(np.mean(args.beta * (dpo_c - sft_c) > args.beta * (dpo_r - sft_r)))
    recs = [json.loads(x) for x in open(os.path.join(args.run, "metrics.jsonl"))]
    print(f"DPO training batches: reward accuracy {recs[0]['rewards/accuracies']:.0%} at step {recs[0]['step']} "
          f"-> {recs[-1]['rewards/accuracies']:.0%} at step {recs[-1]['step']}, "
          f"margin {recs[-1]['rewards/margins']:.3f}, loss {recs[0]['loss']:.3f} -> {recs[-1]['loss']:.3f}")
    print(f"held-out preference pairs ({len(sft_c)} sums never trained on):")
    print(f"  ranks the correct answer above the wrong one   SFT {np.mean(sft_c > sft_r):.0%}   "
          f"after DPO {np.mean(dpo_c > dpo_r):.0%}")
    print(f"  reward accuracy (beta log p/p_sft)             before 0% (policy = reference)   "
          f"after DPO {reward_acc:.0%}")
    if args.eval:
        from demo_report import accuracy
        from libernie.tokenizer import ErnieTokenizer
        tok = ErnieTokenizer.from_pretrained(args.sft)
        rows = [json.loads(line) for line in open(args.eval)]
        print(f"  exact answers to {len(rows)} held-out sums, greedy        SFT {accuracy(sft, tok, rows):.0%}   "
              f"after DPO {accuracy(tuned, tok, rows):.0%}")


if __name__ == "__main__":
    main()

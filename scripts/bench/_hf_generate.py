"""Timing helper run inside .venv-oracle: transformers' greedy generate() on CPU torch, single stream.
Prints one JSON line {"ttft": [...], "total": [...], "new_tokens": N}. Never imports paddle or libernie."""
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM

model_dir, ids_json, new_tokens, iters = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
ids = torch.tensor([json.loads(ids_json)], dtype=torch.long)
kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True)


def run(n):
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
    if out.shape[1] != ids.shape[1] + n:
        raise SystemExit(f"transformers stopped early: {out.shape[1] - ids.shape[1]} of {n} tokens")
    return time.perf_counter() - t


with torch.inference_mode():
    run(2)  # warm-up
    ttft = [run(1) for _ in range(iters)]
    total = [run(new_tokens) for _ in range(iters)]
print(json.dumps({"ttft": ttft, "total": total, "new_tokens": new_tokens}))

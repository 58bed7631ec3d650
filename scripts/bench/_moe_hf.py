"""Peer for scripts/bench/moe.py, run in .venv-oracle: transformers' Ernie4_5_MoeForCausalLM forward+backward
on CPU torch, fp32, from the checkpoint libernie wrote (same weights, so the same routing). Prints one JSON line
{"seconds": [...], "tokens": N}. Never imports paddle or libernie."""
import json
import os
import sys
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

model_dir, ids_path, iters = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").train()
ids = torch.from_numpy(np.load(ids_path))
times = []
for i in range(iters + 1):
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    if i:  # the first step pays for allocation
        times.append(time.perf_counter() - t)
print(json.dumps({"seconds": times, "tokens": int(ids.numel()), "loss": float(loss)}))

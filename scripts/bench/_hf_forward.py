"""Timing helper run inside .venv-oracle: transformers' Ernie4_5ForCausalLM forward on CPU torch.
Prints one JSON line {"seconds": [...], "tokens": N}. Never imports paddle or libernie."""
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM

model_dir, batch, seq, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
times = []
with torch.inference_mode():
    model(ids)  # warm-up
    for _ in range(iters):
        t = time.perf_counter()
        model(ids)
        times.append(time.perf_counter() - t)
print(json.dumps({"seconds": times, "tokens": batch * seq}))

"""Peer for scripts/bench/train.py, run in .venv-oracle: transformers' Ernie4_5ForCausalLM training steps on
CPU torch, fp32, AdamW. Prints {"seconds": [...], "tokens": per-step tokens}. Never imports paddle."""
import json
import os
import sys
import time

import torch
from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

cfg_json, batch, seq, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
torch.manual_seed(0)
cfg = Ernie4_5Config(**json.loads(cfg_json))
model = Ernie4_5ForCausalLM(cfg).train()
model.config._attn_implementation = "sdpa"
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
ids = torch.randint(3, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
times = []
for i in range(steps + 1):
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i:  # the first step pays for allocation
        times.append(time.perf_counter() - t)
print(json.dumps({"seconds": times, "tokens": batch * seq, "loss": float(loss)}))

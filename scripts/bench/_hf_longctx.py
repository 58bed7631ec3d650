"""Peer for scripts/bench/longctx.py, run in .venv-oracle: one fwd+bwd of transformers' Ernie4_5ForCausalLM
(sdpa, CPU torch, fp32) on one row of `seq` tokens. Prints {"seconds": [...], "peak_rss_mb", "base_rss_mb"}.
Never imports paddle."""
import json
import os
import resource
import sys
import time

import torch
from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

cfg_json, seq, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
torch.manual_seed(0)
cfg = Ernie4_5Config(**json.loads(cfg_json))
cfg._attn_implementation = "sdpa"
model = Ernie4_5ForCausalLM(cfg).train()
ids = torch.randint(3, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
times = []
for i in range(iters + 1):
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    float(loss)
    model.zero_grad(set_to_none=True)
    if i:  # the first step pays for allocation
        times.append(time.perf_counter() - t)
print(json.dumps({"seconds": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "base_rss_mb": base, "attn": model.config._attn_implementation}))

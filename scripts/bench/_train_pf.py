"""Peer for scripts/bench/train.py, run in .venv-pf: PaddleFormers' Ernie4_5ForCausalLM training steps on the
same paddlepaddle CPU build, fp32, AdamW, fused kernels off (they are GPU-only). Prints
{"seconds": [...], "tokens": per-step tokens}."""
import json
import os
import sys
import time

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
import paddle  # noqa: E402
from paddleformers.transformers import Ernie4_5Config, Ernie4_5ForCausalLM  # noqa: E402

cfg_json, batch, seq, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
paddle.seed(0)
cfg = Ernie4_5Config(**json.loads(cfg_json), apply_rope_fusion=False, fuse_rms_norm=False,
                     use_flash_attention=False, _attn_implementation="sdpa")
model = Ernie4_5ForCausalLM(cfg)
model.train()
opt = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.parameters(), beta1=0.9, beta2=0.95,
                             weight_decay=0.01, grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0))
ids = paddle.randint(3, cfg.vocab_size, [batch, seq])
times = []
for i in range(steps + 1):
    t = time.perf_counter()
    out = model(input_ids=ids, labels=ids, return_dict=True)
    loss = out[0] if isinstance(out, (tuple, list)) else out.loss
    loss.backward()
    opt.step()
    opt.clear_grad()
    float(loss)
    if i:
        times.append(time.perf_counter() - t)
print(json.dumps({"seconds": times, "tokens": batch * seq, "loss": float(loss)}))

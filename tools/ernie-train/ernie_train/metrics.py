"""metrics.jsonl (one line per logged step), optional VisualDL scalars, and the FLOP/MFU estimate.

metrics.jsonl is strict JSON (RFC 8259): a NaN or infinite value (a diverged step's loss) is written as
null, never as the bare `NaN` token Python's json module emits, so jq and strict parsers read every line.

MFU = achieved FLOP/s / peak FLOP/s, with achieved = train_flops_per_token x tokens/s and
train_flops_per_token = 6 x N_matmul + 12 x layers x q_width x seq / 2 (forward + backward of every
weight matmul, plus causal attention scores and values). N_matmul counts projection, MLP and head
weights; embeddings are lookups. Peak comes from --peak-tflops (e.g. 989 for a bf16 H100 SXM dense);
without it MFU is not reported.
"""
from __future__ import annotations

import json
import math
import os
import resource

import orjson

from libernie.config import ErnieConfig


def train_flops_per_token(cfg: ErnieConfig, seq_len: int) -> float:
    h, i = cfg.hidden_size, cfg.intermediate_size
    per_layer = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 3 * h * i
    n_matmul = cfg.num_hidden_layers * per_layer + h * cfg.vocab_size
    attention = 12 * cfg.num_hidden_layers * cfg.q_size * seq_len / 2
    return 6 * n_matmul + attention


def peak_memory_mb() -> float:
    """GPU: max allocated; CPU: peak resident set of this process."""
    try:
        import paddle
        if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
            return paddle.device.cuda.max_memory_allocated() / 2**20
    except Exception:  # noqa: BLE001 - memory reporting must never stop training
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLog:
    """Appends JSON lines to OUTDIR/metrics.jsonl. On resume, lines past the resumed step are dropped,
    so the file always tells one consistent history."""

    def __init__(self, out_dir: str, resume_step: int = 0, visualdl_logdir: str | None = None):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if os.path.exists(self.path):
            keep = []
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a line cut by a kill: everything after it is stale too
                    if rec.get("step", 0) <= resume_step:
                        keep.append(line if line.endswith("\n") else line + "\n")
            with open(self.path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(self.path + ".tmp", self.path)
        self.f = open(self.path, "a")
        self.vdl = None
        if visualdl_logdir:
            try:
                from visualdl import LogWriter
            except ImportError:
                from ernie_train.config import TrainConfigError
                raise TrainConfigError("--visualdl-logdir needs VisualDL: pip install visualdl") from None
            self.vdl = LogWriter(logdir=visualdl_logdir)

    def write(self, record: dict) -> None:
        self.f.write(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")  # NaN/inf -> null
        self.f.flush()
        if self.vdl is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.vdl.add_scalar(tag=k, value=v, step=record["step"])

    def close(self) -> None:
        self.f.close()
        if self.vdl is not None:
            self.vdl.close()

"""AdamW with ERNIEKit's defaults, the learning-rate schedule, clipping, and optimizer state as safetensors.

The schedule is a pure function of the step (nothing to save); the optimizer's moments are saved
under the model's structured parameter names (not Paddle's generated `linear_12.w_0` names), so a
checkpoint is readable, layout-independent, and never pickled.
"""
from __future__ import annotations

import math

import numpy as np
import paddle

from libernie.checkpoint import SafetensorsFile, write_safetensors
from libernie.errors import CheckpointError

_KINDS = ("moment1", "moment2", "beta1_pow_acc", "beta2_pow_acc")


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int, kind: str) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from 0, then decay to min_lr."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return lr
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return min_lr + (lr - min_lr) * (1.0 - frac)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def no_decay(name: str) -> bool:
    """Norm weights, biases and embeddings are not decayed (ERNIEKit/Megatron convention)."""
    return "norm" in name or name.endswith(".bias") or "embed_tokens" in name


def build(model, cfg) -> tuple[paddle.optimizer.AdamW, dict]:
    """AdamW over the trainable parameters. Returns (optimizer, {structured name: parameter})."""
    params = {n: p for n, p in model.named_parameters() if not p.stop_gradient}
    groups: dict[tuple, list] = {}
    for name, p in params.items():
        decay = 0.0 if no_decay(name) else cfg.weight_decay
        lr_scale = cfg.lora_plus_scale if name.endswith(".lora_B") else 1.0   # LoRA+
        groups.setdefault((decay, lr_scale), []).append(p)
    param_groups = [{"params": ps, "weight_decay": d, "learning_rate": s} for (d, s), ps in sorted(groups.items())]
    opt = paddle.optimizer.AdamW(learning_rate=cfg.learning_rate, parameters=param_groups, beta1=cfg.adam_beta1,
                                 beta2=cfg.adam_beta2, epsilon=cfg.adam_epsilon)
    return opt, params


def clip_grad_norm(params: dict, max_norm: float) -> float:
    """Global L2 norm of the gradients (computed in fp32); scale them down to max_norm if larger."""
    grads = [p.grad for p in params.values() if p.grad is not None]
    if not grads:
        return 0.0
    with paddle.no_grad():
        total = float(paddle.sqrt(paddle.add_n([paddle.sum(g.astype("float32") * g.astype("float32")) for g in grads])))
    if max_norm > 0 and total > max_norm:
        coef = max_norm / (total + 1e-6)
        with paddle.no_grad():
            for g in grads:
                g.scale_(coef)
    return total


def save_state(opt, params: dict, path: str) -> None:
    """Moments and beta powers of every trainable parameter, fp32, named `<param>/<kind>`."""
    state = opt.state_dict()
    tensors = {}
    for name, p in params.items():
        for kind in _KINDS:
            key = f"{p.name}_{kind}_0"
            if key in state:
                tensors[f"{name}/{kind}"] = (state[key].astype("float32").numpy(), "F32")
        master = state.get("master_weights", {})
        if p.name in master:  # AMP O2 on GPU: fp32 master copy of a bf16 parameter
            tensors[f"{name}/master_weight"] = (master[p.name].astype("float32").numpy(), "F32")
    write_safetensors(path, tensors, {"format": "np", "ernie_tools": "adamw"})


def load_state(opt, params: dict, path: str) -> None:
    """Inverse of save_state. Every trainable parameter must have its state, with the right shape."""
    f = SafetensorsFile(path)
    names = set(f.names)
    state, master = {}, {}
    for name, p in params.items():
        for kind in _KINDS:
            key = f"{name}/{kind}"
            if key not in names:
                raise CheckpointError(f"{path}: no optimizer state {key}; was the checkpoint written with the "
                                      "same --lora/--lora-target-modules?")
            arr = np.array(f.get(key))
            if kind.startswith("moment") and tuple(arr.shape) != tuple(p.shape):
                raise CheckpointError(f"{path}: {key} has shape {list(arr.shape)}, parameter is {list(p.shape)}")
            state[f"{p.name}_{kind}_0"] = paddle.to_tensor(arr)
        if f"{name}/master_weight" in names:
            master[p.name] = paddle.to_tensor(np.array(f.get(f"{name}/master_weight")))
    if master:
        state["master_weights"] = master
    opt.set_state_dict(state)

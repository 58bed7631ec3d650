"""LoRA for the ERNIE model: adapted Linears, and the adapter files ernie-train writes (docs/formats/adapter.md).

apply_lora() swaps each target nn.Linear for a LoRALinear that keeps the base weight under the same
parameter name, so checkpoint code sees an unchanged model plus `*.lora_A` / `*.lora_B` parameters.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from libernie.checkpoint.safetensors_io import write_safetensors
from libernie.checkpoint.sharded import atomic_dir
from libernie.errors import LoRAError
from libernie.lora_files import (CONFIG_FILE, DEFAULT_TARGETS, FORMAT, VERSION, WEIGHTS_FILE, LoRAConfig,  # noqa: F401
                                 config_sha256, read_adapter)


class LoRALinear(nn.Layer):
    """y = x W + b + scaling * dropout(x) A B, with W [in, out] frozen. Parameter names: weight, bias, lora_A, lora_B."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        n_in, n_out = base.weight.shape
        bound = 1.0 / math.sqrt(n_in)  # kaiming_uniform(a=sqrt(5)) on [in, r], as PEFT initialises A
        self.lora_A = self.create_parameter([n_in, cfg.r], default_initializer=nn.initializer.Uniform(-bound, bound))
        self.lora_B = self.create_parameter([cfg.r, n_out], default_initializer=nn.initializer.Constant(0.0))
        self.scaling, self.dropout = cfg.scaling, cfg.lora_dropout

    def forward(self, x):                                                    # [.., in] -> [.., out]
        y = F.linear(x, self.weight, self.bias)
        h = F.dropout(x, self.dropout, training=self.training) if self.dropout else x
        return y + paddle.matmul(paddle.matmul(h, self.lora_A), self.lora_B) * self.scaling

    def delta(self) -> paddle.Tensor:
        """scaling * A @ B, [in, out], fp32."""
        return paddle.matmul(self.lora_A.astype("float32"), self.lora_B.astype("float32")) * self.scaling


def matches_target(name: str, target: str) -> bool:
    """A target is the last name component(s) of a module, expert indices skipped: `down_proj` matches every
    down_proj (dense MLP, routed and shared experts); `experts.down_proj` only routed experts
    (`...mlp.experts.3.down_proj`); `shared_experts.down_proj` only the shared ones."""
    parts = [p for p in name.split(".") if not p.isdigit()]
    want = target.split(".")
    return parts[-len(want):] == want


def apply_lora(model: nn.Layer, cfg: LoRAConfig, modules: list[str] | None = None) -> list[str]:
    """Wrap target Linears (by matches_target, or the exact `modules`); freeze everything else. Multi-token-
    prediction heads (`.mtp_*`, carried for checkpoints but never run) are not targeted.
    Returns the adapted module names. Raises LoRAError when a target matches nothing."""
    wanted = set(modules) if modules else None
    hits = []
    for name, layer in list(model.named_sublayers()):
        if not isinstance(layer, nn.Linear):
            continue
        if (wanted is not None and name in wanted) or (
                wanted is None and ".mtp_" not in name
                and any(matches_target(name, t) for t in cfg.target_modules)):
            parent_name, _, attr = name.rpartition(".")
            parent = model if not parent_name else dict(model.named_sublayers())[parent_name]
            setattr(parent, attr, LoRALinear(layer, cfg))
            hits.append(name)
    if wanted is not None and set(hits) != wanted:
        raise LoRAError(f"adapter modules not in the model: {sorted(wanted - set(hits))[:3]}")
    for target in (cfg.target_modules if wanted is None else ()):
        if not any(matches_target(h, target) for h in hits):
            raise LoRAError(f"LoRA target {target!r} matches no Linear in the model; targets are last name "
                            "components such as qkv_proj, o_proj, up_gate_proj, down_proj, lm_head, "
                            "experts.down_proj, shared_experts.up_gate_proj")
    for pname, p in model.named_parameters():
        p.stop_gradient = ".lora_" not in pname
    cfg.modules = hits
    return hits


def lora_parameters(model: nn.Layer) -> dict[str, paddle.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def save_adapter(model: nn.Layer, cfg: LoRAConfig, out_dir, base_model: str | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors to out_dir, atomically."""
    with atomic_dir(out_dir) as tmp:
        write_adapter(model, cfg, tmp, base_model)


def write_adapter(model: nn.Layer, cfg: LoRAConfig, directory, base_model: str | None = None) -> None:
    """The adapter files, written into an existing directory (the caller makes it atomic)."""
    tensors = {n: (p.astype("float32").numpy(), "F32") for n, p in lora_parameters(model).items()}
    meta = {"format": FORMAT, "version": VERSION, "peft_type": "LORA",
            "base_model": None if base_model is None else os.fspath(base_model),
            "base_model_config_sha256": config_sha256(base_model) if base_model else None,
            "layout": "paddle", "scaling": cfg.scaling, **asdict(cfg)}
    meta["target_modules"] = list(cfg.target_modules)
    directory = os.fspath(directory)
    write_safetensors(os.path.join(directory, WEIGHTS_FILE), tensors, {"format": "np", "ernie_tools": "lora"})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def load_adapter(model: nn.Layer, adapter_dir) -> LoRAConfig:
    """Apply the adapter in `adapter_dir` to `model` (in place) and load its weights."""
    cfg, _, tensors = read_adapter(adapter_dir)
    apply_lora(model, cfg, modules=cfg.modules)
    params = lora_parameters(model)
    for name, arr in tensors.items():
        if tuple(params[name].shape) != arr.shape:
            raise LoRAError(f"{adapter_dir}: {name} has shape {list(arr.shape)}, the base model needs "
                            f"{list(params[name].shape)}; was it trained on another base?")
        params[name].set_value(arr)
    return cfg

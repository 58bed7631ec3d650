"""The LoRA adapter files (docs/formats/adapter.md), without paddle: tools that only read or rewrite
adapters (ernie-merge) never pay for importing the framework. libernie.lora builds on this."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from libernie.checkpoint.safetensors_io import SafetensorsFile
from libernie.errors import LoRAError

FORMAT, VERSION = "ernie-tools-lora", 1
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
DEFAULT_TARGETS = ("qkv_proj", "o_proj", "up_gate_proj", "down_proj")



@dataclass
class LoRAConfig:
    r: int = 8
    lora_alpha: float | None = None     # None: 2 * r, ERNIEKit's default
    use_rslora: bool = False            # scaling alpha / sqrt(r) instead of alpha / r
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS   # last component of a module name
    modules: list[str] = field(default_factory=list)     # filled by apply_lora

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise LoRAError(f"lora rank must be a positive integer, got {self.r!r}")
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.r
        if not 0.0 <= self.lora_dropout < 1.0:
            raise LoRAError(f"lora dropout must be in [0, 1), got {self.lora_dropout}")
        self.target_modules = tuple(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def config_sha256(model_dir) -> str | None:
    path = os.path.join(os.fspath(model_dir), "config.json")
    return hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.isfile(path) else None


def read_adapter(adapter_dir) -> tuple[LoRAConfig, dict, dict[str, np.ndarray]]:
    """(LoRAConfig, raw config dict, {tensor name: fp32 array}) of an ernie-tools adapter directory."""
    adapter_dir = os.fspath(adapter_dir)
    cpath = os.path.join(adapter_dir, CONFIG_FILE)
    try:
        meta = json.load(open(cpath))
    except FileNotFoundError:
        raise LoRAError(f"{cpath}: not found; pass an adapter directory written by ernie-train") from None
    except json.JSONDecodeError as e:
        raise LoRAError(f"{cpath}: invalid JSON ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise LoRAError(f"{cpath}: format {meta.get('format')!r} v{meta.get('version')} is not {FORMAT} v{VERSION}")
    cfg = LoRAConfig(r=meta["r"], lora_alpha=meta["lora_alpha"], use_rslora=meta.get("use_rslora", False),
                     lora_dropout=meta.get("lora_dropout", 0.0), target_modules=tuple(meta["target_modules"]),
                     modules=list(meta["modules"]))
    st = SafetensorsFile(os.path.join(adapter_dir, WEIGHTS_FILE))
    tensors = {n: np.array(st.get(n), dtype=np.float32) for n in st.names}
    expected = {f"{m}.lora_{x}" for m in cfg.modules for x in "AB"}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)[0]
        raise LoRAError(f"{st.path}: tensor {odd} does not match adapter_config.json modules")
    return cfg, meta, tensors

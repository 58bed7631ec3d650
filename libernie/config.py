"""ErnieConfig: the ERNIE 4.5 dense architecture as a dataclass that reads and writes config.json.

Keys we do not model are kept in `extra` and written back unchanged, so a config survives a
round trip through libernie whichever tool (PaddleFormers, transformers 4/5, FastDeploy) wrote it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from libernie.errors import ConfigError

# config.json `architectures` per checkpoint layout (see docs/formats/checkpoint.md).
ARCHITECTURES = {"hf": "Ernie4_5ForCausalLM", "paddle": "Ernie4_5_ForCausalLM"}


@dataclass
class ErnieConfig:
    vocab_size: int = 103424
    hidden_size: int = 1024
    intermediate_size: int = 3072          # SwiGLU width; up_gate_proj is [hidden, 2*intermediate]
    num_hidden_layers: int = 18
    num_attention_heads: int = 16
    num_key_value_heads: int = 2           # GQA: each kv head serves heads/kv_heads query heads
    head_dim: int = 128                    # independent of hidden/heads: 0.3B has q width 2048 != hidden 1024
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    compression_ratio: float = 1.0         # Paddle-only: RoPE sees position / compression_ratio
    rms_norm_eps: float = 1e-5
    use_bias: bool = False
    tie_word_embeddings: bool = True       # lm_head reuses embed_tokens: logits = h @ E^T
    initializer_range: float = 0.02
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept verbatim on a round trip
    source_keys: frozenset = field(default=frozenset(), compare=False, repr=False)  # keys config.json had

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def validate(self) -> None:
        """Raise ConfigError for a config no ERNIE 4.5 dense model can have."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config: {name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"config: head_dim={self.head_dim} must be even for rotary embeddings")
        if self.hidden_act != "silu":
            raise ConfigError(f"config: hidden_act={self.hidden_act!r} is not supported; ERNIE 4.5 uses 'silu'")
        if self.compression_ratio <= 0:
            raise ConfigError(f"config: compression_ratio must be > 0, got {self.compression_ratio}")

    # ---- config.json ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ErnieConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "source_keys"}
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        present = frozenset(kwargs)  # the keys the file itself had, before anything is derived
        rope = d.get("rope_parameters")  # transformers >= 5 nests rope_theta here
        if isinstance(rope, dict):
            if rope.get("rope_type", "default") != "default":
                raise ConfigError(f"config: rope_type {rope.get('rope_type')!r} is not supported; only 'default'")
            if "rope_theta" in rope:
                kwargs["rope_theta"] = rope["rope_theta"]
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", cls.num_attention_heads)
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = (kwargs.get("hidden_size", cls.hidden_size)
                                  // kwargs.get("num_attention_heads", cls.num_attention_heads))
        for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(kwargs.get(k), list):  # some writers store a list; keep it, use the first
                d[f"_{k}_list"] = kwargs[k]
                kwargs[k] = kwargs[k][0]
        if kwargs.get("pad_token_id") is None:
            kwargs["pad_token_id"] = 0
        try:
            return cls(**kwargs, extra=d, source_keys=present)
        except TypeError as e:
            raise ConfigError(f"config: {e}") from None

    def to_dict(self, layout: str | None = None) -> dict[str, Any]:
        """The config.json dict. `layout` ("hf" or "paddle") sets `architectures` to match the weights."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("extra", "source_keys")}
        extra = dict(self.extra)
        for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
            lst = extra.pop(f"_{k}_list", None)
            if lst is not None and lst[0] == out[k]:
                out[k] = lst
        if isinstance(extra.get("rope_parameters"), dict):
            extra["rope_parameters"] = {**extra["rope_parameters"], "rope_theta": self.rope_theta}
            if "rope_theta" not in self.source_keys:
                del out["rope_theta"]  # transformers 5 style: theta lives only in rope_parameters
        if self.compression_ratio == 1.0 and "compression_ratio" not in self.source_keys:
            del out["compression_ratio"]  # Paddle-only key; transformers has no use for it
        if self.source_keys:  # loaded from a file: add no key it lacked unless its value changed
            defaults = ErnieConfig.__dataclass_fields__
            for k in [k for k in out if k not in self.source_keys and k in defaults]:
                if out[k] == defaults[k].default:
                    del out[k]
        out.update(extra)
        out.setdefault("model_type", "ernie4_5")
        if layout is not None:
            out["architectures"] = [ARCHITECTURES[layout]]
        else:
            out.setdefault("architectures", [ARCHITECTURES["hf"]])
        return out

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ErnieConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, "rb") as f:
                d = json.loads(f.read())
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found; pass a model directory that holds config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: invalid JSON ({e}); fix or regenerate config.json") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        mt = d.get("model_type", "ernie4_5")
        if mt != "ernie4_5":
            raise ConfigError(f"{path}: model_type {mt!r} is not supported yet; expected 'ernie4_5'")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def save(self, out_dir: str | os.PathLike, layout: str | None = None) -> str:
        path = os.path.join(os.fspath(out_dir), "config.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(layout), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
        return path


# ---- presets ---------------------------------------------------------------------------------
def ernie_4_5_0_3b() -> ErnieConfig:
    """ERNIE-4.5-0.3B: 18 layers, hidden 1024, 16 heads / 2 kv heads of 128, tied embeddings."""
    return ErnieConfig()


def ernie_tiny(vocab_size: int = 2048) -> ErnieConfig:
    """A few hundred thousand parameters, for tests and the demo. Keeps GQA and head_dim != hidden/heads."""
    return ErnieConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                       max_position_embeddings=2048, rope_theta=10000.0)


def ernie_small(vocab_size: int = 32000) -> ErnieConfig:
    """The benchmark config: hidden 512, 8 layers, 8 heads / 2 kv heads, intermediate 1408."""
    return ErnieConfig(vocab_size=vocab_size, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                       max_position_embeddings=4096, rope_theta=500000.0)


PRESETS = {"ernie-4.5-0.3b": ernie_4_5_0_3b, "ernie-tiny": ernie_tiny, "ernie-small": ernie_small}

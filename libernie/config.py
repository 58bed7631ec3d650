"""ErnieConfig: the ERNIE 4.5 architecture (dense, and MoE when moe_num_experts > 0) as a dataclass
that reads and writes config.json.

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
MOE_ARCHITECTURE = "Ernie4_5_MoeForCausalLM"  # the same name in both layouts (transformers, FastDeploy)
MODEL_TYPES = {False: "ernie4_5", True: "ernie4_5_moe"}
# MoE fields: written only for an MoE config (or when the file had them), so dense configs are unchanged.
MOE_FIELDS = ("moe_num_experts", "moe_k", "moe_intermediate_size", "moe_num_shared_experts",
              "moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval", "moe_norm_min",
              "moe_use_aux_free", "moe_aux_loss_lambda", "moe_z_loss_lambda")


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
    # ---- mixture of experts (docs/formats/checkpoint.md, "MoE checkpoints"); 0 experts = dense ----
    moe_num_experts: int = 0               # routed experts E per MoE layer
    moe_k: int = 2                         # experts each token is routed to
    moe_intermediate_size: int = 0         # SwiGLU width of one expert (0: intermediate_size)
    moe_num_shared_experts: int = 0        # always-on experts, fused into one MLP of width shared*moe_intermediate
    moe_layer_start_index: int = 0         # layer i is MoE iff (i+1) % interval == 0 and start <= i <= end
    moe_layer_end_index: int | None = -1   # -1 / None: the last layer (kept as written on a round trip)
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12            # routing weights are divided by max(sum of top-k probs, this)
    moe_use_aux_free: bool = False         # a trainer updates e_score_correction_bias after each step
    moe_aux_loss_lambda: float = 1e-5      # load-balancing loss coefficient (ERNIEKit's default)
    moe_z_loss_lambda: float = 0.0         # router z-loss coefficient (0: off)
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

    @property
    def is_moe(self) -> bool:
        return self.moe_num_experts > 0

    @property
    def expert_size(self) -> int:
        """SwiGLU width of one routed expert."""
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def lm_head_bias(self) -> bool:
        """transformers' MoE head (not the dense one) has a bias when use_bias."""
        return self.is_moe and self.use_bias

    @property
    def mtp_layers(self) -> int:
        """Multi-token-prediction heads the checkpoint carries (published MoE configs: num_nextn_predict_layers)."""
        return int(self.extra.get("num_nextn_predict_layers") or 0)

    def is_moe_layer(self, i: int) -> bool:
        """Layer i holds experts iff (i+1) % interval == 0 and start <= i <= end (end -1/None: last layer)."""
        if not self.is_moe or not 0 <= i < self.num_hidden_layers:
            return False
        end = self.moe_layer_end_index
        end = self.num_hidden_layers - 1 if end is None or end < 0 else end
        return (i + 1) % self.moe_layer_interval == 0 and self.moe_layer_start_index <= i <= end

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
        if self.moe_num_experts != 0:
            self._validate_moe()

    def _validate_moe(self) -> None:
        if isinstance(self.moe_num_experts, list):
            raise ConfigError(f"config: moe_num_experts={self.moe_num_experts!r} is a list (multimodal ERNIE-4.5-VL "
                              "experts); only text MoE models are supported")
        for name in ("moe_num_experts", "moe_k", "moe_layer_interval"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config: {name} must be a positive integer, got {v!r}")
        for name in ("moe_intermediate_size", "moe_num_shared_experts", "moe_layer_start_index"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"config: {name} must be a non-negative integer, got {v!r}")
        if self.moe_k > self.moe_num_experts:
            raise ConfigError(f"config: moe_k={self.moe_k} exceeds moe_num_experts={self.moe_num_experts}")
        if self.use_bias and self.tie_word_embeddings:
            raise ConfigError("config: use_bias with tie_word_embeddings is not supported for MoE models (the head "
                              "would need a bias of its own); untie the embeddings or set use_bias false")
        if not self.moe_norm_min > 0:
            raise ConfigError(f"config: moe_norm_min must be > 0, got {self.moe_norm_min}")

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
        if d.get("model_type") == MODEL_TYPES[True] and not kwargs.get("moe_num_experts"):
            raise ConfigError("config: model_type 'ernie4_5_moe' needs moe_num_experts > 0")
        for k in ("moe_intermediate_size", "moe_num_shared_experts", "moe_layer_start_index"):
            if kwargs.get(k) is None and k in kwargs:  # transformers' Optional fields written as null
                del kwargs[k]
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
        if not self.is_moe:  # a dense config gains no MoE keys
            for k in MOE_FIELDS:
                if k not in self.source_keys:
                    del out[k]
        if self.source_keys:  # loaded from a file: add no key it lacked unless its value changed
            defaults = ErnieConfig.__dataclass_fields__
            for k in [k for k in out if k not in self.source_keys and k in defaults]:
                if out[k] == defaults[k].default:
                    del out[k]
        out.update(extra)
        out["model_type"] = MODEL_TYPES[self.is_moe]
        if self.is_moe:
            out["architectures"] = [MOE_ARCHITECTURE]
        elif layout is not None:
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
        if mt not in MODEL_TYPES.values():
            raise ConfigError(f"{path}: model_type {mt!r} is not supported; expected 'ernie4_5' or 'ernie4_5_moe'")
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


def parameter_counts(cfg: ErnieConfig) -> dict[str, int]:
    """{"total", "active"} parameters of a model with this config, without building it (for planning with the
    shapes-only presets). "active" counts the k routed experts a token uses instead of all E; MTP heads the
    config declares are counted in total only (they never run)."""
    h, v = cfg.hidden_size, cfg.vocab_size
    bias = cfg.use_bias
    attn = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 2 * h + bias * (cfg.q_size + 2 * cfg.kv_size + h)

    def mlp(width):
        return 3 * h * width + bias * (2 * width + h)

    expert = 3 * h * cfg.expert_size
    total = active = v * h + h + (0 if cfg.tie_word_embeddings else h * v + cfg.lm_head_bias * v)
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(i):
            common = attn + h * cfg.moe_num_experts + cfg.moe_num_experts  # router + correction bias
            common += mlp(cfg.moe_num_shared_experts * cfg.expert_size) if cfg.moe_num_shared_experts else 0
            total += common + cfg.moe_num_experts * expert
            active += common + cfg.moe_k * expert
        else:
            total += attn + mlp(cfg.intermediate_size)
            active += attn + mlp(cfg.intermediate_size)
    total += cfg.mtp_layers * (2 * h + 2 * h * h + attn + mlp(cfg.intermediate_size))
    return {"total": total, "active": active}


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


def ernie_4_5_21b_a3b(vocab_size: int = 103424) -> ErnieConfig:
    """ERNIE-4.5-21B-A3B shapes (for planning and benchmarks, far too big to build here): 28 layers, hidden
    2560, 20 heads / 4 kv heads of 128; layer 0 dense (12288), layers 1-27 MoE with 64 experts of 1536,
    6 routed per token, 2 shared; aux-free routing bias. As the published config.json."""
    return ErnieConfig(vocab_size=vocab_size, hidden_size=2560, intermediate_size=12288, num_hidden_layers=28,
                       num_attention_heads=20, num_key_value_heads=4, head_dim=128, moe_num_experts=64, moe_k=6,
                       moe_intermediate_size=1536,
                       moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=27,
                       moe_layer_interval=1, moe_use_aux_free=True)


def ernie_tiny_moe(vocab_size: int = 2048) -> ErnieConfig:
    """ernie_tiny with experts: 3 layers, layer 0 dense and layers 1-2 MoE with 8 experts of 48, top-2,
    one shared expert. For tests and the demo."""
    cfg = ernie_tiny(vocab_size)
    cfg.num_hidden_layers = 3
    cfg.moe_num_experts, cfg.moe_k, cfg.moe_intermediate_size = 8, 2, 48
    cfg.moe_num_shared_experts, cfg.moe_layer_start_index = 1, 1
    cfg.moe_use_aux_free = True
    cfg.validate()
    return cfg


PRESETS = {"ernie-4.5-0.3b": ernie_4_5_0_3b, "ernie-tiny": ernie_tiny, "ernie-small": ernie_small,
           "ernie-4.5-21b-a3b": ernie_4_5_21b_a3b, "ernie-tiny-moe": ernie_tiny_moe}

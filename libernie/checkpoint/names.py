"""The name table between the two ERNIE 4.5 checkpoint layouts (docs/formats/checkpoint.md).

paddle: prefix `ernie.`, Linear [in, out], fused qkv_proj = [Q | K | V] and up_gate_proj = [gate | up]
hf:     prefix `model.`, Linear [out, in], separate q/k/v_proj and gate/up_proj

Each Rule maps one Paddle tensor to one or more HF tensors. The MoE block (roadmap) adds rules
for experts, the router and its bias; nothing else here has to change.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from libernie.config import ErnieConfig

SAME, LINEAR, FUSED_LINEAR, FUSED_BIAS = "same", "linear", "fused_linear", "fused_bias"


@dataclass(frozen=True)
class Rule:
    paddle: str                    # the Paddle-layout name
    hf: tuple[str, ...]            # the HF-layout name(s)
    kind: str                      # SAME, LINEAR (transpose), FUSED_LINEAR, FUSED_BIAS
    split: tuple[int, ...] = ()    # for fused kinds: widths of the parts along the output axis
    paddle_shape: tuple[int, ...] = ()

    def hf_shapes(self) -> list[tuple[int, ...]]:
        if self.kind == SAME:
            return [self.paddle_shape]
        if self.kind == LINEAR:
            return [self.paddle_shape[::-1]]
        if self.kind == FUSED_LINEAR:
            return [(w, self.paddle_shape[0]) for w in self.split]
        return [(w,) for w in self.split]


def rules(cfg: ErnieConfig) -> list[Rule]:
    """Every tensor of a dense ERNIE 4.5 checkpoint, in the order we write them."""
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    out = [Rule("ernie.embed_tokens.weight", ("model.embed_tokens.weight",), SAME, (), (cfg.vocab_size, h))]
    for n in range(cfg.num_hidden_layers):
        p, m = f"ernie.layers.{n}.", f"model.layers.{n}."
        out += [
            Rule(p + "input_layernorm.weight", (m + "input_layernorm.weight",), SAME, (), (h,)),
            Rule(p + "self_attn.qkv_proj.weight", tuple(m + f"self_attn.{x}_proj.weight" for x in "qkv"),
                 FUSED_LINEAR, (q, kv, kv), (h, q + 2 * kv)),
            Rule(p + "self_attn.o_proj.weight", (m + "self_attn.o_proj.weight",), LINEAR, (), (q, h)),
            Rule(p + "post_attention_layernorm.weight", (m + "post_attention_layernorm.weight",), SAME, (), (h,)),
            Rule(p + "mlp.up_gate_proj.weight", (m + "mlp.gate_proj.weight", m + "mlp.up_proj.weight"),
                 FUSED_LINEAR, (i, i), (h, 2 * i)),
            Rule(p + "mlp.down_proj.weight", (m + "mlp.down_proj.weight",), LINEAR, (), (i, h)),
        ]
        if cfg.use_bias:
            out += [
                Rule(p + "self_attn.qkv_proj.bias", tuple(m + f"self_attn.{x}_proj.bias" for x in "qkv"),
                     FUSED_BIAS, (q, kv, kv), (q + 2 * kv,)),
                Rule(p + "self_attn.o_proj.bias", (m + "self_attn.o_proj.bias",), SAME, (), (h,)),
                Rule(p + "mlp.up_gate_proj.bias", (m + "mlp.gate_proj.bias", m + "mlp.up_proj.bias"),
                     FUSED_BIAS, (i, i), (2 * i,)),
                Rule(p + "mlp.down_proj.bias", (m + "mlp.down_proj.bias",), SAME, (), (h,)),
            ]
    out.append(Rule("ernie.norm.weight", ("model.norm.weight",), SAME, (), (h,)))
    if not cfg.tie_word_embeddings:
        out.append(Rule("lm_head.weight", ("lm_head.weight",), LINEAR, (), (h, cfg.vocab_size)))
    return out


def ignorable(name: str, cfg: ErnieConfig) -> bool:
    """Tensors a checkpoint may carry that the model derives: a tied head duplicated on disk."""
    return cfg.tie_word_embeddings and name == "lm_head.weight"


def to_hf(rule: Rule, arr: np.ndarray) -> list[np.ndarray]:
    """One Paddle-layout array -> the HF-layout arrays of `rule.hf`, in order."""
    if rule.kind == SAME:
        return [arr]
    if rule.kind == LINEAR:
        return [arr.T]
    parts = np.split(arr, np.cumsum(rule.split)[:-1], axis=-1)
    return [p.T for p in parts] if rule.kind == FUSED_LINEAR else parts


def to_paddle(rule: Rule, arrs: list[np.ndarray]) -> np.ndarray:
    """The HF-layout arrays of `rule.hf` -> one Paddle-layout array."""
    if rule.kind == SAME:
        return arrs[0]
    if rule.kind == LINEAR:
        return arrs[0].T
    if rule.kind == FUSED_LINEAR:
        return np.concatenate([a.T for a in arrs], axis=1)
    return np.concatenate(arrs, axis=0)


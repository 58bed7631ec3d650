"""The name table between the two ERNIE 4.5 checkpoint layouts (docs/formats/checkpoint.md).

paddle: prefix `ernie.`, Linear [in, out], fused qkv_proj = [Q | K | V] and up_gate_proj = [gate | up]
hf:     prefix `model.`, Linear [out, in], separate q/k/v_proj and gate/up_proj

Each Rule maps one Paddle tensor to one or more HF tensors. MoE layers swap the dense MLP rows for
the router, its correction bias, the routed experts and the shared experts (same kinds of rows).
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
    fp32: bool = False             # always stored as F32, whatever dtype the rest is written in (MoE router)
    optional: bool = False         # may be absent on disk: then it loads as zeros (correction bias)

    def hf_shapes(self) -> list[tuple[int, ...]]:
        if self.kind == SAME:
            return [self.paddle_shape]
        if self.kind == LINEAR:
            return [self.paddle_shape[::-1]]
        if self.kind == FUSED_LINEAR:
            return [(w, self.paddle_shape[0]) for w in self.split]
        return [(w,) for w in self.split]


def _mlp(p: str, m: str, h: int, i: int, bias: bool) -> list[Rule]:
    """A SwiGLU MLP of width i under Paddle prefix p / HF prefix m (dense MLP, one expert, shared experts)."""
    out = [Rule(p + "up_gate_proj.weight", (m + "gate_proj.weight", m + "up_proj.weight"), FUSED_LINEAR, (i, i),
                (h, 2 * i)),
           Rule(p + "down_proj.weight", (m + "down_proj.weight",), LINEAR, (), (i, h))]
    if bias:
        out += [Rule(p + "up_gate_proj.bias", (m + "gate_proj.bias", m + "up_proj.bias"), FUSED_BIAS, (i, i), (2 * i,)),
                Rule(p + "down_proj.bias", (m + "down_proj.bias",), SAME, (), (h,))]
    return out


def _moe(p: str, m: str, cfg: ErnieConfig) -> list[Rule]:
    """An MoE block under p = `ernie.layers.L.mlp.` / m = `model.layers.L.mlp.`."""
    h, e, w = cfg.hidden_size, cfg.moe_num_experts, cfg.expert_size
    out = [Rule(p + "gate.weight", (m + "gate.weight",), LINEAR, (), (h, e), fp32=True),
           Rule(p + "moe_statics.e_score_correction_bias", (m + "moe_statics.e_score_correction_bias",), SAME, (),
                (1, e), fp32=True, optional=True)]
    for x in range(e):  # routed experts have no biases (as transformers)
        out += _mlp(f"{p}experts.{x}.", f"{m}experts.{x}.", h, w, False)
    if cfg.moe_num_shared_experts:
        out += _mlp(p + "shared_experts.", m + "shared_experts.", h, cfg.moe_num_shared_experts * w, cfg.use_bias)
    return out


def _layer(p: str, m: str, cfg: ErnieConfig, moe: bool) -> list[Rule]:
    """One decoder layer under p = `ernie.layers.L.` / m = `model.layers.L.` (or an MTP block)."""
    h, q, kv = cfg.hidden_size, cfg.q_size, cfg.kv_size
    out = [
        Rule(p + "input_layernorm.weight", (m + "input_layernorm.weight",), SAME, (), (h,)),
        Rule(p + "self_attn.qkv_proj.weight", tuple(m + f"self_attn.{x}_proj.weight" for x in "qkv"),
             FUSED_LINEAR, (q, kv, kv), (h, q + 2 * kv)),
        Rule(p + "self_attn.o_proj.weight", (m + "self_attn.o_proj.weight",), LINEAR, (), (q, h)),
        Rule(p + "post_attention_layernorm.weight", (m + "post_attention_layernorm.weight",), SAME, (), (h,)),
    ]
    if cfg.use_bias:
        out += [
            Rule(p + "self_attn.qkv_proj.bias", tuple(m + f"self_attn.{x}_proj.bias" for x in "qkv"),
                 FUSED_BIAS, (q, kv, kv), (q + 2 * kv,)),
            Rule(p + "self_attn.o_proj.bias", (m + "self_attn.o_proj.bias",), SAME, (), (h,)),
        ]
    return out + (_moe(p + "mlp.", m + "mlp.", cfg) if moe
                  else _mlp(p + "mlp.", m + "mlp.", h, cfg.intermediate_size, cfg.use_bias))


def rules(cfg: ErnieConfig) -> list[Rule]:
    """Every tensor of an ERNIE 4.5 checkpoint (dense or MoE), in the order we write them."""
    h = cfg.hidden_size
    out = [Rule("ernie.embed_tokens.weight", ("model.embed_tokens.weight",), SAME, (), (cfg.vocab_size, h))]
    for n in range(cfg.num_hidden_layers):
        out += _layer(f"ernie.layers.{n}.", f"model.layers.{n}.", cfg, cfg.is_moe_layer(n))
    out.append(Rule("ernie.norm.weight", ("model.norm.weight",), SAME, (), (h,)))
    for n in range(cfg.mtp_layers):  # multi-token-prediction heads: a dense layer + two norms + [2h -> h]
        out += [Rule(f"ernie.mtp_{x}_norm.{n}.weight", (f"model.mtp_{x}_norm.{n}.weight",), SAME, (), (h,))
                for x in ("emb", "hidden")]
        out.append(Rule(f"ernie.mtp_linear_proj.{n}.weight", (f"model.mtp_linear_proj.{n}.weight",), LINEAR, (),
                        (2 * h, h)))
        out += _layer(f"ernie.mtp_block.{n}.", f"model.mtp_block.{n}.", cfg, False)
    if not cfg.tie_word_embeddings:
        out.append(Rule("lm_head.weight", ("lm_head.weight",), LINEAR, (), (h, cfg.vocab_size)))
        if cfg.lm_head_bias:
            out.append(Rule("lm_head.bias", ("lm_head.bias",), SAME, (), (cfg.vocab_size,)))
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


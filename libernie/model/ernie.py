"""ERNIE 4.5 decoder in Paddle (dense; MoE layers swap the MLP for libernie.model.moe.MoEBlock), read top to bottom:
RMSNorm -> RoPE -> Attention -> MLP -> DecoderLayer -> ErnieModel -> ErnieForCausalLM.

Parameter names and shapes are the Paddle checkpoint layout (prefix `ernie.`, Linear [in, out],
fused qkv_proj and up_gate_proj), so a Paddle checkpoint loads without renaming and an HF one
goes through libernie.checkpoint's name table. Shapes: b batch, s new tokens, t cached + new
tokens, h hidden, nh/nkv query/kv heads, hd head_dim, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.nn as nn

from libernie.config import ErnieConfig
from libernie.kernels import attention, build_attention_mask, rms_norm, rope_cos_sin
from libernie.model.cache import KVCache
from libernie.model.grad_ops import apply_rope_train, swiglu_train  # the kernels, with a leaner backward
from libernie.model.loss import causal_lm_loss
from libernie.model.moe import MoEBlock


def _linear(cfg: ErnieConfig, n_in: int, n_out: int) -> nn.Linear:
    init = nn.initializer.Normal(std=cfg.initializer_range)
    bias = paddle.ParamAttr(initializer=nn.initializer.Constant(0.0)) if cfg.use_bias else False
    return nn.Linear(n_in, n_out, weight_attr=paddle.ParamAttr(initializer=init), bias_attr=bias)  # W [in, out]


class RMSNorm(nn.Layer):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = self.create_parameter([hidden], default_initializer=nn.initializer.Constant(1.0))
        self.eps = eps

    def forward(self, x):                                   # [..., h] -> [..., h]
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Layer):
    def __init__(self, cfg: ErnieConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.qkv_proj = _linear(cfg, cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size)  # [Q | K | V]
        self.o_proj = _linear(cfg, cfg.q_size, cfg.hidden_size)

    def forward(self, x, rope, mask, cache: KVCache | None = None):
        cfg = self.cfg
        b, s, _ = x.shape
        qkv = self.qkv_proj(x)                                               # [b, s, q + 2kv]
        q, k, v = paddle.split(qkv, [cfg.q_size, cfg.kv_size, cfg.kv_size], axis=-1)
        q = q.reshape([b, s, cfg.num_attention_heads, cfg.head_dim])         # [b, s, nh, hd]
        k = k.reshape([b, s, cfg.num_key_value_heads, cfg.head_dim])         # [b, s, nkv, hd]
        v = v.reshape([b, s, cfg.num_key_value_heads, cfg.head_dim])         # [b, s, nkv, hd]
        q, k = apply_rope_train(q, *rope["q"]), apply_rope_train(k, *rope["k"])
        k = k.transpose([0, 2, 1, 3]).contiguous()                           # [b, nkv, s, hd]
        v = v.transpose([0, 2, 1, 3]).contiguous()                           # [b, nkv, s, hd]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                        # [b, nkv, t, hd]
        out = attention(q, k, v, mask)                                       # [b, s, nh, hd]
        return self.o_proj(out.reshape([b, s, cfg.q_size]))                  # [b, s, h]


class MLP(nn.Layer):
    """SwiGLU. Swappable: the MoE block (libernie/model/moe.py) replaces this module and nothing else."""

    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.up_gate_proj = _linear(cfg, cfg.hidden_size, 2 * cfg.intermediate_size)  # [gate | up]
        self.down_proj = _linear(cfg, cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):                                                    # [b, s, h]
        return self.down_proj(swiglu_train(self.up_gate_proj(x)))           # [b, s, 2i] -> [b, s, h]


class DecoderLayer(nn.Layer):
    def __init__(self, cfg: ErnieConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MoEBlock(cfg, layer_idx) if cfg.is_moe_layer(layer_idx) else MLP(cfg)  # [b, s, h] -> same
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rope, mask, cache=None):                          # pre-norm residual block
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def default_position_ids(b: int, s: int, *, doc_ids=None, key_padding=None, past: int = 0) -> paddle.Tensor:
    """Positions [b, s]: restart at 0 at each document start (doc_ids), skip left padding
    (key_padding [b, t]), or continue after `past` cached tokens."""
    if doc_ids is not None:
        pos = paddle.arange(s, dtype="int64").unsqueeze(0).expand([b, s])
        starts = paddle.concat([paddle.ones([b, 1], dtype="bool"), doc_ids[:, 1:] != doc_ids[:, :-1]], axis=1)
        first = paddle.cummax(paddle.where(starts, pos, paddle.zeros_like(pos)), axis=1)[0]
        return pos - first
    if key_padding is not None:
        pos = paddle.cumsum(key_padding.astype("int64"), axis=1) - 1          # [b, t]
        return paddle.clip(pos[:, -s:], min=0)
    return (paddle.arange(s, dtype="int64") + past).unsqueeze(0).expand([b, s])


class ErnieModel(nn.Layer):
    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, weight_attr=paddle.ParamAttr(
            initializer=nn.initializer.Normal(std=cfg.initializer_range)))
        self.layers = nn.LayerList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.mtp_layers:  # multi-token-prediction heads of published MoE checkpoints: carried, never run
            n, h = cfg.mtp_layers, cfg.hidden_size
            self.mtp_emb_norm = nn.LayerList([RMSNorm(h, cfg.rms_norm_eps) for _ in range(n)])
            self.mtp_hidden_norm = nn.LayerList([RMSNorm(h, cfg.rms_norm_eps) for _ in range(n)])
            self.mtp_linear_proj = nn.LayerList([nn.Linear(2 * h, h, bias_attr=False, weight_attr=paddle.ParamAttr(
                initializer=nn.initializer.Normal(std=cfg.initializer_range))) for _ in range(n)])  # [2h, h]
            self.mtp_block = nn.LayerList([DecoderLayer(cfg, cfg.num_hidden_layers + i) for i in range(n)])

    def forward(self, input_ids, position_ids=None, doc_ids=None, attention_mask=None, cache=None, roles=None):
        """input_ids [b, s] -> final hidden states [b, s, h].

        doc_ids [b, s]: packed documents; attention stays inside each, positions restart.
        roles [b, s]: shard segment roles of packed DPO pairs; a rejected token never sees chosen ones
        (pass position_ids too: rejected positions restart at the prompt's end).
        attention_mask [b, t]: 1 on real tokens, 0 on (left) padding, over cached + new tokens.
        cache: a KVCache to read and extend (incremental decoding).
        """
        b, s = input_ids.shape
        past = cache.seq_len if cache is not None else 0
        rope, mask = self.rope_and_mask(b, s, position_ids, doc_ids, attention_mask, past, roles)
        x = self.embed_tokens(input_ids)                                     # [b, s, h]
        for layer in self.layers:
            x = layer(x, rope, mask, cache)
        return self.norm(x)

    def rope_and_mask(self, b: int, s: int, position_ids=None, doc_ids=None, attention_mask=None, past: int = 0,
                      roles=None):
        """(rope, mask) that every DecoderLayer of one forward shares; also used to run layers one at a
        time (libernie.quant.gptq_model). Arguments as in forward; past = tokens already in the cache."""
        if position_ids is None:
            position_ids = default_position_ids(b, s, doc_ids=doc_ids, key_padding=attention_mask, past=past)
        cfg = self.cfg
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.compression_ratio)  # [b, s, 1, hd]
        # Expanded once per forward, not per layer: Paddle's CPU broadcasting is slow.
        rope = {"q": (cos.expand([b, s, cfg.num_attention_heads, cfg.head_dim]),
                      sin.expand([b, s, cfg.num_attention_heads, cfg.head_dim])),
                "k": (cos.expand([b, s, cfg.num_key_value_heads, cfg.head_dim]),
                      sin.expand([b, s, cfg.num_key_value_heads, cfg.head_dim]))}
        mask = build_attention_mask(s, past + s, doc_ids=doc_ids, key_padding=attention_mask, roles=roles)
        return rope, mask


@dataclass
class CausalLMOutput:
    logits: paddle.Tensor                  # [b, s, V] (or [b, k, V] with logits_to_keep=k)
    loss: paddle.Tensor | None = None
    cache: KVCache | None = None


class ErnieForCausalLM(nn.Layer):
    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.config = cfg
        self.ernie = ErnieModel(cfg)
        if not cfg.tie_word_embeddings:    # Paddle layout stores an untied head as [h, V]
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias_attr=cfg.lm_head_bias,  # bias: MoE only
                                     weight_attr=paddle.ParamAttr(
                                         initializer=nn.initializer.Normal(std=cfg.initializer_range)))

    def forward(self, input_ids, labels=None, loss_mask=None, position_ids=None, doc_ids=None,
                attention_mask=None, cache: KVCache | None = None, logits_to_keep: int = 0,
                roles=None) -> CausalLMOutput:
        """input_ids [b, s] -> CausalLMOutput(logits [b, s, V], loss if labels given, cache).

        labels [b, s] are aligned with input_ids (shifted inside); loss_mask [b, s] selects targets.
        logits_to_keep=k computes logits for the last k positions only (decoding).
        """
        h = self.ernie(input_ids, position_ids, doc_ids, attention_mask, cache, roles)  # [b, s, h]
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.logits(h)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, loss_mask=loss_mask, doc_ids=doc_ids)
        return CausalLMOutput(logits=logits, loss=loss, cache=cache)

    def logits(self, h):                                                     # [b, s, h] -> [b, s, V]
        if not self.config.tie_word_embeddings:
            return self.lm_head(h)                                           # nn.Linear or a QuantLinear
        emb = self.ernie.embed_tokens
        if isinstance(emb, nn.Embedding):
            return paddle.matmul(h, emb.weight, transpose_y=True)            # one matmul: training's path
        from libernie.quant.linear import vocab_logits                       # a quantized embedding (QuantEmbedding):
        return vocab_logits(h, emb.qweight, emb.scale)                       # int8 rows widened in vocabulary blocks

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    # ---- checkpoints: one loading path for every tool (libernie.checkpoint) -------------------
    @classmethod
    def from_pretrained(cls, path, dtype: str | None = None, adapter=None) -> "ErnieForCausalLM":
        """Load a checkpoint directory in either layout, plus an optional LoRA adapter directory.
        dtype None: fp32 on CPU, the checkpoint's on GPU."""
        from libernie.checkpoint import load_model
        model = load_model(cls, path, dtype=dtype)
        if adapter is not None:
            from libernie.lora import load_adapter
            load_adapter(model, adapter)
            model.eval()
        return model

    def save_pretrained(self, out_dir, layout: str = "hf", max_shard_size: str | int = "5GB",
                        dtype: str | None = None) -> None:
        """Write sharded safetensors + index + config.json in `layout` ("hf" or "paddle"), atomically."""
        from libernie.checkpoint import save_model
        save_model(self, out_dir, layout=layout, max_shard_size=max_shard_size, dtype=dtype)

    def generate(self, prompts, **kwargs):
        """See libernie.generate.generate."""
        from libernie.generate import generate
        return generate(self, prompts, **kwargs)

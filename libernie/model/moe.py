"""ERNIE 4.5 mixture-of-experts block: the drop-in replacement for the dense MLP in MoE layers.

Read top to bottom: route (the gate math) -> SwiGLUExpert -> MoEGate / MoEStatics -> LocalDispatch
(the expert-parallel seam) -> MoEBlock -> training helpers (router loss, load statistics, aux-free bias
update). Shapes: T tokens (b*s), h hidden, E routed experts, k experts per token, m expert width.

The gate, in fp32 whatever the model dtype:
    p   = softmax(x @ Wg)                                    [T, E]
    idx = topk(p + e_score_correction_bias, k)               [T, k]   the bias only SELECTS experts
    w   = gather(p, idx) / max(sum(gather(p, idx)), norm_min) [T, k]  the weights are the unbiased p
    out = sum_j w[:, j] * Expert_idx[:, j](x) + Shared(x)

Dispatch is sort-based: the T*k (token, expert) pairs are sorted by expert, each expert runs once on its
contiguous rows (a Python loop over experts, never over tokens), and the rows are un-sorted and summed.

A trainer's step with an MoE model (nothing here runs unless it is called; ernie-train's ernie_train/moe.py):
    set_token_mask(model, doc_ids >= 0)            # padding out of the router loss and the load
    loss = lm_loss + router_loss(model)            # after the forward; None for a dense model
    with load_count_paused(model): loss.backward() # recompute re-runs forwards in backward: count once
    optimizer.step()
    stats = expert_load_stats(model)               # per layer: tokens per expert, min/max ratio -> metrics
    update_correction_bias(model, coef=1e-3, all_reduce=...)   # moe_use_aux_free; resets the load counters
"""
from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from libernie.config import ErnieConfig
from libernie.model.grad_ops import swiglu_train  # the kernel, with a leaner backward when training on CPU


def route(probs: paddle.Tensor, bias: paddle.Tensor, k: int, norm_min: float):
    """probs [T, E] fp32, bias [1, E] fp32 -> (idx [T, k] int64, weights [T, k] fp32).
    Experts are selected by top-k of probs + bias; weights are the unbiased probs, renormalised."""
    _, idx = paddle.topk(probs + bias, k, axis=-1)                      # [T, k]
    w = paddle.take_along_axis(probs, idx, axis=-1)                     # [T, k]
    return idx, w / paddle.clip(w.sum(axis=-1, keepdim=True), min=norm_min)


class SwiGLUExpert(nn.Layer):
    """One SwiGLU MLP of width `width`: down(silu(gate) * up), gate FIRST in the fused up_gate_proj [h, 2w].
    The same parameter names as the dense MLP, so LoRA targets (up_gate_proj, down_proj) reach experts too."""

    def __init__(self, cfg: ErnieConfig, width: int, bias: bool = False):
        super().__init__()
        init = paddle.ParamAttr(initializer=nn.initializer.Normal(std=cfg.initializer_range))
        b = paddle.ParamAttr(initializer=nn.initializer.Constant(0.0)) if bias else False
        self.up_gate_proj = nn.Linear(cfg.hidden_size, 2 * width, weight_attr=init, bias_attr=b)  # [h, 2w]
        init = paddle.ParamAttr(initializer=nn.initializer.Normal(std=cfg.initializer_range))
        b = paddle.ParamAttr(initializer=nn.initializer.Constant(0.0)) if bias else False
        self.down_proj = nn.Linear(width, cfg.hidden_size, weight_attr=init, bias_attr=b)         # [w, h]

    def forward(self, x):                                                    # [n, h] -> [n, h]
        return self.down_proj(swiglu_train(self.up_gate_proj(x)))


class _Fp32Layer(nn.Layer):
    """Parameters that stay fp32 when the model is cast (model.to(dtype=bf16)): routing flips on rounding."""

    def _apply(self, func, device, dtype, blocking, include_sublayers=True):
        return super()._apply(func, device, None, blocking, include_sublayers)


class MoEGate(_Fp32Layer):
    """The router: weight [h, E] fp32 (Paddle layout; HF stores [E, h]). Not an nn.Linear on purpose, so
    LoRA and weight quantization, which look for Linears, leave it alone."""

    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.weight = self.create_parameter([cfg.hidden_size, cfg.moe_num_experts], dtype="float32",
                                            default_initializer=nn.initializer.Normal(std=cfg.initializer_range))

    def forward(self, x):                                                    # [T, h] -> logits [T, E] fp32
        # AMP (GPU bf16 training) would cast this matmul down; paddle's autocast is a no-op on CPU, so this
        # guard is not exercised by the CPU tests.
        with paddle.amp.auto_cast(enable=False):
            return paddle.matmul(x.astype("float32"), self.weight)


class MoEStatics(_Fp32Layer):
    """e_score_correction_bias [1, E] fp32: added to the probabilities for selection only. Not trained by
    gradients (stop_gradient); moved by update_correction_bias() between steps when moe_use_aux_free."""

    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.e_score_correction_bias = self.create_parameter(
            [1, cfg.moe_num_experts], dtype="float32", default_initializer=nn.initializer.Constant(0.0))
        self.e_score_correction_bias.stop_gradient = True


class LocalDispatch:
    """Where tokens meet experts: the seam for expert parallelism (roadmap, not built).

    dispatch(rows, counts) receives the (token, expert) rows sorted by expert and the rows per expert
    [E]; it returns the rows and counts this rank's experts must process. combine(rows) returns the
    processed rows to the order dispatch received them in. Here every expert is local, so both are the
    identity. An expert-parallel version with ep ranks owning E/ep experts each would all_to_all the
    counts, then the rows (split by the owning rank), run only its local experts, and all_to_all the
    results back in combine; it lives in the distributed wrapper and is handed to MoEBlock.dispatcher,
    so this model file never imports paddle.distributed.
    """
    first_expert = 0  # index of this rank's first local expert

    def dispatch(self, rows: paddle.Tensor, counts: np.ndarray) -> tuple[paddle.Tensor, np.ndarray]:
        return rows, counts

    def combine(self, rows: paddle.Tensor) -> paddle.Tensor:
        return rows


class MoEBlock(nn.Layer):
    """Routed experts + shared experts; replaces MLP in layers where cfg.is_moe_layer(i).

    After a forward in training mode it holds `aux_loss` (load balancing, E * sum_e mean_t p_te * n_e / T,
    n_e = tokens dispatched to e) and `z_loss` (mean_t logsumexp(logits_t)^2, when moe_z_loss_lambda > 0),
    both scalars in the graph, and adds the tokens per expert to `load` (numpy [E], since the last reset).
    """

    def __init__(self, cfg: ErnieConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.num_experts, self.k = cfg.moe_num_experts, cfg.moe_k
        self.gate = MoEGate(cfg)
        self.moe_statics = MoEStatics(cfg)
        self.experts = nn.LayerList([SwiGLUExpert(cfg, cfg.expert_size) for _ in range(cfg.moe_num_experts)])
        self.shared_experts = (SwiGLUExpert(cfg, cfg.moe_num_shared_experts * cfg.expert_size, bias=cfg.use_bias)
                               if cfg.moe_num_shared_experts else None)
        self.dispatcher = LocalDispatch()
        self.load = np.zeros(cfg.moe_num_experts, dtype=np.int64)
        self.aux_loss = self.z_loss = None
        self.token_mask = None    # [b, s] bool, set by set_token_mask: False = padding, left out of loss and load
        self.count_load = True    # False while activation recompute re-runs this forward in backward

    def forward(self, x):                                                    # [b, s, h] -> [b, s, h]
        b, s, h = x.shape
        xf = x.reshape([b * s, h])                                           # [T, h]
        logits = self.gate(xf)                                               # [T, E] fp32
        probs = F.softmax(logits, axis=-1, dtype="float32")                  # [T, E] fp32, also under AMP
        bias = self.moe_statics.e_score_correction_bias                      # [1, E]
        idx, w = route(probs, bias, self.k, self.cfg.moe_norm_min)           # [T, k], [T, k]
        flat = idx.reshape([-1])                                             # [T*k] expert of each pair
        counts = np.bincount(flat.numpy(), minlength=self.num_experts)       # [E] rows per expert
        order = paddle.argsort(flat, stable=True)                            # [T*k] pairs sorted by expert
        rows = paddle.gather(xf, order // self.k)                            # [T*k, h] token of each pair
        rows, local_counts = self.dispatcher.dispatch(rows, counts)
        # split, not slicing: a slice's backward writes a zero tensor the size of all rows, once per expert
        hit = [j for j, n in enumerate(local_counts.tolist()) if n]
        chunks = paddle.split(rows, [int(local_counts[j]) for j in hit]) if len(hit) > 1 else [rows]
        outs = [self.experts[self.dispatcher.first_expert + j](c) for j, c in zip(hit, chunks)]  # loop over experts
        rows = self.dispatcher.combine(paddle.concat(outs) if len(outs) > 1 else outs[0])  # [T*k, h]
        rows = paddle.gather(rows, paddle.argsort(order))                    # [T*k, h] back in pair order
        out = (rows.reshape([b * s, self.k, h]) * w.astype(rows.dtype).unsqueeze(-1)).sum(axis=1)  # [T, h]
        if self.shared_experts is not None:
            out = out + self.shared_experts(xf)
        idle = [p for j, n in enumerate(local_counts.tolist()) if not n
                for p in self.experts[self.dispatcher.first_expert + j].parameters() if not p.stop_gradient]
        if idle and self.training and paddle.is_grad_enabled():    # frozen experts (LoRA) get no gradient anyway
            # an expert no token chose still gets a (zero) gradient: the optimizer and data-parallel
            # gradient reduction then see the same parameters every step, and a resumed run matches
            out = out + paddle.add_n([p.sum() for p in idle]).astype(out.dtype) * 0.0
        if self.training and paddle.is_grad_enabled():  # no_grad forwards (a DPO reference) count nothing
            self._router_losses(logits, probs, idx)
        return out.reshape([b, s, h])

    def _router_losses(self, logits, probs, idx):
        """aux and z losses of this forward (ERNIEKit's definitions), and the load accumulator, over the
        tokens token_mask keeps (all when it is None)."""
        if self.token_mask is not None:
            keep = paddle.nonzero(self.token_mask.reshape([-1])).flatten()      # [T'] real tokens
            logits, probs, idx = (paddle.gather(a, keep) for a in (logits, probs, idx))
        counts = np.bincount(idx.reshape([-1]).numpy(), minlength=self.num_experts)  # [E]
        if self.count_load:
            self.load += counts
        t = float(max(probs.shape[0], 1))
        if self.cfg.moe_use_aux_free:  # ERNIEKit counts the balance loss on top-k of the UNBIASED p here
            counts = np.bincount(paddle.topk(probs, self.k, axis=-1)[1].reshape([-1]).numpy(),
                                 minlength=self.num_experts)
        ce = paddle.to_tensor(counts.astype(np.float32) / t)                # [E] share of tokens, no grad
        self.aux_loss = (probs.mean(axis=0) * ce).sum() * float(self.num_experts)
        self.z_loss = (paddle.logsumexp(logits, axis=-1) ** 2).mean() if self.cfg.moe_z_loss_lambda > 0 else None


# ---- training helpers: a trainer calls these; nothing here runs unless it does ---------------------------
def moe_blocks(model: nn.Layer) -> list[MoEBlock]:
    return [m for m in [model, *model.sublayers()] if isinstance(m, MoEBlock)]


def set_token_mask(model: nn.Layer, mask: paddle.Tensor | None) -> None:
    """mask [b, s] bool (True = a real token) for the next training forwards: padding is left out of the
    aux / z losses and the load counts (ERNIEKit masks padding in its gate too). None: every token."""
    for blk in moe_blocks(model):
        blk.token_mask = mask


@contextlib.contextmanager
def load_count_paused(model: nn.Layer):
    """Activation recompute re-runs each block's forward during backward; wrap backward in this so the
    tokens of a micro-batch are counted once."""
    blocks = moe_blocks(model)
    for blk in blocks:
        blk.count_load = False
    try:
        yield
    finally:
        for blk in blocks:
            blk.count_load = True


def router_loss(model: nn.Layer) -> paddle.Tensor | None:
    """sum over MoE layers of moe_aux_loss_lambda * aux + moe_z_loss_lambda * z, from the last training
    forward; None for a dense model or before any training forward. Add it to the LM loss."""
    total = None
    for blk in moe_blocks(model):
        if blk.aux_loss is None:
            continue
        term = blk.aux_loss * blk.cfg.moe_aux_loss_lambda
        if blk.z_loss is not None:
            term = term + blk.z_loss * blk.cfg.moe_z_loss_lambda
        total = term if total is None else total + term
    return total


def expert_load_stats(model: nn.Layer, reset: bool = False) -> dict[str, dict]:
    """Tokens routed to each expert per MoE layer since the last reset (training forwards only):
    {"layer.L": {"tokens": [n_0..n_E-1], "min_max_ratio": min/max (1.0 = perfectly balanced)}}."""
    out = {}
    for blk in moe_blocks(model):
        mx = int(blk.load.max())
        out[f"layer.{blk.layer_idx}"] = {"tokens": blk.load.tolist(),
                                         "min_max_ratio": float(blk.load.min()) / mx if mx else 1.0}
        if reset:
            blk.load[:] = 0
    return out


def update_correction_bias(model: nn.Layer, coef: float = 1e-3,
                           all_reduce: Callable[[np.ndarray], np.ndarray] | None = None,
                           reset: bool = True) -> None:
    """The aux-free balancing step, after each optimizer step: bias += coef * sign(mean(load) - load).

    Sign convention: an expert that received MORE tokens than the mean gets its bias LOWERED by coef (it
    is selected less often next step); one below the mean is raised; one exactly at the mean is unchanged.
    `load` is the tokens per expert accumulated since the last update (all micro-batches of the step).
    all_reduce: sums a numpy [E] over data-parallel ranks, so every rank applies the same update
    (the distributed wrapper passes it; None on one process). Only MoE layers of a model whose config
    has moe_use_aux_free move; others are left alone.
    """
    for blk in moe_blocks(model):
        if not blk.cfg.moe_use_aux_free:
            continue
        load = blk.load.astype(np.float64)
        if all_reduce is not None:
            load = np.asarray(all_reduce(load), dtype=np.float64)
        delta = coef * np.sign(load.mean() - load)                           # [E]
        bias = blk.moe_statics.e_score_correction_bias
        bias.set_value(bias.numpy() + delta.astype(np.float32)[None, :])
        if reset:
            blk.load[:] = 0

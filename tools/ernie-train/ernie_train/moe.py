"""Mixture-of-experts hooks of the training loop; a no-op for a dense model.

Per micro-batch: padding is masked out of the router (libernie.model.moe.set_token_mask), the router
loss (moe_aux_loss_lambda x aux + moe_z_loss_lambda x z, summed over MoE layers) is added to the
micro-batch's loss divided by the number of micro-batches (so DataParallel's gradient mean over ranks
gives the mean over every micro-batch of the global batch), and backward runs with load counting paused
(activation recompute re-runs the forward there; tokens must be counted once).

Per optimizer step: the tokens routed to each expert are summed over ranks in ONE all-reduce, so every
rank holds the same global load. When the model config has moe_use_aux_free and the guard applied the
step, each MoE layer's e_score_correction_bias moves by coef x sign(mean(load) - load): an overloaded
expert's bias goes DOWN. A skipped step (divergence guard) moves nothing. With --lora the bias stays
frozen with the rest of the base model (an adapter carries only LoRA weights, so a moved bias could
not be saved or merged).

metrics.jsonl gains, at each logged step, the global load over the steps since the last log:
"moe_load": {"layer.L": {"tokens": [n_0, ...], "min_max_ratio": min/max}}, "moe_min_max_ratio" (the
lowest over layers: 1.0 is perfectly balanced) and "router_loss" (mean per micro-batch).
"""
from __future__ import annotations

import contextlib

import numpy as np

from libernie.model.moe import (load_count_paused, moe_blocks, router_loss, set_token_mask,
                                update_correction_bias)

from ernie_train import dist


class MoEHooks:
    def __init__(self, model, cfg, info):
        self.model, self.info = model, info
        self.blocks = moe_blocks(model)
        self.active = bool(self.blocks)
        if self.active:
            for c in [model.config, *(b.cfg for b in self.blocks)]:  # recorded in every checkpoint's config
                if cfg.moe_aux_loss_lambda is not None:
                    c.moe_aux_loss_lambda = cfg.moe_aux_loss_lambda
                if cfg.moe_z_loss_lambda is not None:
                    c.moe_z_loss_lambda = cfg.moe_z_loss_lambda
        self.coef = 0.0 if cfg.lora else cfg.moe_aux_free_coef
        self.window = [np.zeros(b.num_experts) for b in self.blocks]   # global load since the last log
        self.router_sum = self.router_n = 0.0
        self.step_router = 0.0

    def before_forward(self, doc_ids) -> None:
        if self.active:
            set_token_mask(self.model, doc_ids >= 0)                   # [b, s] False on padding

    def loss(self, micro_loss, n_micro: int):
        """micro_loss + router loss / n_micro (the router loss of the forward just run)."""
        if not self.active:
            return micro_loss
        r = router_loss(self.model)
        if r is None:
            return micro_loss
        self.step_router += float(r)
        return micro_loss + r.astype(micro_loss.dtype) / float(n_micro)

    def backward_context(self):
        return load_count_paused(self.model) if self.active else contextlib.nullcontext()

    def after_step(self, applied: bool, n_micro: int) -> None:
        """One all-reduce of every layer's load (+ the router loss); the bias update when applied."""
        if not self.active:
            return
        sizes = [b.num_experts for b in self.blocks]
        flat = dist.all_reduce_sum([float(x) for b in self.blocks for x in b.load] + [self.step_router / n_micro],
                                   self.info)
        self.router_sum += flat[-1] / self.info.world_size
        self.router_n += 1
        self.step_router = 0.0
        for b, w, load in zip(self.blocks, self.window, np.split(np.asarray(flat[:-1]), np.cumsum(sizes)[:-1])):
            w += load
            b.load[:] = np.rint(load).astype(np.int64)
        if applied and self.coef > 0:
            update_correction_bias(self.model, coef=self.coef, reset=False)  # only layers with moe_use_aux_free
        for b in self.blocks:
            b.load[:] = 0

    def metrics(self) -> dict:
        """The load since the last call, per MoE layer; resets the window."""
        if not self.active:
            return {}
        load = {}
        for b, w in zip(self.blocks, self.window):
            mx = float(w.max())
            load[f"layer.{b.layer_idx}"] = {"tokens": [int(x) for x in w],
                                            "min_max_ratio": float(w.min()) / mx if mx else 1.0}
            w[:] = 0
        out = {"moe_load": load, "moe_min_max_ratio": min(v["min_max_ratio"] for v in load.values()),
               "router_loss": self.router_sum / max(self.router_n, 1.0)}
        self.router_sum = self.router_n = 0.0
        return out

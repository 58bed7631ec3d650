"""The DPO loss head: what `ernie-train dpo` plugs into the trainer in place of the causal-LM head.

It wraps the unchanged model (so DataParallel, recompute, LoRA and checkpointing apply as for SFT),
takes a collated batch's tensors plus the reference's per-pair log-probs, and returns
(sum of per-pair losses, number of pairs, per-pair statistics summed) for the trainer to normalise
over the global batch. The reference lives outside the layer tree: DataParallel must not see it.
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn

from ernie_train.dpo import REFERENCE_FREE, STATS, dpo_loss, normalize, pair_logps
from ernie_train.dpo_ref import (AdapterOffReference, CachedReference, ModelReference, batch_tensors, collate,
                                 default_prefix)


def build_reference(cfg, model, ds, eval_ds):
    """(train reference, eval reference) providers for cfg; (None, None) for the reference-free losses.

    --ref-logps: the cached file (eval: --eval-ref-logps, default beside --eval-data). --ref-model DIR:
    that model, frozen. Neither: the starting model, frozen (ERNIEKit's default); with --lora that is
    the policy with its adapter switched off, so no second copy of the weights is held."""
    if cfg.loss_type in REFERENCE_FREE:
        return None, None
    if cfg.ref_logps:
        ref = CachedReference(cfg.ref_logps, ds)
        ev = CachedReference(cfg.eval_ref_logps or default_prefix(cfg.eval_data), eval_ds) if eval_ds else None
        return ref, ev
    from libernie.model import ErnieForCausalLM
    if cfg.ref_model:
        ref = ModelReference(ErnieForCausalLM.from_pretrained(cfg.ref_model))
    elif cfg.lora:
        ref = AdapterOffReference(model)
    else:
        ref = ModelReference(ErnieForCausalLM.from_pretrained(cfg.model))
    return ref, ref


class DPOHead(nn.Layer):
    collate = staticmethod(collate)

    def __init__(self, model, cfg, reference=None, eval_reference=None):
        super().__init__()
        self.model = model
        self._refs = {"train": reference, "eval": eval_reference}   # a dict: not registered as sublayers
        self.loss_type, self.normalize_logps = cfg.loss_type, cfg.normalize_logps
        self.sft_loss_ratio, self.pref_loss_ratio = cfg.sft_loss_ratio, cfg.pref_loss_ratio
        self.kw = dict(loss_type=cfg.loss_type, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                       simpo_gamma=cfg.simpo_gamma, dpop_lambda=cfg.dpop_lambda)

    def inputs(self, b, split: str = "train") -> tuple:
        """Tensors for forward(): the batch's, the response lengths, and the reference's raw sums."""
        tensors = batch_tensors(b)
        ref = self._refs[split]
        if ref is None:
            rc = rr = np.zeros(b.pairs.n_pairs, np.float32)
        else:
            rc, rr = ref(b, tensors)
        extra = (b.pairs.chosen_tokens.astype(np.float32), b.pairs.rejected_tokens.astype(np.float32), rc, rr)
        return tensors + tuple(paddle.to_tensor(x) for x in extra)

    def forward(self, input_ids, position_ids, doc_ids, roles, src, tgt, sel_c, sel_r, len_c, len_r, ref_c, ref_r):
        pc, pr = pair_logps(self.model, input_ids, position_ids, doc_ids, roles, src, tgt, sel_c, sel_r)  # [P]
        norm = dict(loss_type=self.loss_type, normalize_logps=self.normalize_logps)
        nc, nr = normalize(pc, pr, len_c, len_r, **norm)
        rc, rr = (None, None) if self.loss_type in REFERENCE_FREE else normalize(ref_c, ref_r, len_c, len_r, **norm)
        losses, cw, rw = dpo_loss(nc, nr, rc, rr, **self.kw)
        losses = losses * self.pref_loss_ratio
        if self.sft_loss_ratio:                      # per-token NLL of the chosen response, per pair
            losses = losses + self.sft_loss_ratio * (-pc / len_c)
        cw, rw = cw.detach(), rw.detach()
        stats = paddle.stack([cw.sum(), rw.sum(), (cw > rw).astype("float32").sum(), (cw - rw).sum(),
                              nc.detach().sum(), nr.detach().sum()])
        return losses.sum(), paddle.full([], float(pc.shape[0]), "float32"), stats

    @staticmethod
    def metrics(stat_sums, n_pairs: float, prefix: str = "") -> dict:
        """Means over the pairs of a global batch, under metrics.jsonl's names."""
        return {prefix + k: float(v) / max(n_pairs, 1.0) for k, v in zip(STATS, stat_sums)}

"""log p(target | hidden) through the LM head, for a chunk of rows, never keeping the chunk's [n, V] logits.

`target_logps(model, hs [n, h], tgt [n]) -> [n]` (fp32). Where the head is a plain matrix (tied embedding
[V, h] or an untied Linear [h, V] with optional bias: every ERNIE 4.5 layout) and the reference kernels run
(CPU), `_LinearLogp` does it in one autograd node, with the forward values of the generic path (the same
cross_entropy call) and:
- a frozen head (LoRA, the usual DPO run): logp_n depends on row n alone, so its gradient is g_n * J_n with
      J_n = d logp_n / d hs_n = W_t - softmax(logits_n) @ W      [h]   (tied: W = E)
  computed in the forward from the logits already there (one [n, V] x [V, h] matmul, the one backward would
  run anyway) and kept ([n, h]); backward is one multiply. The logits are never recomputed (as fused
  linear-cross-entropy heads do, which take the gradient in the forward).
- a trained head (full fine-tuning): d W needs g, so the forward keeps hs and each row's log-sum-exp and
  the backward recomputes the logits once, turning them into d logits in place.
The generic path (a LoRA adapter on lm_head, or a GPU) is cross_entropy under Paddle's recompute: logits
recomputed, softmax and d logits built beside them, then the same two matmuls. At 0.3B widths with ~80
response rows the head is ~1/4 of a forward, so the recompute it avoids is ~8% of a LoRA step.
Gradients equal the generic path's up to fp32 rounding (tests/tools/ernie_train/test_logp_head.py).
"""
from __future__ import annotations

import functools

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from libernie.kernels import backend


def _logits(hs, weight, bias, tied: bool):                                # [n, h] -> [n, V]
    out = paddle.matmul(hs, weight, transpose_y=tied)
    return out if bias is None else out + bias


class _LinearLogp(PyLayer):
    @staticmethod
    def forward(ctx, hs, weight, bias, tgt, tied):
        logits = _logits(hs, weight, bias, tied).astype("float32")           # [n, V]
        nll = F.cross_entropy(logits, tgt.unsqueeze(1), reduction="none")   # [n, 1]: the generic path's values
        lse = paddle.take_along_axis(logits, tgt.unsqueeze(1), axis=1) + nll  # [n, 1] log-sum-exp of each row
        want_h, want_w, want_b = ctx.grads = (not hs.stop_gradient, not weight.stop_gradient,
                                              bias is not None and not bias.stop_gradient)
        ctx.tied, ctx.has_bias, ctx.jac = tied, bias is not None, want_h and not (want_w or want_b)
        if ctx.jac:  # frozen head: logp_n depends on row n alone, so its gradient is g_n * J_n, J known now
            logits.subtract_(lse)
            logits.exp_()                                                   # softmax, in place [n, V]
            p = logits.astype(hs.dtype)
            jac = _rows(weight, tgt, tied) - paddle.matmul(p, weight, transpose_y=not tied)   # [n, h]
            ctx.save_for_backward(jac)
        else:
            ctx.save_for_backward(hs, weight, bias, tgt, lse)
        return -nll.reshape([-1])                                           # [n]

    @staticmethod
    def backward(ctx, g):                                                   # g [n]
        if ctx.jac:
            (jac,) = ctx.saved_tensor()
            return tuple([g.astype(jac.dtype).unsqueeze(1) * jac, None] + [None] * ctx.has_bias + [None])
        hs, weight, bias, tgt, lse = ctx.saved_tensor()
        tied = ctx.tied
        p = _logits(hs, weight, bias, tied).astype("float32")
        p.subtract_(lse)
        p.exp_()                                                            # softmax, in place [n, V]
        p.multiply_(-g.astype("float32").unsqueeze(1))                      # -g * softmax
        want_h, want_w, want_b = ctx.grads
        if want_w or want_b:                                                # + g at the targets: full d logits
            p = paddle.put_along_axis(p, tgt.unsqueeze(1), g.astype("float32").unsqueeze(1), axis=1, reduce="add")
        p = p.astype(hs.dtype)
        dh = dw = db = None
        if want_h:
            dh = paddle.matmul(p, weight, transpose_y=not tied)             # [n, h]
        if want_w:
            dw = paddle.matmul(p, hs, transpose_x=True) if tied else paddle.matmul(hs, p, transpose_x=True)
        if want_b:
            db = p.sum(0)
        return tuple([dh, dw] + ([db] if bias is not None else []) + [None])   # None: the targets


def _rows(weight, tgt, tied: bool):
    """The head's row for each target: W_t [n, h] (tied E [V, h]; untied W [h, V])."""
    return paddle.gather(weight, tgt, axis=0) if tied else paddle.gather(weight, tgt, axis=1).t()


def _plain_head(model):
    """(weight, bias, tied) of a head _LinearLogp can run, else None."""
    if model.config.tie_word_embeddings:
        return model.ernie.embed_tokens.weight, None, True
    head = getattr(model, "lm_head", None)
    if type(head) is nn.Linear:
        return head.weight, head.bias, False
    return None                                                             # e.g. a LoRA adapter on lm_head


def _cross_entropy_logps(model, hs, tgt):
    logits = model.logits(hs.unsqueeze(0)).squeeze(0).astype("float32")      # [n, V]
    return -F.cross_entropy(logits, tgt.unsqueeze(1), reduction="none").reshape([-1])


def target_logps(model, hs, tgt):
    """log p(tgt | hs) [n] for rows hs [n, h]; differentiable, holding only [n, h] between forward and backward."""
    plain = _plain_head(model) if backend(hs) == "reference" else None
    if plain is not None:
        weight, bias, tied = plain
        return _LinearLogp.apply(hs, weight, bias, tgt, tied)
    head = functools.partial(_cross_entropy_logps, model)
    if paddle.is_grad_enabled() and not hs.stop_gradient:
        from paddle.distributed.fleet.utils import recompute
        return recompute(head, hs, tgt, use_reentrant=False)
    return head(hs, tgt)

"""log p(target | hidden) through the LM head, for a chunk of rows, keeping only the chunk's inputs.

`target_logps(model, hs [n, h], tgt [n]) -> [n]` (fp32). Where the head is a plain matrix (tied embedding
[V, h] or an untied Linear [h, V] with optional bias: every ERNIE 4.5 layout) and the reference kernels run
(CPU), `_LinearLogp` does it in one autograd node: the forward keeps hs, the head's parameters, the targets and
each row's log-sum-exp ([n]); the backward recomputes the logits once and turns them into the softmax in place:
  d logp_t / d logits = onehot(t) - softmax(logits)   so   d hs = g (W_t - softmax @ W)  (tied: W = E)
and d W, d bias only if they are trained. The generic path (cross_entropy under Paddle's recompute, for a
head with a LoRA adapter, or on a GPU) recomputes the logits and the softmax, then runs Paddle's CPU
cross-entropy grad, holding logits, softmax and d logits ([n, V] each) at once, at the moment of the step
when every activation is still alive. Here backward holds one [n, V] buffer and skips the recomputed
cross-entropy forward (~40 ms of CPU per 64 x 103424 chunk). The forward values are the generic path's
(the same cross_entropy call); gradients equal up to fp32 rounding (tests/tools/ernie_train/test_logp_head.py).
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
        ctx.save_for_backward(hs, weight, bias, tgt, lse)
        ctx.tied, ctx.grads = tied, (not hs.stop_gradient, not weight.stop_gradient,
                                     bias is not None and not bias.stop_gradient)
        return -nll.reshape([-1])                                           # [n]

    @staticmethod
    def backward(ctx, g):                                                   # g [n]
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
            if not (want_w or want_b):                                      # the onehot term: g * W_t
                w_t = paddle.gather(weight, tgt, axis=0) if tied else paddle.gather(weight, tgt, axis=1).t()
                dh = dh + g.astype(hs.dtype).unsqueeze(1) * w_t
        if want_w:
            dw = paddle.matmul(p, hs, transpose_x=True) if tied else paddle.matmul(hs, p, transpose_x=True)
        if want_b:
            db = p.sum(0)
        return tuple([dh, dw] + ([db] if bias is not None else []) + [None])   # None: the targets


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

"""Training twins of the CPU reference kernels: the same forward ops (bit-identical values), a hand-written
backward that saves less and runs fewer ops.

Paddle's autograd over the reference ops (libernie.kernels.ops) keeps every intermediate and, for SwiGLU's
two half-views of up_gate_proj's output, builds two full-size zero tensors in backward (one SliceGrad each)
and adds them: 64 ms of a 1024 x 3072 layer's step at 256 tokens against 17 ms here. Each twin below
saves only its inputs (and RMSNorm's [.., 1] inverse rms) and recomputes the cheap elementwise rest in
backward, as Megatron's selective recompute does for its cheap ops. They run only where a gradient is
being taken on the reference path (`active`); inference, no_grad and the fused GPU kernels are untouched.
The gradients equal autograd's over the reference ops up to fp32 rounding (tests/libernie/model/test_grad_ops.py).
"""
from __future__ import annotations

import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from libernie.kernels import backend, rms_norm
from libernie.kernels.ops import _swap_pairs, apply_rope, swiglu


def active(x: paddle.Tensor) -> bool:
    """True where the twin replaces the reference op: a gradient flows through x on the reference path."""
    return not x.stop_gradient and paddle.is_grad_enabled() and backend(x) == "reference"


def _needs(t) -> bool:
    return t is not None and not t.stop_gradient


# ---- RMSNorm: y = w * (x * r), r = rsqrt(mean(x^2) + eps), statistics in fp32 --------------------------
class _RMSNorm(PyLayer):
    @staticmethod
    def forward(ctx, x, weight, eps):                                    # x [.., h], weight [h]
        h = x.astype("float32")
        r = paddle.rsqrt((h * h).mean(-1, keepdim=True) + eps)            # [.., 1]
        ctx.save_for_backward(x, weight, r)
        ctx.grad_w = _needs(weight)
        return weight * (h * r).astype(x.dtype)                           # the reference's ops, in its order

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensor()
        hn = x.astype("float32") * r                                      # normalised x
        gf = g.astype("float32")
        dhn = gf * weight.astype("float32")                               # [.., h]
        dx = r * (dhn - hn * (dhn * hn).mean(-1, keepdim=True))
        dw = None
        if ctx.grad_w:
            dw = (gf * hn.astype(x.dtype).astype("float32")).reshape([-1, x.shape[-1]]).sum(0).astype(weight.dtype)
        return dx.astype(x.dtype), dw


def rms_norm_train(x, weight, eps):
    """rms_norm, with _RMSNorm's backward when a gradient flows through x."""
    return _RMSNorm.apply(x, weight, eps) if active(x) else rms_norm(x, weight, eps)


# ---- RoPE: y = x * cos + swap(x) * sin (swap: the pair permutation, its own inverse and transpose) -----
class _Rope(PyLayer):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)           # shared by every layer of the forward: nothing new is kept
        return apply_rope(x, cos, sin)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensor()
        gf = g.astype("float32")
        return (gf * cos + _swap_pairs(gf * sin)).astype(g.dtype), None, None


def apply_rope_train(x, cos, sin):
    return _Rope.apply(x, cos, sin) if active(x) else apply_rope(x, cos, sin)


# ---- SwiGLU: y = silu(gate) * up, gate the first half of the last axis -----------------------------
class _SwiGLU(PyLayer):
    @staticmethod
    def forward(ctx, gate_up):                                          # [.., 2i] -> [.., i]
        ctx.save_for_backward(gate_up)
        return swiglu(gate_up)

    @staticmethod
    def backward(ctx, g):
        (gate_up,) = ctx.saved_tensor()
        n = gate_up.shape[-1] // 2
        gate, up = gate_up[..., :n], gate_up[..., n:]
        sig = F.sigmoid(gate)
        d_up = g * (gate * sig)                                           # d/d up = silu(gate)
        d_gate = (g * up) * (sig * (1.0 + gate * (1.0 - sig)))           # silu'(x) = s (1 + x (1 - s))
        return paddle.concat([d_gate, d_up], axis=-1)                    # one [.., 2i] tensor, no zero fill


def swiglu_train(gate_up):
    return _SwiGLU.apply(gate_up) if active(gate_up) else swiglu(gate_up)

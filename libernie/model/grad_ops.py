"""Training twins of the CPU reference kernels: the same forward ops (bit-identical values), a backward that
keeps only the op's inputs.

Paddle's autograd over the reference ops (libernie.kernels.ops) keeps every intermediate and, for SwiGLU's
two half-views of up_gate_proj's output, builds two full-size zero tensors in backward (one SliceGrad each)
and adds them: 64 ms of a 1024 x 3072 layer's step at 256 tokens against 17 ms here. Each twin keeps its
inputs and recomputes the cheap elementwise rest in backward, as Megatron's selective recompute does for its
cheap ops: SwiGLU and RoPE with hand-written gradients (equal to autograd's up to fp32 rounding), RMSNorm by
re-running the reference ops under autograd (bit-identical gradients: a run diverging at a large learning rate
overflows at the same step as before, which the trainer's guard tests pin). They run only where a gradient
is taken on the reference path (`active`); inference, no_grad and the fused GPU kernels are untouched.
Tests: tests/libernie/model/test_grad_ops.py.
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


# ---- RMSNorm: y = w * (x * r), r = rsqrt(mean(x^2) + eps), statistics in fp32 --------------------------
class _RMSNorm(PyLayer):
    """Keeps x only; backward re-runs the reference ops on it and takes autograd's gradient of them, so the
    gradients are autograd's bit for bit (a diverging run overflows at the same step, which the trainer's
    guard and its tests rely on). What it saves is memory: x^2, x * r and the cast copies are not kept."""

    @staticmethod
    def forward(ctx, x, weight, eps):                                    # x [.., h], weight [h]
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return rms_norm(x, weight, eps)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensor()
        with paddle.enable_grad():
            xx, ww = x.detach(), weight.detach()
            xx.stop_gradient, ww.stop_gradient = False, weight.stop_gradient
            y = rms_norm(xx, ww, ctx.eps)
            grads = paddle.grad([y], [xx] + ([] if weight.stop_gradient else [ww]), [g])
        return grads[0], (None if weight.stop_gradient else grads[1])


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

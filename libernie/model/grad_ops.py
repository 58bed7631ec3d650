"""Training twins of two CPU reference kernels, RoPE and SwiGLU: the same forward ops (bit-identical values), a
hand-written backward that keeps only the op's inputs.

Paddle's autograd over the reference ops (libernie.kernels.ops) keeps every intermediate and, for SwiGLU's
two half-views of up_gate_proj's output, builds two full-size zero tensors in backward (one SliceGrad each)
and adds them: 64 ms of a 1024 x 3072 layer's step at 256 tokens against 17 ms here. Each twin keeps its
inputs and recomputes the cheap elementwise rest in backward, as Megatron's selective recompute does for its
cheap ops; gradients equal autograd's up to fp32 rounding. They run only where a gradient is taken on the
reference path (`active`); inference, no_grad and the fused GPU kernels are untouched.
RMSNorm has no twin: a hand-written backward (dx = r (dy w - x_hat mean(dy w x_hat))) returned finite
gradients where autograd's overflow to NaN at a diverging learning rate, which hides the divergence from the
trainer's guard for a step; re-running the reference under autograd in backward broke --recompute.
Tests: tests/libernie/model/test_grad_ops.py.
"""
from __future__ import annotations

import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from libernie.kernels import backend
from libernie.kernels.ops import _swap_pairs, apply_rope, swiglu


def active(x: paddle.Tensor) -> bool:
    """True where the twin replaces the reference op: a gradient flows through x on the reference path."""
    return not x.stop_gradient and paddle.is_grad_enabled() and backend(x) == "reference"


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

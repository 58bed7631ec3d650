"""Flash-style attention in plain Paddle ops: the twin of the C++ CPU kernel (csrc/flash_attention_cpu.cc),
and what runs where that kernel cannot be built (no compiler) or the dtype is not fp32.

Same contract as the C++ op: q [b, s, nh, hd], k/v [b, nkv, t, hd], kend int32 [b, t] (key j is seen
from absolute query positions p with j <= p < kend[j]; query row i sits at p = i + t - s) -> out
[b, s, nh, hd] and lse [b, nkv, g, s]. A PyLayer keeps only q, k, v, out and lse for the backward and
recomputes the scores one query block at a time, so memory is O(block * t) per head, never O(s * t).
Each block scores only keys kstart..p_last: keys that every row of the block has outlived (earlier
documents) and keys past its last row (causal) are skipped in forward and backward alike.
"""
from __future__ import annotations

import numpy as np
import paddle
from paddle.autograd import PyLayer

BLOCK = 256  # query rows per block: large enough to amortise Paddle's per-op overhead


def _block_plan(kend: np.ndarray, s: int, t: int, block: int):
    """Per query block: (i0, i1, k0, k1, bias or None). bias float32 [b, 1, 1, i1-i0, k1-k0] is 0 where
    the key is visible and -inf elsewhere; None when every key in k0..k1 is visible to every row."""
    off = t - s
    latest = kend.max(0)                                       # [t] the last row (+1) any batch row sees key j from
    plan = []
    for i0 in range(0, s, block):
        i1 = min(s, i0 + block)
        p = np.arange(i0, i1) + off                            # absolute positions of the rows
        k1 = int(p[-1]) + 1
        k0 = int(np.argmax(latest[:k1] > p[0]))                 # every row sees itself, so one exists
        ke = kend[:, k0:k1]                                     # [b, n]
        j = np.arange(k0, k1)
        ok = (j[None, None, :] <= p[None, :, None]) & (p[None, :, None] < ke[:, None, :])   # [b, c, n]
        bias = None
        if not ok.all():
            bias = paddle.to_tensor(np.where(ok, 0.0, -np.inf).astype(np.float32)[:, None, None])
        plan.append((i0, i1, k0, k1, bias))
    return plan


def _scores(qb, kb, bias, g):
    """fp32 scores [b, nkv, g, c, n] (softmax statistics stay fp32 whatever the input dtype)."""
    b, nkv, gc, _ = qb.shape
    sc = paddle.matmul(qb, kb, transpose_y=True).astype("float32").reshape([b, nkv, g, gc // g, kb.shape[2]])
    return sc if bias is None else sc + bias


class _FlashAttention(PyLayer):
    @staticmethod
    def forward(ctx, q, k, v, kend: np.ndarray, block: int):
        b, s, nh, hd = q.shape
        nkv, t = k.shape[1], k.shape[2]
        g = nh // nkv
        plan = _block_plan(kend, s, t, block)
        q5 = (q * (hd ** -0.5)).reshape([b, s, nkv, g, hd]).transpose([0, 2, 3, 1, 4]).contiguous()  # [b, nkv, g, s, hd]
        outs, lses = [], []
        for i0, i1, k0, k1, bias in plan:
            c = i1 - i0
            qb = q5[:, :, :, i0:i1].reshape([b, nkv, g * c, hd])
            kb, vb = k[:, :, k0:k1].contiguous(), v[:, :, k0:k1].contiguous()        # [b, nkv, n, hd]
            sc = _scores(qb, kb, bias, g)                                            # [b, nkv, g, c, n]
            mx = sc.max(-1, keepdim=True)                                            # every row sees itself
            e = paddle.exp(sc - mx)
            total = e.sum(-1, keepdim=True)
            p = (e / total).astype(v.dtype).reshape([b, nkv, g * c, k1 - k0])
            lse = (mx + paddle.log(total)).squeeze(-1)                               # [b, nkv, g, c]
            outs.append(paddle.matmul(p, vb).reshape([b, nkv, g, c, hd]))
            lses.append(lse)
        out = paddle.concat(outs, axis=3) if len(outs) > 1 else outs[0]             # [b, nkv, g, s, hd]
        lse = paddle.concat(lses, axis=3) if len(lses) > 1 else lses[0]             # [b, nkv, g, s]
        out = out.transpose([0, 3, 1, 2, 4]).reshape([b, s, nh, hd])
        ctx.save_for_backward(q5, k, v, out, lse)
        ctx.plan, ctx.g = plan, g
        return out

    @staticmethod
    def backward(ctx, dout):
        q5, k, v, out, lse = ctx.saved_tensor()
        plan, g = ctx.plan, ctx.g
        b, nkv, _, s, hd = q5.shape
        scale = hd ** -0.5
        do5 = dout.reshape([b, s, nkv, g, hd]).transpose([0, 2, 3, 1, 4]).contiguous()       # [b, nkv, g, s, hd]
        o5 = out.reshape([b, s, nkv, g, hd]).transpose([0, 2, 3, 1, 4])
        delta = (do5.astype("float32") * o5.astype("float32")).sum(-1)                    # [b, nkv, g, s]
        dq, dk, dv = [], paddle.zeros(k.shape, k.dtype), paddle.zeros(v.shape, v.dtype)
        for i0, i1, k0, k1, bias in plan:
            c, n = i1 - i0, k1 - k0
            qb = q5[:, :, :, i0:i1].reshape([b, nkv, g * c, hd])
            gb = do5[:, :, :, i0:i1].reshape([b, nkv, g * c, hd])
            kb, vb = k[:, :, k0:k1].contiguous(), v[:, :, k0:k1].contiguous()
            p = paddle.exp(_scores(qb, kb, bias, g) - lse[:, :, :, i0:i1].unsqueeze(-1))     # [b, nkv, g, c, n]
            dp = paddle.matmul(gb, vb, transpose_y=True).astype("float32").reshape([b, nkv, g, c, n])
            ds = (p * (dp - delta[:, :, :, i0:i1].unsqueeze(-1))).astype(q5.dtype).reshape([b, nkv, g * c, n])
            p = p.astype(q5.dtype).reshape([b, nkv, g * c, n])
            dv[:, :, k0:k1] += paddle.matmul(p, gb, transpose_x=True)                         # [b, nkv, n, hd]
            dk[:, :, k0:k1] += paddle.matmul(ds, qb, transpose_x=True)
            dq.append(paddle.matmul(ds, kb).reshape([b, nkv, g, c, hd]) * scale)
        dq = paddle.concat(dq, axis=3) if len(dq) > 1 else dq[0]                          # [b, nkv, g, s, hd]
        return dq.transpose([0, 3, 1, 2, 4]).reshape([b, s, nkv * g, hd]), dk, dv


def flash_attention_paddle(q, k, v, kend: np.ndarray, block: int = BLOCK) -> paddle.Tensor:
    """q [b, s, nh, hd], k/v [b, nkv, t, hd], kend int32 numpy [b, t] -> [b, s, nh, hd]."""
    return _FlashAttention.apply(q, k, v, kend, block)

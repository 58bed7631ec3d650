"""Cost of the non-finite check in causal_lm_loss: the guarded loss against the same loss without it.

    .venv/bin/python scripts/bench/loss_guard.py [--seq 2048] [--vocab 103424] [--iters 5]

Forward + backward of the loss alone on [1, seq, vocab] fp32 logits (ERNIE 4.5 0.3B's vocabulary), the
two variants alternating in one run; the ratio is what to read. The check is one extra row sum, no grad.
"""
import argparse
import statistics
import time

import libernie  # noqa: F401  (CPU env before paddle)
import paddle
import paddle.nn.functional as F

from libernie.model import causal_lm_loss


def unguarded(logits, labels):
    b, s, v = logits.shape
    target = paddle.concat([labels[:, 1:], paddle.full([b, 1], -100, labels.dtype)], axis=1)
    valid = target != -100
    safe = paddle.where(valid, target, paddle.zeros_like(target)).astype("int64")
    ce = F.cross_entropy(logits.reshape([-1, v]), safe.reshape([-1, 1]), reduction="none").reshape([b, s])
    validf = valid.astype("float32")
    return (ce * validf).sum() / paddle.clip(validf.sum(), min=1.0)


def timed(fn, logits, labels):
    x = logits.detach()
    x.stop_gradient = False
    t = time.perf_counter()
    fn(x, labels).backward()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=103424)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    logits = paddle.randn([1, a.seq, a.vocab])
    labels = paddle.randint(0, a.vocab, [1, a.seq])
    timed(causal_lm_loss, logits, labels), timed(unguarded, logits, labels)  # warm-up
    g, u = [], []
    for _ in range(a.iters):
        g.append(timed(causal_lm_loss, logits, labels))
        u.append(timed(unguarded, logits, labels))
    mg, mu = statistics.median(g), statistics.median(u)
    print(f"loss fwd+bwd [1, {a.seq}, {a.vocab}]: guarded {mg * 1e3:.1f} ms, unguarded {mu * 1e3:.1f} ms, "
          f"ratio {mg / mu:.3f}")


if __name__ == "__main__":
    main()

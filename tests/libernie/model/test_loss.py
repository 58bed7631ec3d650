"""causal_lm_loss against a numpy log-sum-exp, and non-finite logits give a non-finite loss."""
import math

import numpy as np
import paddle
import pytest

from libernie.model import causal_lm_loss


def _ref(logits, labels):
    """Mean next-token cross entropy by hand: logsumexp(row) - row[target], in float64."""
    x = logits[:, :-1].astype(np.float64)
    tgt = labels[:, 1:]
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
    return float((lse - np.take_along_axis(x, tgt[..., None], -1)[..., 0]).mean())


@pytest.mark.parametrize("vocab", [7, 8, 2048])  # 8 and 2048 take paddle's vectorised softmax path
def test_finite_logits_match_numpy(vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.normal(size=(2, 5, vocab)).astype("float32") * 3
    labels = rng.integers(0, vocab, size=(2, 5))
    got = float(causal_lm_loss(paddle.to_tensor(logits), paddle.to_tensor(labels)))
    assert got == pytest.approx(_ref(logits, labels), rel=1e-5)


@pytest.mark.parametrize("vocab", [7, 8, 2048])
@pytest.mark.parametrize("bad", ["all_nan", "one_nan", "one_inf", "one_neg_inf"])
def test_non_finite_logits_give_non_finite_loss(vocab, bad):
    # Before the fix, vocab 8 and 2048 gave ln(vocab) for a row of NaN logits (7.62 at 2048), the loss
    # a diverged ernie-train run logged while every weight was NaN.
    logits = np.zeros((1, 4, vocab), dtype="float32")
    if bad == "all_nan":
        logits[0, 1, :] = np.nan
    else:
        logits[0, 1, 3] = {"one_nan": np.nan, "one_inf": np.inf, "one_neg_inf": -np.inf}[bad]
    labels = paddle.to_tensor(np.array([[0, 1, 2, 0]]))
    total, count = causal_lm_loss(paddle.to_tensor(logits), labels, reduction="none")
    assert not math.isfinite(float(total)) and float(count) == 3
    assert not math.isfinite(float(causal_lm_loss(paddle.to_tensor(logits), labels)))


def test_gradient_is_unchanged_by_the_finite_check():
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.normal(size=(1, 4, 8)).astype("float32"), stop_gradient=False)
    labels = paddle.to_tensor(np.array([[1, 2, 3, 4]]))
    causal_lm_loss(x, labels, reduction="sum").backward()
    # d/dx of sum_t CE(x_t, y_{t+1}) = softmax(x_t) - onehot(y_{t+1}) on the 3 counted positions, 0 on the last
    xs = x.numpy()[0]
    p = np.exp(xs - xs.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = p.copy()
    want[np.arange(3), [2, 3, 4]] -= 1
    want[3] = 0
    np.testing.assert_allclose(x.grad.numpy()[0], want, rtol=1e-5, atol=1e-6)

"""The DPO losses against values worked out by hand from each paper's formula, numpy and paddle alike,
plus the log-prob normalisation and the packed-pair index."""
import math

import numpy as np
import paddle
import pytest

from ernie_train.dpo import DPOError, dpo_loss, normalize, pair_index
from libernie.data import ROLE_CHOSEN, ROLE_PROMPT, ROLE_REJECTED


def softplus(x):  # -log sigmoid(-x)
    return math.log(1.0 + math.exp(x))


# policy chosen/rejected -1, -2; reference -1.5, -1.5: the log-ratio margin is (-1 - -2) - 0 = 1.
PC, PR, RC, RR = -1.0, -2.0, -1.5, -1.5
CASES = [
    # (kwargs, hand value)
    (dict(loss_type="sigmoid", beta=0.5), softplus(-0.5)),                               # -log s(0.5 * 1)
    (dict(loss_type="sigmoid", beta=0.5, label_smoothing=0.1), 0.9 * softplus(-0.5) + 0.1 * softplus(0.5)),
    (dict(loss_type="sigmoid", beta=0.5, offset_alpha=0.5), softplus(-0.5 * (1 - math.log(2 + 1e-6)))),
    (dict(loss_type="ipo", beta=0.25), (1.0 - 2.0) ** 2),                                # (h - 1/(2 tau))^2
    (dict(loss_type="hinge", beta=0.5), 0.5),                                            # max(0, 1 - 0.5)
    (dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5), softplus(-(2.0 * 1.0 - 0.5))),  # refs ignored
    (dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, label_smoothing=0.2),
     0.8 * softplus(-1.5) + 0.2 * softplus(1.5)),
    # dpop: reference chosen -1.5 is below policy -1: no penalty
    (dict(loss_type="dpop", beta=0.5, dpop_lambda=2.0), softplus(-0.5)),
]


@pytest.mark.parametrize("kw,want", CASES, ids=[f"{c[0]['loss_type']}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("backend", ["numpy", "paddle"])
def test_losses_match_hand_values(kw, want, backend):
    args = [np.array([v], np.float64 if backend == "numpy" else np.float32) for v in (PC, PR, RC, RR)]
    extra = {"score_deltas": np.array([2.0])} if kw.get("offset_alpha") else {}
    if backend == "paddle":
        args = [paddle.to_tensor(a) for a in args]
        extra = {k: paddle.to_tensor(v.astype(np.float32)) for k, v in extra.items()}
    losses, cw, rw = dpo_loss(*args, **kw, **extra)
    losses, cw, rw = (np.asarray(x if backend == "numpy" else x.numpy()) for x in (losses, cw, rw))
    assert losses.shape == (1,)
    assert losses[0] == pytest.approx(want, rel=1e-5)
    beta = kw["beta"]
    if kw["loss_type"] == "simpo":       # reference-free: reward is beta * policy log-prob
        assert (cw[0], rw[0]) == pytest.approx((beta * PC, beta * PR), rel=1e-6)
    else:
        assert (cw[0], rw[0]) == pytest.approx((beta * (PC - RC), beta * (PR - RR)), rel=1e-6)


def test_dpop_penalises_chosen_falling_below_the_reference():
    # policy chosen -2 is 0.5 under its reference -1.5; margin (-2 - -3) - (-1.5 - -1.5) = 1
    losses, _, _ = dpo_loss(np.array([-2.0]), np.array([-3.0]), np.array([-1.5]), np.array([-1.5]),
                            loss_type="dpop", beta=0.5, dpop_lambda=2.0)
    assert losses[0] == pytest.approx(softplus(-0.5) + 2.0 * 0.5)


def test_orpo_is_nll_plus_lambda_times_odds_ratio_loss():
    pc, pr, lam = -0.5, -1.0, 0.1   # average per-token log-probs
    odds = lambda lp: math.exp(lp) / (1 - math.exp(lp))  # noqa: E731
    want = -pc + lam * softplus(-math.log(odds(pc) / odds(pr)))
    for conv in (np.array, lambda v: paddle.to_tensor(np.array(v, np.float32))):
        losses, _, _ = dpo_loss(conv([pc]), conv([pr]), None, None, loss_type="orpo", beta=lam)
        assert float(losses[0]) == pytest.approx(want, rel=1e-5)


def test_batched_and_differentiable_in_paddle():
    pc = paddle.to_tensor([-1.0, -3.0], stop_gradient=False)
    losses, _, _ = dpo_loss(pc, paddle.to_tensor([-2.0, -1.0]), paddle.to_tensor([-1.5, -2.0]),
                            paddle.to_tensor([-1.5, -2.0]), loss_type="sigmoid", beta=0.5)
    losses.sum().backward()
    # d/dpc softplus(-beta m) = -beta * sigmoid(-beta m); m = 1 and -2
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    np.testing.assert_allclose(pc.grad.numpy(), [-0.5 * sig(-0.5), -0.5 * sig(1.0)], rtol=1e-5)


def test_bad_arguments_raise_typed_errors():
    a = np.array([-1.0])
    with pytest.raises(DPOError, match="unknown loss_type 'kto'"):
        dpo_loss(a, a, a, a, loss_type="kto")
    with pytest.raises(DPOError, match="needs reference log-probs"):
        dpo_loss(a, a, None, None, loss_type="ipo")
    with pytest.raises(DPOError, match="score_deltas"):
        dpo_loss(a, a, a, a, loss_type="sigmoid", offset_alpha=1.0)


def test_normalize_by_hand():
    c, r, nc, nr = np.array([-6.0]), np.array([-2.0]), np.array([3.0]), np.array([1.0])
    assert normalize(c, r, nc, nr, loss_type="sigmoid", normalize_logps=False) == (c, r)
    got = normalize(c, r, nc, nr, loss_type="sigmoid", normalize_logps=True)   # mean length 2
    assert (got[0][0], got[1][0]) == (-4.0, -4.0)
    for lt in ("ipo", "simpo", "orpo"):  # per-token average whatever normalize_logps says
        got = normalize(c, r, nc, nr, loss_type=lt, normalize_logps=False)
        assert (got[0][0], got[1][0]) == (-2.0, -2.0)


def _row(layout):
    """One packed row from (prompt, chosen, rejected) lengths, shard layout, padded with 2 tokens."""
    roles, doc, mask = [], [], []
    for d, (p, c, r) in enumerate(layout):
        roles += [ROLE_PROMPT] * p + [ROLE_CHOSEN] * c + [ROLE_REJECTED] * r
        doc += [d] * (p + c + r)
        mask += [0] * p + [1] * (c + r)
    roles, doc, mask = roles + [0, 0], doc + [-1, -1], mask + [0, 0]
    ids = np.arange(100, 100 + len(roles))[None]
    return ids, np.array([doc]), np.array([roles], np.uint8), np.array([mask])


def test_pair_index_sources_by_hand():
    ids, doc, roles, mask = _row([(3, 2, 2), (2, 1, 3)])
    # positions: pair 0 prompt 0-2, chosen 3-4, rejected 5-6; pair 1 prompt 7-8, chosen 9, rejected 10-12
    idx = pair_index(ids, doc, roles, mask)
    assert idx.src.tolist() == [2, 3, 2, 5, 8, 8, 10, 11]   # 5 <- 2 and 10 <- 8: rejected starts from the prompt
    assert idx.tgt.tolist() == [103, 104, 105, 106, 109, 110, 111, 112]
    assert idx.pair.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and idx.chosen.tolist() == [1, 1, 0, 0, 1, 0, 0, 0]
    assert idx.chosen_tokens.tolist() == [2, 1] and idx.rejected_tokens.tolist() == [2, 3]
    sel_c, sel_r = idx.selectors()
    assert sel_c.tolist() == [[1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0]]
    assert sel_r.sum(axis=1).tolist() == [2, 3]


def test_pair_index_refuses_a_pair_without_rejected():
    ids, doc, roles, mask = _row([(3, 2, 2)])
    mask[0, 5:7] = 0   # no rejected target left
    with pytest.raises(DPOError, match="data/x: a pair without a chosen or a rejected"):
        pair_index(ids, doc, roles, mask, "data/x")
    ids, doc, roles, mask = _row([(3, 2, 2)])
    roles[0, :3] = ROLE_CHOSEN  # responses with no prompt before them
    with pytest.raises(DPOError, match="without its prompt"):
        pair_index(ids, doc, roles, mask)


def test_chunked_lm_head_gives_the_same_logps_and_gradients(monkeypatch):
    """pair_logps runs the LM head in recomputed chunks; any chunk size gives the same sums and gradients."""
    import ernie_train.dpo as dpo
    from libernie.config import ernie_tiny
    from libernie.model import ErnieForCausalLM
    paddle.seed(0)
    model = ErnieForCausalLM(ernie_tiny(vocab_size=300))
    ids, doc, roles, mask = _row([(3, 4, 5), (2, 3, 2)])
    ids = ids % 300
    pos = np.array([[0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 2, 3, 0, 0]])  # rejected restarts at P
    idx = pair_index(ids, doc, roles, mask)
    t = [paddle.to_tensor(x) for x in (ids, pos, doc, roles.astype(np.int32), idx.src, idx.tgt, *idx.selectors())]
    out = {}
    for chunk in (1000, 4):
        monkeypatch.setattr(dpo, "HEAD_CHUNK", chunk)
        c, r = dpo.pair_logps(model, *t)
        (c.sum() - 2 * r.sum()).backward()
        w = model.ernie.embed_tokens.weight
        out[chunk] = (c.numpy(), r.numpy(), w.grad.numpy().copy())
        model.clear_gradients()
    for a, b in zip(out[1000], out[4]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.abs(out[4][2]).max() > 0


def test_lora_dpo_gradients_unchanged_by_the_fast_paths(monkeypatch):
    """The LoRA DPO step's gradients with the training twins (libernie.model.grad_ops) and the one-node LM head
    (ernie_train.logp_head) equal those of plain autograd over the reference ops + the recomputed cross_entropy."""
    import ernie_train.dpo as dpo
    from ernie_train import logp_head
    from libernie.config import ernie_tiny
    from libernie.lora import LoRAConfig, apply_lora
    from libernie.model import ErnieForCausalLM, grad_ops
    ids, doc, roles, mask = _row([(3, 4, 5), (2, 3, 2)])
    ids = ids % 300
    pos = np.array([[0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 2, 3, 0, 0]])
    idx = pair_index(ids, doc, roles, mask)
    t = [paddle.to_tensor(x) for x in (ids, pos, doc, roles.astype(np.int32), idx.src, idx.tgt, *idx.selectors())]
    monkeypatch.setattr(dpo, "HEAD_CHUNK", 4)

    def step(fast: bool):
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(grad_ops, "active", lambda x: False)
                m.setattr(logp_head, "_plain_head", lambda model: None)
            paddle.seed(0)
            model = ErnieForCausalLM(ernie_tiny(vocab_size=300))
            apply_lora(model, LoRAConfig(r=4))
            for n, p in model.named_parameters():   # B = 0 at init would zero every A gradient
                if n.endswith("lora_B"):
                    p.set_value(paddle.randn(p.shape) * 0.1)
            c, r = dpo.pair_logps(model, *t)
            losses, _, _ = dpo.dpo_loss(c, r, paddle.to_tensor([-30.0, -20.0]), paddle.to_tensor([-31.0, -19.0]),
                                        loss_type="sigmoid", beta=0.1)
            losses.sum().backward()
            return c.numpy(), r.numpy(), {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}

    c0, r0, g0 = step(fast=False)
    c1, r1, g1 = step(fast=True)
    np.testing.assert_array_equal(c1, c0)                 # forward values: bit for bit
    np.testing.assert_array_equal(r1, r0)
    assert g0.keys() == g1.keys() and len(g0) > 0 and all(".lora_" in n for n in g0)
    for n in g0:
        np.testing.assert_allclose(g1[n], g0[n], rtol=1e-4, atol=1e-7, err_msg=n)

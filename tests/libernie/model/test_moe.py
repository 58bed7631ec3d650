"""The MoE block against numpy and hand computations: gate math, dispatch, aux/z losses, the aux-free
bias update (and its sign), load statistics, and fp32 routing under a half-precision model."""
import math

import numpy as np
import paddle
import pytest

from libernie.config import ErnieConfig, ernie_tiny_moe
from libernie.model import ErnieForCausalLM
from libernie.model.moe import (MoEBlock, expert_load_stats, load_count_paused, moe_blocks, route, router_loss,
                                set_token_mask, update_correction_bias)


def _np_route(p, bias, k, norm_min):
    idx = np.argsort(-(p + bias), axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(p, idx, axis=-1)
    return idx, w / np.maximum(w.sum(-1, keepdims=True), norm_min)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("k,norm_min", [(1, 1e-12), (3, 1e-12), (2, 0.9)])
def test_route_matches_numpy_and_bias_only_selects(k, norm_min):
    rs = np.random.RandomState(k)
    p = _softmax(rs.randn(50, 8).astype(np.float32) * 2)
    bias = (rs.randn(1, 8) * 0.1).astype(np.float32)
    idx, w = route(paddle.to_tensor(p), paddle.to_tensor(bias), k, norm_min)
    ridx, rw = _np_route(p, bias, k, norm_min)
    np.testing.assert_array_equal(np.sort(idx.numpy(), -1), np.sort(ridx, -1))
    np.testing.assert_allclose(np.take_along_axis(p, idx.numpy(), -1) / np.maximum(
        np.take_along_axis(p, idx.numpy(), -1).sum(-1, keepdims=True), norm_min), w.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.sort(w.numpy(), -1), np.sort(rw, -1), rtol=1e-6)
    if norm_min == 0.9:  # the clamp is active: weights sum to less than one
        assert (w.numpy().sum(-1) < 1 - 1e-3).any()
    # the bias changes which experts are chosen, never their weights (weights are the unbiased p)
    assert not np.array_equal(np.sort(ridx, -1), np.sort(_np_route(p, 0 * bias, k, norm_min)[0], -1))


def _cfg(**over):
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, moe_num_experts=6, moe_k=2, moe_intermediate_size=12,
                moe_num_shared_experts=1, initializer_range=0.3)
    return ErnieConfig(**{**base, **over})


def _np_swiglu(x, ug, down):
    g, u = np.split(x @ ug, 2, axis=-1)
    return (g / (1 + np.exp(-g)) * u) @ down


@pytest.mark.parametrize("k,shared", [(1, 0), (2, 1), (6, 2)])
def test_block_equals_dense_numpy_reference(k, shared):
    """Every token through every selected expert, the slow way, against the sort-based dispatch."""
    paddle.seed(k)
    blk = MoEBlock(_cfg(moe_k=k, moe_num_shared_experts=shared), 0)
    blk.moe_statics.e_score_correction_bias.set_value(paddle.randn([1, 6]) * 0.05)
    blk.eval()
    x = np.random.RandomState(0).randn(3, 7, 16).astype(np.float32)
    got = blk(paddle.to_tensor(x)).numpy()
    xf = x.reshape(-1, 16)
    p = _softmax(xf @ blk.gate.weight.numpy())
    idx, w = _np_route(p, blk.moe_statics.e_score_correction_bias.numpy(), k, 1e-12)
    ref = np.zeros_like(xf)
    for t in range(xf.shape[0]):
        for j in range(k):
            e = blk.experts[int(idx[t, j])]
            ref[t] += w[t, j] * _np_swiglu(xf[t], e.up_gate_proj.weight.numpy(), e.down_proj.weight.numpy())
    if shared:
        s = blk.shared_experts
        ref += _np_swiglu(xf, s.up_gate_proj.weight.numpy(), s.down_proj.weight.numpy())
    np.testing.assert_allclose(got.reshape(-1, 16), ref, atol=2e-5, rtol=1e-5)


def test_aux_and_z_loss_equal_a_hand_computation():
    """E=2, k=1, three tokens whose router logits are [ln3, 0], [-ln3, 0], [ln3, 0]:
    p = [.75, .25], [.25, .75], [.75, .25]; tokens per expert n = [2, 1];
    aux = E * sum_e mean_t(p_te) * n_e / T = 2 * (1.75/3 * 2/3 + 1.25/3 * 1/3) = 9.5/9;
    z = mean_t logsumexp(logits_t)^2 = (2 ln(4)^2 + ln(4/3)^2) / 3."""
    blk = MoEBlock(_cfg(moe_num_experts=2, moe_k=1, moe_num_shared_experts=0, moe_z_loss_lambda=1e-3,
                        moe_aux_loss_lambda=1e-2), 0)
    wg = np.zeros((16, 2), np.float32)
    wg[0, 0] = 1.0
    blk.gate.weight.set_value(wg)
    x = np.zeros((1, 3, 16), np.float32)
    x[0, :, 0] = [math.log(3), -math.log(3), math.log(3)]
    blk.train()
    blk(paddle.to_tensor(x))
    assert float(blk.aux_loss) == pytest.approx(9.5 / 9, rel=1e-6)
    assert float(blk.z_loss) == pytest.approx((2 * math.log(4) ** 2 + math.log(4 / 3) ** 2) / 3, rel=1e-6)
    assert blk.load.tolist() == [2, 1]
    assert float(router_loss(blk)) == pytest.approx(1e-2 * 9.5 / 9 + 1e-3 * float(blk.z_loss), rel=1e-6)


def test_aux_free_balance_loss_counts_the_unbiased_top_k():
    """With moe_use_aux_free, ERNIEKit's balance loss counts tokens by top-k of the UNBIASED p, while dispatch
    (and the load the bias update sees) follows the biased selection. Same three tokens as above, and a bias
    of +0.6 on expert 1 that flips the first and third token to expert 1: load [0, 3], aux still 9.5/9."""
    blk = MoEBlock(_cfg(moe_num_experts=2, moe_k=1, moe_num_shared_experts=0, moe_use_aux_free=True), 0)
    wg = np.zeros((16, 2), np.float32)
    wg[0, 0] = 1.0
    blk.gate.weight.set_value(wg)
    blk.moe_statics.e_score_correction_bias.set_value(np.array([[0.0, 0.6]], np.float32))
    x = np.zeros((1, 3, 16), np.float32)
    x[0, :, 0] = [math.log(3), -math.log(3), math.log(3)]
    blk.train()
    blk(paddle.to_tensor(x))
    assert blk.load.tolist() == [0, 3]
    assert float(blk.aux_loss) == pytest.approx(9.5 / 9, rel=1e-6)


def test_aux_loss_trains_the_router_only():
    paddle.seed(3)
    blk = MoEBlock(_cfg(), 0)
    blk.train()
    blk(paddle.randn([2, 5, 16]))
    blk.aux_loss.backward()
    assert blk.gate.weight.grad is not None and float(blk.gate.weight.grad.abs().sum()) > 0
    assert blk.moe_statics.e_score_correction_bias.grad is None  # moved by the update rule, not gradients
    assert blk.z_loss is None  # moe_z_loss_lambda 0: off


def test_eval_forward_leaves_training_state_alone():
    paddle.seed(4)
    blk = MoEBlock(_cfg(), 0)
    blk.eval()
    blk(paddle.randn([2, 5, 16]))
    assert blk.aux_loss is None and blk.load.sum() == 0


def test_bias_update_sign_convention():
    """Overloaded experts are pushed DOWN by coef, underloaded ones UP, the exactly-average one stays."""
    model = ErnieForCausalLM(ernie_tiny_moe(vocab_size=40))
    blk = moe_blocks(model)[0]
    blk.load[:] = [10, 0, 5, 5, 5, 5, 5, 5]  # mean 5
    before = blk.moe_statics.e_score_correction_bias.numpy().copy()
    update_correction_bias(model, coef=1e-3)
    delta = blk.moe_statics.e_score_correction_bias.numpy() - before
    np.testing.assert_allclose(delta[0], [-1e-3, 1e-3, 0, 0, 0, 0, 0, 0], atol=1e-9)
    assert blk.load.sum() == 0  # reset for the next step
    other = moe_blocks(model)[1]  # its load was all zeros: every expert at the mean, nothing moves
    assert np.abs(other.moe_statics.e_score_correction_bias.numpy()).max() == 0


def test_bias_update_uses_the_reduced_load_and_respects_the_config():
    model = ErnieForCausalLM(ernie_tiny_moe(vocab_size=40))
    blk = moe_blocks(model)[0]
    blk.load[:] = [1, 0, 0, 0, 0, 0, 0, 0]
    seen = []
    # another rank saw the opposite skew: the summed load decides
    update_correction_bias(model, all_reduce=lambda a: seen.append(a.copy()) or a + [0, 3, 0, 0, 0, 0, 0, 0])
    assert seen[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert np.sign(blk.moe_statics.e_score_correction_bias.numpy()[0]).tolist() == [-1, -1, 1, 1, 1, 1, 1, 1]
    cfg = ernie_tiny_moe(vocab_size=40)
    cfg.moe_use_aux_free = False
    off = ErnieForCausalLM(cfg)
    moe_blocks(off)[0].load[:] = [9, 0, 0, 0, 0, 0, 0, 0]
    update_correction_bias(off)
    assert np.abs(moe_blocks(off)[0].moe_statics.e_score_correction_bias.numpy()).max() == 0


def test_bias_updates_balance_a_skewed_router():
    """The rule does its job: with a router skewed toward expert 0, repeated updates even out the load."""
    paddle.seed(5)
    blk = MoEBlock(_cfg(moe_num_experts=4, moe_k=1, moe_num_shared_experts=0, moe_use_aux_free=True), 0)
    wg = blk.gate.weight.numpy() * 0.1
    wg[:, 0] += 0.05
    blk.gate.weight.set_value(wg)
    x = paddle.randn([4, 32, 16]) * 0.5 + 1.0  # every token leans toward expert 0
    blk.train()
    blk(x)
    first = expert_load_stats(blk, reset=True)["layer.0"]
    for _ in range(200):
        blk(x)
        update_correction_bias(blk, coef=2e-3)
    for _ in range(5):  # measure over a few forwards without updates
        blk(x)
    last = expert_load_stats(blk)["layer.0"]
    assert first["tokens"][0] > 100 and first["min_max_ratio"] < 0.1  # skewed to start with
    assert last["min_max_ratio"] > 0.5 and sum(last["tokens"]) == 5 * 128


def test_load_stats_per_layer():
    paddle.seed(6)
    model = ErnieForCausalLM(ernie_tiny_moe(vocab_size=40))
    model.train()
    model(paddle.randint(0, 40, [2, 10]))
    model(paddle.randint(0, 40, [1, 10]))
    stats = expert_load_stats(model, reset=True)
    assert list(stats) == ["layer.1", "layer.2"]
    for s in stats.values():
        assert sum(s["tokens"]) == 30 * 2 and len(s["tokens"]) == 8  # T * k tokens over both forwards
        assert s["min_max_ratio"] == pytest.approx(min(s["tokens"]) / max(s["tokens"]))
    assert all(sum(s["tokens"]) == 0 for s in expert_load_stats(model).values())


def test_router_stays_fp32_when_the_model_is_cast():
    model = ErnieForCausalLM(ernie_tiny_moe(vocab_size=40))
    model.to(dtype="float16")
    blk = moe_blocks(model)[0]
    assert blk.gate.weight.dtype == paddle.float32
    assert blk.moe_statics.e_score_correction_bias.dtype == paddle.float32
    assert blk.experts[0].up_gate_proj.weight.dtype == paddle.float16


def test_cached_greedy_decoding_equals_full_recompute():
    """generate() (KV cache, one token at a time through the MoE layers) picks what a full forward picks."""
    paddle.seed(8)
    cfg = ernie_tiny_moe(vocab_size=50)
    cfg.initializer_range = 0.2
    model = ErnieForCausalLM(cfg)
    model.eval()
    prompt = [3, 17, 9, 41, 2, 8]
    got = model.generate(prompt, max_new_tokens=10, eos_token_id=-1)[0]
    seq = list(prompt)
    with paddle.no_grad():
        for _ in range(10):
            seq.append(int(model(paddle.to_tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[len(prompt):] and len(set(got)) > 2



def test_padding_is_left_out_of_the_aux_loss_and_the_load():
    """With a token mask, aux loss and load equal those of a forward over the real tokens alone."""
    paddle.seed(9)
    blk = MoEBlock(_cfg(moe_num_experts=4, moe_k=2, moe_num_shared_experts=0), 0)
    blk.train()
    x = paddle.randn([1, 12, 16])
    blk(x[:, :7])
    want_aux, want_load = float(blk.aux_loss), blk.load.copy()
    blk.load[:] = 0
    mask = paddle.to_tensor([[True] * 7 + [False] * 5])
    set_token_mask(blk, mask)
    blk(x)
    assert float(blk.aux_loss) == pytest.approx(want_aux, rel=1e-6)
    assert blk.load.tolist() == want_load.tolist() and blk.load.sum() == 7 * 2
    set_token_mask(blk, None)
    blk(x)
    assert blk.load.sum() == 7 * 2 + 12 * 2


def test_no_grad_forwards_and_paused_counting_leave_the_load_alone():
    """A no_grad forward (a DPO reference) and a recompute re-run inside load_count_paused count nothing."""
    blk = MoEBlock(_cfg(moe_num_experts=4, moe_k=1, moe_num_shared_experts=0), 0)
    blk.train()
    x = paddle.randn([2, 5, 16])
    with paddle.no_grad():
        blk(x)
    assert blk.load.sum() == 0 and blk.aux_loss is None
    with load_count_paused(blk):
        blk(x)
    assert blk.load.sum() == 0 and blk.aux_loss is not None and blk.count_load
    blk(x)
    assert blk.load.sum() == 10

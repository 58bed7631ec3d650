"""The model's own invariants: packing, KV-cache decoding, positions, loss."""
import numpy as np
import paddle
import pytest

from libernie.config import ernie_tiny
from libernie.model import ErnieForCausalLM, causal_lm_loss
from libernie.model.ernie import default_position_ids


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def model(request):
    paddle.seed(11)
    cfg = ernie_tiny(vocab_size=97)
    cfg.tie_word_embeddings = request.param
    cfg.initializer_range = 0.2
    m = ErnieForCausalLM(cfg)
    m.eval()
    return m


def _t(a):
    return paddle.to_tensor(np.asarray(a, dtype=np.int64))


def test_packed_row_loss_equals_sum_of_documents_run_alone(model):
    docs = [[5, 17, 33, 2], [8, 9, 10, 11, 12, 2], [40, 41, 2]]
    row = sum(docs, [])
    doc_ids = sum([[i] * len(d) for i, d in enumerate(docs)], [])
    with paddle.no_grad():
        out = model(_t([row]), labels=_t([row]), doc_ids=_t([doc_ids]))
        packed_sum, n = causal_lm_loss(out.logits, _t([row]), doc_ids=_t([doc_ids]), reduction="none")
        alone = [causal_lm_loss(model(_t([d])).logits, _t([d]), reduction="none") for d in docs]
    assert float(n) == sum(len(d) - 1 for d in docs)
    np.testing.assert_allclose(float(packed_sum), sum(float(s) for s, _ in alone), rtol=1e-5)
    np.testing.assert_allclose(float(out.loss), float(packed_sum) / float(n), rtol=1e-6)
    # and token by token: each document's logits inside the pack equal its logits alone
    start = 0
    for d in docs:
        with paddle.no_grad():
            np.testing.assert_allclose(out.logits[0, start:start + len(d)].numpy(), model(_t([d])).logits[0].numpy(),
                                       atol=1e-5)
        start += len(d)


def test_positions_restart_at_each_document():
    pos = default_position_ids(1, 7, doc_ids=_t([[3, 3, 3, 4, 4, 9, 9]]))
    assert pos.numpy().tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    left = default_position_ids(2, 4, key_padding=_t([[0, 0, 1, 1], [1, 1, 1, 1]]))
    assert left.numpy().tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_prefill_plus_decode_equals_full_forward(model):
    ids = np.random.default_rng(0).integers(3, 97, size=(2, 10))
    with paddle.no_grad():
        full = model(_t(ids)).logits.numpy()
        cache = model.new_cache()
        steps = [model(_t(ids[:, :6]), cache=cache).logits.numpy()]
        for t in range(6, 10):
            steps.append(model(_t(ids[:, t:t + 1]), cache=cache).logits.numpy())
    assert cache.seq_len == 10
    # fp32 noise: the prefill/decode projections and the attention kernel's online softmax round differently
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=2e-5, atol=1e-5)


def test_left_padded_batch_matches_unpadded_rows(model):
    a, b = [4, 5, 6, 7, 8, 9], [20, 21, 22]
    pad = np.array([[1] * 6, [0, 0, 0, 1, 1, 1]])
    ids = np.array([a, [0, 0, 0] + b])
    with paddle.no_grad():
        out = model(_t(ids), attention_mask=_t(pad)).logits.numpy()
        np.testing.assert_allclose(out[1, 3:], model(_t([b])).logits.numpy()[0], atol=1e-5)
        np.testing.assert_allclose(out[0], model(_t([a])).logits.numpy()[0], atol=1e-5)


def test_loss_matches_hand_computed_cross_entropy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(1, 5, 7)).astype(np.float32)
    labels = np.array([[1, 2, -100, 4, 5]])
    mask = np.array([[1, 1, 1, 0, 1]])
    # targets at t=1..4: 2, -100 (ignored), 4 (masked out), 5
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expect = -(lp[0, 0, 2] + lp[0, 3, 5]) / 2
    got = causal_lm_loss(paddle.to_tensor(logits), _t(labels), loss_mask=_t(mask))
    np.testing.assert_allclose(float(got), expect, rtol=1e-6)


def test_logits_to_keep_is_last_positions(model):
    ids = _t([[5, 6, 7, 8]])
    with paddle.no_grad():
        np.testing.assert_allclose(model(ids, logits_to_keep=1).logits.numpy(), model(ids).logits.numpy()[:, -1:],
                                   atol=1e-6)


def test_backward_reaches_every_parameter(model):
    model.train()
    ids = _t([[5, 6, 7, 8, 9, 2]])
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
        p.clear_gradient()
    model.eval()

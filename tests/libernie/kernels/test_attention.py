"""Every attention path that runs on CPU agrees with the reference, and the reference with numpy."""
import numpy as np
import paddle
import pytest

from libernie.kernels import attention, attention_backend, build_attention_mask
from libernie.kernels import cpu_kernel
from libernie.kernels.attention import attention_reference

# every CPU backend that can run here ("cpu" needs the C++ kernel built)
CPU_BACKENDS = ("reference", "cpu", "blocked", "sdpa") if cpu_kernel.load() is not None else (
    "reference", "blocked", "sdpa")


def _numpy_attention(q, k, v, allowed):
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)           # [b, t, nh, hd]
    s = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(q.shape[-1])
    s = np.where(allowed[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhst,bthd->bshd", p, v)


@pytest.mark.parametrize("nh,nkv", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("kind", ["causal", "docs", "padding"])
def test_sdpa_and_reference_agree_with_numpy(nh, nkv, kind):
    rng = np.random.default_rng(nh * 10 + nkv)
    b, s, hd = 2, 9, 8
    q = rng.normal(size=(b, s, nh, hd)).astype(np.float32)
    k, v = (rng.normal(size=(b, s, nkv, hd)).astype(np.float32) for _ in range(2))
    causal = np.tril(np.ones((s, s), bool))[None].repeat(b, 0)
    doc = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 6, 6]])
    pad = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])
    if kind == "causal":
        mask, allowed = build_attention_mask(s, s), causal
    elif kind == "docs":
        mask = build_attention_mask(s, s, doc_ids=paddle.to_tensor(doc))
        allowed = causal & (doc[:, :, None] == doc[:, None, :])
    else:
        mask = build_attention_mask(s, s, key_padding=paddle.to_tensor(pad))
        allowed = causal & pad[:, None, :].astype(bool) | np.eye(s, dtype=bool)[None]
    expect = _numpy_attention(q, k, v, allowed)
    rows = slice(None) if kind != "padding" else slice(3, None)          # padding queries are don't-care
    kh, vh = (paddle.to_tensor(a.transpose(0, 2, 1, 3).copy()) for a in (k, v))   # head-major, as the cache keeps them
    for backend in CPU_BACKENDS:
        out = attention(paddle.to_tensor(q), kh, vh, mask, backend=backend).numpy()
        assert np.isfinite(out).all(), backend
        np.testing.assert_allclose(out[:, rows], expect[:, rows], atol=2e-6, err_msg=backend)


def test_mask_with_cache_offset_lets_new_queries_see_the_past():
    m = build_attention_mask(2, 5, key_padding=paddle.to_tensor([[0, 1, 1, 1, 1]])).allowed().numpy()[0, 0]
    np.testing.assert_array_equal(m, [[False, True, True, True, False], [False, True, True, True, True]])


@pytest.mark.parametrize("s,t,block", [(1, 9, 4), (3, 9, 2), (9, 9, 4), (130, 130, 64), (5, 5, 64), (70, 200, 16)])
def test_blocked_kernels_match_reference_across_blocks_and_cache_offsets(s, t, block):
    from libernie.kernels.attention import attention_blocked, attention_cpu
    rng = np.random.default_rng(s * 100 + t)
    q = paddle.to_tensor(rng.normal(size=(2, s, 6, 8)).astype(np.float32))
    k, v = (paddle.to_tensor(rng.normal(size=(2, 3, t, 8)).astype(np.float32)) for _ in range(2))
    pad = np.ones((2, t), np.int64)
    pad[1, :2] = 0
    for mask in (build_attention_mask(s, t, key_padding=paddle.to_tensor(pad)),) + (
            (build_attention_mask(s, t),) if s == t else ()):
        ref = attention_reference(q, k, v, mask).numpy()
        np.testing.assert_allclose(attention_blocked(q, k, v, mask, block=block).numpy(), ref, atol=2e-6)
        if "cpu" in CPU_BACKENDS:
            np.testing.assert_allclose(attention_cpu(q, k, v, mask).numpy(), ref, atol=2e-6)


def test_dispatch_picks_the_cpu_kernel_for_fp32_and_honours_override(monkeypatch):
    q = paddle.zeros([1, 2, 2, 4])
    assert attention_backend(q, None) == ("cpu" if cpu_kernel.load() else "blocked")   # C++ kernel where built
    assert attention_backend(q.astype("bfloat16"), None) == "blocked"   # fp32 only; the Paddle twin takes the rest
    monkeypatch.setenv("ERNIE_ATTENTION", "reference")
    assert attention_backend(q, None) == "reference"
    monkeypatch.setenv("ERNIE_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="ERNIE_ATTENTION"):
        attention_backend(q, None)


def test_reference_handles_causal_without_mask():
    q = paddle.randn([1, 4, 2, 4])
    k = q.transpose([0, 2, 1, 3])
    np.testing.assert_allclose(attention_reference(q, k, k).numpy(), attention(q, k, k, backend="sdpa").numpy(),
                               atol=1e-6)


def test_gpu_dispatch_never_sends_padded_batches_to_flash(monkeypatch):
    import sys
    monkeypatch.setattr(sys.modules["libernie.kernels.attention"], "on_gpu", lambda x=None: True)
    q = paddle.zeros([1, 4, 2, 8], dtype="bfloat16")
    docs = paddle.to_tensor([[0, 0, 1, 1]])
    assert attention_backend(q, build_attention_mask(4, 4, doc_ids=docs)) == "flash"       # FlashMask
    padded = build_attention_mask(4, 4, doc_ids=docs, key_padding=paddle.to_tensor([[0, 1, 1, 1]]))
    assert attention_backend(q, padded) == "sdpa"                                        # flash would ignore padding
    assert attention_backend(q.astype("float32"), build_attention_mask(4, 4)) == "sdpa"  # flash is half precision only


def test_dpo_rule_rejected_never_sees_chosen_in_every_backend():
    """Packed prompt|chosen|rejected pairs: the mask equals libernie.data.attention_mask (the dense
    reference of docs/formats/shards.md), and every CPU backend agrees with numpy under it."""
    from libernie.data.dataset import attention_mask
    from libernie.kernels.attention import attention_blocked
    # two pairs in one row: P P C C R R R | P C C R ; then padding
    roles = np.array([[1, 1, 2, 2, 3, 3, 3, 1, 2, 2, 3, 0, 0]])
    doc = np.array([[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1]])
    s = roles.shape[1]
    want = _dense_rule(doc[0], roles[0], attention_mask)
    mask = build_attention_mask(s, s, doc_ids=paddle.to_tensor(doc), roles=paddle.to_tensor(roles))
    got = mask.allowed().numpy()[0, 0]
    real = doc[0] >= 0
    np.testing.assert_array_equal(got[np.ix_(real, real)], want[np.ix_(real, real)])
    assert not got[4, 2] and not got[6, 3] and got[4, 1] and got[10, 7] and not got[10, 8]
    rng = np.random.default_rng(7)
    q = rng.normal(size=(1, s, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(1, s, 2, 8)).astype(np.float32) for _ in range(2))
    expect = _numpy_attention(q, k, v, got[None])
    kh, vh = (paddle.to_tensor(a.transpose(0, 2, 1, 3).copy()) for a in (k, v))
    for backend in CPU_BACKENDS:
        out = attention(paddle.to_tensor(q), kh, vh, mask, backend=backend).numpy()
        np.testing.assert_allclose(out[:, real], expect[:, real], atol=2e-6, err_msg=backend)
    out = attention_blocked(paddle.to_tensor(q), kh, vh, mask, block=3).numpy()
    np.testing.assert_allclose(out[:, real], expect[:, real], atol=2e-6)


def _dense_rule(doc, roles, attention_mask):
    class _S:  # the two fields the dense reference reads
        pass
    smp = _S()
    smp.doc_ids, smp.roles = doc, roles
    return attention_mask(smp)

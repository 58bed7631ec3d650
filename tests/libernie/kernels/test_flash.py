"""The linear-memory kernels (C++ "cpu" and its Paddle twin "blocked") against the dense reference: values and
gradients under every mask the model builds, the column form of the mask against the dense one, tile skipping,
and the fallback where the C++ kernel cannot be built."""
import os
import shutil

import numpy as np
import paddle
import pytest

from libernie.kernels import cpu_kernel
from libernie.kernels.attention import (ROLE_CHOSEN, ROLE_REJECTED, attention, attention_backend,
                                        build_attention_mask)

from kernel_testlib import load_uncached

KERNELS = ("cpu", "blocked")


def _built(backends):
    """The backends that can run here: "cpu" needs the C++ kernel (no compiler: the twin alone is tested)."""
    return [b for b in backends if b != "cpu" or cpu_kernel.load() is not None]


def _skip_unbuilt(backend):
    if backend == "cpu" and cpu_kernel.load() is None:
        pytest.skip("the C++ attention kernel is not built here (no compiler or ERNIE_CPU_KERNEL=0)")


def _qkv(rng, b, s, t, nh, nkv, hd):
    q = rng.normal(size=(b, s, nh, hd)).astype(np.float32)
    k, v = (rng.normal(size=(b, nkv, t, hd)).astype(np.float32) for _ in range(2))
    return q, k, v


def _grads(backend, q, k, v, mask, dout):
    """out, dq, dk, dv of attention(q, k, v) under `backend` for the upstream gradient dout."""
    ts = [paddle.to_tensor(x, stop_gradient=False) for x in (q, k, v)]
    out = attention(*ts, mask, backend=backend)
    grads = paddle.grad([out], ts, [paddle.to_tensor(dout)])
    return [out.numpy()] + [g.numpy() for g in grads]


def _packed(rng, b, s, mean_len):
    """Ragged documents per row: doc ids [b, s]."""
    return np.stack([np.cumsum(rng.random(s) < 1.0 / mean_len) for _ in range(b)])


def _dpo(b, s, rng):
    """Rows of packed prompt|chosen|rejected pairs, then padding (doc -1, role 0), as ernie-pack writes them."""
    doc, role = np.full((b, s), -1), np.zeros((b, s), np.int64)
    for r in range(b):
        p, d = 0, 0
        while True:
            lens = rng.integers(2, 12, size=3)
            if p + lens.sum() > s - 3:
                break
            for code, n in zip((1, ROLE_CHOSEN, ROLE_REJECTED), lens):
                doc[r, p:p + n], role[r, p:p + n] = d, code
                p += n
            d += 1
    return doc, role


CASES = {
    "causal": lambda rng, b, s: {},
    "docs": lambda rng, b, s: {"doc_ids": paddle.to_tensor(_packed(rng, b, s, 40))},
    "padding": lambda rng, b, s: {"key_padding": paddle.to_tensor(
        (np.arange(s)[None] >= np.array([0, 37])[:b, None]).astype(np.int64))},
    "docs+padding": lambda rng, b, s: {"doc_ids": paddle.to_tensor(_packed(rng, b, s, 30)),
                                       "key_padding": paddle.to_tensor(
                                           (np.arange(s)[None] >= np.array([5, 70])[:b, None]).astype(np.int64))},
    "dpo": lambda rng, b, s: dict(zip(("doc_ids", "roles"), map(paddle.to_tensor, _dpo(b, s, rng)))),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("nh,nkv,hd", [(4, 2, 24), (8, 1, 20), (4, 4, 64), (16, 2, 8)])
def test_values_and_gradients_match_the_reference(case, nh, nkv, hd):
    """s = 150 crosses the 64-key tiles and the 16/32/64-row query tiles (g = 2, 4, 8); hd 24/20/64/8 takes
    every vector width of the C++ kernel and its scalar tail."""
    rng = np.random.default_rng(nh * 100 + hd)
    b, s = 2, 150
    q, k, v = _qkv(rng, b, s, s, nh, nkv, hd)
    mask = build_attention_mask(s, s, **CASES[case](rng, b, s))
    dout = rng.normal(size=q.shape).astype(np.float32)
    if "padding" in case:          # padding queries are don't-care rows: no gradient flows from them
        pad = mask.key_padding.numpy() == 0
        dout[pad] = 0.0
    ref = _grads("reference", q, k, v, mask, dout)
    for backend in _built(KERNELS):
        got = _grads(backend, q, k, v, mask, dout)
        rows = ~pad if "padding" in case else np.ones((b, s), bool)
        for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
            if name in ("out", "dq"):
                g, r = g[rows], r[rows]
            np.testing.assert_allclose(g, r, atol=3e-5, rtol=1e-4, err_msg=f"{backend} {case} {name}")


@pytest.mark.parametrize("s,t", [(1, 150), (1, 1), (7, 150), (64, 200), (100, 100)])
def test_kv_cache_offsets_prefill_and_decode(s, t):
    """Queries are the last s of t keys (a cache holds t - s), with left padding in one row."""
    rng = np.random.default_rng(s + t)
    q, k, v = _qkv(rng, 2, s, t, 4, 2, 24)
    pad = np.ones((2, t), np.int64)
    pad[1, :min(9, t - 1)] = 0
    mask = build_attention_mask(s, t, key_padding=paddle.to_tensor(pad))
    dout = rng.normal(size=q.shape).astype(np.float32)
    ref = _grads("reference", q, k, v, mask, dout)
    for backend in _built(KERNELS):
        for g, r in zip(_grads(backend, q, k, v, mask, dout), ref):
            np.testing.assert_allclose(g, r, atol=3e-5, rtol=1e-4, err_msg=backend)


@pytest.mark.parametrize("case", sorted(CASES))
def test_column_form_equals_the_dense_mask(case):
    rng = np.random.default_rng(3)
    b, s = 2, 90
    mask = build_attention_mask(s, s, **CASES[case](rng, b, s))
    ends = mask.key_ends(b)                                               # [b, t]
    p, j = np.arange(s)[:, None], np.arange(s)[None, :]
    column = (j <= p) & (p < ends[:, None, :])                            # [b, s, t]
    np.testing.assert_array_equal(column, np.broadcast_to(mask.allowed().numpy()[:, 0], column.shape))


def test_dpo_rule_without_a_column_form_goes_to_the_dense_reference():
    """Chosen after rejected in one document: no interval of rows, so the blocked kernels refuse it."""
    roles = paddle.to_tensor([[1, 2, 3, 2, 3]])
    mask = build_attention_mask(5, 5, doc_ids=paddle.to_tensor([[0] * 5]), roles=roles)
    assert mask.key_ends() is None
    q = paddle.zeros([1, 5, 2, 8])
    assert attention_backend(q, mask) == "reference"
    with pytest.raises(ValueError, match="reference"):
        attention(q, paddle.zeros([1, 2, 5, 8]), paddle.zeros([1, 2, 5, 8]), mask, backend="blocked")
    allowed = mask.allowed().numpy()[0, 0]
    assert not allowed[2, 1] and not allowed[4, 3] and allowed[3, 1] and allowed[4, 0]


@pytest.mark.parametrize("backend", KERNELS)
def test_tiles_of_other_documents_are_never_read(backend):
    """NaN in the values of every key outside a query's document: a kernel that read those tiles would
    spread it (0 * NaN) into outputs and gradients. Documents are 256 long, a multiple of both tile sizes."""
    _skip_unbuilt(backend)
    rng = np.random.default_rng(5)
    s = 768
    doc = np.repeat(np.arange(3), 256)[None]
    mask = build_attention_mask(s, s, doc_ids=paddle.to_tensor(doc))
    q, k, v = _qkv(rng, 1, s, s, 4, 2, 24)
    clean = _grads(backend, q, k, v, mask, np.ones(q.shape, np.float32))
    v_bad = v.copy()
    v_bad[:, :, :256] = np.nan                          # document 0's values: only document 0 may read them
    got = _grads(backend, q, k, v_bad, mask, np.ones(q.shape, np.float32))
    for name, g, c in zip(("out", "dq", "dk", "dv"), got, clean):
        rows = slice(256, None) if name in ("out", "dq") else slice(None)
        g, c = (g[:, rows], c[:, rows]) if name in ("out", "dq") else (g[:, :, 256:], c[:, :, 256:])
        assert np.isfinite(g).all(), f"{backend} {name}: read another document's tile"
        np.testing.assert_allclose(g, c, atol=1e-6, err_msg=name)


def test_cpu_kernel_builds_where_a_compiler_exists():
    """The C++ kernel is what runs on CPU; a silent fallback to the twin would hide a broken build."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine: the Paddle-ops twin runs instead")
    if os.environ.get("ERNIE_CPU_KERNEL") == "0":
        pytest.skip("ERNIE_CPU_KERNEL=0 turns the C++ kernel off")
    assert cpu_kernel.load() is not None


def test_no_compiler_falls_back_to_the_paddle_kernel_with_one_warning(monkeypatch, caplog):
    monkeypatch.delenv("ERNIE_CPU_KERNEL", raising=False)
    monkeypatch.setattr(cpu_kernel.shutil, "which", lambda name: None)
    def again():
        assert attention_backend(paddle.zeros([1, 2, 2, 8]), None) == "blocked"
        assert cpu_kernel.load() is None                           # cached: warned once
    got, lines = load_uncached(cpu_kernel, caplog, then=again)
    assert got is None and len(lines) == 1 and "\n" not in lines[0] and "no C++ compiler" in lines[0]


def test_a_failed_build_falls_back_with_the_compilers_first_error(monkeypatch, caplog):
    monkeypatch.delenv("ERNIE_CPU_KERNEL", raising=False)
    def broken():
        raise RuntimeError("flash_attention_cpu.cc:1:1: error: something went wrong\nmore lines")
    monkeypatch.setattr(cpu_kernel, "_build", broken)
    got, (line,) = load_uncached(cpu_kernel, caplog)
    assert got is None and "error: something went wrong" in line and "more lines" not in line


def test_non_fp32_inputs_go_to_the_paddle_twin():
    """The C++ kernel is fp32 only; other dtypes (float64 here: Paddle's CPU matmul has no bf16) run the twin,
    gradients come back in the input dtype, and the softmax statistics are fp32."""
    rng = np.random.default_rng(9)
    q, k, v = _qkv(rng, 1, 80, 80, 4, 2, 16)
    mask = build_attention_mask(80, 80, doc_ids=paddle.to_tensor(_packed(rng, 1, 80, 30)))
    dout = rng.normal(size=q.shape).astype(np.float32)
    ref = _grads("reference", q, k, v, mask, dout)
    ts = [paddle.to_tensor(x.astype(np.float64), stop_gradient=False) for x in (q, k, v)]
    assert attention_backend(ts[0], mask) == "blocked"
    out = attention(*ts, mask)
    grads = paddle.grad([out], ts, [paddle.to_tensor(dout.astype(np.float64))])
    assert out.dtype == paddle.float64 and all(g.dtype == paddle.float64 for g in grads)
    for g, r in zip([out] + list(grads), ref):
        np.testing.assert_allclose(g.numpy(), r, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", KERNELS)
def test_model_gradients_match_the_reference_on_packed_dpo_rows(backend, monkeypatch):
    """The mask plumbing end to end: ErnieForCausalLM.forward(doc_ids=, position_ids=, roles=) on packed
    DPO pairs with padding, loss and every parameter gradient equal to the dense reference's."""
    _skip_unbuilt(backend)
    from libernie.config import ernie_tiny
    from libernie.model import ErnieForCausalLM
    rng = np.random.default_rng(1)
    b, s = 2, 96
    doc, role = _dpo(b, s, rng)
    pos = np.zeros((b, s), np.int64)
    for r in range(b):
        for d in set(doc[r]) - {-1}:
            idx = np.flatnonzero(doc[r] == d)
            n_prompt = int((role[r, idx] == 1).sum())
            n_cho = int((role[r, idx] == ROLE_CHOSEN).sum())
            pos[r, idx] = np.concatenate([np.arange(n_prompt + n_cho),           # rejected restarts at the prompt's end
                                          n_prompt + np.arange(len(idx) - n_prompt - n_cho)])
    ids = rng.integers(3, 97, size=(b, s))
    paddle.seed(2)
    cfg = ernie_tiny(vocab_size=97)
    cfg.initializer_range = 0.2
    model = ErnieForCausalLM(cfg)
    results = {}
    for name in ("reference", backend):
        monkeypatch.setenv("ERNIE_ATTENTION", name)
        out = model(paddle.to_tensor(ids), labels=paddle.to_tensor(ids), loss_mask=paddle.to_tensor(doc >= 0),
                    doc_ids=paddle.to_tensor(doc), position_ids=paddle.to_tensor(pos), roles=paddle.to_tensor(role))
        out.loss.backward()
        results[name] = [float(out.loss)] + [p.grad.numpy().copy() for p in model.parameters()]
        model.clear_gradients()
    for got, ref in zip(results[backend], results["reference"]):
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-4)

"""The wint8 token embedding (docs/formats/quant.md "--quantize-embeddings"): golden bytes, which tensors are
chosen, the lookup and the blockwise head against the dequantized matrix, and the blocked quantized matmul
against the dequantize-per-matmul reference."""
import dataclasses

import numpy as np
import paddle
import pytest

from libernie.checkpoint.names import rules
from libernie.config import ernie_tiny
from libernie.quant.formats import EMBEDDING, HEAD, QuantResult, planned, quantizable, tensors_for
from libernie.quant.gptq import rtn_quantize_reference
from libernie.quant.linear import QuantEmbedding, QuantLinear, cpu_blocked, cpu_reference, quant_embedding, vocab_logits


def _rule(cfg, name):
    return next(r for r in rules(cfg) if r.paddle == name)


def test_golden_bytes_one_scale_per_vocabulary_row():
    cfg = dataclasses.replace(ernie_tiny(vocab_size=2), hidden_size=4)
    w = np.array([[-1.27, 0.5, 0.0, 1.27], [0.0, 0.0, 0.0, 0.0]], np.float32)        # [V, h]
    q, scale = rtn_quantize_reference(w, 8, -1)
    r = QuantResult("wint8", q, scale, group_size=-1)
    got = {n: (a, dt) for n, a, dt in tensors_for(_rule(cfg, EMBEDDING), r, "fastdeploy")}
    qw, dt = got["ernie.embed_tokens.quant_weight"]
    assert dt == "I8" and qw.shape == (2, 4)                                          # rows = tokens, not [in, out]
    assert np.ascontiguousarray(qw).view(np.uint8)[0].tobytes() == bytes([0x81, 0x32, 0x00, 0x7F])
    s, dt = got["ernie.embed_tokens.weight_scale"]
    assert dt == "F32" and s.shape == (2,)
    assert s.view(np.uint32)[0] == 0x3C23D70A and s[1] == 1.0                       # 0.01; an all-zero row gets 1


@pytest.mark.parametrize("tied", [True, False])
def test_chosen_only_when_asked_and_planned_shapes_match(tied):
    cfg = ernie_tiny(vocab_size=64)
    cfg.tie_word_embeddings = tied
    table = rules(cfg)
    assert not any(quantizable(r) for r in table if r.paddle in (EMBEDDING, HEAD))   # the default is unchanged
    picked = {r.paddle for r in table if quantizable(r, embeddings=True)} - {r.paddle for r in table
                                                                             if quantizable(r)}
    assert picked == ({EMBEDDING} if tied else {EMBEDDING, HEAD})
    rng = np.random.default_rng(0)
    for name in picked:
        rule = _rule(cfg, name)
        w = rng.standard_normal((64, cfg.hidden_size)).astype(np.float32)            # [out = V, in = h]
        q, s = rtn_quantize_reference(w, 8, -1)
        for fmt in ("fastdeploy", "compressed-tensors"):
            got = [(n, dt, tuple(a.shape)) for n, a, dt in tensors_for(rule, QuantResult("wint8", q, s), fmt)]
            assert got == [(n, dt, tuple(sh)) for n, dt, sh in planned(rule, "wint8", fmt, -1)]


def _emb(v=50, h=24, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((v, h)).astype(np.float32) * rng.uniform(0.1, 3, (v, 1)).astype(np.float32)
    q, s = rtn_quantize_reference(w, 8, -1)
    return QuantEmbedding(paddle.to_tensor(q), paddle.to_tensor(s[:, 0])), q.astype(np.float32) * s   # [V, h]


def test_lookup_dequantizes_only_the_gathered_rows_exactly():
    layer, deq = _emb()
    ids = np.array([[3, 0, 49, 3], [7, 7, 1, 2]])
    got = layer(paddle.to_tensor(ids)).numpy()                                        # [b, s, h]
    np.testing.assert_array_equal(got, deq[ids])                                      # q * scale, one product each


@pytest.mark.parametrize("block", [None, 7, 50, 64])
def test_blockwise_head_equals_the_dequantized_matmul(block):
    layer, deq = _emb()
    h = np.random.default_rng(1).standard_normal((2, 3, 24)).astype(np.float32)
    got = vocab_logits(paddle.to_tensor(h), layer.qweight, layer.scale, block).numpy()   # [b, s, V]
    np.testing.assert_allclose(got, h @ deq.T, rtol=1e-5, atol=1e-5)
    assert got.shape == (2, 3, 50)


def _linear(method, n_in, n_out, seed=0, bias=False, gs=-1):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)                        # [out, in]
    act = None
    if method in ("wint8", "wint4"):
        from libernie.quant.packing import pack_int4_rows
        q, s = rtn_quantize_reference(w, 8 if method == "wint8" else 4, gs)           # [out, in], [out, G]
        qt = np.ascontiguousarray(q.T)                                                # [in, out]
        if method == "wint4":
            qt = pack_int4_rows(qt)                                                   # [in/2, out]
        args = (paddle.to_tensor(qt), paddle.to_tensor(np.ascontiguousarray(s.T)))    # scale [G, out]
    else:
        from libernie.quant.fp8 import encode_e4m3, tensor_scale
        sc = tensor_scale(float(np.abs(w).max()))
        codes = encode_e4m3(w.T / sc)
        args = (paddle.to_tensor(np.ascontiguousarray(codes)).view("float8_e4m3fn"),
                paddle.to_tensor(np.full((1, n_out), sc, np.float32)))
        act = paddle.to_tensor(np.array([0.02], np.float32))
    b = paddle.to_tensor(rng.standard_normal(n_out).astype(np.float32)) if bias else None
    return QuantLinear(method, n_in, n_out, gs, *args, act_scale=act, bias=b)


@pytest.mark.parametrize("method,n_in,n_out,bias,gs", [
    ("wint8", 96, 40, False, -1), ("wint8", 100, 2048, True, -1), ("fp8", 96, 40, True, -1),
    ("wint4", 96, 40, True, -1), ("wint4", 96, 40, False, 16), ("wint8", 96, 40, True, 8),
    ("wint4", 128, 48, False, 32)])
def test_blocked_matmul_equals_the_dequantize_reference(monkeypatch, method, n_in, n_out, bias, gs):
    import libernie.quant.linear as L
    monkeypatch.setattr(L, "ROW_BLOCK_ELEMS", 16 * n_out)      # 16 input rows a block: several, the last ragged
    layer = _linear(method, n_in, n_out, bias=bias, gs=gs)
    x = paddle.to_tensor(np.random.default_rng(2).standard_normal((2, 5, n_in)).astype(np.float32))
    want = cpu_reference(x, layer).numpy()
    np.testing.assert_allclose(cpu_blocked(x, layer).numpy(), want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(layer(x).numpy(), want, rtol=1e-5, atol=1e-4)   # the CPU dispatch takes it

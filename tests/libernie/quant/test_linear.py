"""QuantLinear: the CPU reference against numpy dequantization (independent of Paddle's kernels), the int4
unpack against the numpy packer, the GPU layout conversion (weight_quantize, runs on CPU) against our integers,
and the dispatch point."""
import numpy as np
import paddle
import pytest

import libernie.quant.linear as ql
from libernie.quant.fp8 import decode_e4m3, encode_e4m3, quantize_fp8
from libernie.quant.gptq import dequantize, rtn_quantize
from libernie.quant.linear import QuantLinear, cpu_reference, dequantize_weight, unpack_int4, weight_only_layout
from libernie.quant.packing import pack_int4_rows

IN, OUT = 64, 48


def int_layer(method, group_size, seed=0, bias=False):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.1, (OUT, IN)).astype(np.float32)          # [out, in]
    q, scale = rtn_quantize(w, 8 if method == "wint8" else 4, group_size)
    qt = q.T.copy()                                               # [in, out]
    stored = pack_int4_rows(qt) if method == "wint4" else qt
    b = paddle.create_parameter([OUT], "float32") if bias else None
    if b is not None:
        b.set_value(rng.normal(0, 0.1, OUT).astype(np.float32))
    layer = QuantLinear(method, IN, OUT, group_size, paddle.to_tensor(stored), paddle.to_tensor(scale.T.copy()),
                        bias=b)
    gs = IN if group_size == -1 else group_size
    return layer, dequantize(q, scale, gs), b


@pytest.mark.parametrize("method,group", [("wint8", -1), ("wint8", 16), ("wint4", -1), ("wint4", 16)])
def test_int_reference_is_x_times_dequantized_weight(method, group):
    layer, w_deq, b = int_layer(method, group, bias=True)
    x = np.random.default_rng(9).normal(0, 1, (2, 5, IN)).astype(np.float32)
    y = cpu_reference(paddle.to_tensor(x), layer).numpy()
    want = x @ w_deq.T + b.numpy()
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    # kept as stored: int8 in memory (int4 still two per byte), never expanded at load
    assert layer.qweight.dtype == paddle.int8
    assert layer.qweight.shape[0] == (IN // 2 if method == "wint4" else IN)


def test_unpack_int4_matches_numpy_packer():
    q = np.random.default_rng(3).integers(-8, 8, (10, 7)).astype(np.int8)
    np.testing.assert_array_equal(unpack_int4(paddle.to_tensor(pack_int4_rows(q))).numpy(), q)


def test_fp8_reference_fake_quantizes_activations():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.1, (OUT, IN)).astype(np.float32)
    codes, ws = quantize_fp8(w)
    x = rng.normal(0, 1, (3, IN)).astype(np.float32)
    a_s = np.float32(np.abs(x).max() * 0.8 / 448)               # some inputs clip: that is what static scales do
    layer = QuantLinear("fp8", IN, OUT, -1, paddle.to_tensor(codes.T.copy()).view("float8_e4m3fn"),
                        paddle.to_tensor(np.full((1, OUT), ws, np.float32)), paddle.to_tensor(np.array([a_s])))
    y = cpu_reference(paddle.to_tensor(x), layer).numpy()
    xq = decode_e4m3(encode_e4m3(x / a_s)) * a_s                  # numpy twin of the activation path
    want = xq @ (decode_e4m3(codes) * ws).T
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(y, x @ (decode_e4m3(codes) * ws).T, atol=1e-4)  # the fake quant did something
    assert str(layer.qweight.dtype).endswith("float8_e4m3fn")


@pytest.mark.parametrize("method,group", [("wint8", -1), ("wint4", -1), ("wint4", 64)])
def test_weight_only_layout_keeps_our_integers(method, group):
    """The GPU conversion (weight_quantize, arch 80) re-derives the scales of RTN weights exactly (to fp16) and
    holds the same integers, rearranged and offset for the kernel."""
    rng = np.random.default_rng(5)
    n_in, n_out = 128, 64
    w = rng.normal(0, 0.1, (n_out, n_in)).astype(np.float32)
    bits = 8 if method == "wint8" else 4
    q, scale = rtn_quantize(w, bits, group)
    qt = q.T.copy()
    layer = QuantLinear(method, n_in, n_out, group, paddle.to_tensor(pack_int4_rows(qt) if bits == 4 else qt),
                        paddle.to_tensor(scale.T.copy()))
    kq, ks = weight_only_layout(layer, arch=80)
    kq, ks = kq.numpy(), ks.numpy().astype(np.float32)
    if group == -1:
        np.testing.assert_allclose(ks, scale[:, 0], rtol=2 ** -10)
    else:
        np.testing.assert_allclose(ks, scale.T, rtol=2 ** -10)
    assert kq.shape == ((n_out, n_in) if bits == 8 else (n_out // 2, n_in))
    if bits == 8:  # the kernel stores q + 128 (bytes XOR 0x80), interleaved: same multiset of integers
        got = (kq.view(np.uint8) ^ 0x80).view(np.int8)
        np.testing.assert_array_equal(np.sort(got.ravel()), np.sort(q.ravel()))


def test_dispatch_point_picks_gpu_path_when_paddle_sees_a_gpu(monkeypatch):
    layer, _, _ = int_layer("wint8", -1)
    calls = []
    monkeypatch.setattr(ql, "on_gpu", lambda: True)
    monkeypatch.setattr(ql, "_gpu_linear", lambda x, lay: calls.append(lay) or x)
    layer(paddle.ones([1, IN]))
    assert calls == [layer]
    monkeypatch.setattr(ql, "on_gpu", lambda: False)
    y = layer(paddle.ones([1, IN]))
    assert y.shape == [1, OUT] and len(calls) == 1


def test_dequantize_weight_groups():
    layer, w_deq, _ = int_layer("wint8", 16)
    np.testing.assert_allclose(dequantize_weight(layer).numpy(), w_deq.T, rtol=1e-6, atol=1e-7)

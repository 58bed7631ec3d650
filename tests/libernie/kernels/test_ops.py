"""Kernels against numpy written from the formulas (ERNIE-FACTS: interleaved RoPE, fp32 RMSNorm, SwiGLU)."""
import numpy as np
import paddle
import pytest

from libernie.kernels import apply_rope, backend, rms_norm, rope_cos_sin, swiglu
from libernie.kernels.ops import rms_norm_reference


def test_cpu_dispatch_uses_reference_kernels():
    assert backend(paddle.ones([2])) == "reference"  # fused RMSNorm is SIGILL on these CPUs


def test_rms_norm_matches_formula():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(3, 5, 16)).astype(np.float32), rng.normal(size=16).astype(np.float32)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
    out = rms_norm(paddle.to_tensor(x), paddle.to_tensor(w), 1e-5).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out, rms_norm_reference(paddle.to_tensor(x), paddle.to_tensor(w), 1e-5).numpy())


def _rope_numpy(x, pos, theta, ratio=1.0):
    """GPT-J interleaved RoPE as transformers writes it: x*cos + rotate_half(x)*sin, pairwise-repeated angles."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = (pos[..., None] / ratio) * inv                               # [b, s, hd/2]
    cos, sin = np.repeat(np.cos(ang), 2, -1)[:, :, None], np.repeat(np.sin(ang), 2, -1)[:, :, None]
    rot = np.stack([-x[..., 1::2], x[..., 0::2]], -1).reshape(x.shape)
    return x * cos + rot * sin


@pytest.mark.parametrize("ratio", [1.0, 2.0])
def test_rope_is_interleaved_with_compression_ratio(ratio):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, 3, 8)).astype(np.float32)
    pos = np.array([np.arange(7), [0, 1, 2, 0, 1, 0, 5]], dtype=np.int64)
    cos, sin = rope_cos_sin(paddle.to_tensor(pos), 8, 10000.0, ratio)
    out = apply_rope(paddle.to_tensor(x), cos, sin).numpy()
    np.testing.assert_allclose(out, _rope_numpy(x.astype(np.float64), pos, 10000.0, ratio), atol=2e-5)


def test_rope_position_zero_is_identity_and_norm_preserving():
    x = paddle.randn([1, 4, 2, 16])
    cos, sin = rope_cos_sin(paddle.to_tensor([[0, 3, 100, 5000]]), 16, 500000.0)
    out = apply_rope(x, cos, sin)
    np.testing.assert_allclose(out[:, 0].numpy(), x[:, 0].numpy(), atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(out.numpy(), axis=-1), np.linalg.norm(x.numpy(), axis=-1), rtol=1e-5)


def test_swiglu_gate_is_first_half():
    g = np.array([[1.0, -2.0]], np.float32)
    u = np.array([[3.0, 4.0]], np.float32)
    out = swiglu(paddle.to_tensor(np.concatenate([g, u], -1))).numpy()
    np.testing.assert_allclose(out, g / (1 + np.exp(-g)) * u, rtol=1e-6)

"""RMSNorm, interleaved RoPE and SwiGLU: a reference in plain Paddle ops next to each fused GPU path."""
import paddle
import paddle.nn.functional as F

from libernie.kernels.dispatch import backend


# ---- RMSNorm ----------------------------------------------------------------------------------
def rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, statistics in fp32. x [..., h], weight [h]."""
    if backend(x) == "fused":
        return _rms_norm_fused(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm_reference(x, weight, eps):
    h = x.astype("float32")
    h = h * paddle.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.astype(x.dtype)  # cast back before the weight, as transformers does


def _rms_norm_fused(x, weight, eps):  # GPU only: SIGILL on AVX2 CPUs; not run in CI
    from paddle.incubate.nn.functional import fused_rms_norm
    out = fused_rms_norm(x, weight, None, eps, begin_norm_axis=x.ndim - 1)
    return out[0] if isinstance(out, (tuple, list)) else out


# ---- RoPE (interleaved, GPT-J style) ------------------------------------------------------------
def rope_cos_sin(position_ids: paddle.Tensor, head_dim: int, theta: float,
                 compression_ratio: float = 1.0) -> tuple[paddle.Tensor, paddle.Tensor]:
    """cos/sin for each position and frequency, fp32. position_ids [b, s] -> two [b, s, 1, head_dim/2]."""
    inv_freq = 1.0 / (theta ** (paddle.arange(0, head_dim, 2, dtype="float32") / head_dim))  # [hd/2]
    pos = position_ids.astype("float32")
    if compression_ratio != 1.0:
        pos = pos / compression_ratio
    freqs = pos.unsqueeze(-1) * inv_freq                      # [b, s, hd/2]
    return freqs.cos().unsqueeze(2), freqs.sin().unsqueeze(2)  # [b, s, 1, hd/2]


def apply_rope(x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by the angle of frequency i. x [b, s, n, hd]; math in fp32."""
    b, s, n, hd = x.shape
    pairs = x.astype("float32").reshape([b, s, n, hd // 2, 2])   # [b, s, n, hd/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]                        # [b, s, n, hd/2]
    # Same products and sums, in the same order, as x*cos + rotate_half(x)*sin in transformers.
    out0 = x0 * cos + (-x1) * sin
    out1 = x1 * cos + x0 * sin
    return paddle.stack([out0, out1], axis=-1).reshape([b, s, n, hd]).astype(x.dtype)


# ---- SwiGLU ----------------------------------------------------------------------------------
def swiglu(gate_up: paddle.Tensor) -> paddle.Tensor:
    """silu(gate) * up where gate is the FIRST half of up_gate_proj's output. [..., 2i] -> [..., i]."""
    if backend(gate_up) == "fused":
        from paddle.incubate.nn.functional import swiglu as fused_swiglu
        return fused_swiglu(gate_up)  # splits the last axis in halves, gate first
    gate, up = gate_up.chunk(2, axis=-1)
    return F.silu(gate) * up

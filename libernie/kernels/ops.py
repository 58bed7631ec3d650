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
    h = h * paddle.rsqrt((h * h).mean(-1, keepdim=True) + eps)  # h*h: Paddle's CPU pow(2) is ~20x slower
    return weight * h.astype(x.dtype)  # cast back before the weight, as transformers does


def _rms_norm_fused(x, weight, eps):  # GPU only: SIGILL on AVX2 CPUs; not run in CI
    from paddle.incubate.nn.functional import fused_rms_norm
    out = fused_rms_norm(x, weight, None, eps, begin_norm_axis=x.ndim - 1)
    return out[0] if isinstance(out, (tuple, list)) else out


# ---- RoPE (interleaved, GPT-J style) ------------------------------------------------------------
def rope_cos_sin(position_ids: paddle.Tensor, head_dim: int, theta: float,
                 compression_ratio: float = 1.0) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Tables for apply_rope, fp32. position_ids [b, s] -> cos, sin [b, s, 1, head_dim].

    Pair i = (x[2i], x[2i+1]) turns by pos * theta^(-2i/hd). cos is repeated pairwise; sin carries
    the rotation's signs (-sin at 2i, +sin at 2i+1) so apply_rope needs only a pair swap.
    """
    inv_freq = 1.0 / (theta ** (paddle.arange(0, head_dim, 2, dtype="float32") / head_dim))  # [hd/2]
    pos = position_ids.astype("float32")
    if compression_ratio != 1.0:
        pos = pos / compression_ratio
    freqs = pos.unsqueeze(-1) * inv_freq                                # [b, s, hd/2]
    b, s = position_ids.shape
    cos = paddle.stack([freqs.cos(), freqs.cos()], axis=-1).reshape([b, s, 1, head_dim])
    sin = paddle.stack([-freqs.sin(), freqs.sin()], axis=-1).reshape([b, s, 1, head_dim])
    return cos, sin


_SWAPS: dict = {}


def _swap_pairs(x: paddle.Tensor) -> paddle.Tensor:
    """(x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...) along the last axis.
    A matmul with a 0/1 permutation matrix: exact (one nonzero term per output) and, on Paddle's CPU,
    several times faster than strided slicing or index_select."""
    hd = x.shape[-1]
    key = (hd, x.dtype)
    if key not in _SWAPS:
        perm = paddle.arange(hd).reshape([hd // 2, 2]).flip(-1).reshape([hd])
        _SWAPS[key] = paddle.nn.functional.one_hot(perm, hd).astype(x.dtype).t()    # [hd, hd]
    return paddle.matmul(x, _SWAPS[key])


def apply_rope(x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
    """x [b, s, n, hd]; cos/sin from rope_cos_sin ([b, s, 1 or n, hd]). Math in fp32.
    out[2i] = x[2i]*cos_i - x[2i+1]*sin_i, out[2i+1] = x[2i+1]*cos_i + x[2i]*sin_i: the same products
    and sums, in the same order, as x*cos + rotate_half(x)*sin in transformers."""
    xf = x.astype("float32")
    return (xf * cos + _swap_pairs(xf) * sin).astype(x.dtype)


# ---- SwiGLU ----------------------------------------------------------------------------------
def swiglu(gate_up: paddle.Tensor) -> paddle.Tensor:
    """silu(gate) * up where gate is the FIRST half of up_gate_proj's output. [..., 2i] -> [..., i]."""
    if backend(gate_up) == "fused":
        from paddle.incubate.nn.functional import swiglu as fused_swiglu
        return fused_swiglu(gate_up)  # splits the last axis in halves, gate first
    n = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :n]) * gate_up[..., n:]  # strided views: chunk() would copy both halves

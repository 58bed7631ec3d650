"""Kernels: each op has a plain Paddle reference and, where one exists, a fused GPU path.

One dispatch point per op decides which runs (`backend()` below); tests compare every path that
can run here against the reference. Fused ops are GPU-only on purpose: Paddle's fused RMSNorm
dies with SIGILL on AVX2 CPUs, and the fused RoPE/SwiGLU ops have no CPU kernel.
"""
from libernie.kernels.dispatch import backend, on_gpu
from libernie.kernels.ops import apply_rope, rms_norm, rope_cos_sin, swiglu
from libernie.kernels.attention import attention, attention_backend, build_attention_mask

__all__ = ["backend", "on_gpu", "rms_norm", "rope_cos_sin", "apply_rope", "swiglu",
           "attention", "attention_backend", "build_attention_mask"]

"""Kernels: each op has a plain Paddle reference and, where one exists, a fused GPU path.

One dispatch point per op decides which runs (`backend()` below); tests compare every path that
can run here against the reference. Fused ops are GPU-only on purpose: Paddle's fused RMSNorm
dies with SIGILL on AVX2 CPUs, and the fused RoPE/SwiGLU ops have no CPU kernel.

The names below load on first use, so `libernie.kernels.quant_kernel` (numpy + ctypes) imports
without paddle. `libernie.kernels.attention` stays the function, as when they loaded eagerly.
"""
import importlib
import sys
import types

_WHERE = {"backend": "dispatch", "on_gpu": "dispatch", "apply_rope": "ops", "rms_norm": "ops",
          "rope_cos_sin": "ops", "swiglu": "ops", "attention": "attention", "attention_backend": "attention",
          "build_attention_mask": "attention"}

__all__ = ["backend", "on_gpu", "rms_norm", "rope_cos_sin", "apply_rope", "swiglu",
           "attention", "attention_backend", "build_attention_mask"]


class _Package(types.ModuleType):
    def __getattr__(self, name):
        if name not in _WHERE:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name, value):
        if name in _WHERE and isinstance(value, types.ModuleType):
            return      # the import system binding the submodule `attention`: the name belongs to the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

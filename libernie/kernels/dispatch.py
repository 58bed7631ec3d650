"""Where fused kernels may run. ERNIE_KERNELS=reference forces the plain Paddle ops everywhere."""
import functools
import os

import paddle


@functools.lru_cache(maxsize=None)
def _gpu_available() -> bool:
    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def on_gpu(x: paddle.Tensor | None = None) -> bool:
    """True when `x` (or, without x, the current device) is a CUDA place."""
    if not _gpu_available():
        return False
    if x is not None:
        return x.place.is_gpu_place()
    return paddle.device.get_device().startswith("gpu")


def backend(x: paddle.Tensor | None = None) -> str:
    """'fused' on a GPU unless ERNIE_KERNELS=reference; 'reference' otherwise."""
    if os.environ.get("ERNIE_KERNELS", "auto") == "reference":
        return "reference"
    return "fused" if on_gpu(x) else "reference"

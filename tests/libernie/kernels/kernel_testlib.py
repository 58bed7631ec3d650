"""What the kernel fallback tests share: load a compiled kernel from a clean cache and collect its warnings."""
import logging


def load_uncached(kernel, caplog, then=None) -> tuple[object, list[str]]:
    """kernel.load() with its per-process cache cleared before and after (`then()` runs in between, with the
    cache still warm); returns (what load gave, the libernie.kernels warning lines logged)."""
    kernel.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="libernie.kernels"):
            got = kernel.load()
            if then is not None:
                then()
    finally:
        kernel.load.cache_clear()
    return got, [r.getMessage() for r in caplog.records if r.name == "libernie.kernels"]

"""Blocks of rows on a small thread pool: what both quantization paths of the streaming writer share."""
from __future__ import annotations

import contextlib
import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

_BLOCK_ELEMS = 1 << 16  # rows per block so that one block and its float32 temporaries stay in L2


def _threads() -> int:
    """Worker threads for the row blocks: OMP_NUM_THREADS (libernie sets it to the core count), at most 8."""
    try:
        return max(1, min(8, int(os.environ.get("OMP_NUM_THREADS", "") or os.cpu_count() or 1)))
    except ValueError:
        return 1


_POOL: ThreadPoolExecutor | None = None


def _map(fn, items: list) -> list:
    """[fn(x) for x in items] on a small thread pool (numpy drops the GIL inside each block's array
    passes, ctypes around each call of the compiled kernel).
    Each task takes a run of consecutive items (about four tasks per thread): one hand-off per cache-sized
    block cost more than the block itself on a busy machine (8,000 futures for a 0.7 GB model)."""
    global _POOL
    n = _threads()
    if n == 1 or len(items) < 2:
        return [fn(x) for x in items]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="ernie-quant")
    k = max(1, len(items) // (4 * n))
    runs = [items[i:i + k] for i in range(0, len(items), k)]
    return [r for part in _POOL.map(lambda run: [fn(x) for x in run], runs) for r in part]


_NON_FINITE = "non-finite weights (NaN or inf); the checkpoint is corrupt or its training diverged"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4   # glibc mallopt parameters (malloc.h)


@contextlib.contextmanager
def reuse_freed_memory():
    """For the streaming pass (glibc only): big arrays come from the heap and freed pages stay mapped, so each
    tensor's read buffer and outputs reuse the last tensor's pages instead of faulting in fresh ones the kernel
    must zero (that zeroing was half the pass's time at 4 GB). Peak RSS is unchanged: the same two tensor groups
    at most. Afterwards the freed memory goes back to the system. glibc cannot switch its dynamic mmap threshold
    back on once mallopt has been called, so the settings left behind are the ones that threshold reaches as soon
    as a large array is freed (mmap from 32 MiB, trim above 64 MiB): what --eval's model forwards run under."""
    libc = None
    with contextlib.suppress(OSError, AttributeError, ValueError):
        if os.confstr("CS_GNU_LIBC_VERSION"):
            libc = ctypes.CDLL(None)
            libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, 65536)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
        libc.malloc_trim(0)

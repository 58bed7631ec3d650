"""Thread and MKL defaults that Paddle needs on these CPUs, set before paddle is imported.

Paddle's MKL picks a slow code path on AMD/AVX2 CPUs unless MKL_DEBUG_CPU_TYPE=5, and runs one
thread unless OMP_NUM_THREADS is set: together they cost 3-6x in matmul throughput (about 20 vs
130 GFLOP/s measured on a 2-core dev box). We only fill in what the user has not set.
"""
import os
import sys


def apply_cpu_defaults() -> dict[str, str]:
    """Set MKL_DEBUG_CPU_TYPE and OMP_NUM_THREADS unless already set. Returns what was set."""
    applied = {}
    if "paddle" in sys.modules:  # too late to influence MKL/OpenMP start-up
        return applied
    defaults = {"MKL_DEBUG_CPU_TYPE": "5", "OMP_NUM_THREADS": str(_cpu_count())}
    for key, value in defaults.items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    # Paddle prints a warning for every OMP_NUM_THREADS > 1; it is about data parallel, not us.
    os.environ.setdefault("GLOG_minloglevel", "2")
    return applied


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1

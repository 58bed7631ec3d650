"""Shared by the compiled CPU kernels (cpu_kernel: attention; quant_kernel: quantization loops): where they are
cached, what keys a build, and the atomic, file-locked build itself. No paddle import here.

Cache: $ERNIE_KERNEL_CACHE, else $XDG_CACHE_HOME/ernie-tools/kernels, else ~/.cache/ernie-tools/kernels. Each
build lives in a directory named by a hash of its sources, flags and CPU (a -march=native library never reaches
another CPU through a shared home directory); it appears there only once complete.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil


def cache_dir() -> str:
    return os.environ.get("ERNIE_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ernie-tools", "kernels")


def cpu_model() -> str:
    """The CPU's model name and feature flags (first processor of /proc/cpuinfo)."""
    seen = {}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":")[0].strip()
                if key in ("model name", "flags") and key not in seen:
                    seen[key] = line
                if len(seen) == 2:
                    break
    return "".join(seen.values())


def build_once(final: str, product: str, build_into):
    """Make directory `final` holding `product` (a relative path), unless it already does.

    build_into(tmp) builds into the empty private directory tmp and returns anything; it is renamed to `final`
    only when it returns, so a build killed half-way never leaves a library behind (loading a truncated .so kills
    the process). A lock file beside `final` keeps concurrent processes from building the same thing twice.
    Returns build_into's result, or None where `final` was complete already (built before or by another process).
    """
    if os.path.exists(os.path.join(final, product)):
        return None
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with open(final + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(final, product)):
            return None
        tmp = f"{final}.build-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            result = build_into(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        return result

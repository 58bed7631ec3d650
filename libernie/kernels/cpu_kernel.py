"""Build and load the C++ CPU attention kernel (csrc/flash_attention_cpu.cc) with paddle.utils.cpp_extension.

Built once per machine on first use (20-30 s with g++), into a cache directory keyed by the source, the
Paddle version, the flags and the CPU, so an edited kernel or another Paddle rebuilds and a stale library is
never loaded: $ERNIE_KERNEL_CACHE, else $XDG_CACHE_HOME/ernie-tools/kernels, else ~/.cache/ernie-tools/kernels.
Concurrent processes share one build (a file lock); a build appears there only once it is complete. Where it cannot be built (no compiler, no write
access) `load()` returns None after one warning line and attention runs the Paddle-ops twin
(libernie.kernels.flash). ERNIE_CPU_KERNEL=0 skips the build.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import warnings

from libernie.kernels.build import build_once, cache_dir, cpu_model

NAME = "ernie_flash_attention_cpu"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "flash_attention_cpu.cc")
# -march=native: the library is built on the machine that runs it, and tagged by host below.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=fast", "-std=gnu++17"]
LDFLAGS = ["-fopenmp"]

log = logging.getLogger("libernie.kernels")


def _tag() -> str:
    import paddle
    h = hashlib.sha256()
    for name in sorted(os.listdir(os.path.dirname(SOURCE))):    # the op and the kernel header it includes
        if not name.startswith("flash_attention_cpu."):          # other kernels' sources share csrc/
            continue
        with open(os.path.join(os.path.dirname(SOURCE), name), "rb") as f:
            h.update(name.encode() + f.read())
    h.update(" ".join([paddle.__version__, *CFLAGS, *LDFLAGS, os.uname().machine, cpu_model()]).encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def load():
    """The op (callable: q, k, v, kend -> [out, lse]), or None where it cannot be built here."""
    if os.environ.get("ERNIE_CPU_KERNEL", "1") == "0":
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        log.warning("ernie-tools: no C++ compiler found; attention runs the slower Paddle-ops kernel "
                    "(install g++ for the C++ CPU kernel)")
        return None
    try:
        return _build()
    except Exception as e:  # noqa: BLE001 -- any build failure means: use the twin, and say so once
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning(f"ernie-tools: could not build the C++ attention kernel ({first}); "
                    f"attention runs the slower Paddle-ops kernel")
        return None


_OP = None   # the op once registered: Paddle registers an op name once per process, so never load it twice


def _build():
    """Build into a private directory and rename it into place when complete, so a build killed half-way
    never leaves a library behind (loading a truncated .so kills the process). A lock keeps concurrent
    processes from compiling the same kernel twice."""
    global _OP
    if _OP is not None:
        return _OP
    final = os.path.join(cache_dir(), _tag())
    lib = os.path.join(final, NAME)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # Paddle's "No ccache found": we build one file, once
        from paddle.utils.cpp_extension import load as cpp_load
        from paddle.utils.cpp_extension.extension_utils import _import_module_from_library

        def build_into(tmp):
            with _quiet() as out:
                try:   # builds and registers the op in this process (renaming keeps the mapping valid)
                    return cpp_load(name=NAME, sources=[SOURCE], extra_cxx_cflags=CFLAGS,
                                    extra_ldflags=LDFLAGS, build_directory=tmp, verbose=False)
                except Exception as e:  # the compiler's messages are in `out`; keep the first error
                    errors = [ln for ln in out.read().splitlines() if "error" in ln.lower()]
                    raise RuntimeError(errors[0] if errors else str(e)) from e
        module = build_once(final, os.path.join(NAME, NAME + ".so"), build_into)
        if module is None:  # built before: register it directly (load() re-runs a setup.py check, ~1 s)
            with _quiet():
                module = _import_module_from_library(NAME, lib, False)
    _OP = getattr(module, NAME)
    return _OP


@contextlib.contextmanager
def _quiet():
    """Send fds 1 and 2 (Paddle's build log, the compiler run as a subprocess) to a temp file:
    libernie prints nothing. Yields the file so a failure can quote it."""
    with tempfile.TemporaryFile("w+") as tmp:
        saved = os.dup(1), os.dup(2)
        handlers = [h for h in logging.getLogger().handlers]
        _flush()
        try:
            os.dup2(tmp.fileno(), 1)
            os.dup2(tmp.fileno(), 2)
            yield _Reader(tmp)
        finally:
            _flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            logging.getLogger().handlers = handlers


def _flush():
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


class _Reader:
    def __init__(self, f):
        self.f = f

    def read(self) -> str:
        self.f.flush()
        self.f.seek(0)
        return self.f.read()

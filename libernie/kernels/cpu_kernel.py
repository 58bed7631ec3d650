"""Build and load the C++ CPU attention kernel (csrc/flash_attention_cpu.cc) with paddle.utils.cpp_extension.

Built once per machine on first use (about 20 s with g++), into a cache directory keyed by the source, the
Paddle version and the flags, so an edited kernel or another Paddle rebuilds and a stale library is never
loaded: $ERNIE_KERNEL_CACHE, else $XDG_CACHE_HOME/ernie-tools/kernels, else ~/.cache/ernie-tools/kernels.
A file lock lets concurrent processes share one build. Where it cannot be built (no compiler, no write
access) `load()` returns None after one warning line and attention runs the Paddle-ops twin
(libernie.kernels.flash). ERNIE_CPU_KERNEL=0 skips the build.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import warnings

NAME = "ernie_flash_attention_cpu"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "flash_attention_cpu.cc")
# -march=native: the library is built on the machine that runs it, and tagged by host below.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=fast", "-std=gnu++17"]
LDFLAGS = ["-fopenmp"]

log = logging.getLogger("libernie.kernels")


def cache_dir() -> str:
    root = os.environ.get("ERNIE_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ernie-tools", "kernels")
    return root


def _tag() -> str:
    import paddle
    h = hashlib.sha256()
    for name in sorted(os.listdir(os.path.dirname(SOURCE))):    # the op and the kernel header it includes
        with open(os.path.join(os.path.dirname(SOURCE), name), "rb") as f:
            h.update(name.encode() + f.read())
    h.update(" ".join([paddle.__version__, *CFLAGS, *LDFLAGS, os.uname().machine, _cpu_model()]).encode())
    return h.hexdigest()[:16]


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    return line
    return ""


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


def _build():
    build = os.path.join(cache_dir(), _tag())
    os.makedirs(build, exist_ok=True)
    with warnings.catch_warnings(), open(os.path.join(build, ".lock"), "w") as lock:
        warnings.simplefilter("ignore")   # Paddle's "No ccache found": we build one file, once
        from paddle.utils.cpp_extension import load as cpp_load
        from paddle.utils.cpp_extension.extension_utils import _import_module_from_library
        fcntl.flock(lock, fcntl.LOCK_EX)   # one build per directory; the others wait and reuse it
        with _quiet() as out:
            if os.path.exists(os.path.join(build, NAME, NAME + ".so")):
                # Built before (the tag pins source, flags, Paddle): register it directly. cpp_extension's
                # load() would re-run its setup.py check, about 1 s per process.
                module = _import_module_from_library(NAME, os.path.join(build, NAME), False)
            else:
                try:
                    module = cpp_load(name=NAME, sources=[SOURCE], extra_cxx_cflags=CFLAGS,
                                      extra_ldflags=LDFLAGS, build_directory=build, verbose=False)
                except Exception as e:  # the compiler's own messages are in `out`; keep the first error
                    errors = [ln for ln in out.read().splitlines() if "error" in ln.lower()]
                    raise RuntimeError(errors[0] if errors else str(e)) from e
    return getattr(module, NAME)


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

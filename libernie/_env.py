"""Thread and MKL defaults that Paddle needs on these CPUs, set before paddle is imported.

Paddle's MKL picks a slow code path on AMD/AVX2 CPUs unless MKL_DEBUG_CPU_TYPE=5, and runs one
thread unless OMP_NUM_THREADS is set: together they cost 3-6x in matmul throughput (about 20 vs
130 GFLOP/s measured on a 2-core dev box). We only fill in what the user has not set.
"""
import contextlib
import io
import os
import sys
import warnings


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
    os.environ.setdefault("GLOG_minloglevel", "2")
    # paddle.utils.cpp_extension warns about ccache on import; we build no extensions.
    warnings.filterwarnings("ignore", message="No ccache found")
    if not any(isinstance(f, _QuietPaddleImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietPaddleImport())
    return applied


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_OMP_NAG = ("WARNING: OMP_NUM_THREADS set to", "PLEASE USE OMP_NUM_THREADS WISELY")


class _QuietPaddleImport:
    """Paddle prints a data-parallel warning to stderr on import whenever OMP_NUM_THREADS > 1, which is
    exactly what we set. Our tools keep stderr for their own progress, so drop those two lines (and
    only those) while `paddle` is first imported.
    A meta path finder by protocol (find_spec), not a subclass of importlib.abc.MetaPathFinder: importing
    importlib.abc pulls in importlib.resources, tempfile and shutil, 3-4 ms of every tool's start-up."""

    def find_spec(self, name, path=None, target=None):
        if name != "paddle":
            return None
        sys.meta_path.remove(self)
        try:
            from importlib.util import find_spec
            spec = find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader:
    """A loader (the protocol: create_module, exec_module) wrapping paddle's own."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        buf = io.StringIO()
        try:
            with contextlib.redirect_stderr(buf):
                self.inner.exec_module(module)
        finally:
            kept = [ln for ln in buf.getvalue().splitlines(keepends=True) if not ln.startswith(_OMP_NAG)]
            sys.stderr.write("".join(kept))
            # Paddle's import adds a root logging handler bound to the stderr of that moment, our buffer:
            # rebind it, or every warning logged afterwards would vanish into the buffer.
            import logging
            for handler in logging.getLogger().handlers:
                if getattr(handler, "stream", None) is buf:
                    handler.setStream(sys.stderr)

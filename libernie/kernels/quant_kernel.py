"""The compiled element loops of ernie-quant's streaming pass (csrc/quant_cpu.cc), built with the system C++
compiler and loaded with ctypes: no Python dependency and no paddle import.

Built once per machine on first use (~1 s), into the kernel cache (libernie.kernels.build: keyed by the source,
the compiler, the flags and the CPU; atomic and file-locked). Where it cannot be built (no compiler, a failed
build, no write access) `load()` returns None after one warning line and the caller runs its numpy path, which
gives the same bytes. ERNIE_QUANT_KERNEL=0 forces the numpy path.

Each call works on one block of rows and releases the GIL (ctypes does for a CDLL), so the caller's worker
threads run blocks in parallel.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil

import numpy as np

from libernie.kernels.build import build_once, cache_dir, cpu_model

NAME = "ernie_quant_cpu"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "quant_cpu.cc")
# No -ffast-math and no contraction: each float operation must be the one numpy does (same bytes);
# -fno-trapping-math lets the selects vectorize (2.5-7x here) and changes no result. No OpenMP runtime.
CFLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
          "-std=gnu++17", "-fPIC", "-shared"]
DTYPES = {"F32": 0, "F16": 1, "BF16": 2}

log = logging.getLogger("libernie.kernels")


def _compiler() -> str | None:
    for cxx in (os.environ.get("CXX"), "g++", "c++"):
        if cxx and shutil.which(cxx):
            return shutil.which(cxx)
    return None


def _tag(cxx: str) -> str:
    h = hashlib.sha256()
    with open(SOURCE, "rb") as f:
        h.update(f.read())
    h.update(" ".join([NAME, cxx, *CFLAGS, os.uname().machine, cpu_model()]).encode())
    return "quant-" + h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL | None:
    """The library (ctypes), or None where the numpy path must run (forced off, or it cannot be built)."""
    if os.environ.get("ERNIE_QUANT_KERNEL", "1") == "0":
        return None
    cxx = _compiler()
    if cxx is None:
        log.warning("ernie-tools: no C++ compiler found; quantization runs the slower numpy loops "
                    "(install g++ for the compiled kernel)")
        return None
    try:
        return _declare(ctypes.CDLL(_build(cxx)))
    except Exception as e:  # noqa: BLE001 -- any build or load failure means: numpy path, and say so once
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning(f"ernie-tools: could not build the C++ quantization kernel ({first}); "
                    "quantization runs the slower numpy loops")
        return None


def _build(cxx: str) -> str:
    import subprocess                  # only when building: 2 ms of every start-up otherwise
    final = os.path.join(cache_dir(), _tag(cxx))

    def build_into(tmp):
        run = subprocess.run([cxx, *CFLAGS, "-o", os.path.join(tmp, NAME + ".so"), SOURCE],
                             capture_output=True, text=True)
        if run.returncode:
            errors = [ln for ln in run.stderr.splitlines() if "error" in ln.lower()]
            raise RuntimeError(errors[0] if errors else f"{os.path.basename(cxx)} exited {run.returncode}")
    build_once(final, NAME + ".so", build_into)
    return os.path.join(final, NAME + ".so")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.absmax_bits.argtypes = [p, i32, i64, i64, i64, p]
    lib.rtn_round.argtypes = [p, i32, i64, i64, i64, p, p, p]
    lib.fp8_encode.argtypes = [p, i32, i64, ctypes.c_float, p, p]
    lib.pack_int4.argtypes = [p, i64, i64, p]
    for f in (lib.absmax_bits, lib.rtn_round, lib.fp8_encode, lib.pack_int4):
        f.restype = None
    return lib


def _ptr(a: np.ndarray) -> int:
    if not a.flags.c_contiguous:
        raise ValueError("quant kernel: arrays must be C-contiguous")
    return a.ctypes.data


def absmax_bits(lib, store: np.ndarray, dtype: str, g: int) -> np.ndarray:
    """storage [rows, cols] (rows a multiple of g) -> max |w| bits over each group of g rows: [rows / g, cols],
    uint32 for F32, uint16 otherwise (sign cleared; NaN/inf patterns are above every finite one)."""
    rows, cols = store.shape
    out = np.empty((rows // g, cols), np.uint32 if dtype == "F32" else np.uint16)
    lib.absmax_bits(_ptr(store), DTYPES[dtype], rows, cols, g, _ptr(out))
    return out


def rtn_round(lib, store: np.ndarray, dtype: str, g: int, scale: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """q[...] = rint(w / scale) (the float64 rule) for storage [rows, cols], scale float32 [ceil(rows / g), cols] (group
    scales of these values' amax), q int8 [rows, cols]. Returns (sum (q s - w)^2, sum w^2)."""
    rows, cols = store.shape
    scale = np.ascontiguousarray(scale, np.float32)
    if scale.shape != (-(-rows // g), cols) or q.shape != (rows, cols) or q.dtype != np.int8:
        raise ValueError(f"quant kernel: scale {scale.shape} / q {q.shape} do not fit [{rows}, {cols}] g={g}")
    sums = np.zeros(2, np.float64)
    lib.rtn_round(_ptr(store), DTYPES[dtype], rows, cols, g, _ptr(scale), _ptr(q), _ptr(sums))
    return float(sums[0]), float(sums[1])


def fp8_encode(lib, store: np.ndarray, dtype: str, scale: float, codes: np.ndarray) -> tuple[float, float]:
    """codes[...] = e4m3 codes of w / scale (clipped to +-448; finite w) for storage of any shape, codes uint8 of
    its shape. Returns (sum (decode(c) scale - w)^2, sum w^2)."""
    if codes.shape != store.shape or codes.dtype != np.uint8:
        raise ValueError(f"quant kernel: codes {codes.shape} do not fit {store.shape}")
    sums = np.zeros(2, np.float64)
    lib.fp8_encode(_ptr(store), DTYPES[dtype], store.size, np.float32(scale).item(), _ptr(codes), _ptr(sums))
    return float(sums[0]), float(sums[1])


def pack_int4(lib, q: np.ndarray) -> np.ndarray:
    """int8 q [rows, cols] in [-8, 7], rows even -> [rows / 2, cols] int8: row 2k low nibble, 2k + 1 high."""
    rows, cols = q.shape
    out = np.empty((rows // 2, cols), np.int8)
    lib.pack_int4(_ptr(q), rows, cols, _ptr(out))
    return out

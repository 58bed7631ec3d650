"""The compiled quantization loops (libernie.kernels.quant_kernel) against independent truth: the float64
rounding rule (rtn_quantize_reference), the numpy e4m3 encoder (itself tested against Paddle's cast), numpy's
own maxima; on random values, k + 1/2 ties and values within an ulp of them, zeros, subnormals and values out of
range; then the fallback where it cannot be built."""

import numpy as np
import pytest

from libernie.checkpoint.stream import widen
from libernie.kernels import quant_kernel
from libernie.quant.fp8 import DECODE, encode_e4m3
from libernie.quant.gptq import QMAX, group_scale, rtn_quantize_reference

from kernel_testlib import load_uncached

LIB = quant_kernel.load()
needs_lib = pytest.mark.skipif(LIB is None, reason="no C++ compiler here (or ERNIE_QUANT_KERNEL=0): numpy runs")


def _storage(w: np.ndarray, dtype: str) -> np.ndarray:
    """float32 [in, out] -> storage as read_array gives it (bf16 truncated to its bits: exact for these values)."""
    if dtype == "BF16":
        return (w.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    with np.errstate(over="ignore"):                                 # F16: 1e6 -> inf, dropped by the caller
        return w.astype(np.float16) if dtype == "F16" else w.astype(np.float32)


def _tricky(n_in, n_out, bits, seed):
    """float32 [in, out]: random t-distributed columns, then columns of exact ties k + 1/2 of the scale that
    column's amax gives, the floats just either side of them, zeros, negative zeros, subnormals."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, size=(n_in, n_out)) * 0.02).astype(np.float32)
    qmax = QMAX[bits]
    amax = np.float32(0.0371)
    s = group_scale(np.array([amax], np.float32), bits)[0]
    k = rng.integers(-qmax - 1, qmax, size=n_in).astype(np.float32)
    ties = ((k + np.float32(0.5)) * s).astype(np.float32)          # float32 products: near-ties, some exact
    ties[0] = amax                                                  # the column's amax is this
    for c, col in enumerate([ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, -np.float32(np.inf))]):
        w[:, c] = col
        w[0, c] = amax
    w[:, 3] = 0.0
    w[:, 4] = -0.0
    w[:, 5] = rng.standard_normal(n_in).astype(np.float32) * np.float32(1e-40)   # float32 subnormals
    w[1, 6] = np.float32(1e-45)                                     # one subnormal beside normal values
    return w


@needs_lib
@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("bits,g", [(8, -1), (4, -1), (4, 16), (8, 32)])
def test_round_matches_the_float64_rule(dtype, bits, g):
    n_in, n_out = 96, 70                                             # 70 columns: a ragged vector tail
    store = _storage(_tricky(n_in, n_out, bits, bits + g), dtype)
    w = widen(store, dtype)                                          # the values the storage holds, float32
    gg = n_in if g == -1 else g
    m = quant_kernel.absmax_bits(LIB, store, dtype, gg)
    amax = widen(m.view(store.dtype), dtype)
    np.testing.assert_array_equal(amax, np.abs(w).reshape(-1, gg, n_out).max(axis=1))
    scale = group_scale(amax, bits)
    q = np.empty(store.shape, np.int8)
    err2, ref2 = quant_kernel.rtn_round(LIB, store, dtype, gg, scale, q)
    q_ref, s_ref = rtn_quantize_reference(w.T, bits, g)              # [out, in] float64 rule
    np.testing.assert_array_equal(q, q_ref.T)
    np.testing.assert_array_equal(scale, s_ref.T)
    d = (q.astype(np.float64) * np.repeat(scale, gg, axis=0) - w)
    assert err2 == pytest.approx(float((d * d).sum()), rel=1e-5)
    assert ref2 == pytest.approx(float((w.astype(np.float64) ** 2).sum()), rel=1e-5)


@needs_lib
def test_round_redoes_near_ties_in_float64():
    # w / s where the float32 quotient rounds onto k + 1/2 but the exact one does not (and the reverse)
    bits, s = 8, np.float32(0.1)
    amax = np.float32(s * 127)
    k = np.arange(-100, 100, dtype=np.float32)
    w = np.concatenate([((k + 0.5) * s), np.nextafter((k + 0.5) * s, np.float32(1)),
                        np.nextafter((k + 0.5) * s, np.float32(-1)), [amax]]).astype(np.float32)[:, None]
    scale = group_scale(np.array([[amax]], np.float32), bits)
    q = np.empty(w.shape, np.int8)
    quant_kernel.rtn_round(LIB, w, "F32", w.shape[0], scale, q)
    exact = np.rint(w.astype(np.float64) / np.float64(scale[0, 0])).astype(np.int8)
    np.testing.assert_array_equal(q, exact)
    assert (np.rint(w / scale[0, 0]).astype(np.int8) != exact).any()   # float32 alone would get some wrong


@needs_lib
@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_fp8_codes_match_the_numpy_encoder(dtype):
    rng = np.random.default_rng(7)
    mids = (DECODE[:-1] + DECODE[1:]) / 2                            # e4m3 midpoints (ties to even)
    vals = np.concatenate([DECODE[np.isfinite(DECODE)], mids[np.isfinite(mids)],
                           np.nextafter(mids[np.isfinite(mids)], np.float32(np.inf)),
                           [0.0, -0.0, 1e-40, -1e-40, 2.0 ** -10, 3 * 2.0 ** -11, 449.0, -449.0, 464.0, 1e6, -1e6],
                           rng.standard_normal(3000) * 100]).astype(np.float32)
    store = _storage(vals, dtype)
    store = store[np.isfinite(widen(store, dtype))]                  # F16 overflows 1e6 to inf: finite only
    w = widen(store, dtype)
    for scale in (np.float32(1.0), np.float32(0.37), np.float32(3e-3)):    # 3e-3: many values out of range
        codes = np.empty(store.shape, np.uint8)
        err2, ref2 = quant_kernel.fp8_encode(LIB, store, dtype, scale, codes)
        expect = encode_e4m3(w / scale)
        np.testing.assert_array_equal(codes, expect)
        d = DECODE[expect].astype(np.float64) * scale - w
        assert err2 == pytest.approx(float((d * d).sum()), rel=1e-5)
        assert ref2 == pytest.approx(float((w.astype(np.float64) ** 2).sum()), rel=1e-5)


@needs_lib
@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_absmax_bits_orders_nan_and_inf_above_every_finite(dtype):
    w = np.random.default_rng(1).standard_normal((8, 5)).astype(np.float32)
    w[2, 1], w[5, 2], w[7, 3] = np.inf, -np.inf, np.nan
    store = _storage(w, dtype)
    m = quant_kernel.absmax_bits(LIB, store, dtype, 4)              # two groups of four rows
    kind = np.uint32 if dtype == "F32" else np.uint16
    mask = kind(0x7FFFFFFF if dtype == "F32" else 0x7FFF)
    np.testing.assert_array_equal(m, (store.view(kind) & mask).reshape(2, 4, 5).max(axis=1))
    inf_bits = {"F32": 0x7F800000, "F16": 0x7C00, "BF16": 0x7F80}[dtype]
    assert (m[0, 1] >= inf_bits) and (m[1, 2] >= inf_bits) and (m[1, 3] >= inf_bits) and (m[0, 0] < inf_bits)


def test_no_compiler_means_numpy_with_one_warning(monkeypatch, caplog):
    monkeypatch.delenv("ERNIE_QUANT_KERNEL", raising=False)
    monkeypatch.setattr(quant_kernel, "_compiler", lambda: None)
    got, lines = load_uncached(quant_kernel, caplog)
    assert got is None and len(lines) == 1 and "\n" not in lines[0] and "no C++ compiler" in lines[0]


def test_failed_build_means_numpy_with_one_warning_and_leaves_nothing(monkeypatch, caplog, tmp_path):
    monkeypatch.delenv("ERNIE_QUANT_KERNEL", raising=False)
    monkeypatch.setenv("ERNIE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(quant_kernel, "CFLAGS", [*quant_kernel.CFLAGS, "-DERNIE_BROKEN", "-include", "no/such.h"])
    got, lines = load_uncached(quant_kernel, caplog)
    assert got is None and len(lines) == 1 and "could not build the C++ quantization kernel" in lines[0]
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []   # no half-built library


def test_env_var_forces_numpy_silently(monkeypatch, caplog):
    monkeypatch.setenv("ERNIE_QUANT_KERNEL", "0")
    assert load_uncached(quant_kernel, caplog) == (None, [])


@needs_lib
def test_build_lands_in_the_cache_once(monkeypatch, tmp_path):
    monkeypatch.delenv("ERNIE_QUANT_KERNEL", raising=False)
    monkeypatch.setenv("ERNIE_KERNEL_CACHE", str(tmp_path))
    quant_kernel.load.cache_clear()
    try:
        assert quant_kernel.load() is not None
        (built,) = [p for p in tmp_path.iterdir() if p.is_dir()]
        assert built.name.startswith("quant-") and (built / "ernie_quant_cpu.so").exists()
        stamp = (built / "ernie_quant_cpu.so").stat().st_mtime_ns
        quant_kernel.load.cache_clear()
        assert quant_kernel.load() is not None                      # found, not rebuilt
        assert (built / "ernie_quant_cpu.so").stat().st_mtime_ns == stamp
    finally:
        quant_kernel.load.cache_clear()


@needs_lib
def test_int4_packing_matches_numpy(monkeypatch):
    from libernie.quant import packing
    q = np.random.default_rng(3).integers(-8, 8, size=(130, 77)).astype(np.int8)
    q[0, :16], q[1, :16] = np.arange(-8, 8), np.arange(7, -9, -1)           # every nibble, both halves
    fast = packing.pack_int4_rows(q)
    monkeypatch.setattr(quant_kernel, "load", lambda: None)
    slow = packing.pack_int4_rows(q)
    np.testing.assert_array_equal(fast, slow)
    np.testing.assert_array_equal(packing.unpack_int4_rows(fast), q)
    assert fast[0, 0] == 0x78 and fast[0, 15] == np.int8(-121)              # -8 | 7 << 4; 7 | -8 << 4 = 0x87

"""float8 e4m3fn in numpy: encode (round to nearest even, after an explicit clip to ±448) and decode.

numpy has no fp8 dtype; the bits travel as uint8 (safetensors dtype F8_E4M3). The encoder is written
from the format (1 sign, 4 exponent bits of bias 7, 3 mantissa bits, subnormals below 2^-6, 0x7F NaN, no
inf) rather than through a library: Paddle's cast saturates out-of-range values while ml_dtypes gives NaN,
and we want one rule we can state. The tests check it against Paddle's float8_e4m3fn cast on every
representable value and on midpoints.
"""
from __future__ import annotations

import numpy as np

E4M3_MAX = 448.0
_MIN_NORMAL_EXP = -6           # smallest normal: 2^-6; subnormal step 2^-9


def _decode_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.uint32)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = (codes & 0x7).astype(np.float64)
    val = np.where(exp == 0, man * 2.0 ** -9, (1.0 + man / 8.0) * 2.0 ** (exp.astype(np.float64) - 7))
    val = sign * val
    val[(codes & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


DECODE = _decode_table()       # [256] float32: value of each code


def encode_e4m3(x: np.ndarray, finite: bool = False) -> np.ndarray:
    """float32 array -> uint8 e4m3fn codes. Values are clipped to ±448 first; NaN stays NaN (0x7F).
    finite=True: the caller has checked there is no NaN in x, so the NaN pass is skipped (same codes).

    On the float32 bits, in cache-sized blocks: a normal value keeps 3 of its 23 mantissa bits, rounded to
    nearest even by adding 0x7FFFF plus the lowest kept bit (a carry bumps the exponent, as it should); its
    exponent is re-biased from 127 to 7. Below 2^-6 the value is a multiple of 2^-9: rint(a * 512) in 0..8
    (8 is the smallest normal, whose code is 8 too), read off the bits of a + 2^14 (whole-array passes, no
    masked indexing).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    flat, out = x.reshape(-1), np.empty(x.size, dtype=np.uint8)
    for i in range(0, flat.size, _BLOCK):
        out[i:i + _BLOCK] = _encode_block(flat[i:i + _BLOCK], finite)
    return out.reshape(x.shape)


_BLOCK = 1 << 16


_MAGIC = np.float32(2.0 ** 14)     # float32 ulp at 2^14 is 2^-9, the subnormal step: a + 2^14 rounds a to it (RNE)


def _encode_block(x: np.ndarray, finite: bool = False) -> np.ndarray:
    a = np.abs(x)
    np.minimum(a, np.float32(E4M3_MAX), out=a)                    # NaN stays NaN
    bits = a.view(np.uint32)
    r = bits >> 20
    r &= 1
    r += 0x7FFFF
    r += bits                                                      # rounded at the 3rd mantissa bit
    r >>= 20                                                       # biased exponent << 3 | 3 mantissa bits
    r -= 120 << 3                                                  # re-bias 127 -> 7 (wraps where subnormal)
    sub = a + _MAGIC                                               # subnormals: 2^14 + k * 2^-9, k = rint(a * 512)
    sub = sub.view(np.uint32)
    sub -= _MAGIC.view(np.uint32)                                  # k in 0..8 (8 is the smallest normal's code too)
    np.copyto(r, sub, where=a < np.float32(2.0 ** _MIN_NORMAL_EXP))
    sign = x.view(np.uint32) >> 24
    sign &= 0x80
    r |= sign
    code = r.astype(np.uint8)                                      # the low 8 bits: sign | exponent | mantissa
    if finite:
        return code
    nan = np.isnan(a)
    if nan.any():
        code[nan] = 0x7F
    return code


def decode_e4m3(codes: np.ndarray) -> np.ndarray:
    """uint8 e4m3fn codes -> float32 values."""
    return DECODE.take(np.asarray(codes, dtype=np.uint8))


def tensor_scale(amax: float) -> np.float32:
    """Tensor-wise scale amax / 448 (1.0 for an all-zero tensor, so dequantizing stays exact)."""
    amax = float(amax)
    return np.float32(amax / E4M3_MAX) if amax > 0 else np.float32(1.0)


def quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Any-shape float32 tensor -> (uint8 e4m3 codes of w / scale, scale = amax / 448)."""
    scale = tensor_scale(np.max(np.abs(w)) if w.size else 0.0)
    return encode_e4m3(np.asarray(w, np.float32) / scale), scale

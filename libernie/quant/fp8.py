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


def encode_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 array -> uint8 e4m3fn codes. Values are clipped to ±448 first; NaN stays NaN (0x7F)."""
    x = np.asarray(x, dtype=np.float32)
    a = np.minimum(np.abs(x), np.float32(E4M3_MAX)).astype(np.float64)
    _, e = np.frexp(a)                                   # a = f * 2^e, f in [0.5, 1)
    e = np.maximum(e - 1, _MIN_NORMAL_EXP)               # exponent of the leading bit; subnormals share -6
    q = np.rint(a / np.exp2(e - 3))                      # 3 mantissa bits + the leading one: q in [0, 16]
    # code = ((e + 7) << 3) + (q - 8): a carry (q == 16) and a subnormal (e == -6, q < 8) both come out right
    code = np.where(a == 0, 0, ((e + 7) * 8 + q - 8)).astype(np.uint8)
    code |= np.where(np.signbit(x), np.uint8(0x80), np.uint8(0))
    code[np.isnan(x)] = 0x7F
    return code


def decode_e4m3(codes: np.ndarray) -> np.ndarray:
    """uint8 e4m3fn codes -> float32 values."""
    return DECODE[np.asarray(codes, dtype=np.uint8)]


def tensor_scale(amax: float) -> np.float32:
    """Tensor-wise scale amax / 448 (1.0 for an all-zero tensor, so dequantizing stays exact)."""
    amax = float(amax)
    return np.float32(amax / E4M3_MAX) if amax > 0 else np.float32(1.0)


def quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Any-shape float32 tensor -> (uint8 e4m3 codes of w / scale, scale = amax / 448)."""
    scale = tensor_scale(np.max(np.abs(w)) if w.size else 0.0)
    return encode_e4m3(np.asarray(w, np.float32) / scale), scale

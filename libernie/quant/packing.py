"""Bit packing of quantized integers (docs/formats/quant.md).

Paddle layout (ours, FastDeploy names): int4 values of two consecutive input rows share one byte,
low nibble = even row, two's complement nibbles; tensor [in/2, out] int8.
compressed-tensors (pack-quantized): each row of q [out, in] (offset to unsigned by 2^(bits-1)) is one bit
string, element i at bits i*bits.., cut into little-endian int32 words; a row is zero-padded to a whole word.
"""
from __future__ import annotations

import numpy as np

from libernie.errors import CheckpointError
from libernie.kernels import quant_kernel


def pack_int4_rows(q: np.ndarray) -> np.ndarray:
    """q [in, out] int8 in [-8, 7] (Paddle orientation) -> [in/2, out] int8, rows 2k / 2k+1 in low / high nibble."""
    if q.shape[0] % 2:
        raise ValueError(f"int4 packing needs an even input width, got {q.shape[0]}")
    lib = quant_kernel.load()                           # the compiled twin where built (same bytes)
    if lib is not None and q.ndim == 2 and q.dtype == np.int8 and q.flags.c_contiguous:
        return quant_kernel.pack_int4(lib, q)
    lo = q[0::2].astype(np.uint8) & 0x0F
    hi = q[1::2].astype(np.uint8) & 0x0F
    return (lo | (hi << 4)).view(np.int8)


def unpack_int4_rows(p: np.ndarray) -> np.ndarray:
    """Inverse of pack_int4_rows: [in/2, out] int8 -> [in, out] int8."""
    lo = (p << 4) >> 4                                   # arithmetic shifts sign-extend the low nibble
    hi = p >> 4
    out = np.empty((p.shape[0] * 2,) + p.shape[1:], dtype=np.int8)
    out[0::2], out[1::2] = lo, hi
    return out


def packed_words(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def pack_int32(q: np.ndarray, bits: int) -> np.ndarray:
    """q [rows, n] int8 in [-2^(bits-1), 2^(bits-1)-1] -> [rows, ceil(n*bits/32)] int32 (compressed-tensors)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    rows, n = q.shape
    per = 32 // bits
    words = packed_words(n, bits)
    u = np.zeros((rows, words * per), dtype=np.uint32)
    u[:, :n] = (q.astype(np.int32) + (1 << (bits - 1))).astype(np.uint32)
    u = u.reshape(rows, words, per)
    out = np.zeros((rows, words), dtype=np.uint32)
    for j in range(per):                                  # element j of each word sits at bits j*bits..
        out |= u[:, :, j] << np.uint32(j * bits)
    return out.view(np.int32)


def unpack_int32(p: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of pack_int32: [rows, words] int32 -> [rows, n] int8."""
    rows, words = p.shape
    per = 32 // bits
    if words * per < n:
        raise CheckpointError(f"packed tensor has {words} words per row, too few for {n} {bits}-bit values")
    u = p.view(np.uint32)
    mask = np.uint32((1 << bits) - 1)
    out = np.empty((rows, words, per), dtype=np.int32)
    for j in range(per):
        out[:, :, j] = ((u >> np.uint32(j * bits)) & mask).astype(np.int32)
    return (out.reshape(rows, words * per)[:, :n] - (1 << (bits - 1))).astype(np.int8)

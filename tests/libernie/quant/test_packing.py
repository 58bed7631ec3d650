"""Bit layouts of docs/formats/quant.md: golden bytes, golden words, round trips."""
import numpy as np
import pytest

from libernie.quant.packing import pack_int4_rows, pack_int32, unpack_int4_rows, unpack_int32


def test_int4_golden_bytes():
    # input rows (Paddle orientation [in, out]) pairs (1, -1), (-8, 7), (0, 3) -> 0xF1, 0x78, 0x30 (docs)
    q = np.array([[1], [-1], [-8], [7], [0], [3]], np.int8)
    assert pack_int4_rows(q).view(np.uint8).ravel().tolist() == [0xF1, 0x78, 0x30]


def test_int4_round_trip_every_value_pair():
    a, b = np.meshgrid(np.arange(-8, 8), np.arange(-8, 8))
    q = np.stack([a.ravel(), b.ravel()]).astype(np.int8)           # [2, 256]: every (even, odd) pair
    packed = pack_int4_rows(q)
    assert packed.shape == (1, 256) and packed.dtype == np.int8
    assert len(set(packed.view(np.uint8).ravel().tolist())) == 256
    np.testing.assert_array_equal(unpack_int4_rows(packed), q)


def test_int4_needs_even_rows():
    with pytest.raises(ValueError):
        pack_int4_rows(np.zeros((3, 2), np.int8))


def test_int32_golden_word_int4():
    w = pack_int32(np.array([[-8, -7, 0, 1, 2, 3, 6, 7]], np.int8), 4)
    assert w.dtype == np.int32 and w.shape == (1, 1)
    assert w.view(np.uint32)[0, 0] == 0xFEBA9810 and w[0, 0] == -21325808


def test_int32_golden_word_int8():
    w = pack_int32(np.array([[-128, 0, 1, 127]], np.int8), 8)
    assert w.view(np.uint32)[0, 0] == 0xFF818000  # 0x00, 0x80, 0x81, 0xFF, first lowest


@pytest.mark.parametrize("bits,n", [(4, 8), (4, 37), (8, 4), (8, 37)])
def test_int32_round_trip_and_padding(bits, n):
    rng = np.random.default_rng(n)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = rng.integers(lo, hi + 1, (5, n)).astype(np.int8)
    p = pack_int32(q, bits)
    assert p.shape == (5, -(-n * bits // 32))
    np.testing.assert_array_equal(unpack_int32(p, bits, n), q)

"""e4m3fn codec against Paddle's own float8_e4m3fn cast (an independent implementation) and against the format."""
import numpy as np
import paddle
import pytest

from libernie.quant.fp8 import DECODE, E4M3_MAX, decode_e4m3, encode_e4m3, quantize_fp8, tensor_scale


def paddle_codes(x: np.ndarray) -> np.ndarray:
    return paddle.to_tensor(np.asarray(x, np.float32)).astype("float8_e4m3fn").view("uint8").numpy()


def test_decode_table_matches_the_format():
    assert DECODE[0x7E] == 448.0 and DECODE[0xFE] == -448.0
    assert DECODE[0x01] == 2.0 ** -9          # smallest subnormal
    assert DECODE[0x08] == 2.0 ** -6          # smallest normal
    assert DECODE[0x38] == 1.0                # exponent 7 = bias
    assert np.isnan(DECODE[0x7F]) and np.isnan(DECODE[0xFF])
    assert np.sum(np.isnan(DECODE)) == 2


def test_every_code_round_trips_and_matches_paddle():
    codes = np.arange(256, dtype=np.uint8)
    vals = decode_e4m3(codes)
    ok = ~np.isnan(vals) & ~((codes == 0x80))   # -0.0 encodes to 0x80, checked below
    np.testing.assert_array_equal(encode_e4m3(vals[ok]), codes[ok])
    np.testing.assert_array_equal(paddle_codes(vals[ok]), codes[ok])
    assert encode_e4m3(np.array([-0.0], np.float32))[0] == 0x80


def test_rounding_matches_paddle_on_midpoints_and_random_values():
    vals = np.sort(decode_e4m3(np.arange(256, dtype=np.uint8))[~np.isnan(DECODE)])
    mids = ((vals[1:] + vals[:-1]) / 2).astype(np.float32)          # ties: round half to even
    rng = np.random.default_rng(0)
    x = np.concatenate([mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf),
                        rng.normal(0, 60, 20000).astype(np.float32), rng.normal(0, 0.01, 5000).astype(np.float32)])
    x = np.clip(x, -E4M3_MAX, E4M3_MAX).astype(np.float32)
    np.testing.assert_array_equal(encode_e4m3(x), paddle_codes(x))


@pytest.mark.parametrize("v", [448.5, 449.0, 464.0, 479.9, 480.0, 1e4, 3e38, np.inf])
def test_out_of_range_clips_to_448(v):
    # Without the explicit clip, values between 464 and 480 round to the NaN code 0x7F: Paddle 3.3.1's own cast
    # does that for 470 and 479.9 (it saturates only from 480 up). After the clip every writer agrees.
    x = np.array([v, -v], np.float32)
    np.testing.assert_array_equal(encode_e4m3(x), [0x7E, 0xFE])
    np.testing.assert_array_equal(paddle_codes(np.clip(x, -E4M3_MAX, E4M3_MAX)), [0x7E, 0xFE])


def test_nan_stays_nan():
    assert encode_e4m3(np.array([np.nan], np.float32))[0] == 0x7F


def test_tensor_scale_is_amax_over_448_exactly():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.3, (37, 11)).astype(np.float32)
    codes, scale = quantize_fp8(w)
    assert scale == np.float32(np.abs(w).max() / 448.0)
    assert decode_e4m3(codes).max() <= 448.0 and np.abs(decode_e4m3(codes)).max() == 448.0  # amax maps to ±448
    assert tensor_scale(0.0) == 1.0
    # relative error of e4m3 is at most 2^-4 for normals
    deq = decode_e4m3(codes) * scale
    big = np.abs(w) > 2.0 ** -6 * scale
    assert np.all(np.abs(deq - w)[big] <= np.abs(w)[big] * 2.0 ** -4 + 1e-12)


def test_finite_flag_gives_the_same_codes():
    # encode_e4m3(finite=True) skips the NaN pass only: same codes on every finite input, out-of-range ones too
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 100, 70000), [1e4, -3e38, np.inf, -np.inf, 0.0, -0.0, 2.0 ** -12]])
    x = x.astype(np.float32)
    np.testing.assert_array_equal(encode_e4m3(x, finite=True), encode_e4m3(x))
    np.testing.assert_array_equal(encode_e4m3(x[:-7], finite=True), paddle_codes(x[:-7]))

"""rtn_quantize's float32 path against its float64 slow twin (rtn_quantize_reference): the same integers and
scales bit for bit, on random weights and on weights built to sit on and next to the k + 1/2 rounding
boundaries, where a plain float32 quotient would round the other way."""
import numpy as np
import pytest

from libernie.quant.gptq import dequantize, rtn_float32, rtn_quantize, rtn_quantize_reference


def _same(w, bits, group_size):
    q, scale = rtn_quantize(w, bits, group_size)
    q_ref, scale_ref = rtn_quantize_reference(w, bits, group_size)
    np.testing.assert_array_equal(scale.view(np.uint32), scale_ref.view(np.uint32))
    np.testing.assert_array_equal(q, q_ref)
    assert q.dtype == np.int8 and scale.dtype == np.float32


@pytest.mark.parametrize("bits,group_size", [(8, -1), (8, 64), (4, -1), (4, 32), (4, 128)])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_weights_match_the_float64_rule(seed, bits, group_size):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, size=(96, 512)) * 0.02).astype(np.float32)
    w[3] = 0.0                                                     # an all-zero row: scale 1.0
    w[5, :64] = 1e-30                                              # tiny magnitudes
    _same(w, bits, group_size)


def _boundary_weights(bits: int, n: int = 4096, seed: int = 0) -> np.ndarray:
    """Rows of [amax, w_1 .. w_n]: the scale is fl32(amax / qmax) and every w_i is within 3 float32 ulps of
    (k + 1/2) * scale, for random amax and half-integer k in range."""
    qmax = {8: 127, 4: 7}[bits]
    rng = np.random.default_rng(seed)
    rows = []
    for amax in (rng.uniform(0.01, 1.0, size=8).astype(np.float32)):
        s = np.float32(amax / np.float32(qmax))
        k = rng.integers(-qmax - 1, qmax, size=n) + 0.5                   # half-integers in range
        w = (k * np.float64(s)).astype(np.float32)                       # nearest float32 to the boundary
        w = np.nextafter(w, np.float32(np.inf) * np.sign(rng.standard_normal(n)).astype(np.float32))
        for _ in range(2):                                               # spread to -3..+3 ulps
            move = rng.integers(0, 2, size=n).astype(bool)
            w[move] = np.nextafter(w[move], np.float32(np.inf) * np.sign(rng.standard_normal(move.sum())))
        w = np.clip(w, -amax, amax)
        rows.append(np.concatenate([[amax], w]).astype(np.float32))
    return np.stack(rows)


@pytest.mark.parametrize("bits", [8, 4])
def test_weights_next_to_rounding_boundaries_match_the_float64_rule(bits):
    w = _boundary_weights(bits)
    _same(w, bits, -1)
    # the case is real: a plain float32 quotient rounds some of these differently from the float64 rule
    qmax = {8: 127, 4: 7}[bits]
    _, scale = rtn_quantize_reference(w, bits, -1)
    naive = np.clip(np.rint(w / scale), -qmax - 1, qmax)
    assert (naive != rtn_quantize_reference(w, bits, -1)[0]).any()


def test_exact_ties_round_half_to_even():
    # amax 127 -> scale 1.0 exactly: w / scale are exact half-integers
    w = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -126.5, 126.5]], np.float32)
    q, scale = rtn_quantize(w, 8, -1)
    assert scale.tolist() == [[1.0]]
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -126, 126]]
    _same(w, 8, -1)


def test_rtn_float32_times_scale_is_dequantize():
    w = (np.random.default_rng(7).standard_normal((32, 256)) * 0.02).astype(np.float32)
    qf, scale = rtn_float32(w, 4, 32)
    q, _ = rtn_quantize(w, 4, 32)
    np.testing.assert_array_equal(qf, q.astype(np.float32))
    deq = (qf.reshape(32, 8, 32) * scale[:, :, None]).reshape(32, 256)
    np.testing.assert_array_equal(deq, dequantize(q, scale, 32))


def test_float64_input_takes_the_reference_rule():
    w = np.random.default_rng(3).standard_normal((8, 64)) * 0.02          # float64: not float32-representable
    q, scale = rtn_quantize(w, 8, -1)
    q_ref, scale_ref = rtn_quantize_reference(w, 8, -1)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(scale, scale_ref)


@pytest.mark.parametrize("bits,group_size", [(8, -1), (4, -1), (4, 16), (8, 8)])
def test_clip_cannot_bind_when_scales_come_from_the_same_values(bits, group_size):
    # round_to_grid(clip=False) is what the streaming writer uses: with scale = group_scale(amax of the group),
    # rounding alone stays within +-qmax, so the result equals the clipped one and the float64 rule, including
    # on the boundary weights and on elements equal to +-amax (t = +-qmax, the largest magnitude possible)
    from libernie.quant.gptq import QMAX, group_scale, round_to_grid
    w = _boundary_weights(bits, n=1023)
    w[:, 1] = -w[:, 0]                                             # -amax in every row (1024 columns)
    g = w.shape[1] if group_size == -1 else group_size
    wg = w.reshape(w.shape[0], -1, g)
    scale = group_scale(np.maximum(wg.max(axis=2), -wg.min(axis=2)), bits)[:, :, None]
    free = round_to_grid(wg, scale, bits, clip=False)
    np.testing.assert_array_equal(free, round_to_grid(wg, scale, bits))
    np.testing.assert_array_equal(free.reshape(w.shape), rtn_quantize_reference(w, bits, group_size)[0])
    assert np.abs(free).max() == QMAX[bits]                        # +-amax reach qmax exactly

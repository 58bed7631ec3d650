"""Weight-only integer quantization: round-to-nearest (RTN) and GPTQ, in numpy.

The integer convention every ernie-quant path shares (docs/quant-gptq.md):
- a weight is viewed as W [out, in] (HF orientation; Paddle stores Linear weights [in, out], transpose first);
- symmetric, no zero point; groups of `group_size` consecutive input columns, group_size -1 = one group per
  row (per output channel);
- qmax = 127 for bits=8, 7 for bits=4; scale[o, g] = amax(|W[o, group g]|) / qmax, stored float32, and 1.0
  where the group is all zero;
- q = clip(round(W / scale), -qmax-1, qmax) as int8 [out, in], round half to even (numpy's, torch's);
- dequant = q * scale, each scale broadcast over its group.

GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023, arXiv:2210.17323) picks the same kind of (q, scale) but quantizes
columns one at a time and spreads each column's rounding error over the columns not yet quantized, weighted
by the inverse Hessian of the layer's squared output error, H = 2 XᵀX / n over calibration inputs X [n, in].
H is accumulated, damped, factored and applied in float64 (each batch's XᵀX is a float32 product).
"""
from __future__ import annotations

import numpy as np

from libernie.errors import ErnieError

QMAX = {8: 127, 4: 7}


class QuantArgError(ErnieError, ValueError):
    """Quantization asked for something the convention cannot express: a group size that does not divide
    the input width, unsupported bits, mismatched shapes, non-finite weights or a Hessian that stays
    singular after damping."""


# ---- the shared convention -----------------------------------------------------------------------------
def check_args(shape, bits: int, group_size: int) -> tuple[int, int, int]:
    """Weight shape [out, in] -> (qmax, group width, number of groups), or QuantArgError if the convention
    cannot quantize it (callers check a whole model up front with this, before any work)."""
    if bits not in QMAX:
        raise QuantArgError(f"bits={bits} is not supported; use 8 (int8) or 4 (int4)")
    if len(shape) != 2:
        raise QuantArgError(f"weight must be 2-D [out, in], got shape {list(shape)}")
    n_in = shape[1]
    if group_size == -1:
        return QMAX[bits], n_in, 1
    if group_size <= 0 or n_in % group_size:
        raise QuantArgError(f"group size {group_size} does not divide the input width {n_in}; "
                            f"use a divisor of {n_in} or -1 (per output channel)")
    return QMAX[bits], group_size, n_in // group_size


def _scale(amax: np.ndarray, qmax: int) -> np.ndarray:
    """amax [...] -> float32 scale [...]: amax / qmax, 1.0 for all-zero groups (q is 0 there anyway)."""
    return np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)


def _round(x: np.ndarray, qmax: int) -> np.ndarray:
    """Real-valued W / scale -> the integer grid [-qmax-1, qmax] (float, exact integers)."""
    return np.clip(np.rint(x), -qmax - 1, qmax)


def rtn_quantize(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest. w [out, in] float -> (q int8 [out, in], scale float32 [out, n_groups]).

    The rule is the float64 one of rtn_quantize_reference (its slow twin; tests compare them). A float32 w
    takes a float32 path that gives the same bits at a third of the memory traffic:
    - scale: fl32(amax / qmax) computed in float32 equals float64-then-float32 (both are the correctly
      rounded quotient of two float32 values: double rounding is harmless for division at 53 >= 2*24+2 bits);
    - q: t = fl32(w / scale) is within half a float32 ulp of the true quotient, so rint(t) can differ from
      the float64 rint only where t is within an ulp of a k + 1/2 boundary. Only |t| < 256 matters (beyond,
      both clip to the same end), where an ulp is at most 2^-16; elements within _TIE_BAND = 2^-15 of a
      boundary (about 1 in 15,000 at random) are redone in float64.
    """
    qmax, g, n_groups = check_args(w.shape, bits, group_size)
    if np.asarray(w).dtype != np.float32:
        return rtn_quantize_reference(w, bits, group_size)
    q, scale = rtn_float32(w, bits, group_size)
    return q.astype(np.int8), scale


_TIE_BAND = np.float32(0.5 - 2.0 ** -15)    # |t - rint(t)| above this: within 2^-15 of a .5 boundary


def rtn_float32(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 w [out, in] -> (q as float32 exact integers [out, in], scale float32 [out, G]): rtn_quantize's
    float32 path, for callers that want q * scale next (dequantize gives the same products)."""
    qmax, g, n_groups = check_args(w.shape, bits, group_size)
    out, n_in = w.shape
    wg = np.ascontiguousarray(w).reshape(out, n_groups, g)                     # [out, G, g], a view
    scale = group_scale(np.maximum(wg.max(axis=2), -wg.min(axis=2)), bits)      # [out, G], no |w| temporary
    return round_to_grid(wg, scale[:, :, None], bits).reshape(out, n_in), scale


def group_scale(amax: np.ndarray, bits: int) -> np.ndarray:
    """float32 amax [...] -> float32 scale [...] of the convention (a float32 division: see rtn_quantize)."""
    return _scale(np.asarray(amax, np.float32), QMAX[bits])


def round_to_grid(w: np.ndarray, scale: np.ndarray, bits: int, clip: bool = True) -> np.ndarray:
    """float32 w, float32 scale broadcastable to w -> clip(rint(w / scale)) as float32 exact integers, equal
    to the float64 rule (see rtn_quantize): a float32 quotient, redone in float64 within _TIE_BAND of a .5.

    clip=False skips the clip where the caller knows it cannot bind: when each scale is group_scale of the
    amax of the very values it divides, |w| <= amax and scale >= (amax / qmax)(1 - 2^-24) give
    |w / scale| <= qmax + 2^-17 in float64 and at most one float32 ulp more, so rint stays within +-qmax."""
    qmax = QMAX[bits]
    t = w / scale                                                               # float32, w's shape
    r = np.rint(t)
    t -= r
    np.abs(t, out=t)
    near = np.flatnonzero(t > _TIE_BAND)
    if near.size:                                                               # redo these in float64
        at = np.unravel_index(near, w.shape)
        r[at] = np.rint(w[at].astype(np.float64) / np.broadcast_to(scale, w.shape)[at].astype(np.float64))
    if clip:
        np.clip(r, -qmax - 1, qmax, out=r)
    return r


def rtn_quantize_reference(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The rounding rule as written, in float64 (any float input): the slow twin of rtn_quantize."""
    qmax, g, n_groups = check_args(w.shape, bits, group_size)
    out, n_in = w.shape
    wg = np.asarray(w, dtype=np.float64).reshape(out, n_groups, g)              # [out, G, g]
    scale = _scale(np.abs(wg).max(axis=2), qmax)                                # [out, G]
    q = _round(wg / scale.astype(np.float64)[:, :, None], qmax)
    return q.reshape(out, n_in).astype(np.int8), scale


def dequantize(q: np.ndarray, scale: np.ndarray, group_size: int) -> np.ndarray:
    """(q int8 [out, in], scale [out, n_groups]) -> float32 W [out, in]."""
    out, n_in = q.shape
    g = n_in if group_size == -1 else group_size
    if g <= 0 or n_in % g or scale.shape != (out, n_in // g):
        raise QuantArgError(f"scale shape {list(scale.shape)} does not fit q {list(q.shape)} "
                            f"with group size {group_size}")
    qg = q.astype(np.float32).reshape(out, n_in // g, g)
    return (qg * scale.astype(np.float32)[:, :, None]).reshape(out, n_in)


# ---- calibration statistics ----------------------------------------------------------------------------
class HessianAccumulator:
    """Running H = 2/n Σ x xᵀ over the n calibration rows seen so far (float64 [in, in]).

    The mean (not the sum) keeps H's scale independent of how much calibration data there is; GPTQ's
    damping is relative to mean(diag H), so only the direction of H matters to the result.
    Each batch's XᵀX is a float32 product (twice the speed of float64, and the cost that dominates
    calibration: tokens x in² per linear); batches are summed into H in float64. The float32 rounding,
    about 1e-6 of an entry, is four orders below the damping GPTQ adds (1e-2 of mean(diag H)).
    """

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.H = np.zeros((in_features, in_features), dtype=np.float64)
        self.n = 0

    def add(self, x: np.ndarray) -> None:
        """x [..., in]: every leading index is one calibration row (token)."""
        x = np.asarray(x, dtype=np.float32).reshape(-1, self.in_features)       # [m, in]
        m = x.shape[0]
        if m == 0:
            return
        self.H *= self.n / (self.n + m)
        self.n += m
        self.H += (x.T @ x).astype(np.float64) * (2.0 / self.n)


# ---- GPTQ ----------------------------------------------------------------------------------------------
def _upper_cholesky_of_inverse(H: np.ndarray) -> np.ndarray:
    """U upper triangular with Uᵀ U = H⁻¹, from one Cholesky and one triangular inverse.

    With J the reversal permutation, chol(J H J) = L gives H = R Rᵀ for the upper R = J L J, so
    H⁻¹ = R⁻ᵀ R⁻¹ = Uᵀ U with U = R⁻¹ (upper, positive diagonal): this is the factor GPTQ's updates read
    row by row, computed without forming H⁻¹ (fewer flops and better conditioned than inv + cholesky).
    """
    L = np.linalg.cholesky(H[::-1, ::-1])
    return _inverse_upper(np.ascontiguousarray(L[::-1, ::-1]))


def _inverse_upper(R: np.ndarray) -> np.ndarray:
    """Inverse of an upper triangular R by halves: [[A, B], [0, C]]⁻¹ = [[A⁻¹, -A⁻¹ B C⁻¹], [0, C⁻¹]].
    About n³/3 multiply-adds in matmuls; numpy has no triangular inverse, and its general inv costs 6x that."""
    n = R.shape[0]
    if n <= 128:
        return np.triu(np.linalg.inv(R))
    h = n // 2
    a_inv, c_inv = _inverse_upper(R[:h, :h]), _inverse_upper(R[h:, h:])
    out = np.zeros_like(R)
    out[:h, :h], out[h:, h:] = a_inv, c_inv
    out[:h, h:] = -(a_inv @ R[:h, h:]) @ c_inv
    return out


def gptq_quantize(w: np.ndarray, H: np.ndarray, bits: int, group_size: int, *, damp: float = 0.01,
                  block: int = 128, act_order: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ. w [out, in] float, H [in, in] (HessianAccumulator.H) -> (q int8 [out, in], scale f32 [out, G]).

    damp: fraction of mean(diag H) added to the diagonal before inverting (the paper's λ; 0.01).
    block: columns per lazy batch update (the paper's B = 128); changes speed, not the result.
    act_order: quantize columns in order of decreasing diag(H) (largest activations first). Groups stay the
        contiguous input-column groups of the convention ("static groups"), their scales taken from W
        before any update, so the output is plain group-wise and needs no permutation at inference.
    Without act_order a group's scale is taken from the partially-updated weights when the group starts.
    Columns with diag(H) == 0 never saw a nonzero input ("dead"): they are quantized to 0.
    """
    qmax, g, n_groups = check_args(w.shape, bits, group_size)
    out, n_in = w.shape
    if H.shape != (n_in, n_in):
        raise QuantArgError(f"Hessian shape {list(H.shape)} does not match the weight's input width {n_in}")
    if block <= 0:
        raise QuantArgError(f"block must be positive, got {block}")
    # Work on Wᵀ [in, out]: a column of W is then a contiguous row, and the rank-1 update of each step writes
    # whole rows (2.8x faster than on [out, in], measured). Peak memory is about two float64 copies of W (Wt,
    # and the product of the first lazy batch update) plus the int8 result: measured 2.45x W's float64 bytes.
    Wt = np.array(np.asarray(w).T, dtype=np.float64, order="C")               # [in, out], updated in place
    H = np.array(H, dtype=np.float64)
    if not (np.isfinite(Wt).all() and np.isfinite(H).all()):
        raise QuantArgError("weight or Hessian has NaN/Inf values; check the checkpoint and calibration data")

    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    Wt[dead] = 0.0
    # Scales fixed up front: per-channel (one group, starting at column 0 before any update) and act_order.
    static = group_size == -1 or act_order
    scale = np.ones((out, n_groups), dtype=np.float32)
    if static:
        scale = _scale(np.abs(Wt.reshape(n_groups, g, out)).max(axis=1).T, qmax)

    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n_in)
    H = H[np.ix_(perm, perm)]
    H[np.diag_indices(n_in)] += damp * np.mean(np.diag(H))
    try:
        U = _upper_cholesky_of_inverse(H)                                      # [in, in], Uᵀ U = H⁻¹
    except np.linalg.LinAlgError:
        raise QuantArgError(f"the damped Hessian is not positive definite; raise damp (now {damp})") from None
    if act_order:
        Wt = Wt[perm]                                                          # rows in processing order
    scale_t = scale.astype(np.float64).T                                       # [G, out] (static scales)
    group_of = perm // g                                                       # processing step -> its group

    Qt = np.zeros((n_in, out), dtype=np.int8)
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        W1 = Wt[i1:i2].copy()                                                  # [B, out] updated row by row
        Err = np.zeros_like(W1)                                                # [B, out] scaled errors
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if static:
                s = scale_t[group_of[j]]
            else:
                if j % g == 0:                                                 # a group starts: scale from now
                    scale[:, j // g] = _scale(np.abs(_current(Wt, W1, Err, U, i1, i, j + g)).max(axis=0), qmax)
                s = scale[:, j // g].astype(np.float64)
            q = _round(W1[i] / s, qmax)                                        # [out], exact integers
            Qt[j] = q
            err = (W1[i] - q * s) / U1[i, i]                                   # [out]
            W1[i + 1:] -= np.outer(U1[i, i + 1:], err)
            Err[i] = err
        Wt[i2:] -= U[i1:i2, i2:].T @ Err                                       # lazy batch update of the rest
    inv = np.argsort(perm)
    return np.ascontiguousarray(Qt[inv].T), scale


def _current(Wt, W1, Err, U, i1: int, i: int, stop: int) -> np.ndarray:
    """Columns i1+i .. stop-1 of the weight as updated so far, as rows [k, out]: W1 inside the current block;
    beyond it, Wt plus the updates from this block's already-quantized columns that the lazy batch update has
    not applied yet."""
    i2 = i1 + W1.shape[0]
    inside = W1[i:min(stop, i2) - i1]
    if stop <= i2:
        return inside
    beyond = Wt[i2:stop] - U[i1:i1 + i, i2:stop].T @ Err[:i]
    return np.concatenate([inside, beyond], axis=0)

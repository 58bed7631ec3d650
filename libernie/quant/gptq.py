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
Everything that touches H runs in float64.
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
def _check(w: np.ndarray, bits: int, group_size: int) -> tuple[int, int, int]:
    """-> (qmax, group width, number of groups) for W [out, in], or QuantArgError."""
    if bits not in QMAX:
        raise QuantArgError(f"bits={bits} is not supported; use 8 (int8) or 4 (int4)")
    if w.ndim != 2:
        raise QuantArgError(f"weight must be 2-D [out, in], got shape {list(w.shape)}")
    n_in = w.shape[1]
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
    """Round-to-nearest. w [out, in] float -> (q int8 [out, in], scale float32 [out, n_groups])."""
    qmax, g, n_groups = _check(w, bits, group_size)
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
    """

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.H = np.zeros((in_features, in_features), dtype=np.float64)
        self.n = 0

    def add(self, x: np.ndarray) -> None:
        """x [..., in]: every leading index is one calibration row (token)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.in_features)       # [m, in]
        m = x.shape[0]
        if m == 0:
            return
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * np.sqrt(2.0 / self.n)
        self.H += x.T @ x


# ---- GPTQ ----------------------------------------------------------------------------------------------
def _upper_cholesky_of_inverse(H: np.ndarray) -> np.ndarray:
    """U upper triangular with Uᵀ U = H⁻¹, from one Cholesky and one triangular inverse.

    With J the reversal permutation, chol(J H J) = L gives H = R Rᵀ for the upper R = J L J, so
    H⁻¹ = R⁻ᵀ R⁻¹ = Uᵀ U with U = R⁻¹ (upper, positive diagonal): this is the factor GPTQ's updates read
    row by row, computed without forming H⁻¹ (fewer flops and better conditioned than inv + cholesky).
    """
    L = np.linalg.cholesky(H[::-1, ::-1])
    R = L[::-1, ::-1]
    return np.triu(np.linalg.inv(R))


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
    qmax, g, n_groups = _check(w, bits, group_size)
    out, n_in = w.shape
    if H.shape != (n_in, n_in):
        raise QuantArgError(f"Hessian shape {list(H.shape)} does not match the weight's input width {n_in}")
    if block <= 0:
        raise QuantArgError(f"block must be positive, got {block}")
    W = np.array(w, dtype=np.float64)                                          # [out, in], updated in place
    H = np.array(H, dtype=np.float64)
    if not (np.isfinite(W).all() and np.isfinite(H).all()):
        raise QuantArgError("weight or Hessian has NaN/Inf values; check the checkpoint and calibration data")

    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    # Scales fixed up front: per-channel (one group, starting at column 0 before any update) and act_order.
    static = group_size == -1 or act_order
    scale = np.ones((out, n_groups), dtype=np.float32)
    if static:
        scale = _scale(np.abs(W.reshape(out, n_groups, g)).max(axis=2), qmax)

    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n_in)
    W, H = W[:, perm], H[np.ix_(perm, perm)]
    H[np.diag_indices(n_in)] += damp * np.mean(np.diag(H))
    try:
        U = _upper_cholesky_of_inverse(H)                                      # [in, in], Uᵀ U = H⁻¹
    except np.linalg.LinAlgError:
        raise QuantArgError(f"the damped Hessian is not positive definite; raise damp (now {damp})") from None
    col_scale = scale.astype(np.float64)[:, perm // g] if static else None       # [out, in] in processing order

    Q = np.zeros((out, n_in), dtype=np.float64)
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        W1 = W[:, i1:i2].copy()                                                # [out, B] updated column by column
        Err = np.zeros_like(W1)                                                # [out, B] scaled errors
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if static:
                s = col_scale[:, j]
            else:
                if j % g == 0:                                                 # a group starts: scale from now
                    scale[:, j // g] = _scale(np.abs(_current(W, W1, Err, U, i1, i, j + g)).max(axis=1), qmax)
                s = scale[:, j // g].astype(np.float64)
            col = W1[:, i]
            Q[:, j] = _round(col / s, qmax)
            err = (col - Q[:, j] * s) / U1[i, i]                               # [out]
            W1[:, i + 1:] -= np.outer(err, U1[i, i + 1:])
            Err[:, i] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]                                       # lazy batch update of the rest
    inv = np.argsort(perm)
    return Q[:, inv].astype(np.int8), scale


def _current(W, W1, Err, U, i1: int, i: int, stop: int) -> np.ndarray:
    """Columns i1+i .. stop-1 of the weight as updated so far: W1 inside the current block; beyond it, W plus
    the updates from this block's already-quantized columns that the lazy batch update has not applied."""
    i2 = i1 + W1.shape[1]
    inside = W1[:, i:min(stop, i2) - i1]
    if stop <= i2:
        return inside
    beyond = W[:, i2:stop] - Err[:, :i] @ U[i1:i1 + i, i2:stop]
    return np.concatenate([inside, beyond], axis=1)

"""Attention: one dispatch point over flash attention (GPU), the C++ CPU flash kernel ("cpu"), its
Paddle-ops twin ("blocked"), Paddle's SDPA and a plain dense reference.

Shapes: q [b, s, nh, hd]; k, v [b, nkv, t, hd] (head-major, as the KV cache stores them) with nh a
multiple of nkv (GQA); out [b, s, nh, hd]. Queries are the last s of the t key positions (t > s when
a KV cache holds the past). Head-major keys matter on CPU: Paddle's transposes are strided views,
and both its matmul on a strided operand and its strided copies are slow (a decode step's
transpose of the cache cost 1.35 ms per layer, its matmul 0.03 ms).
The mask is an AttentionMask built once per forward and shared by every layer; each backend asks
it for the form it uses and that form is built once. The CPU kernels and FlashMask take the column
form (one int per key, O(t)); only the reference and SDPA build the dense [b, 1, s, t] mask. The CPU
kernels keep memory linear in s (the backward recomputes scores per tile) and skip tiles that no row
of the tile may see, so packed documents cost the sum of their squared lengths. The C++ kernel is
faster than the old dense blocked path at every length measured (512-token training, decode; see
docs/BENCHMARKS.md), so no dense path remains on CPU by default.
"""
from __future__ import annotations

import os

import numpy as np
import paddle
import paddle.nn.functional as F

from libernie.kernels import cpu_kernel, flash
from libernie.kernels.dispatch import on_gpu

# Segment roles of packed DPO pairs (libernie.data.shard; kept here so kernels need not import data).
ROLE_CHOSEN, ROLE_REJECTED = 2, 3
BACKENDS = ("flash", "cpu", "blocked", "sdpa", "reference")


class AttentionMask:
    """Causal attention, optionally restricted to each document (doc_ids [b, s]), to real keys
    (key_padding [b, t]: 1 real, 0 left padding) and by the DPO rule (roles [b, s], the shard role
    codes of docs/formats/shards.md: a REJECTED query never sees a CHOSEN key).

    Each backend asks for the form it uses, built once per forward and shared by every layer:
    `key_ends()` the column form (O(t), the blocked kernels and FlashMask), `allowed()`/`bias()` the
    dense [b|1, 1, s, t] form (reference and SDPA only)."""

    def __init__(self, q_len: int, k_len: int, doc_ids=None, key_padding=None, roles=None):
        if roles is not None and doc_ids is None:
            raise ValueError("roles (the DPO rule) needs doc_ids: a pair is one packed document")
        if doc_ids is not None and q_len != k_len:
            raise ValueError("doc_ids can only be combined with a full forward, not a KV cache")
        self.q_len, self.k_len, self.doc_ids, self.roles = q_len, k_len, doc_ids, roles
        self.key_padding = key_padding
        self.has_padding = key_padding is not None
        self.plain_causal = doc_ids is None and key_padding is None and q_len == k_len
        self._bool = self._bias = self._ends = None
        self._ends_t: dict = {}

    def key_ends(self, batch: int = 1) -> np.ndarray | None:
        """int32 [b, t] (FlashMask's column form): key j is seen from absolute query positions p with
        j <= p < kend[j]; query row i sits at p = i + t - s. Causal, documents, padding and the DPO rule
        in one vector. None where the DPO rule is not an interval of rows (a document whose tokens
        after a rejected one are not all rejected): such masks need the dense form."""
        if self._ends is None:
            self._ends = _key_ends(self.q_len, self.k_len, self.doc_ids, self.key_padding, self.roles)
        if self._ends is False:
            return None
        return np.ascontiguousarray(np.broadcast_to(self._ends, (max(batch, self._ends.shape[0]), self.k_len)))

    def key_ends_tensor(self, batch: int, place=None) -> paddle.Tensor | None:
        """key_ends as a paddle int32 tensor, cached per (batch, place)."""
        key = (batch, str(place))
        if key not in self._ends_t:
            ends = self.key_ends(batch)
            self._ends_t[key] = None if ends is None else paddle.to_tensor(ends, place=place)
        return self._ends_t[key]

    def allowed(self) -> paddle.Tensor:
        """bool [b|1, 1, s, t], True where query i may attend to key j."""
        if self._bool is None:
            self._bool = _allowed(self.q_len, self.k_len, self.doc_ids, self.key_padding, self.roles)
        return self._bool

    def bias(self) -> paddle.Tensor:
        """float32 [b|1, 1, s, t]: 0 where allowed, -inf elsewhere (added to the scores)."""
        if self._bias is None:
            allowed = self.allowed()
            self._bias = paddle.where(allowed, paddle.zeros(allowed.shape, "float32"),
                                      paddle.full(allowed.shape, float("-inf"), "float32"))
        return self._bias


def _numpy(x) -> np.ndarray:
    return x.numpy() if isinstance(x, paddle.Tensor) else np.asarray(x)


def _next_at_or_after(flag: np.ndarray) -> np.ndarray:
    """[b, s] bool -> [b, s] int: the first position >= p where flag is set (s if none)."""
    s = flag.shape[1]
    at = np.where(flag, np.arange(s), s)
    return np.minimum.accumulate(at[:, ::-1], axis=1)[:, ::-1]


def _key_ends(q_len, k_len, doc_ids, key_padding, roles):
    """See AttentionMask.key_ends; False when the DPO rule has no column form."""
    ends = np.full((1, k_len), k_len, np.int64)
    if doc_ids is not None:                                   # q_len == k_len here
        doc = _numpy(doc_ids)
        last = np.concatenate([doc[:, 1:] != doc[:, :-1], np.ones((doc.shape[0], 1), bool)], axis=1)
        ends = _next_at_or_after(last) + 1                    # [b, s] end of each token's document
    if roles is not None:                                     # chosen keys: hidden from the next rejected row on
        role = _numpy(roles)
        rej, cho = role == ROLE_REJECTED, role == ROLE_CHOSEN
        first_rej = _next_at_or_after(rej)
        hidden_from = np.where(cho, np.minimum(ends, first_rej), ends)
        # exact only if every row from there to the document's end is rejected too
        after = np.take_along_axis(_next_at_or_after(~rej), np.minimum(hidden_from, k_len - 1), axis=1)
        if (cho & (hidden_from < ends) & (after < ends)).any():
            return False
        ends = hidden_from
    if key_padding is not None:                               # a padding key is seen only by itself
        pad = _numpy(key_padding) == 0
        ends = np.where(pad, np.arange(k_len) + 1, np.broadcast_to(ends, pad.shape))
    return ends.astype(np.int32)


def _allowed(q_len, k_len, doc_ids, key_padding, roles=None):
    offset = k_len - q_len
    rows = paddle.arange(q_len, dtype="int64").unsqueeze(1) + offset      # [s, 1]
    cols = paddle.arange(k_len, dtype="int64").unsqueeze(0)               # [1, t]
    mask = (cols <= rows).unsqueeze(0).unsqueeze(0)                       # [1, 1, s, t]
    if doc_ids is not None:
        mask = mask & (doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)).unsqueeze(1)   # [b, 1, s, t]
    if roles is not None:                                                  # rejected never sees chosen
        rej = (roles == ROLE_REJECTED).unsqueeze(2)                        # [b, s, 1]
        cho = (roles == ROLE_CHOSEN).unsqueeze(1)                          # [b, 1, t]
        mask = mask & ~(rej & cho).unsqueeze(1)                            # [b, 1, s, t]
    if key_padding is not None:
        mask = mask & key_padding.astype("bool").unsqueeze(1).unsqueeze(1)          # [b, 1, 1, t]
        # A padding query would attend to nothing and softmax would give NaN, which then leaks
        # through 0 * NaN into real rows in the next layer. Let every query see itself.
        mask = mask | (cols == rows).unsqueeze(0).unsqueeze(0)
    return mask


def build_attention_mask(q_len: int, k_len: int, *, doc_ids=None, key_padding=None, roles=None) -> AttentionMask:
    return AttentionMask(q_len, k_len, doc_ids, key_padding, roles)


def attention_backend(q: paddle.Tensor, mask: AttentionMask | None = None) -> str:
    """The dispatch point. ERNIE_ATTENTION=flash|cpu|blocked|sdpa|reference overrides the automatic choice.

    CPU: "cpu" (the C++ kernel) for fp32 when it is built here, else "blocked" (its Paddle-ops twin);
    "reference" for the rare DPO masks with no column form (see AttentionMask.key_ends)."""
    forced = os.environ.get("ERNIE_ATTENTION")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"ERNIE_ATTENTION={forced!r}; choose one of {', '.join(BACKENDS)}")
        return forced
    if on_gpu(q):
        half = q.dtype in (paddle.float16, paddle.bfloat16)
        flashable = mask is None or mask.plain_causal or (mask.doc_ids is not None and mask.q_len == mask.k_len
                                                          and not mask.has_padding and mask.key_ends() is not None)
        return "flash" if half and flashable else "sdpa"
    if mask is not None and mask.key_ends() is None:
        return "reference"
    if q.dtype == paddle.float32 and cpu_kernel.load() is not None:
        return "cpu"
    return "blocked"


def attention(q, k, v, mask: AttentionMask | None = None, *, backend: str | None = None) -> paddle.Tensor:
    """Scaled dot-product attention, scale 1/sqrt(hd). See the module docstring for shapes."""
    mask = mask if mask is not None else AttentionMask(q.shape[1], k.shape[2])
    backend = backend or attention_backend(q, mask)
    if backend == "flash":
        return _flash(q, k, v, mask)
    if backend == "cpu":
        return attention_cpu(q, k, v, mask)
    if backend == "blocked":
        return attention_blocked(q, k, v, mask)
    if backend == "sdpa":
        return _sdpa(q, k, v, mask)
    return attention_reference(q, k, v, mask)


def _column_form(mask: AttentionMask, b: int) -> np.ndarray:
    ends = mask.key_ends(b)
    if ends is None:
        raise ValueError("this DPO mask has tokens after a rejected one that are not rejected; "
                         "only the reference and sdpa attention backends take it")
    return ends


def attention_cpu(q, k, v, mask: AttentionMask) -> paddle.Tensor:
    """The C++ CPU kernel (fp32; libernie.kernels.cpu_kernel builds it); its twin is attention_blocked."""
    op = cpu_kernel.load()
    if op is None:
        raise RuntimeError("the C++ attention kernel is not built here; use ERNIE_ATTENTION=blocked")
    _column_form(mask, q.shape[0])
    out, _ = op(q.contiguous(), k.contiguous(), v.contiguous(), mask.key_ends_tensor(q.shape[0]))
    return out


def attention_blocked(q, k, v, mask: AttentionMask, block: int = flash.BLOCK) -> paddle.Tensor:
    """Flash-style attention in Paddle ops (libernie.kernels.flash): any dtype, O(block * t) memory."""
    return flash.flash_attention_paddle(q, k, v, _column_form(mask, q.shape[0]), block)


def attention_reference(q, k, v, mask: AttentionMask | None = None):
    """The slow twin every other path is tested against: one matmul-softmax-matmul, fp32 softmax."""
    b, s, nh, hd = q.shape
    nkv, t = k.shape[1], k.shape[2]
    mask = mask if mask is not None else AttentionMask(s, t)
    g = nh // nkv
    qg = q.reshape([b, s, nkv, g, hd]).transpose([0, 2, 3, 1, 4])         # [b, nkv, g, s, hd]
    kg, vg = k.unsqueeze(2), v.unsqueeze(2)                               # [b, nkv, 1, t, hd]
    scores = paddle.matmul(qg, kg, transpose_y=True).astype("float32") * (hd ** -0.5)  # [b, nkv, g, s, t]
    scores = paddle.where(mask.allowed().unsqueeze(2), scores, paddle.full([], float("-inf"), "float32"))
    probs = F.softmax(scores, axis=-1).astype(q.dtype)
    out = paddle.matmul(probs, vg)                                         # [b, nkv, g, s, hd]
    return out.transpose([0, 3, 1, 2, 4]).reshape([b, s, nh, hd])


def _seq_major(x, g):  # [b, nkv, t, hd] -> [b, t, nkv*g, hd], each kv head repeated for its g query heads
    b, nkv, t, hd = x.shape
    x = x.transpose([0, 2, 1, 3])
    if g == 1:
        return x
    return x.unsqueeze(3).expand([b, t, nkv, g, hd]).reshape([b, t, nkv * g, hd])


def _sdpa(q, k, v, mask: AttentionMask):
    g = q.shape[2] // k.shape[1]
    k, v = _seq_major(k, g), _seq_major(v, g)
    if mask.plain_causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, training=False)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed(), training=False)


def _flash(q, k, v, mask: AttentionMask):  # GPU only; not run in CI (no GPU on these machines)
    from paddle.nn.functional.flash_attention import flash_attention, flashmask_attention
    k, v = k.transpose([0, 2, 1, 3]), v.transpose([0, 2, 1, 3])        # flash wants [b, t, nkv, hd]
    if mask.doc_ids is None:
        out, _ = flash_attention(q, k, v, causal=True)
        return out
    # FlashMask's column form: key j is hidden from row kend[j] on (document end; DPO: the next rejected row).
    ends = mask.key_ends_tensor(q.shape[0], place=q.place)                  # [b, t] int32
    return flashmask_attention(q, k, v, startend_row_indices=ends.unsqueeze(1).unsqueeze(-1), causal=True)

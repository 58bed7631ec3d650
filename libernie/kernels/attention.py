"""Attention: one dispatch point over flash attention (GPU), a blocked CPU kernel, Paddle's SDPA and
a plain reference.

Shapes: q [b, s, nh, hd]; k, v [b, nkv, t, hd] (head-major, as the KV cache stores them) with nh a
multiple of nkv (GQA); out [b, s, nh, hd]. Queries are the last s of the t key positions (t > s when
a KV cache holds the past). Head-major keys matter on CPU: Paddle's transposes are strided views,
and both its matmul on a strided operand and its strided copies are slow (a decode step's
transpose of the cache cost 1.35 ms per layer, its matmul 0.03 ms).
The mask is an AttentionMask built once per forward and shared by every layer; each backend asks
it for the form it uses (bool, additive bias, document ids) and that form is built once.
"""
from __future__ import annotations

import os

import numpy as np
import paddle
import paddle.nn.functional as F

from libernie.kernels.dispatch import on_gpu

# Segment roles of packed DPO pairs (libernie.data.shard; kept here so kernels need not import data).
ROLE_CHOSEN, ROLE_REJECTED = 2, 3
BACKENDS = ("flash", "blocked", "sdpa", "reference")
BLOCK = 64  # query rows per block in the CPU kernel: small enough for the scores to stay in cache


class AttentionMask:
    """Causal attention, optionally restricted to each document (doc_ids [b, s]), to real keys
    (key_padding [b, t]: 1 real, 0 left padding) and by the DPO rule (roles [b, s], the shard role
    codes of docs/formats/shards.md: a REJECTED query never sees a CHOSEN key).
    `allowed` is None for plain causal with no cache."""

    def __init__(self, q_len: int, k_len: int, doc_ids=None, key_padding=None, roles=None):
        if roles is not None and doc_ids is None:
            raise ValueError("roles (the DPO rule) needs doc_ids: a pair is one packed document")
        self.q_len, self.k_len, self.doc_ids, self.roles = q_len, k_len, doc_ids, roles
        self.has_padding = key_padding is not None
        self.plain_causal = doc_ids is None and key_padding is None and q_len == k_len
        self._bool = None if self.plain_causal else _allowed(q_len, k_len, doc_ids, key_padding, roles)
        self._bias = None

    def first_key(self, i: int, e: int) -> int:
        """The earliest key any of query rows i..e-1 may see (in any batch row): with packed documents,
        keys before the block's earliest document start are masked for every row, so kernels skip them."""
        if self.doc_ids is None or self.q_len != self.k_len:
            return 0
        if not hasattr(self, "_starts"):
            doc = self.doc_ids.numpy()
            pos = np.broadcast_to(np.arange(doc.shape[1]), doc.shape)
            new = np.concatenate([np.ones((doc.shape[0], 1), bool), doc[:, 1:] != doc[:, :-1]], axis=1)
            self._starts = np.maximum.accumulate(np.where(new, pos, 0), axis=1).min(axis=0)   # [s]
        return int(self._starts[i:e].min())

    def allowed(self) -> paddle.Tensor:
        """bool [b|1, 1, s, t], True where query i may attend to key j."""
        if self._bool is None:
            self._bool = _allowed(self.q_len, self.k_len, None, None)
        return self._bool

    def bias(self) -> paddle.Tensor:
        """float32 [b|1, 1, s, t]: 0 where allowed, -inf elsewhere (added to the scores)."""
        if self._bias is None:
            allowed = self.allowed()
            self._bias = paddle.where(allowed, paddle.zeros(allowed.shape, "float32"),
                                      paddle.full(allowed.shape, float("-inf"), "float32"))
        return self._bias


def _allowed(q_len, k_len, doc_ids, key_padding, roles=None):
    offset = k_len - q_len
    rows = paddle.arange(q_len, dtype="int64").unsqueeze(1) + offset      # [s, 1]
    cols = paddle.arange(k_len, dtype="int64").unsqueeze(0)               # [1, t]
    mask = (cols <= rows).unsqueeze(0).unsqueeze(0)                       # [1, 1, s, t]
    if doc_ids is not None:
        if q_len != k_len:
            raise ValueError("doc_ids can only be combined with a full forward, not a KV cache")
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
    """The dispatch point. ERNIE_ATTENTION=flash|blocked|sdpa|reference overrides the automatic choice."""
    forced = os.environ.get("ERNIE_ATTENTION")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"ERNIE_ATTENTION={forced!r}; choose one of {', '.join(BACKENDS)}")
        return forced
    if on_gpu(q):
        half = q.dtype in (paddle.float16, paddle.bfloat16)
        flashable = mask is None or mask.plain_causal or (mask.doc_ids is not None and mask.q_len == mask.k_len
                                                          and not mask.has_padding)
        return "flash" if half and flashable else "sdpa"
    return "blocked"


def attention(q, k, v, mask: AttentionMask | None = None, *, backend: str | None = None) -> paddle.Tensor:
    """Scaled dot-product attention, scale 1/sqrt(hd). See the module docstring for shapes."""
    mask = mask if mask is not None else AttentionMask(q.shape[1], k.shape[2])
    backend = backend or attention_backend(q, mask)
    if backend == "flash":
        return _flash(q, k, v, mask)
    if backend == "blocked":
        return attention_blocked(q, k, v, mask)
    if backend == "sdpa":
        return _sdpa(q, k, v, mask)
    return attention_reference(q, k, v, mask)


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


def attention_blocked(q, k, v, mask: AttentionMask, block: int = BLOCK):
    """CPU kernel: query blocks of `block` rows. Each block scores only the keys it can reach under
    the causal mask (halving the work), and its [.., block, t] scores stay in cache for the softmax.
    Paddle's CPU elementwise ops on a full [b, nh, s, t] score tensor cost more than the matmuls."""
    b, s, nh, hd = q.shape
    nkv, t = k.shape[1], k.shape[2]
    g = nh // nkv
    offset = t - s
    # Paddle's CPU matmul on a strided view is up to 40x slower than on a dense tensor: make q dense once.
    q5 = (q * (hd ** -0.5)).reshape([b, s, nkv, g, hd]).transpose([0, 2, 3, 1, 4]).contiguous()  # [b, nkv, g, s, hd]
    kt, vt = k.contiguous(), v.contiguous()                               # [b, nkv, t, hd] (no-op when dense)
    bias = None if mask.plain_causal else mask.bias().unsqueeze(2)        # [b|1, 1, 1, s, t]
    outs = []
    for i in range(0, s, block):
        e = min(s, i + block)
        n_keys = offset + e                                               # keys these rows may reach
        k0 = mask.first_key(i, e)                                         # keys before k0 are masked for all
        c = e - i
        qb = q5[:, :, :, i:e].reshape([b, nkv, g * c, hd])                # [b, nkv, g*c, hd]
        kb, vb = _keys(kt, k0, n_keys), _keys(vt, k0, n_keys)              # [b, nkv, keys, hd]
        sc = paddle.matmul(qb, kb, transpose_y=True).astype("float32")
        sc = sc.reshape([b, nkv, g, c, n_keys - k0])                      # [b, nkv, g, c, keys]
        if bias is not None:
            sc = sc + bias[:, :, :, i:e, k0:n_keys]
        elif c > 1:                                                       # plain causal: only the last c keys
            sc = sc + _causal_tail(c, n_keys)
        p = F.softmax(sc, axis=-1).astype(q.dtype).reshape([b, nkv, g * c, n_keys - k0])
        outs.append(paddle.matmul(p, vb).reshape([b, nkv, g, c, hd]))
    out = paddle.concat(outs, axis=3) if len(outs) > 1 else outs[0]       # [b, nkv, g, s, hd]
    return out.transpose([0, 3, 1, 2, 4]).reshape([b, s, nh, hd])


def _keys(x, k0: int, k1: int):
    """Keys k0..k1 of [b, nkv, t, hd] as a contiguous tensor (a slice is a strided view; see above)."""
    return x if (k0 == 0 and k1 == x.shape[2]) else x[:, :, k0:k1].contiguous()


_TAILS: dict = {}


def _causal_tail(c: int, n_keys: int) -> paddle.Tensor:
    """[c, n_keys] bias: -inf above the diagonal that ends at the last key, 0 elsewhere (cached)."""
    key = (c, n_keys)
    if key not in _TAILS:
        rows = paddle.arange(c, dtype="int64").unsqueeze(1) + (n_keys - c)
        cols = paddle.arange(n_keys, dtype="int64").unsqueeze(0)
        _TAILS[key] = paddle.where(cols <= rows, paddle.zeros([c, n_keys], "float32"),
                                   paddle.full([c, n_keys], float("-inf"), "float32"))
        if len(_TAILS) > 256:
            _TAILS.pop(next(iter(_TAILS)))
    return _TAILS[key]


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
    # FlashMask: for key column j, rows at or past the end of j's document may not see it.
    doc = mask.doc_ids
    b, s = doc.shape
    pos = paddle.arange(s, dtype="int32").unsqueeze(0).expand([b, s])
    last = paddle.concat([doc[:, 1:] != doc[:, :-1], paddle.ones([b, 1], dtype="bool")], axis=1)
    ends = paddle.where(last, pos + 1, paddle.full_like(pos, s))
    ends = paddle.flip(paddle.cummin(paddle.flip(ends, [1]), axis=1)[0], [1])   # end of each token's doc
    if mask.roles is not None:  # a chosen key is hidden from the first rejected row on (rejected follows chosen)
        rej = paddle.where(mask.roles == ROLE_REJECTED, pos, paddle.full_like(pos, s))
        first_rej = paddle.flip(paddle.cummin(paddle.flip(rej, [1]), axis=1)[0], [1])  # next rejected row
        ends = paddle.where(mask.roles == ROLE_CHOSEN, paddle.minimum(ends, first_rej), ends)
    return flashmask_attention(q, k, v, startend_row_indices=ends.unsqueeze(1).unsqueeze(-1), causal=True)

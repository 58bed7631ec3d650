"""Attention: one dispatch point over flash attention (GPU), Paddle's SDPA, and a plain reference.

Shapes: q [b, s, nh, hd]; k, v [b, t, nkv, hd] with nh a multiple of nkv (GQA); out [b, s, nh, hd].
A mask is either None (plain causal, s == t) or a bool [b, 1, s, t] where True means "may attend".
Masks are built once per forward by `build_attention_mask`, never per layer.
"""
import os

import paddle
import paddle.nn.functional as F

from libernie.kernels.dispatch import on_gpu

BACKENDS = ("flash", "sdpa", "reference")


def build_attention_mask(q_len: int, k_len: int, *, doc_ids: paddle.Tensor | None = None,
                         key_padding: paddle.Tensor | None = None) -> paddle.Tensor | None:
    """Causal mask, restricted to each document and to non-padding keys. None means plain causal.

    q_len: new tokens; k_len: cached + new tokens (queries are the last q_len positions).
    doc_ids: [b, s] int, the document each token belongs to (s == q_len == k_len; no cache).
    key_padding: [b, t] with 1/True on real tokens, 0/False on padding (left-padded batches).
    """
    if doc_ids is None and key_padding is None and q_len == k_len:
        return None
    offset = k_len - q_len
    rows = paddle.arange(q_len, dtype="int64").unsqueeze(1) + offset      # [s, 1]
    cols = paddle.arange(k_len, dtype="int64").unsqueeze(0)               # [1, t]
    mask = (cols <= rows).unsqueeze(0).unsqueeze(0)                       # [1, 1, s, t]
    if doc_ids is not None:
        if q_len != k_len:
            raise ValueError("doc_ids can only be combined with a full forward, not a KV cache")
        same_doc = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)           # [b, s, t]
        mask = mask & same_doc.unsqueeze(1)                               # [b, 1, s, t]
    if key_padding is not None:
        mask = mask & key_padding.astype("bool").unsqueeze(1).unsqueeze(1)  # [b, 1, 1, t]
        # A padding query would attend to nothing and softmax would give NaN, which then leaks
        # through 0 * NaN into real rows in the next layer. Let every query see itself.
        mask = mask | (cols == rows).unsqueeze(0).unsqueeze(0)
    return mask


def attention_backend(q: paddle.Tensor, mask: paddle.Tensor | None, doc_ids=None) -> str:
    """The dispatch point. ERNIE_ATTENTION=flash|sdpa|reference overrides the automatic choice."""
    forced = os.environ.get("ERNIE_ATTENTION")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"ERNIE_ATTENTION={forced!r}; choose one of {', '.join(BACKENDS)}")
        return forced
    if on_gpu(q) and q.dtype in (paddle.float16, paddle.bfloat16) and (mask is None or doc_ids is not None):
        return "flash"
    return "sdpa"


def attention(q, k, v, mask=None, *, doc_ids=None, backend: str | None = None) -> paddle.Tensor:
    """Scaled dot-product attention with scale 1/sqrt(hd). See the module docstring for shapes."""
    backend = backend or attention_backend(q, mask, doc_ids)
    if backend == "flash":
        return _flash(q, k, v, mask, doc_ids)
    if backend == "sdpa":
        return _sdpa(q, k, v, mask)
    return attention_reference(q, k, v, mask)


def attention_reference(q, k, v, mask=None):
    """Plain matmul-softmax-matmul with fp32 softmax. GQA without copying k/v per query head."""
    b, s, nh, hd = q.shape
    t, nkv = k.shape[1], k.shape[2]
    g = nh // nkv
    qg = q.reshape([b, s, nkv, g, hd]).transpose([0, 2, 3, 1, 4])         # [b, nkv, g, s, hd]
    kg = k.transpose([0, 2, 1, 3]).unsqueeze(2)                           # [b, nkv, 1, t, hd]
    vg = v.transpose([0, 2, 1, 3]).unsqueeze(2)                           # [b, nkv, 1, t, hd]
    scores = paddle.matmul(qg, kg, transpose_y=True).astype("float32") * (hd ** -0.5)  # [b, nkv, g, s, t]
    if mask is None:
        mask = build_attention_mask(s, t, key_padding=paddle.ones([b, t], dtype="bool"))
    neg = paddle.full([], float("-inf"), dtype="float32")
    scores = paddle.where(mask.unsqueeze(2), scores, neg)                  # mask [b, 1, 1, s, t]
    # A query row that may attend nowhere (left padding) would give NaN; give it zeros instead.
    probs = F.softmax(scores, axis=-1)
    probs = paddle.where(paddle.isnan(probs), paddle.zeros_like(probs), probs).astype(q.dtype)
    out = paddle.matmul(probs, vg)                                         # [b, nkv, g, s, hd]
    return out.transpose([0, 3, 1, 2, 4]).reshape([b, s, nh, hd])


def _repeat_kv(x, g):  # [b, t, nkv, hd] -> [b, t, nkv*g, hd]
    if g == 1:
        return x
    b, t, nkv, hd = x.shape
    return x.unsqueeze(3).expand([b, t, nkv, g, hd]).reshape([b, t, nkv * g, hd])


def _sdpa(q, k, v, mask):
    g = q.shape[2] // k.shape[2]
    k, v = _repeat_kv(k, g), _repeat_kv(v, g)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, training=False)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, training=False)
    return out


def _flash(q, k, v, mask, doc_ids):  # GPU only; not run in CI (no GPU on these machines)
    from paddle.nn.functional.flash_attention import flash_attention, flashmask_attention
    if doc_ids is None:
        out, _ = flash_attention(q, k, v, causal=True)
        return out
    # FlashMask: for key column j, rows at or past the end of j's document may not see it.
    s = doc_ids.shape[1]
    pos = paddle.arange(s, dtype="int32").unsqueeze(0).expand_as(doc_ids.astype("int32"))
    new_doc = paddle.concat([doc_ids[:, 1:] != doc_ids[:, :-1],
                             paddle.ones([doc_ids.shape[0], 1], dtype="bool")], axis=1)
    ends = paddle.where(new_doc, pos + 1, paddle.full_like(pos, s))
    ends = paddle.flip(paddle.cummin(paddle.flip(ends, [1]), axis=1)[0], [1])  # end of each token's doc
    return flashmask_attention(q, k, v, startend_row_indices=ends.unsqueeze(1).unsqueeze(-1), causal=True)

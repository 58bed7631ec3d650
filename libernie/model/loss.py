"""Causal-LM loss: next-token cross entropy with an ignore index, a loss mask, and document boundaries."""
import paddle
import paddle.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: paddle.Tensor, labels: paddle.Tensor, loss_mask: paddle.Tensor | None = None,
                   doc_ids: paddle.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                   reduction: str = "mean"):
    """Cross entropy of logits[:, t] against labels[:, t+1].

    logits [b, s, V]; labels [b, s], aligned with input_ids (we shift here, as transformers does).
    loss_mask [b, s]: 1 where labels[:, t] is a target to learn (0 on prompts, padding).
    doc_ids [b, s]: no target across a document boundary (the next document's first token
    cannot be predicted from the previous document).
    reduction: "mean" over counted targets, "sum", or "none" -> (sum, count).
    """
    b, s, v = logits.shape
    # Shift the targets left instead of slicing logits[:, :-1]: that slice would copy [b, s, V].
    pad = paddle.full([b, 1], ignore_index, dtype=labels.dtype)
    target = paddle.concat([labels[:, 1:], pad], axis=1)                 # [b, s]: target of position t
    valid = target != ignore_index
    if loss_mask is not None:
        valid = valid & paddle.concat([loss_mask[:, 1:], paddle.zeros([b, 1], loss_mask.dtype)], 1).astype("bool")
    if doc_ids is not None:
        same = doc_ids[:, 1:] == doc_ids[:, :-1]
        valid = valid & paddle.concat([same, paddle.zeros([b, 1], dtype="bool")], axis=1)
    safe_target = paddle.where(valid, target, paddle.zeros_like(target)).astype("int64")
    flat = logits.reshape([-1, v]).astype("float32")                      # [b*s, V]
    ce = F.cross_entropy(flat, safe_target.reshape([-1, 1]), reduction="none").reshape([b, s])  # [b, s]
    # Paddle's CPU softmax (3.3, the vectorised path taken when V is a multiple of 8) drops NaN: a row of
    # NaN logits comes out as the uniform distribution (loss ln V), and a NaN or inf logit gets weight 0 or
    # 1/V. A diverged model would then log a plausible loss. 0 * sum(row) is 0 for a finite row and NaN
    # for a row holding NaN or +-inf, so the loss is non-finite exactly when some logit is. No gradient.
    ce = ce + (flat.sum(axis=-1) * 0.0).detach().reshape([b, s])
    validf = valid.astype("float32")
    total = (ce * validf).sum()
    count = validf.sum()
    if reduction == "sum":
        return total
    if reduction == "none":
        return total, count
    return total / paddle.clip(count, min=1.0)

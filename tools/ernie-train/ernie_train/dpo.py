"""DPO: the pure preference losses and the per-pair log-prob gather of packed prompt|chosen|rejected
sequences (the trainer's head is in dpo_head.py, the references in dpo_ref.py). Formulas and papers:
tools/ernie-train/README.md ("DPO"); option names and defaults are ERNIEKit's (erniekit DPOConfig).

Who predicts what in a packed pair. Tokens are `prompt p0..pP-1 | chosen c0..cC-1 | rejected r0..`;
chosen sees the prompt, rejected sees the prompt and never chosen, and both count positions from P.
So c0 is predicted from the hidden state at pP-1 (the token before it), c_k from c_k-1, r_k from
r_k-1 for k >= 1, and r0 from pP-1 too: NOT from the last chosen token, which sits right before r0
in the packed row but is invisible to it. `pair_index` builds these source positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from libernie.data import ROLE_CHOSEN, ROLE_PROMPT, ROLE_REJECTED
from libernie.errors import ErnieError

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo", "orpo", "dpop")
REFERENCE_FREE = ("simpo", "orpo")          # defined without a reference model
AVERAGED = ("ipo", "simpo", "orpo")         # use the per-token average log-prob (as ERNIEKit and the papers)
# Per-pair statistics the head returns (summed over pairs), in this order; metrics.jsonl gets their means.
STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
         "logps/rejected")


class DPOError(ErnieError):
    """Shards, reference log-probs or options that do not describe a valid DPO batch."""


# ---- the pure loss ----------------------------------------------------------------------------
def _backend(x):
    """(log_sigmoid, relu, log1mexp, sigmoid) for numpy arrays or paddle tensors."""
    if type(x).__module__.startswith("paddle"):
        import paddle
        import paddle.nn.functional as F
        return (F.log_sigmoid, F.relu, lambda v: paddle.log(-paddle.expm1(paddle.clip(v, max=-1e-7))),
                paddle.zeros_like)
    return (lambda v: -np.logaddexp(0.0, -v), lambda v: np.maximum(v, 0.0),
            lambda v: np.log(-np.expm1(np.minimum(v, -1e-7))), np.zeros_like)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen=None, ref_rejected=None, *, loss_type: str = "sigmoid",
             beta: float = 0.1, label_smoothing: float = 0.0, simpo_gamma: float = 0.5, dpop_lambda: float = 50.0,
             offset_alpha: float = 0.0, score_deltas=None):
    """Per-pair preference losses and implicit rewards.

    Args:
        policy_chosen, policy_rejected: per-pair log-probs of the policy, [P] numpy arrays or paddle tensors,
            already normalised as the loss wants (see `normalize`).
        ref_chosen, ref_rejected: the reference's, same shape; None for the reference-free losses (simpo,
            orpo), which ignore them.
        loss_type: sigmoid (DPO, cDPO with label_smoothing, ODPO offset with offset_alpha), ipo, hinge,
            simpo, orpo, dpop.
        beta: the inverse temperature (orpo: the weight lambda of the odds-ratio term).
        label_smoothing: probability that a label is flipped (sigmoid, simpo), in [0, 0.5).
        simpo_gamma: SimPO's target reward margin.
        dpop_lambda: DPO-Positive's weight of max(0, ref_chosen - policy_chosen).
        offset_alpha, score_deltas: ERNIEKit's score offset (sigmoid only): the margin is lowered by
            offset_alpha / beta * log(score_delta + 1e-6), score_deltas [P] > 0.
    Returns:
        (losses [P], chosen_rewards [P], rejected_rewards [P]); rewards are beta * (policy - reference)
        (beta * policy for the reference-free losses), detached by the caller if it logs them.
    """
    if loss_type not in LOSS_TYPES:
        raise DPOError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    log_sigmoid, relu, log1mexp, zeros = _backend(policy_chosen)
    free = loss_type in REFERENCE_FREE
    if not free and (ref_chosen is None or ref_rejected is None):
        raise DPOError(f"loss_type {loss_type} needs reference log-probs; only {' and '.join(REFERENCE_FREE)} "
                       "are reference-free")
    rc = zeros(policy_chosen) if free else ref_chosen
    rr = zeros(policy_rejected) if free else ref_rejected
    chosen_rewards = beta * (policy_chosen - rc)
    rejected_rewards = beta * (policy_rejected - rr)
    logits = (policy_chosen - policy_rejected) - (rc - rr)        # the margin of log-ratios
    if loss_type == "sigmoid":                                     # Rafailov et al. 2023; cDPO smoothing
        if offset_alpha > 0:                                       # ERNIEKit's score offset (ODPO-like)
            if score_deltas is None:
                raise DPOError("offset_alpha > 0 needs per-pair score_deltas")
            logits = logits - offset_alpha / beta * _log(score_deltas + 1e-6)
        losses = -log_sigmoid(beta * logits) * (1 - label_smoothing) - log_sigmoid(-beta * logits) * label_smoothing
    elif loss_type == "ipo":                                       # Azar et al. 2023, eq. 17
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":                                     # SLiC, Zhao et al. 2023
        losses = relu(1.0 - beta * logits)
    elif loss_type == "simpo":                                     # Meng et al. 2024
        z = beta * logits - simpo_gamma
        losses = -log_sigmoid(z) * (1 - label_smoothing) - log_sigmoid(-z) * label_smoothing
    elif loss_type == "orpo":                                      # Hong et al. 2024: NLL + lambda * L_OR
        log_odds = logits - (log1mexp(policy_chosen) - log1mexp(policy_rejected))
        losses = -policy_chosen - beta * log_sigmoid(log_odds)
    else:                                                          # dpop: Pal et al. 2024, as ERNIEKit adds it
        losses = -log_sigmoid(beta * logits) + dpop_lambda * relu(rc - policy_chosen)
    return losses, chosen_rewards, rejected_rewards


def _log(x):
    if type(x).__module__.startswith("paddle"):
        import paddle
        return paddle.log(x)
    return np.log(x)


def normalize(chosen, rejected, chosen_tokens, rejected_tokens, *, loss_type: str, normalize_logps: bool):
    """Raw per-pair sums -> what the loss uses (same for policy and reference).

    ipo, simpo, orpo: the per-token average. Otherwise with normalize_logps (ERNIEKit's default) each
    sum is rescaled to the pair's mean response length, sum / n * (n_chosen + n_rejected) / 2, so a
    longer response is not penalised for its length and beta keeps the scale of a sum; without it,
    the plain sums of the DPO paper.
    """
    if loss_type in AVERAGED:
        return chosen / chosen_tokens, rejected / rejected_tokens
    if normalize_logps:
        mean_len = (chosen_tokens + rejected_tokens) / 2.0
        return chosen * (mean_len / chosen_tokens), rejected * (mean_len / rejected_tokens)
    return chosen, rejected


# ---- which hidden state predicts which response token -----------------------------------------
@dataclass
class PairIndex:
    """The response targets of a [b, s] batch and the pairs they belong to.

    src [N] int64: flat index (row * s + position) of the hidden state that predicts target n.
    tgt [N] int64: the target token. pair [N]: its pair; chosen [N] bool: in the chosen response.
    rows, docs [P]: where pair j sits (batch row, doc id); chosen_tokens, rejected_tokens [P] int32.
    """
    src: np.ndarray
    tgt: np.ndarray
    pair: np.ndarray
    chosen: np.ndarray
    rows: np.ndarray
    docs: np.ndarray
    chosen_tokens: np.ndarray
    rejected_tokens: np.ndarray

    @property
    def n_pairs(self) -> int:
        return len(self.rows)

    def selectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Dense [P, N] float32 matrices summing target log-probs into chosen and rejected sums."""
        sel_c = np.zeros((self.n_pairs, len(self.src)), np.float32)
        sel_r = np.zeros_like(sel_c)
        cols = np.arange(len(self.src))
        sel_c[self.pair[self.chosen], cols[self.chosen]] = 1.0
        sel_r[self.pair[~self.chosen], cols[~self.chosen]] = 1.0
        return sel_c, sel_r


def pair_index(input_ids: np.ndarray, doc_ids: np.ndarray, roles: np.ndarray, loss_mask: np.ndarray,
               where: str = "batch") -> PairIndex:
    """Find the pairs of packed DPO rows [b, s] and the source position of every response target.

    Raises DPOError naming `where` if a row holds a response without its prompt or a pair that
    lacks a chosen or a rejected target (ernie-pack dpo never writes either)."""
    b, s = roles.shape
    pos = np.broadcast_to(np.arange(s), (b, s))
    prompt_pos = np.where(roles == ROLE_PROMPT, pos, -1)
    last_prompt = np.maximum.accumulate(prompt_pos, axis=1)               # [b, s] latest prompt token so far
    is_resp = ((roles == ROLE_CHOSEN) | (roles == ROLE_REJECTED)) & (loss_mask > 0) & (doc_ids >= 0)
    prev_role = np.concatenate([np.zeros((b, 1), roles.dtype), roles[:, :-1]], axis=1)
    rej_start = (roles == ROLE_REJECTED) & (prev_role != ROLE_REJECTED)
    src_pos = np.where(rej_start, last_prompt, pos - 1)                   # r0 <- last prompt token
    r, t = np.nonzero(is_resp)
    sp = src_pos[r, t]
    if len(t) and ((sp < 0).any() or (doc_ids[r, np.maximum(sp, 0)] != doc_ids[r, t]).any()
                   or (roles[r, np.maximum(sp, 0)] == ROLE_CHOSEN)[roles[r, t] == ROLE_REJECTED].any()):
        raise DPOError(f"{where}: a response token without its prompt before it in the same pair; "
                       "are these ernie-pack dpo shards?")
    keys = r.astype(np.int64) * (int(doc_ids.max()) + 2) + doc_ids[r, t]
    uniq, pair = np.unique(keys, return_inverse=True)
    chosen = roles[r, t] == ROLE_CHOSEN
    n_c = np.bincount(pair[chosen], minlength=len(uniq)).astype(np.int32)
    n_r = np.bincount(pair[~chosen], minlength=len(uniq)).astype(np.int32)
    rows, docs = uniq // (int(doc_ids.max()) + 2), uniq % (int(doc_ids.max()) + 2)
    # every prompt must own one pair with both halves
    n_prompts = sum(len(np.unique(doc_ids[i][roles[i] == ROLE_PROMPT])) for i in range(b))
    if n_prompts != len(uniq) or (n_c == 0).any() or (n_r == 0).any():
        raise DPOError(f"{where}: a pair without a chosen or a rejected response target; "
                       "are these ernie-pack dpo shards?")
    return PairIndex(src=(r.astype(np.int64) * s + sp), tgt=input_ids[r, t].astype(np.int64), pair=pair,
                     chosen=chosen, rows=rows, docs=docs, chosen_tokens=n_c, rejected_tokens=n_r)


HEAD_CHUNK = 64  # response tokens per LM-head chunk: bounds the [n, V] fp32 logits (V = 103424 for ERNIE 4.5)


def pair_logps(model, input_ids, position_ids, doc_ids, roles, src, tgt, sel_c, sel_r):
    """Raw per-pair log-prob sums (chosen [P], rejected [P]) of a packed batch, differentiable.

    Only the N target positions go through the LM head (the prompt's logits are never built), in chunks
    of HEAD_CHUNK rows; when gradients flow, each chunk's logits are recomputed in backward instead of
    kept (ernie_train.logp_head), so the head costs [HEAD_CHUNK, V] of memory whatever N is (as ERNIEKit's
    chunked fused head).
    input_ids, position_ids, doc_ids, roles [b, s]; src, tgt [N]; sel_c, sel_r [P, N] (PairIndex)."""
    import paddle

    from ernie_train.logp_head import target_logps
    h = model.ernie(input_ids, position_ids=position_ids, doc_ids=doc_ids, roles=roles)   # [b, s, h]
    hs = paddle.gather(h.reshape([-1, h.shape[-1]]), src)                               # [N, h]
    parts = [target_logps(model, hs[i:i + HEAD_CHUNK], tgt[i:i + HEAD_CHUNK])
             for i in range(0, hs.shape[0], HEAD_CHUNK)]
    logp = (paddle.concat(parts) if len(parts) > 1 else parts[0]).reshape([-1, 1])      # [N, 1]
    return paddle.matmul(sel_c, logp).squeeze(1), paddle.matmul(sel_r, logp).squeeze(1)  # [P], [P]

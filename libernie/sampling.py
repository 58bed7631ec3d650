"""Choosing the next token from one row of logits: greedy, temperature, top-k, top-p, penalties.

Runs in numpy on a single [V] row with a per-sequence numpy Generator, so a sequence's draws
depend only on its own seed and history, never on what else shares the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from libernie.errors import NonFiniteLogitsError


@dataclass
class SamplingParams:
    temperature: float = 1.0          # 0 means greedy (argmax)
    top_k: int = 0                    # 0 = no top-k cut
    top_p: float = 1.0                # nucleus mass kept; 1.0 = no cut
    repetition_penalty: float = 1.0   # HF/CTRL style: divide positive logits of seen tokens, multiply negative
    presence_penalty: float = 0.0     # OpenAI style: subtract once for every token already generated
    frequency_penalty: float = 0.0    # OpenAI style: subtract per occurrence

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_penalties(logits: np.ndarray, params: SamplingParams, seen: np.ndarray | None,
                    generated: np.ndarray | None) -> np.ndarray:
    """seen: token ids of prompt + output (repetition penalty); generated: output ids (presence/frequency)."""
    if params.repetition_penalty != 1.0 and seen is not None and len(seen):
        idx = np.unique(seen)
        vals = logits[idx]
        logits[idx] = np.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and generated is not None and len(generated):
        idx, counts = np.unique(generated, return_counts=True)
        logits[idx] -= params.presence_penalty + params.frequency_penalty * counts
    return logits


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None = None,
           seen: np.ndarray | None = None, generated: np.ndarray | None = None) -> int:
    """Pick one token id from `logits` [V]. Raises NonFiniteLogitsError if any logit is NaN or inf: argmax
    would silently pick the first NaN (token 0) and the sampler would draw from NaN probabilities."""
    if not np.isfinite(logits).all():
        raise NonFiniteLogitsError(f"the model's logits hold {'NaN' if np.isnan(logits).any() else 'inf'}; its "
                                   "weights are broken (saved from a diverged run?); use an earlier checkpoint")
    logits = apply_penalties(np.array(logits, dtype=np.float64), params, seen, generated)
    if params.temperature == 0:
        return int(np.argmax(logits))
    logits = logits / params.temperature
    if params.top_k and params.top_k < len(logits):          # partition first: no full sort of a 100k vocab
        cand = np.argpartition(-logits, params.top_k - 1)[: params.top_k]
        order = cand[np.lexsort((cand, -logits[cand]))]       # best first; ties broken by id
    else:
        order = np.argsort(-logits, kind="stable")           # best first; ties broken by id
    probs = np.exp(logits[order] - logits[order[0]])
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)  # smallest prefix with mass >= top_p
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    rng = rng if rng is not None else np.random.default_rng()
    i = int(np.searchsorted(np.cumsum(probs), rng.random() * 1.0, side="right"))
    return int(order[min(i, len(order) - 1)])

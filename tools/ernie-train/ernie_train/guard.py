"""The divergence guard: a non-finite loss or gradient norm stops the run before it is applied or saved.

Each optimizer step, every rank contributes its local loss sum and a 0/1 flag "my gradient norm is not
finite" to one all-reduce (the one that already sums the loss). The sum is NaN or inf on every rank as
soon as it is on one, and the flag count is the same number everywhere, so all ranks reach the same
verdict from the same inputs without a second collective:

- "ok":   apply the step.
- "skip": drop this step's gradients (no optimizer update); counted in metrics.jsonl as skipped_steps.
          Allowed --skip-nan-inf-steps times over the whole run (0, the default: never).
- "stop": raise DivergenceError, naming the step and the last good checkpoint; nothing is saved from
          the bad state.

Megatron's switch for the same check is `--check-for-nan-in-loss-and-grad` (on by default; it stops at
the first non-finite value). Neither Megatron nor ERNIEKit has an option to skip N such steps; the name
follows the `skip_nan_inf` flag of torchtitan-based trainers, with a count instead of a bool.
"""
from __future__ import annotations

import math

from libernie.errors import ErnieError


class DivergenceError(ErnieError):
    """Training produced a non-finite loss or gradient norm beyond what --skip-nan-inf-steps allows."""


class NonFiniteGuard:
    """Args:
        skip_budget: how many non-finite steps may be skipped over the whole run (>= 0).
        skipped: steps already skipped (restored from trainer_state.json on --resume).
    """

    def __init__(self, skip_budget: int = 0, skipped: int = 0):
        self.skip_budget, self.skipped = skip_budget, skipped

    @staticmethod
    def local_flag(grad_norm: float) -> float:
        """This rank's contribution to the all-reduce: 1.0 if its gradient norm is not finite."""
        return 0.0 if math.isfinite(grad_norm) else 1.0

    def verdict(self, loss: float, bad_grad_ranks: float) -> str:
        """"ok", "skip" or "stop" from globally reduced values (identical on every rank)."""
        if math.isfinite(loss) and bad_grad_ranks == 0:
            return "ok"
        if self.skipped < self.skip_budget:
            self.skipped += 1
            return "skip"
        return "stop"

    def error(self, step: int, loss: float, grad_norm: float, last_good: str | None) -> DivergenceError:
        where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written before it"
        skipped = f" after skipping {self.skipped}" if self.skipped else ""
        return DivergenceError(
            f"step {step}: non-finite loss {loss} / grad_norm {grad_norm}{skipped}; training stopped and nothing "
            f"was saved from this step ({where}); lower --learning-rate or set --max-grad-norm, resume with "
            "--resume, or pass --skip-nan-inf-steps N to skip up to N such steps")

"""A run's length (Plan) and the learning-rate schedule both frameworks follow over it (the
official VICReg warmup-cosine)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from shared.config import Config


@dataclass(frozen=True)
class Plan:
    """How long a run trains: `epochs` (a fraction ends the last epoch early) of
    `steps_per_epoch` steps. Without a time budget it is --epochs; with one, what fits the budget
    (shared.budget), planned again as the rate moves. Config keeps the flags as given."""

    epochs: float
    steps_per_epoch: int

    @classmethod
    def of_steps(cls, steps: int, steps_per_epoch: int) -> Plan:
        """The plan that ends after `steps` steps."""
        return cls(steps / steps_per_epoch, steps_per_epoch)

    @property
    def total_steps(self) -> int:
        """Steps of the whole run: epochs x steps_per_epoch, rounded (at least 1)."""
        return max(1, round(self.epochs * self.steps_per_epoch))

    def steps_in_epoch(self, epoch: int) -> int:
        """Steps of epoch `epoch` (0-based): all of them but in a fractional run's last epoch."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)


def lr_at(step: int, plan: Plan, cfg: Config) -> float:
    """Learning rate at global step `step` (0-based) of a run of length `plan` with cfg's schedule.

    Warmup: lr = peak * t / T_w; then cosine: q = (1 + cos(pi * (t - T_w) / (T - T_w))) / 2,
    lr = peak * q + peak * final_lr_ratio * (1 - q). t counts steps, or whole epochs when
    schedule_unit is "epoch".
    """
    peak = cfg.peak_lr()
    if cfg.schedule_unit == "epoch":
        t, total, warmup = step // plan.steps_per_epoch, plan.epochs, cfg.warmup_epochs
    else:
        t, total = step, plan.total_steps
        warmup = cfg.warmup_epochs * plan.steps_per_epoch
    if t < warmup:
        return peak * t / warmup
    q = 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / max(total - warmup, 1)))
    return peak * q + peak * cfg.final_lr_ratio * (1.0 - q)

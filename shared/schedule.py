"""The learning-rate schedule both frameworks follow (the official VICReg warmup-cosine)."""
from __future__ import annotations

import math

from shared.config import Config


def lr_at(step: int, steps_per_epoch: int, cfg: Config) -> float:
    """Learning rate at global step `step` (0-based).

    Warmup: lr = peak * t / T_w; then cosine: q = (1 + cos(pi * (t - T_w) / (T - T_w))) / 2,
    lr = peak * q + peak * final_lr_ratio * (1 - q). t counts steps, or whole epochs when
    schedule_unit is "epoch".
    """
    peak = cfg.peak_lr()
    if cfg.schedule_unit == "epoch":
        t, total, warmup = step // steps_per_epoch, cfg.epochs, cfg.warmup_epochs
    else:
        t, total = step, cfg.total_steps(steps_per_epoch)
        warmup = cfg.warmup_epochs * steps_per_epoch
    if t < warmup:
        return peak * t / warmup
    q = 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / max(total - warmup, 1)))
    return peak * q + peak * cfg.final_lr_ratio * (1.0 - q)

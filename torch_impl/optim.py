"""LARS with the official VICReg semantics and Adam for the homework preset (the learning rate
follows shared.schedule.lr_at, set before every step)."""
from __future__ import annotations

import torch
from torch import nn

from shared.config import Config


def exclude_bias_and_norm(p: torch.Tensor) -> bool:
    """Biases and norm weights (the 1-D parameters) get neither weight decay nor LARS adaptation."""
    return p.ndim == 1


class LARS(torch.optim.Optimizer):
    """LARS as in facebookresearch/vicreg, per parameter p with gradient g:

        g' = g + wd * p                                   (unless excluded)
        q  = eta * ||p|| / ||g'|| if ||p|| > 0 and ||g'|| > 0 else 1   (unless excluded)
        mu = momentum * mu + q * g'
        p  = p - lr * mu
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not exclude_bias_and_norm(p):
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm = torch.linalg.vector_norm(p)
                    update_norm = torch.linalg.vector_norm(update)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(param_norm > 0.0, torch.where(
                        update_norm > 0.0, group["eta"] * param_norm / update_norm, one), one)
                    update = update.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])


def build_optimizer(cfg: Config, *, model: nn.Module) -> torch.optim.Optimizer:
    """LARS (official semantics) or Adam (L2 weight decay, as the seed course), lr set per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "lars":
        return LARS(params, lr=0.0, weight_decay=cfg.wd, momentum=cfg.momentum, eta=cfg.lars_eta)
    return torch.optim.Adam(params, lr=cfg.peak_lr(), weight_decay=cfg.wd)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

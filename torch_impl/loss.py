"""The VICReg loss (Bardes, Ponce, LeCun 2022): a pure function of two embedding batches.

    loss = lambda * s(Z, Z') + mu * [v(Z) + v(Z')] + nu * [c(Z) + c(Z')]

with s the mean squared difference, v(Z) = mean_j relu(1 - sqrt(Var(z_j) + eps)) and c(Z) the
squared off-diagonal covariances / D: the `solo-learn` variant, the default. `official` halves the
variance term (mu * [v(Z) + v(Z')] / 2, facebookresearch/vicreg's code), `homework` drops eps.

"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.loss_inputs import check_loss_inputs


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """[D, D] -> the D*(D-1) off-diagonal entries, flattened."""
    d = m.shape[0]
    return m.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


def variance_term(z: torch.Tensor, eps: float) -> torch.Tensor:
    """v(Z) = mean_j relu(1 - sqrt(Var(z_j) + eps)), unbiased variance over the batch; z [N, D]."""
    std = torch.sqrt(z.var(dim=0, unbiased=True) + eps)
    return F.relu(1.0 - std).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """c(Z) = sum_{i!=j} C(Z)_ij^2 / D with C(Z) = (Z - mean)^T (Z - mean) / (N - 1); z [N, D]."""
    n, d = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)
    return off_diagonal(cov).pow(2).sum() / d


def vicreg_loss(z_a: torch.Tensor, z_b: torch.Tensor, *, sim_coeff: float = 25.0,
                std_coeff: float = 25.0, cov_coeff: float = 1.0, eps: float = 1e-4,
                variant: str = "solo-learn") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VICReg on embeddings z_a, z_b [N, D] (float32 or float64) -> (scalar loss, unweighted terms).

    terms: `invariance` = s(Z, Z'); `variance` = v(Z) + v(Z') (`solo-learn`), halved
    (`official`), or with eps = 0 (`no-eps`, formerly `homework`); `covariance` = c(Z) + c(Z').
    """
    weight, with_eps = check_loss_inputs(variant, tuple(z_a.shape), tuple(z_b.shape))
    invariance = F.mse_loss(z_a, z_b)
    e = eps if with_eps else 0.0
    variance = weight * (variance_term(z_a, e) + variance_term(z_b, e))
    covariance = covariance_term(z_a) + covariance_term(z_b)
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return loss, {"invariance": invariance, "variance": variance, "covariance": covariance}

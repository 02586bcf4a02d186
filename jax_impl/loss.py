"""The VICReg loss (Bardes, Ponce, LeCun 2022) as a pure, jit-able jnp function.

    loss = lambda * s(Z, Z') + mu * [v(Z) + v(Z')] + nu * [c(Z) + c(Z')]

with s the mean squared difference, v(Z) = mean_j relu(1 - sqrt(Var(z_j) + eps)) and c(Z) the
squared off-diagonal covariances / D: the `solo-learn` variant, the default. `official` halves the
variance term (mu * [v(Z) + v(Z')] / 2, facebookresearch/vicreg's code), `homework` drops eps.

The twin of torch_impl.loss: same terms, same variants, same errors (raised while tracing, since
they depend on shapes and settings only).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from shared.loss_inputs import check_loss_inputs


def off_diagonal(m: jax.Array) -> jax.Array:
    """[D, D] -> the D*(D-1) off-diagonal entries, flattened (torch_impl's order)."""
    d = m.shape[0]
    return m.flatten()[:-1].reshape(d - 1, d + 1)[:, 1:].flatten()


def variance_term(z: jax.Array, eps: float) -> jax.Array:
    """v(Z) = mean_j relu(1 - sqrt(Var(z_j) + eps)), unbiased variance over the batch; z [N, D]."""
    std = jnp.sqrt(jnp.var(z, axis=0, ddof=1) + eps)
    return jax.nn.relu(1.0 - std).mean()


def covariance_term(z: jax.Array) -> jax.Array:
    """c(Z) = sum_{i!=j} C(Z)_ij^2 / D with C(Z) = (Z - mean)^T (Z - mean) / (N - 1); z [N, D]."""
    n, d = z.shape
    centred = z - z.mean(axis=0)
    # HIGHEST: the loss is float32 throughout, also on GPUs whose default float32 matmul is TF32.
    cov = jnp.matmul(centred.T, centred, precision=jax.lax.Precision.HIGHEST) / (n - 1)
    return jnp.sum(jnp.square(off_diagonal(cov))) / d


def vicreg_loss(z_a: jax.Array, z_b: jax.Array, *, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, eps: float = 1e-4,
                variant: str = "solo-learn") -> tuple[jax.Array, dict[str, jax.Array]]:
    """VICReg on embeddings z_a, z_b [N, D] (float32 or float64) -> (scalar loss, unweighted terms).

    terms: `invariance` = s(Z, Z'); `variance` = v(Z) + v(Z') (`solo-learn`), halved
    (`official`), or with eps = 0 (`no-eps`, formerly `homework`); `covariance` = c(Z) + c(Z').
    """
    weight, with_eps = check_loss_inputs(variant, tuple(z_a.shape), tuple(z_b.shape))
    invariance = jnp.mean(jnp.square(z_a - z_b))
    e = eps if with_eps else 0.0
    variance = weight * (variance_term(z_a, e) + variance_term(z_b, e))
    covariance = covariance_term(z_a) + covariance_term(z_b)
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return loss, {"invariance": invariance, "variance": variance, "covariance": covariance}

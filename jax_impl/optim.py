"""LARS with the official VICReg semantics and Adam for the homework preset, in optax (the
learning rate follows shared.schedule.lr_at, injected every step).

The twin of torch_impl.optim. optax.lars is not the official update: it scales by the learning rate
before the momentum trace (mu = m * mu + lr * q * g'), so a changing lr is folded into the momentum
differently; scale_by_lars below keeps mu free of lr as facebookresearch/vicreg does.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from shared.config import Config


class LarsState(NamedTuple):
    """The momentum buffer mu, one array per parameter."""

    mu: optax.Updates


def exclude_bias_and_norm(p: jax.Array) -> bool:
    """Biases and norm weights (the 1-D parameters) get neither weight decay nor LARS adaptation."""
    return p.ndim == 1


def scale_by_lars(weight_decay: float, momentum: float, eta: float) -> optax.GradientTransformation:
    """LARS direction as in facebookresearch/vicreg; returns mu (scale by -lr afterwards).

    Per parameter p with gradient g (float32, any shape):
        g' = g + wd * p                                               (unless excluded)
        q  = eta * ||p|| / ||g'|| if ||p|| > 0 and ||g'|| > 0 else 1    (unless excluded)
        mu = momentum * mu + q * g'
    """

    def direction(g: jax.Array, p: jax.Array) -> jax.Array:
        if exclude_bias_and_norm(p):
            return g
        g = g + weight_decay * p
        p_norm, g_norm = jnp.linalg.norm(p), jnp.linalg.norm(g)
        trust = jnp.where((p_norm > 0) & (g_norm > 0), eta * p_norm / g_norm, 1.0)
        return g * trust

    def init(params) -> LarsState:
        return LarsState(mu=jax.tree.map(jnp.zeros_like, params))

    def update(grads, state: LarsState, params):
        mu = jax.tree.map(lambda m, g, p: momentum * m + direction(g, p), state.mu, grads, params)
        return mu, LarsState(mu=mu)

    return optax.GradientTransformation(init, update)


def lars(learning_rate, weight_decay: float, momentum: float,
         eta: float) -> optax.GradientTransformation:
    """The full LARS step: p <- p - lr * mu with mu from scale_by_lars."""
    return optax.chain(scale_by_lars(weight_decay, momentum, eta),
                       optax.scale_by_learning_rate(learning_rate))


def adam_l2(learning_rate, weight_decay: float) -> optax.GradientTransformation:
    """torch.optim.Adam(weight_decay=wd): coupled L2, g' = g + wd * p before the moments (not
    AdamW)."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
                       optax.scale_by_learning_rate(learning_rate))


def build_optimizer(cfg: Config) -> optax.GradientTransformation:
    """LARS (official semantics) or Adam (L2 weight decay, as the seed course); set lr with
    set_lr."""
    if cfg.optimizer == "lars":
        return optax.inject_hyperparams(
            lambda learning_rate: lars(learning_rate, cfg.wd, cfg.momentum, cfg.lars_eta))(
            learning_rate=0.0)
    return optax.inject_hyperparams(
        lambda learning_rate: adam_l2(learning_rate, cfg.wd))(learning_rate=cfg.peak_lr())


def set_lr(opt_state: optax.InjectHyperparamsState, lr) -> optax.InjectHyperparamsState:
    """The state of build_optimizer's optimizer with its learning rate replaced (jit-friendly)."""
    current = opt_state.hyperparams["learning_rate"]
    return opt_state._replace(hyperparams={**opt_state.hyperparams,
                                           "learning_rate": jnp.asarray(lr, current.dtype)})

"""One VICReg training step in JAX: the loss of a batch's two views, its gradient, the update; one
pure function, jit-compiled.

The twin of torch_impl.step: train_step(state, x_a, x_b, lr, ...) and make_train_step(cfg, augment,
...) take the same leading arguments in both; what each framework needs beside them (here the
flax module and the optax optimizer, there the compute dtype) comes as keywords.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jax_impl.augment import apply_view
from jax_impl.checkpoint import load_model_state, restore_opt_state
from jax_impl.distributed import batch_sharding, replicated
from jax_impl.loss import vicreg_loss
from jax_impl.model import VICReg, init_variables
from jax_impl.optim import set_lr
from shared.augment import AugmentParams
from shared.config import Config


class TrainState(NamedTuple):
    """Everything a step updates: float32 params, BN statistics, optimizer state."""

    params: dict
    batch_stats: dict
    opt_state: optax.OptState


def step_loss(model: VICReg, params: dict, batch_stats: dict, x_a: jax.Array, x_b: jax.Array,
              cfg: Config) -> tuple[jax.Array, tuple[dict, dict]]:
    """Forward both views in train mode (two BN updates, as torch), then the loss in float32 (or
    wider).

    x_a, x_b: float32 [B, S, S, 3]. Returns (loss, (terms incl. loss and embedding_std, new BN
    stats)).
    """
    z_a, updated = model.apply({"params": params, "batch_stats": batch_stats}, x_a, train=True,
                               mutable=["batch_stats"])
    z_b, updated = model.apply({"params": params, "batch_stats": updated["batch_stats"]}, x_b,
                               train=True, mutable=["batch_stats"])
    wide = jnp.promote_types(z_a.dtype, jnp.float32)  # bf16 -> float32; float64 stays
    z_a, z_b = z_a.astype(wide), z_b.astype(wide)
    loss, terms = vicreg_loss(z_a, z_b, sim_coeff=cfg.sim_coeff, std_coeff=cfg.std_coeff,
                              cov_coeff=cfg.cov_coeff, variant=cfg.loss_variant)
    # mean_j std(z_a[:, j]), unbiased like torch's Tensor.std: a collapse monitor, no gradient
    embedding_std = jnp.std(jax.lax.stop_gradient(z_a), axis=0, ddof=1).mean()
    return loss, ({**terms, "loss": loss, "embedding_std": embedding_std}, updated["batch_stats"])


def train_step(state: TrainState, x_a: jax.Array, x_b: jax.Array, lr: jax.Array, *,
               cfg: Config, model: VICReg,
               optimizer: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """One optimisation step at learning rate lr, pure: (the new state, the loss terms)."""
    grads, (terms, batch_stats) = jax.grad(
        lambda params: step_loss(model, params, state.batch_stats, x_a, x_b, cfg),
        has_aux=True)(state.params)
    opt_state = set_lr(state.opt_state, lr)
    updates, opt_state = optimizer.update(grads, opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), batch_stats, opt_state), terms


def make_train_step(cfg: Config, augment: AugmentParams | None = None, *, model: VICReg,
                    optimizer: optax.GradientTransformation, mesh: Mesh | None = None):
    """jit(step)(state, x_a, x_b, lr) -> (state, terms): train_step, the state's buffers donated.

    With a mesh (distributed.data_mesh) the views are sharded along the batch over its devices and
    the state, lr and terms replicated: the step of the global batch, computed across devices.
    With `augment`, the views are computed inside the step (jax_impl.augment):
    jit(step)(state, images, index, view_a, view_b, lr), images uint8 [N, S, S, 3] (replicated),
    index int32 [B] and view_a/b (the views' device_params) sharded like the views.
    """

    def step(state: TrainState, x_a: jax.Array, x_b: jax.Array, lr: jax.Array):
        return train_step(state, x_a, x_b, lr, cfg=cfg, model=model, optimizer=optimizer)

    def augmented_step(state: TrainState, images: jax.Array, index: jax.Array, view_a: dict,
                       view_b: dict, lr: jax.Array):
        batch = images[index]
        return step(state, apply_view(batch, view_a, augment), apply_view(batch, view_b, augment),
                    lr)

    function = step if augment is None else augmented_step
    if mesh is None:
        return jax.jit(function, donate_argnums=0)
    whole, rows = replicated(mesh), batch_sharding(mesh)
    # the two views; or the images, the batch's indices and the two views' parameters
    inputs = (rows, rows) if augment is None else (whole, rows, rows, rows)
    return jax.jit(function, in_shardings=(whole, *inputs, whole), out_shardings=whole,
                   donate_argnums=0)


def initial_state(cfg: Config, *, model: VICReg,
                  optimizer: optax.GradientTransformation) -> TrainState:
    """Fresh variables drawn from cfg.seed and a fresh optimizer state."""
    variables = init_variables(model, cfg.seed)
    return TrainState(variables["params"], variables["batch_stats"],
                      optimizer.init(variables["params"]))


def resumed_state(cfg: Config, stored: dict, path: Path, *, model: VICReg,
                  optimizer: optax.GradientTransformation) -> TrainState:
    """The TrainState held by a loaded checkpoint, checked against the run's model and optimizer."""
    variables = load_model_state(model, stored, path, cfg.model_description())
    opt_state = restore_opt_state(optimizer.init(variables["params"]), stored["opt_state"], path)
    return TrainState(variables["params"], variables["batch_stats"], opt_state)


def network(state: TrainState) -> dict:
    """The VICReg network's variables, {"params", "batch_stats"}: what checkpoints and probes."""
    return {"params": state.params, "batch_stats": state.batch_stats}

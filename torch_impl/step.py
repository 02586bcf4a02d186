"""One VICReg training step in PyTorch: the loss of a batch's two views, its gradient, the update.

The twin of jax_impl.step: train_step(state, x_a, x_b, lr, ...) and make_train_step(cfg, augment,
...) take the same leading arguments in both; what each framework needs beside them (here the
compute dtype, there the flax module and the optax optimizer) comes as keywords.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from shared.augment import AugmentParams
from shared.backend import World
from shared.config import Config
from torch_impl.augment import apply_view
from torch_impl.checkpoint import load_model_state
from torch_impl.distributed import data_parallel, gather_batch, sync_batch_norm
from torch_impl.loss import vicreg_loss
from torch_impl.model import VICReg, build_model, init_variables
from torch_impl.optim import build_optimizer, set_lr
from torch_impl.runtime import autocast, memory_format


class TrainState(NamedTuple):
    """Everything a step updates: the model the steps call (the VICReg network, or
    DistributedDataParallel around it) with its BN statistics, and the optimizer."""

    model: nn.Module
    optimizer: torch.optim.Optimizer


def step_loss(model: nn.Module, x_a: torch.Tensor, x_b: torch.Tensor, cfg: Config,
              dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward both views in train mode (autocast to `dtype` when it is narrower than float32),
    then the loss in float32 (or wider) over the global batch: in a data-parallel job every
    process gathers all processes' embeddings.

    x_a, x_b: float [B, 3, S, S]. Returns (loss, terms incl. loss and embedding_std).
    """
    with autocast(x_a.device, dtype):
        z_a, z_b = model(x_a), model(x_b)
    wide = torch.promote_types(z_a.dtype, torch.float32)  # bf16 -> float32; float64 stays
    z_a, z_b = gather_batch(z_a.to(wide)), gather_batch(z_b.to(wide))
    loss, terms = vicreg_loss(z_a, z_b, sim_coeff=cfg.sim_coeff, std_coeff=cfg.std_coeff,
                              cov_coeff=cfg.cov_coeff, variant=cfg.loss_variant)
    # mean_j std(z_a[:, j]) (unbiased): a collapse monitor, no gradient
    terms = {**terms, "loss": loss, "embedding_std": z_a.detach().std(dim=0).mean()}
    return loss, terms


def train_step(state: TrainState, x_a: torch.Tensor, x_b: torch.Tensor, lr: float, *,
               cfg: Config, dtype: torch.dtype,
               loss_fn: Callable = step_loss) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """One optimisation step at learning rate lr, updating the state in place: (the state, the
    detached loss terms on the device, not synchronised).

    loss_fn: step_loss, or step_loss through torch.compile. The optimizer step stays outside it,
    so that a new learning rate each step does not make torch.compile trace the step again.
    """
    set_lr(state.optimizer, lr)
    loss, terms = loss_fn(state.model, x_a, x_b, cfg, dtype)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    return state, {k: v.detach() for k, v in terms.items()}


def make_train_step(cfg: Config, augment: AugmentParams | None = None, *, dtype: torch.dtype,
                    compile_views: bool = False):
    """step(state, x_a, x_b, lr) -> (state, terms): train_step, its forward pass and loss through
    torch.compile with --compile.

    With `augment`, the views are computed here, on the device (torch_impl.augment):
    step(state, images, index, view_a, view_b, lr), images uint8 [N, S, S, 3] on the device,
    index int64 [B], view_a/b the views' device_params; with compile_views through torch.compile,
    which fuses their few hundred small element-wise kernels into a few.
    """
    def views(images: torch.Tensor, index: torch.Tensor, view_a: dict, view_b: dict):
        batch = images[index]
        return apply_view(batch, view_a, augment), apply_view(batch, view_b, augment)

    loss_fn = torch.compile(step_loss) if cfg.compile else step_loss
    compute_views = torch.compile(views, dynamic=False) if compile_views else views

    def step(state: TrainState, x_a: torch.Tensor, x_b: torch.Tensor, lr: float):
        return train_step(state, x_a, x_b, lr, cfg=cfg, dtype=dtype, loss_fn=loss_fn)

    def augmented_step(state: TrainState, images: torch.Tensor, index: torch.Tensor,
                       view_a: dict, view_b: dict, lr: float):
        return step(state, *compute_views(images, index, view_a, view_b), lr)

    return step if augment is None else augmented_step


def initial_state(cfg: Config, *, device: torch.device, world: World) -> TrainState:
    """Fresh weights drawn from cfg.seed on `device` (channels_last from width 8), with BatchNorm
    over the global batch in a data-parallel job with --sync-bn, and a fresh optimizer state."""
    model = init_variables(build_model(cfg.arch, cfg.width, cfg.mlp_dims(), cfg.stem(),
                                       cfg.last_width), cfg.seed)
    model = model.to(device, memory_format=memory_format(cfg.width))
    if world.size > 1 and cfg.sync_bn:
        model = sync_batch_norm(model, device)
    return TrainState(data_parallel(model, world, device), build_optimizer(cfg, model=model))


def resumed_state(cfg: Config, stored: dict, path: Path, *, device: torch.device,
                  world: World) -> TrainState:
    """The TrainState held by a loaded checkpoint, checked against the run's model."""
    state = initial_state(cfg, device=device, world=world)
    load_model_state(network(state), stored["model"], path, cfg.model_description())
    state.optimizer.load_state_dict(stored["optimizer"])
    return state


def network(state: TrainState) -> VICReg:
    """The VICReg network itself (without DistributedDataParallel): what checkpoints and probes."""
    model = state.model
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

"""VICReg pretraining with PyTorch: `python -m torch_impl.train [--preset cpu] [flags]`.

Writes the run folder (config.json, metrics.jsonl, checkpoint.pt every epoch, summary.json), then
runs the linear probe on CIFAR-10 and, when its data is present, GTSRB.

`torchrun --nproc_per_node=N -m torch_impl.train [flags]` trains data-parallel on N processes
(torch_impl.distributed): --batch-size stays the global batch, and rank 0 writes the run folder.

The twin of jax_impl.train: the same functions, in the same order, doing the same things.
"""
from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from shared.augment import AugmentParams
from shared.cli import cli_main, parse_train_args
from shared.config import Config
from shared.data import CIFAR10_MEAN, CIFAR10_STD
from shared.loader import DrawnBatch, ViewBatch, split_batch, steps_per_epoch
from shared.runio import MetricsLog
from shared.schedule import lr_at
from shared.tensorboard import EventLog
from shared.training import (
    EpochLog,
    Progress,
    World,
    augments_on_device,
    finish_run,
    measure_step_seconds,
    prepare_run_dir,
    resumable_on_interrupt,
    run_folder,
    session_batches,
    train_images,
    train_remaining,
)
from torch_impl.augment import apply_view, device_params
from torch_impl.checkpoint import (
    CHECKPOINT_FILE,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from torch_impl.distributed import (
    broadcast_from_main,
    data_parallel,
    gather_batch,
    joined,
    on_main,
    sync_batch_norm,
    world_from_env,
)
from torch_impl.loss import vicreg_loss
from torch_impl.model import VICReg, build_model
from torch_impl.optim import build_optimizer, set_lr
from torch_impl.runtime import autocast_dtype, memory_format, to_channels_last


def step_loss(model: nn.Module, x_a: torch.Tensor, x_b: torch.Tensor, cfg: Config,
              amp: torch.dtype | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward both views (autocast when `amp`), then the loss in float32 (or wider) over the
    global batch: in a data-parallel job every process gathers all processes' embeddings.

    x_a, x_b: float [B, 3, 32, 32]. Returns (loss, terms incl. loss and embedding_std).
    """
    with torch.autocast(x_a.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        z_a, z_b = model(x_a), model(x_b)
    wide = torch.promote_types(z_a.dtype, torch.float32)  # bf16 -> float32; float64 stays
    z_a, z_b = gather_batch(z_a.to(wide)), gather_batch(z_b.to(wide))
    loss, terms = vicreg_loss(z_a, z_b, sim_coeff=cfg.sim_coeff, std_coeff=cfg.std_coeff,
                              cov_coeff=cfg.cov_coeff, variant=cfg.loss_variant)
    terms = {**terms, "loss": loss, "embedding_std": z_a.detach().std(dim=0).mean()}
    return loss, terms


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x_a: torch.Tensor,
               x_b: torch.Tensor, cfg: Config, amp: torch.dtype | None,
               loss_fn: Callable = step_loss) -> dict[str, torch.Tensor]:
    """One optimisation step; returns the detached loss terms (on the device, not synchronised).

    loss_fn: step_loss, or step_loss through torch.compile. The optimizer step stays outside it,
    so that a new learning rate each step does not make torch.compile trace the step again.
    """
    loss, terms = loss_fn(model, x_a, x_b, cfg, amp)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {k: v.detach() for k, v in terms.items()}


class TrainState(NamedTuple):
    """Everything a step updates: the model the steps call (the VICReg network, or
    DistributedDataParallel around it) with its BN statistics, and the optimizer."""

    model: nn.Module
    optimizer: torch.optim.Optimizer


def make_train_step(cfg: Config, amp: torch.dtype | None, augment: AugmentParams | None = None,
                    compile_views: bool = False):
    """step(state, x_a, x_b, lr) -> (state, terms): train_step at learning rate lr (updating the
    state in place), its forward pass and loss through torch.compile with --compile.

    With `augment`, the views are computed here, on the device (torch_impl.augment):
    step(state, images, index, view_a, view_b, lr), images uint8 [N, 32, 32, 3] on the device,
    index int64 [B], view_a/b the views' device_params; with compile_views through torch.compile,
    which fuses their few hundred small element-wise kernels into a few.
    """
    def views(images: torch.Tensor, index: torch.Tensor, view_a: dict, view_b: dict):
        batch = images[index]
        return apply_view(batch, view_a, augment), apply_view(batch, view_b, augment)

    loss_fn = torch.compile(step_loss) if cfg.compile else step_loss
    compute_views = torch.compile(views, dynamic=False) if compile_views else views

    def step(state: TrainState, x_a: torch.Tensor, x_b: torch.Tensor, lr: float):
        set_lr(state.optimizer, lr)
        return state, train_step(state.model, state.optimizer, x_a, x_b, cfg, amp, loss_fn)

    def augmented_step(state: TrainState, images: torch.Tensor, index: torch.Tensor,
                       view_a: dict, view_b: dict, lr: float):
        return step(state, *compute_views(images, index, view_a, view_b), lr)

    return step if augment is None else augmented_step


def initial_state(cfg: Config, device: torch.device, world: World) -> TrainState:
    """Fresh weights drawn from cfg.seed on `device` (channels_last), with BatchNorm over the global
    batch in a data-parallel job with --sync-bn, and a fresh optimizer state."""
    model = build_model(cfg.arch, cfg.width, cfg.mlp_dims(), cfg.seed)
    model = model.to(device, memory_format=memory_format(cfg.width))
    if world.size > 1 and cfg.sync_bn:
        model = sync_batch_norm(model, device)
    return TrainState(data_parallel(model, world, device), build_optimizer(model, cfg))


def resumed_state(cfg: Config, device: torch.device, world: World, stored: dict,
                  path: Path) -> TrainState:
    """The TrainState held by a loaded checkpoint, checked against the run's model."""
    state = initial_state(cfg, device, world)
    load_model_state(network(state), stored["model"], path, cfg.model_description())
    state.optimizer.load_state_dict(stored["optimizer"])
    return state


def network(state: TrainState) -> VICReg:
    """The VICReg network itself (without DistributedDataParallel): what checkpoints and probes."""
    model = state.model
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@dataclass
class Session:
    """What one training process holds besides the state: settings, data, how a step runs, where
    it is written."""

    cfg: Config
    images: np.ndarray  # uint8 [N, 32, 32, 3]
    device: torch.device
    amp: torch.dtype | None  # the autocast dtype, None for float32
    world: World
    metrics: MetricsLog | None  # None on ranks other than 0, which write nothing
    steps_per_epoch: int = field(init=False)
    augment: AugmentParams = field(init=False)
    on_device: bool = field(init=False)  # the views are computed on the device
    device_images: torch.Tensor | None = field(init=False)  # the uint8 images there, if so
    step_fn: Callable = field(init=False)
    events: EventLog | None = field(default=None, init=False)  # --tensorboard, main process

    def __post_init__(self):
        self.steps_per_epoch = steps_per_epoch(len(self.images), self.cfg.batch_size)
        self.augment = self.cfg.augment_params(CIFAR10_MEAN, CIFAR10_STD)
        self.on_device = augments_on_device(self.cfg, self.device.type == "cuda")
        self.device_images = (torch.from_numpy(self.images).to(self.device) if self.on_device
                              else None)
        self.step_fn = make_train_step(self.cfg, self.amp,
                                       self.augment if self.on_device else None,
                                       compile_views=self.device.type == "cuda")

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def device_name(self) -> str:
        return self.device.type

    @property
    def precision_name(self) -> str:
        return "bf16" if self.amp else "fp32"

    @property
    def batch_split(self) -> str:
        return f" over {self.world.size} processes" if self.world.size > 1 else ""


def step_inputs(session: Session, batch: ViewBatch | DrawnBatch) -> tuple:
    """What session.step_fn takes besides the state and lr: the two views, or (with the views
    computed
    on the device) the images, the batch's indices and the views' parameters, on the device."""
    if isinstance(batch, ViewBatch):
        return (to_channels_last(batch.view_a, session.device),
                to_channels_last(batch.view_b, session.device))
    index = torch.from_numpy(batch.index).to(session.device, non_blocking=True)
    return (session.device_images, index, device_params(batch.view_a, session.device),
            device_params(batch.view_b, session.device))


def train_epoch(session: Session, state: TrainState, epoch: int,
                bar: tqdm) -> tuple[TrainState, dict[str, float]]:
    """One epoch of steps, logged every cfg.log_every steps; returns (state, the epoch record)."""
    state.model.train()
    log = EpochLog(session, bar, epoch)
    for batch in session_batches(session, epoch):
        lr = lr_at(epoch * session.steps_per_epoch + batch.step, session.steps_per_epoch,
                   session.cfg)
        state, terms = session.step_fn(state, *step_inputs(session, batch), lr)
        log.add(batch.step, lr, terms)
    return state, log.close()


def time_step(session: Session, state: TrainState) -> float:
    """Seconds a training step takes here (shared.training.measure_step_seconds), measured on
    steps that the state's weights, statistics and optimizer state are restored from."""
    weights = copy.deepcopy(network(state).state_dict())
    optimizer = copy.deepcopy(state.optimizer.state_dict())
    on_cuda = session.device.type == "cuda"
    sync = (lambda _: torch.cuda.synchronize()) if on_cuda else (lambda _: None)
    try:
        return measure_step_seconds(
            session, lambda batch: session.step_fn(state, *step_inputs(session, batch), 0.0), sync)
    finally:
        network(state).load_state_dict(weights)
        state.optimizer.load_state_dict(optimizer)


def save_state(session: Session, state: TrainState, progress: Progress) -> None:
    """The checkpoint of `progress`, written by rank 0 (a plain single-process state_dict)."""
    if session.world.is_main:
        save_checkpoint(session.run_dir / CHECKPOINT_FILE, {
            "model": network(state).state_dict(), "optimizer": state.optimizer.state_dict(),
            **progress.record(session.steps_per_epoch, session.cfg)})


def start_session(cfg: Config, resume: bool, world: World,
                  device: torch.device) -> tuple[Session, TrainState, Progress]:
    """Load data, build or restore the state: (session, state, progress so far). Nothing in the run
    folder changes but what runio.start_run_dir writes for a run that starts from scratch.

    Every process of a data-parallel job builds the same model (same seed) or reads the same
    checkpoint, so the run folder must be on a file system all machines see; rank 0 alone writes.
    """
    images = train_images(cfg)
    on_main(world, lambda: prepare_run_dir(cfg, resume, "torch"))
    session = Session(cfg, images, device, autocast_dtype(cfg.precision, device), world,
                MetricsLog(cfg.out) if world.is_main else None)
    path = session.run_dir / CHECKPOINT_FILE
    if not (resume and path.is_file()):  # rank 0 has decided: a checkpoint is there, or none is
        return session, initial_state(cfg, device, world), Progress()
    stored = load_checkpoint(path)
    return session, resumed_state(cfg, device, world, stored, path), Progress.of_checkpoint(stored)


def run(cfg: Config, resume: bool) -> dict:
    """Train (or resume) as `cfg` says, then probe; returns the summary written to summary.json.

    In a data-parallel job (torchrun) rank 0 alone writes the summary and runs the probe, after
    the process group is gone.
    """
    world = world_from_env()
    split_batch(cfg.batch_size, world.size)  # an uneven split fails before the processes meet
    with run_folder(cfg, "torch", world), resumable_on_interrupt("torch", Path(cfg.out)):
        with joined(world) as device:
            session, state, progress = start_session(cfg, resume, world, device)
            state, progress, done = train_remaining(
                "torch", session, state, progress, train_epoch=train_epoch, save_state=save_state,
                time_step=time_step, agree=lambda value: broadcast_from_main(world, value))
        if done is not None or not world.is_main:
            return done or {}

        def probe() -> dict:
            from torch_impl.probe import probe_after_training
            return probe_after_training(session.cfg, session.run_dir, network(state).backbone)

        return finish_run("torch", session, progress, probe)


def main(argv: list[str] | None = None) -> int:
    return cli_main(lambda: run(*parse_train_args(argv, "torch")))


if __name__ == "__main__":
    sys.exit(main())

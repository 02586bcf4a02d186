"""VICReg pretraining with JAX: `python -m jax_impl.train [--preset cpu] [flags]`.

The twin of torch_impl.train: the same flags, batches and run folder (config.json, metrics.jsonl,
checkpoint.msgpack every epoch, summary.json), then the linear probe on CIFAR-10 and, when its data
is present, GTSRB; the same functions, in the same order, doing the same things. The train step is
one jax.jit-compiled pure function.

It trains data-parallel over every device jax sees (jax_impl.distributed): the batch sharded over
them, the state replicated; several processes join one job through jax.distributed. --batch-size
stays the global batch, and process 0 writes the run folder.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from jax_impl.augment import apply_view, device_params
from jax_impl.checkpoint import (
    CHECKPOINT_FILE,
    check_variables,
    load_checkpoint,
    restore_opt_state,
    save_checkpoint,
)
from jax_impl.distributed import (
    batch_sharding,
    broadcast_from_main,
    data_mesh,
    global_batch,
    on_main,
    replicate,
    replicated,
    world_from_env,
)
from jax_impl.loss import vicreg_loss
from jax_impl.model import (
    VICReg,
    backbone_of,
    backbone_variables,
    build_model,
    init_variables,
    variable_shapes,
)
from jax_impl.optim import build_optimizer, set_lr
from jax_impl.runtime import compute_dtype, device_name, pick_device, precision_name
from shared.augment import AugmentParams
from shared.cli import cli_main, parse_train_args
from shared.config import Config
from shared.data import CIFAR10_MEAN, CIFAR10_STD
from shared.errors import UserError
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


def step_loss(model: VICReg, params: dict, batch_stats: dict, x_a: jax.Array, x_b: jax.Array,
              cfg: Config) -> tuple[jax.Array, tuple[dict, dict]]:
    """Forward both views in train mode (two BN updates, as torch), then the loss in float32 (or
    wider).

    x_a, x_b: float32 [B, 32, 32, 3]. Returns (loss, (terms incl. loss and embedding_std, new BN
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


def train_step(model: VICReg, optimizer: optax.GradientTransformation, cfg: Config,
               state: TrainState, x_a: jax.Array, x_b: jax.Array,
               lr: jax.Array) -> tuple[TrainState, dict]:
    """One optimisation step at learning rate lr, pure: (the new state, the loss terms)."""
    grads, (terms, batch_stats) = jax.grad(
        lambda params: step_loss(model, params, state.batch_stats, x_a, x_b, cfg),
        has_aux=True)(state.params)
    opt_state = set_lr(state.opt_state, lr)
    updates, opt_state = optimizer.update(grads, opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), batch_stats, opt_state), terms


class TrainState(NamedTuple):
    """Everything a step updates: float32 params, BN statistics, optimizer state."""

    params: dict
    batch_stats: dict
    opt_state: optax.OptState


def make_train_step(model: VICReg, optimizer: optax.GradientTransformation, cfg: Config,
                    mesh: Mesh | None = None, augment: AugmentParams | None = None):
    """jit(step)(state, x_a, x_b, lr) -> (state, terms): train_step, the state's buffers donated.

    With a mesh (distributed.data_mesh) the views are sharded along the batch over its devices and
    the state, lr and terms replicated: the step of the global batch, computed across devices.
    With `augment`, the views are computed inside the step (jax_impl.augment):
    jit(step)(state, images, index, view_a, view_b, lr), images uint8 [N, 32, 32, 3] (replicated),
    index int32 [B] and view_a/b (the views' device_params) sharded like the views.
    """

    def step(state: TrainState, x_a: jax.Array, x_b: jax.Array, lr: jax.Array):
        return train_step(model, optimizer, cfg, state, x_a, x_b, lr)

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


def initial_state(model: VICReg, optimizer: optax.GradientTransformation,
                  cfg: Config) -> TrainState:
    """Fresh variables drawn from cfg.seed and a fresh optimizer state."""
    variables = init_variables(model, cfg.seed)
    return TrainState(variables["params"], variables["batch_stats"],
                      optimizer.init(variables["params"]))


def resumed_state(model: VICReg, optimizer: optax.GradientTransformation, cfg: Config,
                  stored: dict, path: Path) -> TrainState:
    """The TrainState held by a loaded checkpoint, checked against the run's model and optimizer."""
    variables = check_variables({"params": stored["params"], "batch_stats": stored["batch_stats"]},
                                variable_shapes(model), path, cfg.model_description())
    opt_state = restore_opt_state(optimizer.init(variables["params"]), stored["opt_state"], path)
    return TrainState(variables["params"], variables["batch_stats"], opt_state)


def network(state: TrainState) -> dict:
    """The VICReg network's variables, {"params", "batch_stats"}: what checkpoints and probes."""
    return {"params": state.params, "batch_stats": state.batch_stats}


@dataclass
class Session:
    """What one training process holds besides the state: settings, data, how a step runs, where
    it is written."""

    cfg: Config
    images: np.ndarray  # uint8 [N, 32, 32, 3]
    device: jax.Device
    dtype: Any  # the model's compute dtype
    world: World
    metrics: MetricsLog | None  # None in processes other than 0, which write nothing
    model: VICReg
    optimizer: optax.GradientTransformation
    mesh: Mesh
    steps_per_epoch: int = field(init=False)
    augment: AugmentParams = field(init=False)
    on_device: bool = field(init=False)  # the views are computed on the device
    device_images: jax.Array | None = field(init=False)  # the uint8 images there, if so
    step_fn: Callable = field(init=False)
    events: EventLog | None = field(default=None, init=False)  # --tensorboard, main process
    batch_sharding: NamedSharding = field(init=False)  # the views: rows split over the mesh

    def __post_init__(self):
        self.steps_per_epoch = steps_per_epoch(len(self.images), self.cfg.batch_size)
        self.augment = self.cfg.augment_params(CIFAR10_MEAN, CIFAR10_STD)
        self.on_device = augments_on_device(self.cfg, self.device.platform == "gpu")
        self.device_images = (jax.device_put(self.images, replicated(self.mesh))
                              if self.on_device else None)
        self.step_fn = make_train_step(self.model, self.optimizer, self.cfg, self.mesh,
                                       self.augment if self.on_device else None)
        self.batch_sharding = batch_sharding(self.mesh)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def device_name(self) -> str:
        return device_name(self.device)

    @property
    def precision_name(self) -> str:
        return precision_name(self.dtype)

    @property
    def batch_split(self) -> str:
        return f" over {self.mesh.size} devices" if self.mesh.size > 1 else ""


def step_inputs(session: Session, batch: ViewBatch | DrawnBatch) -> tuple:
    """What session.step_fn takes besides the state and lr: the two views, or (with the views
    computed
    on the device) the images, the batch's indices and the views' parameters, as global arrays
    sharded along the batch (this process supplies its rows)."""
    def rows(local: np.ndarray) -> jax.Array:
        return global_batch(local, session.batch_sharding, session.cfg.batch_size)

    if isinstance(batch, ViewBatch):
        return rows(batch.view_a), rows(batch.view_b)
    return (session.device_images, rows(batch.index.astype(np.int32)),
            *({k: rows(v) for k, v in device_params(view).items()}
              for view in (batch.view_a, batch.view_b)))


def train_epoch(session: Session, state: TrainState, epoch: int,
                bar: tqdm) -> tuple[TrainState, dict[str, float]]:
    """One epoch of steps, logged every cfg.log_every steps; returns (state, the epoch record)."""
    log = EpochLog(session, bar, epoch)
    for batch in session_batches(session, epoch):
        lr = lr_at(epoch * session.steps_per_epoch + batch.step, session.steps_per_epoch,
                   session.cfg)
        state, terms = session.step_fn(state, *step_inputs(session, batch), lr)
        log.add(batch.step, lr, terms)
    return state, log.close()


def time_step(session: Session, state: TrainState) -> float:
    """Seconds a training step takes here (shared.training.measure_step_seconds), measured on
    steps of a copy of the state (the step donates what it is given)."""
    holder = [jax.tree.map(jnp.copy, state)]

    def run_step(batch) -> dict:
        holder[0], terms = session.step_fn(holder[0], *step_inputs(session, batch), 0.0)
        return terms

    return measure_step_seconds(session, run_step, jax.block_until_ready)


def save_state(session: Session, state: TrainState, progress: Progress) -> None:
    """The checkpoint of `progress`, written by process 0."""
    if session.world.is_main:
        save_checkpoint(session.run_dir / CHECKPOINT_FILE, {
            **network(state), "opt_state": state.opt_state,
            **progress.record(session.steps_per_epoch, session.cfg)})


def start_session(cfg: Config, resume: bool, world: World,
                  mesh: Mesh) -> tuple[Session, TrainState, Progress]:
    """Load data, build or restore the state: (session, state, progress so far). Nothing in the run
    folder changes but what runio.start_run_dir writes for a run that starts from scratch.

    Every process of a multi-process job builds the same state (same seed) or reads the same
    checkpoint, so the run folder must be on a file system all machines see; process 0 writes.
    """
    if mesh.size > 1 and not cfg.sync_bn:
        raise UserError(f"--no-sync-bn: jax_impl always normalises over the global batch of its "
                        f"{mesh.size} devices (the flag is torch_impl's)")
    images = train_images(cfg)
    on_main(world, lambda: prepare_run_dir(cfg, resume, "jax"))
    device = pick_device()
    dtype = compute_dtype(cfg.precision, device)
    model = build_model(cfg.arch, cfg.width, cfg.mlp_dims(), dtype)
    session = Session(cfg, images, device, dtype, world,
                      MetricsLog(cfg.out) if world.is_main else None,
                model, build_optimizer(cfg), mesh)
    path = session.run_dir / CHECKPOINT_FILE
    if not (resume and path.is_file()):  # process 0 has decided: a checkpoint is there, or none is
        return session, replicate(initial_state(model, session.optimizer, cfg), mesh), Progress()
    stored = load_checkpoint(path)
    state = resumed_state(model, session.optimizer, cfg, stored, path)
    return session, replicate(state, mesh), Progress.of_checkpoint(stored)


def run(cfg: Config, resume: bool) -> dict:
    """Train (or resume) as `cfg` says, then probe; returns the summary written to summary.json.

    In a multi-process job process 0 alone writes the summary and runs the probe, on its own
    devices; the other processes wait for it at exit (jax.distributed's shutdown).
    """
    world = world_from_env()
    mesh = data_mesh()
    split_batch(cfg.batch_size, mesh.size, "devices")
    with run_folder(cfg, "jax", world), resumable_on_interrupt("jax", Path(cfg.out)):
        session, state, progress = start_session(cfg, resume, world, mesh)
        state, progress, done = train_remaining(
            "jax", session, state, progress, train_epoch=train_epoch, save_state=save_state,
            time_step=time_step, agree=lambda value: broadcast_from_main(world, value))
        if done is not None or not world.is_main:
            return done or {}

        def probe() -> dict:
            from jax_impl.probe import probe_after_training
            # host copies: the replicated arrays span every process's devices, the probe only ours
            variables = jax.device_get(backbone_variables(network(state)))
            return probe_after_training(session.cfg, session.run_dir, backbone_of(session.model),
                                        variables)

        return finish_run("jax", session, progress, probe)


def main(argv: list[str] | None = None) -> int:
    return cli_main(lambda: run(*parse_train_args(argv, "jax")))


if __name__ == "__main__":
    sys.exit(main())

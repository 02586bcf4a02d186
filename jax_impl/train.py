"""VICReg pretraining with JAX: `python -m jax_impl.train [--preset cpu] [flags]`.

The twin of torch_impl.train: the same flags, batches and run folder (config.json, metrics.jsonl,
checkpoint.msgpack every epoch, summary.json), then the linear probe on CIFAR-10 and, when its data
is present, GTSRB. The train step is one jax.jit-compiled pure function.

It trains data-parallel over every device jax sees (jax_impl.distributed): the batch sharded over
them, the state replicated; several processes join one job through jax.distributed. --batch-size
stays the global batch, and process 0 writes the run folder.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm import tqdm

from jax_impl.checkpoint import (CHECKPOINT_FILE, check_variables, load_checkpoint,
                                 model_description, require_checkpoint, restore_opt_state,
                                 save_checkpoint)
from jax_impl.distributed import (batch_sharding, data_mesh, global_batch, initialize_from_env,
                                  is_main, on_main, process_shard, replicate, replicated)
from jax_impl.loss import vicreg_loss
from jax_impl.model import (VICReg, backbone_of, backbone_variables, build_model, init_variables,
                            variable_shapes)
from jax_impl.optim import build_optimizer, set_lr
from jax_impl.runtime import compute_dtype, device_name, pick_device, precision_name
from shared.config import Config, parse_train_args
from shared.data import CIFAR10_MEAN, CIFAR10_STD
from shared.errors import UserError
from shared.loader import epoch_batches, steps_per_epoch
from shared.runio import CONFIG_FILE, SUMMARY_FILE, MetricsLog, prepare_run_dir, write_json
from shared.schedule import lr_at
from shared.training import EpochLog, cli_main, run_summary, train_images

class TrainState(NamedTuple):
    """Everything a step updates: float32 params, BN statistics, optimizer state."""

    params: dict
    batch_stats: dict
    opt_state: optax.OptState


def step_loss(model: VICReg, params: dict, batch_stats: dict, x_a: jax.Array, x_b: jax.Array,
              cfg: Config) -> tuple[jax.Array, tuple[dict, dict]]:
    """Forward both views in train mode (two BN updates, as torch), then the loss in float32 (or wider).

    x_a, x_b: float32 [B, 32, 32, 3]. Returns (loss, (terms incl. loss and embedding_std, new BN stats)).
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


def make_train_step(model: VICReg, optimizer: optax.GradientTransformation, cfg: Config,
                    mesh: Mesh | None = None):
    """jit(step)(state, x_a, x_b, lr) -> (state, terms); the state's buffers are donated.

    With a mesh (distributed.data_mesh) the views are sharded along the batch over its devices and
    the state, lr and terms replicated: the step of the global batch, computed across devices.
    """

    def step(state: TrainState, x_a: jax.Array, x_b: jax.Array, lr: jax.Array):
        grads, (terms, batch_stats) = jax.grad(
            lambda params: step_loss(model, params, state.batch_stats, x_a, x_b, cfg),
            has_aux=True)(state.params)
        opt_state = set_lr(state.opt_state, lr)
        updates, opt_state = optimizer.update(grads, opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), batch_stats, opt_state), terms

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    whole, rows = replicated(mesh), batch_sharding(mesh)
    return jax.jit(step, in_shardings=(whole, rows, rows, whole), out_shardings=whole,
                   donate_argnums=0)


def initial_state(model: VICReg, optimizer: optax.GradientTransformation, cfg: Config) -> TrainState:
    """Fresh variables drawn from cfg.seed and a fresh optimizer state."""
    variables = init_variables(model, cfg.seed)
    return TrainState(variables["params"], variables["batch_stats"],
                      optimizer.init(variables["params"]))


def resumed_state(model: VICReg, optimizer: optax.GradientTransformation, cfg: Config,
                  stored: dict, path: Path) -> TrainState:
    """The TrainState held by a loaded checkpoint, checked against the run's model and optimizer."""
    variables = check_variables({"params": stored["params"], "batch_stats": stored["batch_stats"]},
                                variable_shapes(model), path, model_description(cfg))
    opt_state = restore_opt_state(optimizer.init(variables["params"]), stored["opt_state"], path)
    return TrainState(variables["params"], variables["batch_stats"], opt_state)


@dataclass
class Session:
    """What one training process holds: settings, data, model, optimizer, step and the run folder."""

    cfg: Config
    run_dir: Path
    images: np.ndarray
    per_epoch: int
    device: jax.Device
    dtype: Any
    model: VICReg
    optimizer: optax.GradientTransformation
    metrics: MetricsLog | None  # None in processes other than 0, which write nothing
    mesh: Mesh
    shard: tuple[int, int]  # (process index, process count): the part of each batch loaded here

    def __post_init__(self):
        self.params = self.cfg.augment_params(CIFAR10_MEAN, CIFAR10_STD)
        self.step_fn = make_train_step(self.model, self.optimizer, self.cfg, self.mesh)
        self.views = batch_sharding(self.mesh)


def train_epoch(s: Session, state: TrainState, epoch: int, bar: tqdm) -> tuple[TrainState, dict]:
    """One epoch of steps, logged every cfg.log_every steps; returns (state, the epoch record)."""
    log = EpochLog(s.cfg, s.metrics, s.run_dir, bar, epoch, s.per_epoch)
    for batch in epoch_batches(s.images, s.params, s.cfg.batch_size, s.cfg.seed, epoch,
                               workers=s.cfg.loader_workers(), shard=s.shard):
        lr = lr_at(epoch * s.per_epoch + batch.step, s.per_epoch, s.cfg)
        x_a, x_b = (global_batch(view, s.views, s.cfg.batch_size)
                    for view in (batch.view_a, batch.view_b))
        state, terms = s.step_fn(state, x_a, x_b, lr)
        log.add(batch.step, lr, terms)
    return state, log.close()


def prepare_run(cfg: Config, resume: bool) -> None:
    """Create the run folder, or check the one to resume (naming jax_impl.convert for torch's)."""
    if resume:
        require_checkpoint(Path(cfg.out) / CHECKPOINT_FILE)
    prepare_run_dir(cfg, resume, CHECKPOINT_FILE)


def start_session(cfg: Config, resume: bool) -> tuple[Session, TrainState, int, float]:
    """Load data, build or restore the state: (session, state, first epoch, train time so far).

    Every process of a multi-process job builds the same state (same seed) or reads the same
    checkpoint, so the run folder must be on a file system all machines see; process 0 writes.
    """
    device = pick_device()
    mesh = data_mesh()
    if mesh.size > 1 and not cfg.sync_bn:
        raise UserError(f"--no-sync-bn: jax_impl always normalises over the global batch of its "
                        f"{mesh.size} devices (the flag is torch_impl's)")
    shard = process_shard(mesh, cfg.batch_size)
    images = train_images(cfg)
    per_epoch = steps_per_epoch(len(images), cfg.batch_size)
    run_dir = Path(cfg.out)
    on_main(lambda: prepare_run(cfg, resume))
    dtype = compute_dtype(cfg.precision, device)
    model = build_model(cfg.arch, cfg.width, cfg.mlp_dims(), dtype)
    s = Session(cfg, run_dir, images, per_epoch, device, dtype, model, build_optimizer(cfg),
                MetricsLog(run_dir) if is_main() else None, mesh, shard)
    if not resume:
        return s, replicate(initial_state(model, s.optimizer, cfg), mesh), 0, 0.0
    path = run_dir / CHECKPOINT_FILE
    stored = load_checkpoint(path)
    state = resumed_state(model, s.optimizer, cfg, stored, path)
    if is_main():
        s.metrics.truncate(int(stored["metrics_bytes"]))
        write_json(run_dir / CONFIG_FILE, asdict(cfg))
    return s, replicate(state, mesh), int(stored["epoch"]), float(stored["train_time_s"])


def run(cfg: Config, resume: bool) -> dict:
    """Train (or resume) as `cfg` says, then probe; returns the summary written to summary.json.

    In a multi-process job process 0 alone writes the summary and runs the probe, on its own
    devices; the other processes wait for it at exit (jax.distributed's shutdown).
    """
    initialize_from_env()
    s, state, start_epoch, train_time = start_session(cfg, resume)
    if is_main():
        split = f" over {s.mesh.size} devices" if s.mesh.size > 1 else ""
        print(f"jax_impl: {cfg.arch} width {cfg.width}, expander {cfg.mlp}, {len(s.images)} "
              f"images, {s.per_epoch} steps/epoch x {cfg.epochs} epochs, batch {cfg.batch_size}"
              f"{split}, {device_name(s.device)} {precision_name(s.dtype)}, run folder "
              f"{s.run_dir}", flush=True)
    record: dict = {}
    with tqdm(total=cfg.epochs * s.per_epoch, initial=start_epoch * s.per_epoch, unit="step",
              dynamic_ncols=True, mininterval=1.0, file=sys.stderr, disable=not is_main()) as bar:
        for epoch in range(start_epoch, cfg.epochs):
            state, record = train_epoch(s, state, epoch, bar)
            train_time += record["epoch_time_s"]
            if is_main():
                save_checkpoint(s.run_dir / CHECKPOINT_FILE, {
                    "params": state.params, "batch_stats": state.batch_stats,
                    "opt_state": state.opt_state, "epoch": epoch + 1,
                    "global_step": (epoch + 1) * s.per_epoch, "train_time_s": train_time,
                    "metrics_bytes": s.metrics.size(), "config": asdict(cfg)})
    summary = run_summary("jax", device_name(s.device), precision_name(s.dtype), cfg,
                          s.per_epoch, len(s.images), train_time, record)
    if not is_main():
        return summary
    write_json(s.run_dir / SUMMARY_FILE, summary)
    print(f"trained {cfg.epochs} epochs in {train_time / 60:.1f} min", flush=True)
    if cfg.probe:
        from jax_impl.probe import probe_after_training
        # host copies: the replicated arrays span every process's devices, the probe only ours
        variables = jax.device_get(backbone_variables({"params": state.params,
                                                       "batch_stats": state.batch_stats}))
        summary["probe"] = probe_after_training(cfg, s.run_dir, backbone_of(s.model), variables)
        write_json(s.run_dir / SUMMARY_FILE, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    return cli_main(lambda: run(*parse_train_args(argv, "jax")))


if __name__ == "__main__":
    sys.exit(main())

"""VICReg pretraining with JAX: `python -m jax_impl.train [--preset cpu] [flags]`.

The twin of torch_impl.train: the same flags, batches and run folder (config.json, metrics.jsonl,
checkpoint.msgpack every epoch, summary.json), then the linear probe on CIFAR-10 and, when its data
is present, GTSRB. The train step is one jax.jit-compiled pure function.
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
from tqdm import tqdm

from jax_impl.checkpoint import (CHECKPOINT_FILE, check_variables, load_checkpoint,
                                 model_description, require_checkpoint, restore_opt_state,
                                 save_checkpoint)
from jax_impl.loss import vicreg_loss
from jax_impl.model import (VICReg, backbone_of, backbone_variables, build_model, init_variables,
                            variable_shapes)
from jax_impl.optim import build_optimizer, set_lr
from jax_impl.runtime import compute_dtype, device_name, pick_device, precision_name
from shared.config import Config, parse_train_args
from shared.data import CIFAR10_MEAN, CIFAR10_STD
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
    """Forward both views in train mode (two BN updates, as torch), then the loss in float32.

    x_a, x_b: float32 [B, 32, 32, 3]. Returns (loss, (terms incl. loss and embedding_std, new BN stats)).
    """
    z_a, updated = model.apply({"params": params, "batch_stats": batch_stats}, x_a, train=True,
                               mutable=["batch_stats"])
    z_b, updated = model.apply({"params": params, "batch_stats": updated["batch_stats"]}, x_b,
                               train=True, mutable=["batch_stats"])
    z_a, z_b = z_a.astype(jnp.float32), z_b.astype(jnp.float32)
    loss, terms = vicreg_loss(z_a, z_b, sim_coeff=cfg.sim_coeff, std_coeff=cfg.std_coeff,
                              cov_coeff=cfg.cov_coeff, variant=cfg.loss_variant)
    # mean_j std(z_a[:, j]), unbiased like torch's Tensor.std: a collapse monitor, no gradient
    embedding_std = jnp.std(jax.lax.stop_gradient(z_a), axis=0, ddof=1).mean()
    return loss, ({**terms, "loss": loss, "embedding_std": embedding_std}, updated["batch_stats"])


def make_train_step(model: VICReg, optimizer: optax.GradientTransformation, cfg: Config):
    """jit(step)(state, x_a, x_b, lr) -> (state, terms); the state's buffers are donated."""

    def step(state: TrainState, x_a: jax.Array, x_b: jax.Array, lr: jax.Array):
        grads, (terms, batch_stats) = jax.grad(
            lambda params: step_loss(model, params, state.batch_stats, x_a, x_b, cfg),
            has_aux=True)(state.params)
        opt_state = set_lr(state.opt_state, lr)
        updates, opt_state = optimizer.update(grads, opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), batch_stats, opt_state), terms

    return jax.jit(step, donate_argnums=0)


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
    metrics: MetricsLog

    def __post_init__(self):
        self.params = self.cfg.augment_params(CIFAR10_MEAN, CIFAR10_STD)
        self.step_fn = make_train_step(self.model, self.optimizer, self.cfg)


def train_epoch(s: Session, state: TrainState, epoch: int, bar: tqdm) -> tuple[TrainState, dict]:
    """One epoch of steps, logged every cfg.log_every steps; returns (state, the epoch record)."""
    log = EpochLog(s.cfg, s.metrics, s.run_dir, bar, epoch, s.per_epoch)
    for batch in epoch_batches(s.images, s.params, s.cfg.batch_size, s.cfg.seed, epoch,
                               workers=s.cfg.loader_workers()):
        lr = lr_at(epoch * s.per_epoch + batch.step, s.per_epoch, s.cfg)
        state, terms = s.step_fn(state, batch.view_a, batch.view_b, lr)
        log.add(batch.step, lr, terms)
    return state, log.close()


def start_session(cfg: Config, resume: bool) -> tuple[Session, TrainState, int, float]:
    """Load data, build or restore the state: (session, state, first epoch, train time so far)."""
    device = pick_device()
    images = train_images(cfg)
    per_epoch = steps_per_epoch(len(images), cfg.batch_size)
    if resume:
        require_checkpoint(Path(cfg.out) / CHECKPOINT_FILE)  # names jax_impl.convert for a torch run
    run_dir = prepare_run_dir(cfg, resume, CHECKPOINT_FILE)
    dtype = compute_dtype(cfg.precision, device)
    model = build_model(cfg.arch, cfg.width, cfg.mlp_dims(), dtype)
    s = Session(cfg, run_dir, images, per_epoch, device, dtype, model, build_optimizer(cfg),
                MetricsLog(run_dir))
    if not resume:
        return s, initial_state(model, s.optimizer, cfg), 0, 0.0
    path = run_dir / CHECKPOINT_FILE
    stored = load_checkpoint(path)
    state = resumed_state(model, s.optimizer, cfg, stored, path)
    s.metrics.truncate(int(stored["metrics_bytes"]))
    write_json(run_dir / CONFIG_FILE, asdict(cfg))
    return s, state, int(stored["epoch"]), float(stored["train_time_s"])


def run(cfg: Config, resume: bool) -> dict:
    """Train (or resume) as `cfg` says, then probe; returns the summary written to summary.json."""
    s, state, start_epoch, train_time = start_session(cfg, resume)
    print(f"jax_impl: {cfg.arch} width {cfg.width}, expander {cfg.mlp}, {len(s.images)} images, "
          f"{s.per_epoch} steps/epoch x {cfg.epochs} epochs, batch {cfg.batch_size}, "
          f"{device_name(s.device)} {precision_name(s.dtype)}, run folder {s.run_dir}", flush=True)
    record: dict = {}
    with tqdm(total=cfg.epochs * s.per_epoch, initial=start_epoch * s.per_epoch, unit="step",
              dynamic_ncols=True, mininterval=1.0, file=sys.stderr) as bar:
        for epoch in range(start_epoch, cfg.epochs):
            state, record = train_epoch(s, state, epoch, bar)
            train_time += record["epoch_time_s"]
            save_checkpoint(s.run_dir / CHECKPOINT_FILE, {
                "params": state.params, "batch_stats": state.batch_stats,
                "opt_state": state.opt_state, "epoch": epoch + 1,
                "global_step": (epoch + 1) * s.per_epoch, "train_time_s": train_time,
                "metrics_bytes": s.metrics.size(), "config": asdict(cfg)})
    summary = run_summary("jax", device_name(s.device), precision_name(s.dtype), cfg,
                          s.per_epoch, len(s.images), train_time, record)
    write_json(s.run_dir / SUMMARY_FILE, summary)
    print(f"trained {cfg.epochs} epochs in {train_time / 60:.1f} min", flush=True)
    if cfg.probe:
        from jax_impl.probe import probe_after_training
        variables = backbone_variables({"params": state.params, "batch_stats": state.batch_stats})
        summary["probe"] = probe_after_training(cfg, s.run_dir, backbone_of(s.model), variables)
        write_json(s.run_dir / SUMMARY_FILE, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    return cli_main(lambda: run(*parse_train_args(argv, "jax")))


if __name__ == "__main__":
    sys.exit(main())

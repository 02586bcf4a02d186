"""VICReg pretraining with PyTorch: `python -m torch_impl.train [--preset cpu] [flags]`.

Writes the run folder (config.json, metrics.jsonl, checkpoint.pt every epoch, summary.json), then
runs the linear probe on CIFAR-10 and, when its data is present, GTSRB.

`torchrun --nproc_per_node=N -m torch_impl.train [flags]` trains data-parallel on N processes
(torch_impl.distributed): --batch-size stays the global batch, and rank 0 writes the run folder.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shared.config import Config, parse_train_args
from shared.data import CIFAR10_MEAN, CIFAR10_STD
from shared.loader import epoch_batches, split_batch, steps_per_epoch
from shared.runio import CONFIG_FILE, SUMMARY_FILE, MetricsLog, prepare_run_dir, write_json
from shared.schedule import lr_at
from shared.training import EpochLog, cli_main, run_summary, train_images
from torch_impl.checkpoint import (CHECKPOINT_FILE, load_checkpoint, load_model_state,
                                   save_checkpoint)
from torch_impl.distributed import (World, data_parallel, gather_batch, joined, on_main,
                                    sync_batch_norm, world_from_env)
from torch_impl.loss import vicreg_loss
from torch_impl.model import VICReg
from torch_impl.optim import build_optimizer, set_lr
from torch_impl.runtime import autocast_dtype, memory_format, to_channels_last

def build_model(cfg: Config, device: torch.device) -> VICReg:
    """The VICReg network, initialised from cfg.seed, channels_last on `device`."""
    torch.manual_seed(cfg.seed)
    return VICReg(cfg.arch, cfg.width, cfg.mlp_dims()).to(device, memory_format=memory_format(cfg.width))


def step_loss(model: torch.nn.Module, x_a: torch.Tensor, x_b: torch.Tensor, cfg: Config,
              amp: torch.dtype | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward both views (autocast when `amp`), then the loss in float32 (or wider) over the
    global batch: in a data-parallel job every process gathers all processes' embeddings."""
    with torch.autocast(x_a.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        z_a, z_b = model(x_a), model(x_b)
    wide = torch.promote_types(z_a.dtype, torch.float32)  # bf16 -> float32; float64 stays
    z_a, z_b = gather_batch(z_a.to(wide)), gather_batch(z_b.to(wide))
    loss, terms = vicreg_loss(z_a, z_b, sim_coeff=cfg.sim_coeff, std_coeff=cfg.std_coeff,
                              cov_coeff=cfg.cov_coeff, variant=cfg.loss_variant)
    terms = {**terms, "loss": loss, "embedding_std": z_a.detach().std(dim=0).mean()}
    return loss, terms


def train_step(model, optimizer, x_a, x_b, cfg: Config, amp) -> dict[str, torch.Tensor]:
    """One optimisation step; returns the detached loss terms (on the device, not synchronised)."""
    loss, terms = step_loss(model, x_a, x_b, cfg, amp)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {k: v.detach() for k, v in terms.items()}


@dataclass
class Session:
    """What one training process holds: settings, data, model, optimizer and the run folder."""

    cfg: Config
    run_dir: Path
    images: np.ndarray
    per_epoch: int
    device: torch.device
    amp: torch.dtype | None
    model: VICReg
    optimizer: torch.optim.Optimizer
    metrics: MetricsLog | None  # None on ranks other than 0, which write nothing
    world: World

    def __post_init__(self):
        self.params = self.cfg.augment_params(CIFAR10_MEAN, CIFAR10_STD)
        self.step_fn = torch.compile(train_step) if self.cfg.compile else train_step
        self.replica = data_parallel(self.model, self.world, self.device)  # what the steps call


def train_epoch(s: Session, epoch: int, bar: tqdm) -> dict[str, float]:
    """One epoch of steps, logged every cfg.log_every steps; returns the epoch record."""
    s.model.train()
    log = EpochLog(s.cfg, s.metrics, s.run_dir, bar, epoch, s.per_epoch)
    for batch in epoch_batches(s.images, s.params, s.cfg.batch_size, s.cfg.seed, epoch,
                               workers=s.cfg.loader_workers(), shard=s.world.shard):
        lr = lr_at(epoch * s.per_epoch + batch.step, s.per_epoch, s.cfg)
        set_lr(s.optimizer, lr)
        terms = s.step_fn(s.replica, s.optimizer, to_channels_last(batch.view_a, s.device),
                          to_channels_last(batch.view_b, s.device), s.cfg, s.amp)
        log.add(batch.step, lr, terms)
    return log.close()


def start_session(cfg: Config, resume: bool, world: World,
                  device: torch.device) -> tuple[Session, int, float]:
    """Load data, build or restore model and optimizer: (session, first epoch, train time so far).

    Every process of a data-parallel job builds the same model (same seed) or reads the same
    checkpoint, so the run folder must be on a file system all machines see; rank 0 alone writes.
    """
    images = train_images(cfg)
    per_epoch = steps_per_epoch(len(images), cfg.batch_size)
    run_dir = Path(cfg.out)
    on_main(world, lambda: prepare_run_dir(cfg, resume, CHECKPOINT_FILE))
    model = build_model(cfg, device)
    if world.size > 1 and cfg.sync_bn:
        model = sync_batch_norm(model, device)
    optimizer = build_optimizer(model, cfg)
    metrics = MetricsLog(run_dir) if world.is_main else None
    start_epoch, train_time = 0, 0.0
    if resume:
        path = run_dir / CHECKPOINT_FILE
        state = load_checkpoint(path)
        load_model_state(model, state["model"], path,
                         f"{cfg.arch} width {cfg.width} expander {cfg.mlp}")
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, train_time = state["epoch"], state["train_time_s"]
        if world.is_main:
            metrics.truncate(state["metrics_bytes"])
            write_json(run_dir / CONFIG_FILE, asdict(cfg))
    return (Session(cfg, run_dir, images, per_epoch, device, autocast_dtype(cfg.precision, device),
                    model, optimizer, metrics, world), start_epoch, train_time)


def train(cfg: Config, resume: bool, world: World,
          device: torch.device) -> tuple[Session, dict[str, float], float]:
    """The epochs not yet done, a checkpoint after each: (session, last epoch record, time)."""
    s, start_epoch, train_time = start_session(cfg, resume, world, device)
    if world.is_main:
        split = f" over {world.size} processes" if world.size > 1 else ""
        print(f"torch_impl: {cfg.arch} width {cfg.width}, expander {cfg.mlp}, {len(s.images)} "
              f"images, {s.per_epoch} steps/epoch x {cfg.epochs} epochs, batch {cfg.batch_size}"
              f"{split}, {device.type} {'bf16' if s.amp else 'fp32'}, run folder {s.run_dir}",
              flush=True)
    record: dict[str, float] = {}
    with tqdm(total=cfg.epochs * s.per_epoch, initial=start_epoch * s.per_epoch, unit="step",
              dynamic_ncols=True, mininterval=1.0, file=sys.stderr,
              disable=not world.is_main) as bar:
        for epoch in range(start_epoch, cfg.epochs):
            record = train_epoch(s, epoch, bar)
            train_time += record["epoch_time_s"]
            if world.is_main:
                save_checkpoint(s.run_dir / CHECKPOINT_FILE, {
                    "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
                    "epoch": epoch + 1, "global_step": (epoch + 1) * s.per_epoch,
                    "train_time_s": train_time, "metrics_bytes": s.metrics.size(),
                    "config": asdict(cfg)})
    return s, record, train_time


def run(cfg: Config, resume: bool) -> dict:
    """Train (or resume) as `cfg` says, then probe; returns the summary written to summary.json.

    In a data-parallel job (torchrun) rank 0 alone writes the summary and runs the probe, after
    the process group is gone.
    """
    world = world_from_env()
    split_batch(cfg.batch_size, world.size)  # an uneven split fails before the processes meet
    with joined(world) as device:
        s, record, train_time = train(cfg, resume, world, device)
    summary = run_summary("torch", s.device.type, "bf16" if s.amp else "fp32", cfg, s.per_epoch,
                          len(s.images), train_time, record)
    if not world.is_main:
        return summary
    write_json(s.run_dir / SUMMARY_FILE, summary)
    print(f"trained {cfg.epochs} epochs in {train_time / 60:.1f} min", flush=True)
    if cfg.probe:
        from torch_impl.probe import probe_after_training
        summary["probe"] = probe_after_training(cfg, s.run_dir, s.model.backbone)
        write_json(s.run_dir / SUMMARY_FILE, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    return cli_main(lambda: run(*parse_train_args(argv, "torch")))


if __name__ == "__main__":
    sys.exit(main())

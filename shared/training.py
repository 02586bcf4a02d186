"""The framework-neutral parts of a training run: data, step logging, divergence, summary, CLI.

torch_impl.train and jax_impl.train differ only in how a step is computed; what they log, when
they stop, and what they write come from here, so their run folders have the same shape.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from shared.config import Config
from shared.data import load_split, stratified_subset
from shared.errors import UserError
from shared.runio import MetricsLog

TERMS = ("loss", "invariance", "variance", "covariance", "embedding_std")


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the last checkpoint is kept."""


def train_images(cfg: Config) -> np.ndarray:
    """CIFAR-10 train images uint8 [N, 32, 32, 3] (a stratified subset when cfg.subset > 0)."""
    images, labels = load_split("cifar10", cfg.data_dir, "train", download=cfg.download)
    if cfg.subset:
        images = images[stratified_subset(labels, cfg.subset, cfg.seed)]
    return np.ascontiguousarray(images)


def gtsrb_available(cfg: Config) -> bool:
    """Whether the end-of-training probe should include GTSRB."""
    return cfg.download or (Path(cfg.data_dir) / "gtsrb").is_dir()


def check_finite(window: list[tuple[int, int, dict]], run_dir: Path) -> dict[str, float]:
    """Bring a window of (epoch, step, terms) to the host; stop on the first non-finite loss."""
    rows = [(epoch, step, {k: float(v) for k, v in terms.items()}) for epoch, step, terms in window]
    for epoch, step, values in rows:
        if not np.isfinite(values["loss"]):
            raise TrainingDiverged(
                f"loss became {values['loss']} at epoch {epoch} step {step}; stopped. The last "
                f"good checkpoint stays in {run_dir} (try a lower --base-lr)")
    return {k: float(np.mean([v[k] for _, _, v in rows])) for k in TERMS}


class EpochLog:
    """Collects one epoch's step terms (device scalars, read back only every cfg.log_every steps,
    so the device is not synchronised each step) and writes metrics.jsonl lines and the bar.

    metrics is None in the processes of a data-parallel run other than the first: they check the
    loss (the same global loss everywhere, so all stop together) but write nothing.
    """

    def __init__(self, cfg: Config, metrics: MetricsLog | None, run_dir: Path, bar, epoch: int,
                 per_epoch: int):
        self.cfg, self.metrics, self.run_dir, self.bar = cfg, metrics, run_dir, bar
        self.epoch, self.per_epoch = epoch, per_epoch
        self.rows: list[dict[str, float]] = []
        self.window: list = []
        self.lr = 0.0
        self.t_epoch = self.t_window = time.perf_counter()

    def add(self, step: int, lr: float, terms: dict) -> None:
        """Record step `step` (0-based within the epoch) trained at `lr`."""
        self.window.append((self.epoch, step, terms))
        self.lr = lr
        self.bar.update(1)
        if len(self.window) == self.cfg.log_every or step == self.per_epoch - 1:
            means = check_finite(self.window, self.run_dir)
            pairs_per_s = len(self.window) * self.cfg.batch_size / (time.perf_counter() - self.t_window)
            self._write({"kind": "step", "epoch": self.epoch,
                         "step": self.epoch * self.per_epoch + step + 1, "lr": lr,
                         "pairs_per_s": pairs_per_s, "images_per_s": 2 * pairs_per_s, **means})
            self.rows += [means] * len(self.window)
            self.bar.set_postfix(epoch=self.epoch + 1, loss=f"{means['loss']:.3f}",
                                 img_s=f"{2 * pairs_per_s:.0f}")
            self.window, self.t_window = [], time.perf_counter()

    def close(self) -> dict:
        """Write and return the epoch record (mean terms, time, throughput)."""
        epoch_time = time.perf_counter() - self.t_epoch
        pairs_per_s = self.per_epoch * self.cfg.batch_size / epoch_time
        record = {"kind": "epoch", "epoch": self.epoch, "step": (self.epoch + 1) * self.per_epoch,
                  "lr": self.lr, "epoch_time_s": epoch_time, "pairs_per_s": pairs_per_s,
                  "images_per_s": 2 * pairs_per_s,
                  **{k: float(np.mean([r[k] for r in self.rows])) for k in TERMS}}
        self._write(record)
        return record

    def _write(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)


def run_summary(framework: str, device: str, precision: str, cfg: Config, per_epoch: int,
                num_images: int, train_time: float, last_epoch: dict) -> dict:
    """The summary.json of a finished run (before the probe results are added)."""
    steps = cfg.epochs * per_epoch
    return {"framework": framework, "device": device, "precision": precision,
            "epochs": cfg.epochs, "steps": steps, "train_images": num_images,
            "train_time_s": train_time,
            "pairs_per_s": steps * cfg.batch_size / max(train_time, 1e-9),
            "final": {k: last_epoch.get(k) for k in TERMS}}


def cli_main(body: Callable[[], object]) -> int:
    """Run a command's body; a UserError becomes `error: ...` on stderr and exit status 2."""
    try:
        body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

"""What a run logs while it trains: step windows and epochs as records, to metrics.jsonl and
TensorBoard (the sinks) and the progress bar, and the check that the loss stays finite.

The step terms stay on the device until a window of --log-every steps (or the epoch's last step)
is read back, so the device is not synchronised each step. Every process checks the loss (the same
global loss everywhere, so all stop together); only the main process has sinks.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shared.errors import UserError
from shared.records import TERMS, EpochRecord, MetricsLog, Record, StepRecord
from shared.tensorboard import EventLog


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the last checkpoint is kept."""


class Sinks:
    """Where a run's records go: metrics.jsonl and, with --tensorboard, TensorBoard on the main
    process; nowhere on the others (Sinks())."""

    def __init__(self, metrics: MetricsLog | None = None, events: EventLog | None = None):
        self.metrics, self.events = metrics, events

    def write(self, record: Record) -> None:
        if self.metrics is not None:
            self.metrics.write(record)
        if self.events is not None:
            self.events.write(record)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """TensorBoard scalars at `step` (with --tensorboard)."""
        if self.events is not None:
            self.events.scalars(step, values, prefix)

    def flush(self) -> None:
        if self.events is not None:
            self.events.flush()

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


def check_finite(window: list[tuple[int, int, dict]], run_dir: Path,
                 per_epoch: int) -> dict[str, float]:
    """Bring a window of (epoch, step in epoch, terms) to the host and return each term's mean;
    stop on the first non-finite loss, naming its step as the progress bar counts them (from 1)."""
    rows = [(epoch, step, {k: float(v) for k, v in terms.items()}) for epoch, step, terms in window]
    for epoch, step, values in rows:
        if not np.isfinite(values["loss"]):
            kept = (f"the checkpoint of epoch {epoch} stays in {run_dir}" if epoch else
                    "no checkpoint was written yet")
            raise TrainingDiverged(
                f"loss became {values['loss']} at step {epoch * per_epoch + step + 1} (epoch "
                f"{epoch + 1}); stopped, {kept} (try a lower --base-lr)")
    return {k: float(np.mean([v[k] for _, _, v in rows])) for k in TERMS}


class EpochLog:
    """One epoch's log: collects its step terms (device scalars), reads them back every
    `log_every` steps and at the epoch's last step, and writes a StepRecord for each window and
    an EpochRecord at the end to `sinks`, the bar following. Time spent on something other than
    training (a kNN point) is left out with `pause`."""

    def __init__(self, epoch: int, *, steps_per_epoch: int, batch_size: int, log_every: int,
                 run_dir: Path, sinks: Sinks, bar: tqdm, knn_top1: float | None = None):
        self.epoch, self.steps_per_epoch, self.batch_size = epoch, steps_per_epoch, batch_size
        self.log_every, self.run_dir, self.sinks, self.bar = log_every, run_dir, sinks, bar
        self.knn_top1 = knn_top1  # the monitor's last point, for the bar
        self.rows: list[dict[str, float]] = []
        self.window: list = []
        self.lr = 0.0
        self.t_epoch = self.t_window = time.perf_counter()

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (spent on something else than training) out of the epoch's time and
        rate."""
        self.t_epoch += seconds
        self.t_window += seconds

    def training_seconds(self) -> float:
        """The seconds this epoch has trained so far."""
        return time.perf_counter() - self.t_epoch

    def add(self, step: int, lr: float, terms: dict, last: bool) -> None:
        """Record step `step` (0-based within the epoch) trained at `lr`; `last`: the epoch's
        last step."""
        self.window.append((self.epoch, step, terms))
        self.lr = lr
        self.bar.update(1)
        if len(self.window) >= self.log_every or last:
            self._flush()

    def _flush(self) -> None:
        means = check_finite(self.window, self.run_dir, self.steps_per_epoch)
        pairs_per_s = len(self.window) * self.batch_size / (time.perf_counter() - self.t_window)
        step = self.epoch * self.steps_per_epoch + self.window[-1][1] + 1
        self.sinks.write(StepRecord(epoch=self.epoch, step=step, lr=self.lr,
                                    pairs_per_s=pairs_per_s, images_per_s=2 * pairs_per_s,
                                    **means))
        self.rows += [means] * len(self.window)
        shown = {} if self.knn_top1 is None else {"knn": f"{100 * self.knn_top1:.1f}%"}
        self.bar.set_postfix(epoch=self.epoch + 1, loss=f"{means['loss']:.3f}",
                             img_s=f"{2 * pairs_per_s:.0f}", **shown)
        self.window, self.t_window = [], time.perf_counter()

    def close(self) -> EpochRecord:
        """Write and return the epoch's record (mean terms, time, throughput)."""
        if self.window:
            self._flush()
        epoch_time = time.perf_counter() - self.t_epoch
        steps = len(self.rows)
        pairs_per_s = steps * self.batch_size / epoch_time
        record = EpochRecord(epoch=self.epoch, step=self.epoch * self.steps_per_epoch + steps,
                             lr=self.lr, epoch_time_s=epoch_time, pairs_per_s=pairs_per_s,
                             images_per_s=2 * pairs_per_s,
                             **{k: float(np.mean([r[k] for r in self.rows])) for k in TERMS})
        self.sinks.write(record)
        return record

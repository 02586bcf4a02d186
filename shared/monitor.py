"""The kNN monitor: how well the backbone classifies while it trains, at fixed points of a run.

At every --monitor-every epochs of steps (fractions allowed) and once at the end of training, the
frozen backbone (eval mode, no augmentation, the pretraining's normalisation) embeds a fixed
labelled bank, the first --monitor-bank training images of the run's dataset in dataset order
(whatever --subset is; STL-10's labelled training split), and the first --monitor-test test
images; each test image takes the label a weighted kNN gives it (lightly's benchmark protocol,
each framework's probe.knn_predict). A folder without train/ and test/ class folders has no labels,
and its run no monitor:

    s_j = <q / |q|, b_j / |b_j|>,   votes(c) = sum over the k largest s_j with label c of
    exp(s_j / T),   prediction = argmax_c votes(c),   knn_top1 = mean(prediction == label).

The loop (shared.loop) calls its Monitor after every step, so both frameworks measure alike; each
point is a KnnRecord in metrics.jsonl.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.backend import Backend, Features, KnnClassifier
from shared.config import Config
from shared.data import dataset_title, is_labelled, load_split, num_classes, unlabelled_reason
from shared.errors import UserError
from shared.records import KnnRecord


@dataclass(frozen=True)
class MonitorData:
    """The monitor's images: the bank uint8 [N, S, S, 3] with labels int [N], the test images
    [M, S, S, 3] with labels [M], how many classes the labels count, and the k neighbours that
    vote (--monitor-k, at most N)."""

    bank: np.ndarray
    bank_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    classes: int
    k: int


def monitor_data(cfg: Config) -> MonitorData | None:
    """The monitor's images for cfg (None when --monitor-every is 0, or the dataset has no
    labels): the first cfg.monitor_bank images of the dataset's labelled training split and the
    first cfg.monitor_test of its test split, each at most the whole split (a small dataset's
    monitor takes all of it, and at most as many neighbours as its bank holds)."""
    if not cfg.monitor_every or not is_labelled(cfg.dataset):
        return None
    try:
        splits = {split: load_split(cfg.dataset, cfg.data_dir, split, cfg.download,
                                    cfg.image_size, cfg.bad_images)
                  for split in ("train", "test")}
    except UserError as exc:
        raise UserError(f"the kNN monitor needs {dataset_title(cfg.dataset)}'s labelled images "
                        f"(--monitor-every 0 turns it off): {exc}") from None
    (images, labels), (test_images, test_labels) = splits["train"], splits["test"]
    bank = min(cfg.monitor_bank, len(images))
    return MonitorData(images[:bank], labels[:bank], test_images[:cfg.monitor_test],
                       test_labels[:cfg.monitor_test], num_classes(cfg.dataset),
                       min(cfg.monitor_k, bank))


def monitor_note(cfg: Config, data: MonitorData | None) -> str:
    """What a run says of its monitor before it trains: that it is off for a dataset without
    labels, or that its test images lack some classes (a test split stored sorted by class, as
    the JPEG copy of CIFAR-10 is, starts with one class only); "" otherwise."""
    if data is None:
        return ("" if not cfg.monitor_every else
                f"note: no kNN monitor: {cfg.dataset}: {unlabelled_reason(cfg.dataset)}")
    notes = []
    title = dataset_title(cfg.dataset)
    for flag, wanted, held, split in (("--monitor-bank", cfg.monitor_bank, len(data.bank),
                                       "training"),
                                      ("--monitor-test", cfg.monitor_test, len(data.test), "test")):
        if wanted > held:
            notes.append(f"it takes all {held} {title} {split} images ({flag} {wanted} asks for "
                         "more)")
    if data.k < cfg.monitor_k:
        notes.append(f"{data.k} neighbours vote (--monitor-k {cfg.monitor_k} is more than its "
                     "bank holds)")
    held = len(np.unique(data.test_labels))
    if held < data.classes:
        ordered = " (this test split is ordered by class)" if np.all(
            np.diff(data.test_labels) >= 0) else ""
        notes.append(f"its {len(data.test_labels)} test images hold {held} of {data.classes} "
                     f"classes{ordered}; a larger --monitor-test takes more of them")
    return "note: the kNN monitor: " + "; ".join(notes) if notes else ""


def is_point(step: int, total: int, every_steps: float) -> bool:
    """Whether the monitor measures once `step` steps are trained: a multiple of every_steps
    lies in (step - 1, step], or the run ends there."""
    return step == total or math.floor(step / every_steps) > math.floor((step - 1) / every_steps)


def knn_top1(features: Features, knn_predict: KnnClassifier, data: MonitorData,
             cfg: Config) -> float:
    """The fraction of the monitor's test images the kNN classifies right: both sets embedded by
    `features`, classified by `knn_predict`."""
    bank = features(data.bank, "kNN bank features")
    test = features(data.test, "kNN test features")
    predicted = knn_predict(bank, data.bank_labels, test, data.classes, data.k,
                            cfg.monitor_temperature)
    return float(np.mean(predicted == data.test_labels))


@dataclass(frozen=True)
class Monitor:
    """The kNN monitor of one training run: its images, a point every `every_steps` steps of
    `steps_per_epoch` (and at the end), timed on `clock` (a time budget counts the points)."""

    data: MonitorData
    cfg: Config
    steps_per_epoch: int
    clock: Callable[[], float]

    @property
    def every_steps(self) -> float:
        """The steps between two points."""
        return self.cfg.monitor_every * self.steps_per_epoch

    def due(self, step: int, total: int) -> bool:
        """Whether a point falls once `step` of the run's `total` steps are trained."""
        return is_point(step, total, self.every_steps)

    def measure(self, backend: Backend, state: Any) -> tuple[float, float]:
        """The top-1 for the backbone of `state`, and the seconds it took."""
        started = self.clock()
        top1 = knn_top1(backend.features(state), backend.knn_predict, self.data, self.cfg)
        return top1, self.clock() - started

    def point(self, backend: Backend, state: Any, step: int, epoch: int,
              train_time_s: float) -> KnnRecord:
        """The point once `step` steps are trained (in 0-based `epoch`), `train_time_s` training
        seconds into the run."""
        top1, seconds = self.measure(backend, state)
        return KnnRecord(epoch=epoch, step=step, epochs=step / self.steps_per_epoch,
                         knn_top1=top1, train_time_s=train_time_s, seconds=seconds)

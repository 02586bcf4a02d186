"""The kNN monitor: how well the backbone classifies while it trains, at fixed points of a run.

At every --monitor-every epochs of steps (fractions allowed) and once at the end of training, the
frozen backbone (eval mode, no augmentation, the pretraining's normalisation) embeds a fixed
labelled bank, the first --monitor-bank CIFAR-10 training images in dataset order (whatever
--subset is), and the first --monitor-test test images; each test image takes the label a weighted
kNN gives it (lightly's benchmark protocol, each framework's probe.knn_predict):

    s_j = <q / |q|, b_j / |b_j|>,   votes(c) = sum over the k largest s_j with label c of
    exp(s_j / T),   prediction = argmax_c votes(c),   knn_top1 = mean(prediction == label).

The loop (shared.loop) calls it, so both frameworks measure alike; each point is a "knn" record in
metrics.jsonl.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared.config import Config
from shared.data import NUM_CLASSES, load_split
from shared.errors import UserError
from shared.linear_probe import Features, KnnClassifier


@dataclass(frozen=True)
class MonitorData:
    """The monitor's images: the bank uint8 [N, 32, 32, 3] with labels int [N], and the test
    images [M, 32, 32, 3] with labels [M]."""

    bank: np.ndarray
    bank_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray


def monitor_data(cfg: Config, train: tuple[np.ndarray, np.ndarray]) -> MonitorData | None:
    """The monitor's images for cfg (None when --monitor-every is 0): the first
    cfg.monitor_bank of the whole training split `train` (images, labels) and the first
    cfg.monitor_test test images. More than a split holds is a UserError."""
    if not cfg.monitor_every:
        return None
    images, labels = train
    try:
        test_images, test_labels = load_split("cifar10", cfg.data_dir, "test",
                                              download=cfg.download)
    except UserError as exc:
        raise UserError("the kNN monitor needs CIFAR-10's test images (--monitor-every 0 turns "
                        f"it off): {exc}") from None
    for flag, wanted, held, split in (("--monitor-bank", cfg.monitor_bank, len(images), "training"),
                                      ("--monitor-test", cfg.monitor_test, len(test_images),
                                       "test")):
        if wanted > held:
            raise UserError(f"{flag} {wanted} is larger than the {held} CIFAR-10 {split} images; "
                            "use at most that many")
    return MonitorData(images[:cfg.monitor_bank], labels[:cfg.monitor_bank],
                       test_images[:cfg.monitor_test], test_labels[:cfg.monitor_test])


def missing_classes_note(data: MonitorData) -> str:
    """A warning when the monitor's test images lack some classes (a test split stored sorted by
    class, as the JPEG copy of CIFAR-10 is, starts with one class only): "" when all are there."""
    held = len(np.unique(data.test_labels))
    if held == NUM_CLASSES["cifar10"]:
        return ""
    return (f"note: the kNN monitor's {len(data.test_labels)} test images hold {held} of "
            f"{NUM_CLASSES['cifar10']} classes (this test split is ordered by class); a larger "
            "--monitor-test takes more of them")


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
    predicted = knn_predict(bank, data.bank_labels, test, NUM_CLASSES["cifar10"], cfg.monitor_k,
                            cfg.monitor_temperature)
    return float(np.mean(predicted == data.test_labels))

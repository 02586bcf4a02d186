"""The framework-neutral half of the linear-probe protocol, so both probes train on the same thing.

Protocol: features of the frozen backbone (eval-mode BN) for un-augmented, normalised train and
test images, extracted once; features standardised with the train split's mean and std; a linear
classifier trained with SGD (momentum 0.9, cosine learning rate per step) on shuffled mini-batches;
top-1 on the test split.
"""
from __future__ import annotations

import math

import numpy as np

from shared.augment import normalize, to_float01

PROTOCOL = "frozen backbone (eval BN), un-augmented 32x32 images normalised as in pretraining, " \
           "features standardised on train, linear classifier, SGD momentum 0.9, cosine lr"


def normalize_images(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, H, W, 3]: (x / 255 - mean) / std, channel-wise."""
    return normalize(to_float01(images), mean, std)


def standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, F] float32: x' = (x - mean_train) / (std_train + 1e-6), for both splits."""
    mean = train.mean(axis=0, dtype=np.float64)
    std = train.std(axis=0, dtype=np.float64) + 1e-6
    return (((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32))


def probe_lr(step: int, total_steps: int, peak: float) -> float:
    """lr_t = peak * (1 + cos(pi * t / T)) / 2."""
    return peak * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def probe_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Mini-batch indices of one probe epoch (shuffled by (seed, epoch); last partial kept)."""
    order = np.random.default_rng([seed, epoch, 0xB0B]).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose arg-max equals the label; logits [N, C], labels int [N]."""
    return float((np.argmax(logits, axis=1) == labels).mean())


def per_class_accuracy(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float | None]:
    """Top-1 within each class (None for a class absent from the test split)."""
    hits = np.argmax(logits, axis=1) == labels
    return [float(hits[labels == c].mean()) if np.any(labels == c) else None
            for c in range(num_classes)]

"""The framework-neutral half of the linear-probe protocol, so both probes train on the same thing.

Protocol: features of the frozen backbone (eval-mode BN) for un-augmented, normalised train and
test images, extracted once; features standardised with the train split's mean and std; a linear
classifier trained with SGD (momentum 0.9, cosine learning rate per step) on shuffled mini-batches;
top-1 on the test split.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from shared.augment import normalize, to_float01
from shared.data import NUM_CLASSES
from shared.runio import probe_result_path, write_json

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


def probe_record(framework: str, dataset: str, logits: np.ndarray, num_train: int,
                 test_labels: np.ndarray, feature_dim: int, cfg, random_init: bool,
                 checkpoint_epoch: int | None, time_s: float) -> dict:
    """The probe_<dataset>.json content: top-1 (fraction), per-class top-1, counts, settings."""
    num_classes = NUM_CLASSES[dataset]
    return {
        "framework": framework, "dataset": dataset, "top1": top1(logits, test_labels),
        "per_class_top1": per_class_accuracy(logits, test_labels, num_classes),
        "num_train": int(num_train), "num_test": int(len(test_labels)),
        "num_classes": num_classes, "feature_dim": int(feature_dim),
        "random_init": random_init, "checkpoint_epoch": checkpoint_epoch, "protocol": PROTOCOL,
        "settings": {"arch": cfg.arch, "width": cfg.width, "epochs": cfg.probe_epochs,
                     "lr": cfg.probe_lr, "wd": cfg.probe_wd, "batch_size": cfg.probe_batch_size,
                     "seed": cfg.seed, "normalisation": "CIFAR-10 mean/std (as in pretraining)"},
        "time_s": time_s,
    }


def report_probe(result: dict, run_dir: Path, cfg) -> None:
    """Write probe_<dataset>[_random_init].json and print the one-line result."""
    write_json(probe_result_path(run_dir, result["dataset"], result["random_init"]), result)
    label = f"{result['dataset']} linear probe{' (random init)' if result['random_init'] else ''}"
    print(f"{label}: top-1 {100 * result['top1']:.2f}% ({result['num_train']} train / "
          f"{result['num_test']} test images, {cfg.arch} width {cfg.width})", flush=True)

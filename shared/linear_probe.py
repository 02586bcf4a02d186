"""The framework-neutral half of the probes, so both frameworks' probes measure the same thing.

Both protocols start from features of the frozen backbone (eval-mode BN) for un-augmented,
normalised train and test images, extracted once, and report top-1 on the test split:
  - linear (LINEAR): features standardised with the train split's mean and std; a linear
    classifier trained with SGD (momentum 0.9, cosine learning rate per step) on shuffled
    mini-batches;
  - knn (KNN): each test image takes the label a weighted kNN among the train images gives it.

Each framework's probe module supplies the feature extractor and the classifiers (a linear
trainer, the weighted kNN); everything else (which images, the checks, the result file, the command
line) is here.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.augment_ops import normalize, to_float01
from shared.backend import Features, KnnClassifier, LinearTrainer
from shared.cli import cli_main, parse_probe_args
from shared.config import Config
from shared.data import (
    dataset_key,
    load_split,
    num_classes,
    probe_datasets,
    stratified_subset,
    unlabelled_reason,
)
from shared.errors import Interrupted, UserError, check_interrupted
from shared.runio import (
    SUMMARY_FILE,
    probe_result_path,
    read_json,
    refuse_stale_checkpoint,
    run_folder_lock,
    tool_command,
    write_json,
)

# Salt of the probe's shuffling stream, so that it never coincides with the pretraining loader's
# streams drawn from the same seed (shared.loader).
_SHUFFLE_SALT = 0xB0B


def check_knn(k: int, temperature: float, bank_size: int) -> None:
    """UserError unless a weighted kNN with k neighbours and temperature T can run on a bank of
    `bank_size` images (1 <= k <= bank_size, T > 0)."""
    if not 1 <= k <= bank_size:
        raise UserError(f"a kNN with k = {k} needs a bank of at least {max(k, 1)} images and k "
                        f"of at least 1; the bank holds {bank_size}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise UserError(f"the kNN temperature must be a positive number, got {temperature}")


@dataclass(frozen=True)
class Classifiers:
    """A framework's classifiers on features: the linear probe's trainer and the weighted kNN
    (None where a probe does not use it)."""

    train_linear: LinearTrainer | None
    knn_predict: KnnClassifier | None


def _linear_predict(classifiers: Classifiers, f_train: np.ndarray, y_train: np.ndarray,
                    f_test: np.ndarray, classes: int, cfg: Config, dataset: str) -> np.ndarray:
    """Labels int64 [M] of the linear classifier trained on f_train; UserError if it diverged."""
    logits = classifiers.train_linear(f_train, y_train, f_test, classes, cfg)
    if not np.isfinite(logits).all():
        raise UserError(f"the {dataset} linear probe diverged (non-finite outputs) with "
                        f"--probe-lr {cfg.probe_lr}; try a lower one. Nothing was written")
    return np.argmax(logits, axis=1)


def _knn_predict(classifiers: Classifiers, f_train: np.ndarray, y_train: np.ndarray,
                 f_test: np.ndarray, classes: int, cfg: Config, dataset: str) -> np.ndarray:
    """Labels int64 [M] of the weighted kNN with f_train as the bank."""
    return classifiers.knn_predict(f_train, y_train, f_test, classes, cfg.monitor_k,
                                   cfg.monitor_temperature)


@dataclass(frozen=True)
class ProbeProtocol:
    """How a probe classifies the frozen features: its name (--protocol, and the result file's
    suffix after the linear one's), what the result file says of it, its settings, the check of
    those settings against the training split's size, and the prediction; `in_summary`: its
    top-1 is the run's summary.json probe result."""

    name: str
    label: str
    description: str
    settings: Callable[[Config], dict]
    check: Callable[[Config, int], None]
    predict: Callable[..., np.ndarray]
    in_summary: bool


LINEAR = ProbeProtocol(
    "linear", "linear probe",
    "frozen backbone (eval BN), un-augmented images at the run's size normalised as in "
    "pretraining, features standardised on train, linear classifier, SGD momentum 0.9, cosine lr",
    lambda cfg: {"epochs": cfg.probe_epochs, "lr": cfg.probe_lr, "wd": cfg.probe_wd,
                 "batch_size": cfg.probe_batch_size},
    lambda cfg, bank_size: None, _linear_predict, in_summary=True)
KNN = ProbeProtocol(
    "knn", "kNN probe",
    "frozen backbone (eval BN), un-augmented images at the run's size normalised as in "
    "pretraining, weighted kNN: cosine similarity of L2-normalised features, the k most similar "
    "bank images vote exp(similarity / T) for their label",
    lambda cfg: {"k": cfg.monitor_k, "temperature": cfg.monitor_temperature},
    lambda cfg, bank_size: check_knn(cfg.monitor_k, cfg.monitor_temperature, bank_size),
    _knn_predict, in_summary=False)
PROTOCOLS = {protocol.name: protocol for protocol in (LINEAR, KNN)}


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
    order = np.random.default_rng([seed, epoch, _SHUFFLE_SALT]).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose arg-max equals the label; logits [N, C], labels int [N]."""
    return accuracy(np.argmax(logits, axis=1), labels)


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predicted labels int [N] that equal the labels int [N]."""
    return float((predicted == labels).mean())


def per_class_accuracy(predicted: np.ndarray, labels: np.ndarray,
                       num_classes: int) -> list[float | None]:
    """Top-1 within each class (None for a class absent from the test split)."""
    hits = predicted == labels
    return [float(hits[labels == c].mean()) if np.any(labels == c) else None
            for c in range(num_classes)]


def probe_record(*, framework: str, dataset: str, classes: int, protocol: ProbeProtocol,
                 predicted: np.ndarray, num_train: int, test_labels: np.ndarray,
                 feature_dim: int, cfg: Config,
                 random_init: bool, checkpoint_epoch: float | None, time_s: float) -> dict:
    """The probe_<dataset>[_knn].json content: top-1 (fraction), per-class top-1, counts, the
    protocol and its settings; "dataset" is dataset_key(dataset), "source" the whole name, and
    `classes` how many classes it has."""
    return {
        "framework": framework, "dataset": dataset_key(dataset), "source": dataset,
        "top1": accuracy(predicted, test_labels),
        "per_class_top1": per_class_accuracy(predicted, test_labels, classes),
        "num_train": int(num_train), "num_test": int(len(test_labels)),
        "num_classes": classes, "feature_dim": int(feature_dim),
        "random_init": random_init, "checkpoint_epoch": checkpoint_epoch,
        "protocol": protocol.description,
        "settings": {"arch": cfg.arch, "width": cfg.width, "last_width": cfg.last_width,
                     "image_size": cfg.image_size,
                     **protocol.settings(cfg),
                     "subset": cfg.probe_subset, "seed": cfg.seed,
                     "normalisation": "CIFAR-10 mean/std (as in pretraining)"},
        "time_s": time_s,
    }


def report_probe(result: dict, run_dir: Path, cfg: Config, protocol: ProbeProtocol) -> None:
    """Write probe_<dataset>[_random_init][_knn][_<framework>].json and print the one-line
    result."""
    write_json(probe_result_path(run_dir, result["dataset"], result["random_init"],
                                 result["framework"], protocol.name), result)
    baseline = " (random init)" if result["random_init"] else ""
    label = f"{result['dataset']} {protocol.label}{baseline}"
    print(f"{label}: top-1 {100 * result['top1']:.2f}% ({result['num_train']} train / "
          f"{result['num_test']} test images, {cfg.backbone_description()})", flush=True)


def probe_split(cfg: Config, dataset: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's images and labels, or a stratified subset of cfg.probe_subset of them."""
    images, labels = load_split(dataset, cfg.data_dir, split, cfg.download, cfg.image_size,
                                cfg.bad_images)
    if cfg.probe_subset and cfg.probe_subset < len(labels):
        index = stratified_subset(labels, cfg.probe_subset, cfg.seed)
        images, labels = images[index], labels[index]
    return images, labels


def probe(cfg: Config, run_dir: Path, dataset: str, *, framework: str, features: Features,
          classifiers: Classifiers, random_init: bool, checkpoint_epoch: float | None,
          protocol: ProbeProtocol = LINEAR) -> dict:
    """Run `protocol` on `dataset` with the backbone's `features` and the framework's
    `classifiers`, write its result file (see report_probe) and return it.

    A classifier that fails (a linear one that diverges, say from a too large --probe-lr) is a
    UserError, and nothing is written: a probe never replaces a result with a broken one.
    """
    started = time.perf_counter()
    x_train, y_train = probe_split(cfg, dataset, "train")
    x_test, y_test = probe_split(cfg, dataset, "test")
    protocol.check(cfg, len(x_train))
    f_train = features(x_train, f"{dataset} train features")
    check_interrupted()
    f_test = features(x_test, f"{dataset} test features")
    check_interrupted()
    classes = num_classes(dataset)
    predicted = protocol.predict(classifiers, f_train, y_train, f_test, classes, cfg, dataset)
    check_interrupted()
    result = probe_record(framework=framework, dataset=dataset, classes=classes, protocol=protocol,
                          predicted=predicted, num_train=len(y_train), test_labels=y_test,
                          feature_dim=f_train.shape[1], cfg=cfg, random_init=random_init,
                          checkpoint_epoch=checkpoint_epoch, time_s=time.perf_counter() - started)
    report_probe(result, run_dir, cfg, protocol)
    return result


def probe_after_training(cfg: Config, run_dir: Path, *, framework: str, features: Features,
                         train_linear: LinearTrainer, checkpoint_epoch: float) -> dict:
    """The linear probes that end a training run of `checkpoint_epoch` epochs, {dataset key:
    top-1}: the run's dataset when it has labels, and GTSRB when its data is there
    (shared.data.probe_datasets)."""
    datasets = probe_datasets(cfg.dataset, cfg.data_dir, cfg.download)
    if "gtsrb" not in datasets and cfg.dataset != "gtsrb":
        print(f"GTSRB probe skipped: no {Path(cfg.data_dir) / 'gtsrb'} (pass --download)")
    if cfg.dataset not in datasets:
        print(f"{cfg.dataset} probe skipped: {unlabelled_reason(cfg.dataset)}")
    classifiers = Classifiers(train_linear, None)
    return {dataset_key(dataset): probe(cfg, run_dir, dataset, framework=framework,
                                        features=features, classifiers=classifiers,
                                        random_init=False,
                                        checkpoint_epoch=checkpoint_epoch)["top1"]
            for dataset in datasets}


def update_summary(run_dir: Path, result: dict) -> None:
    """Put a probe of the trained backbone into summary.json's probe results, when the run has a
    summary and was trained by the probe's framework, so the two never disagree."""
    path = Path(run_dir) / SUMMARY_FILE
    summary = read_json(path)
    if not isinstance(summary, dict) or summary.get("framework") != result["framework"]:
        return
    summary["probe"] = {**summary.get("probe", {}), result["dataset"]: result["top1"]}
    write_json(path, summary)


def probe_main(argv: list[str] | None, framework: str,
               load: Callable[[Config, Path, bool], tuple[Features, float | None]],
               train_linear: LinearTrainer, knn_predict: KnnClassifier) -> int:
    """`python -m {framework}_impl.probe`: parse, lock the run folder, load the backbone
    (load(cfg, run_dir, random_init) -> (features, checkpoint epoch)) and probe with the
    --protocol asked for."""

    def body():
        cfg, args = parse_probe_args(argv, framework)
        run_dir = Path(args.run)
        protocol = PROTOCOLS[args.protocol]
        with run_folder_lock(run_dir, tool_command(framework, "probe")):
            try:
                if not args.random_init:
                    refuse_stale_checkpoint(run_dir, framework)
                features, epoch = load(cfg, run_dir, args.random_init)
                result = probe(cfg, run_dir, args.dataset, framework=framework,
                               features=features,
                               classifiers=Classifiers(train_linear, knn_predict),
                               random_init=args.random_init, checkpoint_epoch=epoch,
                               protocol=protocol)
            except KeyboardInterrupt:
                raise Interrupted("the probe stopped; nothing was written") from None
            if not args.random_init and protocol.in_summary:
                update_summary(run_dir, result)

    return cli_main(body)

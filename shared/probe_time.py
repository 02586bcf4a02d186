"""--budget-scope job: how long the linear probes that end a run will take, projected before it
trains, so that the time budget keeps it for them (shared.budget).

Every part of the probes' time is measured on this machine, with the run's own backbone and
classifier, and scaled by how much of it the probes will do:

    T_probes = T_load + (sum over datasets of N_train + N_test) * t_image
               + (sum over datasets of probe_epochs * ceil(N_train / B)) * t_step

T_load is the time their splits take to load (they are loaded here, as the probes will load them;
the first load of a dataset also decodes it into vicreg_cache/, so the projection errs long),
t_image the seconds an image takes to embed (timed on SAMPLE_IMAGES of them after a warm-up
batch), t_step the seconds one step of the linear classifier takes (timed over at least
SAMPLE_STEPS steps on random features of the backbone's width, after a warm-up epoch), B
--probe-batch-size.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from shared.backend import Features, LinearTrainer
from shared.budget import Clock
from shared.config import Config
from shared.data import num_classes, probe_datasets
from shared.linear_probe import probe_split

# Images embedded, after a warm-up batch of WARMUP_IMAGES, to time t_image; classifier steps
# timed for t_step.
SAMPLE_IMAGES, WARMUP_IMAGES, SAMPLE_STEPS = 2_000, 500, 48


def classifier_steps(cfg: Config, train: int) -> int:
    """Steps of the linear classifier on `train` images: probe_epochs * ceil(train / B)."""
    return cfg.probe_epochs * math.ceil(train / cfg.probe_batch_size)


def time_per_image(features: Features, images: np.ndarray, clock: Clock) -> tuple[float, int]:
    """Seconds `features` takes per image of uint8 [N, S, S, 3] `images` (the first
    SAMPLE_IMAGES, after WARMUP_IMAGES that warm up and compile), and the features' width."""
    width = features(images[:WARMUP_IMAGES], "timing the probes: warm-up").shape[1]
    sample = images[:SAMPLE_IMAGES]
    start = clock()
    features(sample, "timing the probes: features")
    return (clock() - start) / len(sample), width


def time_per_step(train_linear: LinearTrainer, cfg: Config, width: int, classes: int,
                  clock: Clock) -> float:
    """Seconds one step of `train_linear` takes on float32 features [N, width] of `classes`
    classes, timed over at least SAMPLE_STEPS steps after a warm-up epoch."""
    rng = np.random.default_rng(0)
    n = min(SAMPLE_IMAGES, SAMPLE_STEPS * cfg.probe_batch_size)
    x = rng.normal(size=(n, width)).astype(np.float32)
    y = np.arange(n) % classes
    train_linear(x, y, x[:1], classes, dataclasses.replace(cfg, probe_epochs=1))
    timed = dataclasses.replace(cfg, probe_epochs=math.ceil(
        SAMPLE_STEPS / math.ceil(n / cfg.probe_batch_size)))
    start = clock()
    train_linear(x, y, x[:1], classes, timed)
    return (clock() - start) / classifier_steps(timed, n)


def projected_probe_seconds(cfg: Config, features: Features, train_linear: LinearTrainer,
                            clock: Clock) -> float:
    """Seconds the linear probes after training (shared.linear_probe.probe_after_training) will
    take with these `features` and `train_linear`: T_probes above, 0.0 with no probe to run."""
    start, first = clock(), None
    images = steps = classes = 0
    for dataset in probe_datasets(cfg.dataset, cfg.data_dir, cfg.download):
        train_images, _ = probe_split(cfg, dataset, "train")
        images += len(train_images) + len(probe_split(cfg, dataset, "test")[1])
        steps += classifier_steps(cfg, len(train_images))
        classes = max(classes, num_classes(dataset))
        first = train_images if first is None else first
    load_s = clock() - start
    if first is None:
        return 0.0
    image_s, width = time_per_image(features, first, clock)
    step_s = time_per_step(train_linear, cfg, width, classes, clock)
    total = load_s + images * image_s + steps * step_s
    print(f"the probes' time, projected: {total:.3g} s (loading {load_s:.3g} s, {images} images "
          f"at {1e3 * image_s:.3g} s per 1,000, {steps} classifier steps at "
          f"{1e3 * step_s:.3g} ms)", flush=True)
    return total

"""Group 8, a plumbing test: both trainers hand their steps byte-identical batches for the same
(seed, epoch, step).

Each backend runs shared.loop's fit as in training, from a checkpoint at epoch 1 to the end of
epoch 2, with its compiled step replaced by a recorder of what it is handed (the steps themselves
are compared in test_training.py). The reference, shared.loader.batch_at, runs the same loader
code, so this checks the way from the loader to each framework's step (threads, order, layout,
dtype), not the augmentation itself (tests/test_augment.py checks that against torchvision).
"""
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax_impl.backend import Backend as JaxBackend
from shared.augment import view_params
from shared.backend import World
from shared.config import make_config
from shared.data import CIFAR10_MEAN, CIFAR10_STD
from shared.epoch_log import Sinks
from shared.loader import batch_at
from shared.loop import Trainer, fit
from shared.records import TERMS, MetricsLog
from shared.run_folder import Progress
from shared.schedule import Plan
from torch_impl.backend import Backend as TorchBackend


def pixels(n: int = 48) -> np.ndarray:
    return np.random.default_rng(51).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def torch_recorder(seen: list):
    """A step that records the (view_a, view_b) tensors it is handed, as NHWC numpy."""
    def step(state, x_a, x_b, lr):
        seen.append(tuple(x.permute(0, 2, 3, 1).contiguous().numpy().copy() for x in (x_a, x_b)))
        return state, {key: torch.tensor(1.0) for key in TERMS}
    return step


def jax_recorder(seen: list):
    def step(state, x_a, x_b, lr):
        seen.append((np.array(x_a), np.array(x_b)))
        return state, {key: jnp.asarray(1.0) for key in TERMS}
    return step


BACKENDS = {"torch": (TorchBackend, torch.device("cpu"), torch_recorder),
            "jax": (JaxBackend, jax.devices()[0], jax_recorder)}


def consumed(framework, cfg, images, run_dir, epoch) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (view_a, view_b) arrays the framework's backend hands its step in epoch `epoch`."""
    backend_class, device, recorder = BACKENDS[framework]
    run_dir.mkdir()
    cfg = dataclasses.replace(cfg, out=str(run_dir))
    augment = view_params(cfg, CIFAR10_MEAN, CIFAR10_STD)
    backend = backend_class(cfg, World(), images, augment, device)
    seen = []
    backend.step_fn = recorder(seen)
    trainer = Trainer(cfg, framework, backend, World(), images, augment, None,
                      Sinks(MetricsLog(run_dir)), time.perf_counter, time.perf_counter())
    per_epoch = trainer.steps_per_epoch
    fit(trainer, backend.initial_state(), Progress(epoch=epoch), Plan(epoch + 1, per_epoch),
        None)
    return seen


@pytest.mark.parametrize("workers", [1, 3])
def test_trainers_consume_byte_identical_batches(workers, tmp_path, parity):
    cfg = make_config({"preset": "smoke", "batch_size": 16, "workers": workers, "seed": 5,
                       "epochs": 2})  # epoch 1 is the run's second
    images = pixels()
    epoch = 1
    torch_batches = consumed("torch", cfg, images, tmp_path / "torch", epoch)
    jax_batches = consumed("jax", cfg, images, tmp_path / "jax", epoch)
    params = view_params(cfg, CIFAR10_MEAN, CIFAR10_STD)
    assert len(torch_batches) == len(jax_batches) == 3
    for step, (from_torch, from_jax) in enumerate(zip(torch_batches, jax_batches)):
        reference = batch_at(images, params, cfg.batch_size, cfg.seed, epoch, step)
        for view, t_view, j_view, r_view in zip("ab", from_torch, from_jax,
                                                (reference.view_a, reference.view_b)):
            assert t_view.dtype == j_view.dtype == np.float32
            name = f"step {step} view {view}"
            assert t_view.tobytes() == j_view.tobytes() == r_view.tobytes(), (
                f"{name}: the batches differ (largest difference torch - jax "
                f"{np.abs(t_view - j_view).max():.3g})")
            parity.record("loader", name, 0.0)

"""Group 8: both trainers consume byte-identical batches for the same (seed, epoch, step).

Each trainer's epoch loop runs as in training, with its step replaced by a recorder of what it is
handed (the steps themselves are compared in test_training.py).
"""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tqdm import tqdm

from jax_impl import train as jax_train
from jax_impl.distributed import data_mesh
from jax_impl.model import build_model
from jax_impl.optim import build_optimizer as jax_build_optimizer
from jax_impl.runtime import pick_device
from shared.config import make_config
from shared.data import CIFAR10_MEAN, CIFAR10_STD
from shared.loader import batch_at
from shared.runio import MetricsLog
from shared.training import TERMS, World
from torch_impl import train as torch_train


def pixels(n: int = 48) -> np.ndarray:
    return np.random.default_rng(51).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def torch_consumed(cfg, images, run_dir, epoch) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (view_a, view_b) tensors torch_impl.train's epoch loop hands its step, as NHWC numpy."""
    device = torch.device("cpu")
    run_dir.mkdir()
    cfg = dataclasses.replace(cfg, out=str(run_dir))
    session = torch_train.Session(cfg, images, device, None, World(), MetricsLog(run_dir))
    seen = []

    def recording_step(state, x_a, x_b, lr):
        seen.append(tuple(x.permute(0, 2, 3, 1).contiguous().numpy().copy() for x in (x_a, x_b)))
        return state, {key: torch.tensor(1.0) for key in TERMS}

    session.step_fn = recording_step
    with tqdm(disable=True) as bar:
        torch_train.train_epoch(session, torch_train.initial_state(cfg, device, World()), epoch,
                                bar)
    return seen


def jax_consumed(cfg, images, run_dir, epoch) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (view_a, view_b) arrays jax_impl.train's epoch loop hands its jitted step."""
    run_dir.mkdir()
    cfg = dataclasses.replace(cfg, out=str(run_dir))
    model = build_model(cfg.arch, cfg.width, cfg.mlp_dims())
    optimizer = jax_build_optimizer(cfg)
    session = jax_train.Session(cfg, images, pick_device(), None, World(), MetricsLog(run_dir),
                                model, optimizer, data_mesh())
    seen = []

    def recording_step(state, x_a, x_b, lr):
        seen.append((np.array(x_a), np.array(x_b)))
        return state, {key: jnp.asarray(1.0) for key in TERMS}

    session.step_fn = recording_step
    state = jax_train.initial_state(model, optimizer, cfg)
    with tqdm(disable=True) as bar:
        jax_train.train_epoch(session, state, epoch, bar)
    return seen


@pytest.mark.parametrize("workers", [1, 3])
def test_trainers_consume_byte_identical_batches(workers, tmp_path, parity):
    cfg = make_config({"preset": "smoke", "batch_size": 16, "workers": workers, "seed": 5,
                       "epochs": 2})  # epoch 1 is the run's second
    images = pixels()
    epoch = 1
    torch_batches = torch_consumed(cfg, images, tmp_path / "torch", epoch)
    jax_batches = jax_consumed(cfg, images, tmp_path / "jax", epoch)
    params = cfg.augment_params(CIFAR10_MEAN, CIFAR10_STD)
    assert len(torch_batches) == len(jax_batches) == 3
    for step, (from_torch, from_jax) in enumerate(zip(torch_batches, jax_batches)):
        # The independent reference: the batch recomputed alone from (seed, epoch, step).
        reference = batch_at(images, params, cfg.batch_size, cfg.seed, epoch, step)
        for view, t_view, j_view, r_view in zip("ab", from_torch, from_jax,
                                                (reference.view_a, reference.view_b)):
            assert t_view.dtype == j_view.dtype == np.float32
            name = f"step {step} view {view}"
            assert t_view.tobytes() == j_view.tobytes() == r_view.tobytes(), (
                f"{name}: the batches differ (largest difference torch - jax "
                f"{np.abs(t_view - j_view).max():.3g})")
            parity.record("loader", name, 0.0)

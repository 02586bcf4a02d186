"""torch_impl's side of the training loop (shared.backend.Backend): the state, the step, the
checkpoint, the device and the backbone's features, in PyTorch.

The twin of jax_impl.backend: the same class name, methods and signatures (tests/test_twins.py
checks them against shared.backend.Backend).
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from shared.augment import AugmentParams
from shared.backend import Features, World, augments_on_device
from shared.config import Config
from shared.loader import DrawnBatch, ViewBatch
from torch_impl import checkpoint
from torch_impl.augment import device_params
from torch_impl.distributed import broadcast_from_main, joined, on_main
from torch_impl.model import backbone_of
from torch_impl.probe import features_of, knn_predict, train_linear
from torch_impl.runtime import compute_dtype, device_name, precision_name, to_channels_last
from torch_impl.step import TrainState, initial_state, make_train_step, network, resumed_state


class Backend:
    """shared.backend.Backend for one process of a (perhaps data-parallel) torch job on `device`."""

    def __init__(self, cfg: Config, world: World, images: np.ndarray, augment: AugmentParams,
                 device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device
        self.dtype = compute_dtype(cfg.precision, device)
        self.device_name = device_name(device)
        self.precision_name = precision_name(self.dtype)
        self.batch_split = f" over {world.size} processes" if world.size > 1 else ""
        self.on_device = augments_on_device(cfg, device.type == "cuda")
        self.device_images = torch.from_numpy(images).to(device) if self.on_device else None
        self.step_fn = make_train_step(cfg, augment if self.on_device else None,
                                       dtype=self.dtype, compile_views=device.type == "cuda")

    def on_main(self, action: Callable[[], object]) -> None:
        on_main(self.world, action)

    def agree(self, value: float) -> float:
        return broadcast_from_main(self.world, value)

    def initial_state(self) -> TrainState:
        return initial_state(self.cfg, device=self.device, world=self.world)

    def load_checkpoint(self, path: Path) -> dict:
        return checkpoint.load_checkpoint(path)

    def restored_state(self, stored: dict, path: Path) -> TrainState:
        return resumed_state(self.cfg, stored, path, device=self.device, world=self.world)

    def save_checkpoint(self, path: Path, state: TrainState, progress: dict) -> None:
        checkpoint.save_checkpoint(path, {"model": network(state).state_dict(),
                                          "optimizer": state.optimizer.state_dict(), **progress})

    def train_step(self, state: TrainState, batch: ViewBatch | DrawnBatch,
                   lr: float) -> tuple[TrainState, dict]:
        return self.step_fn(state, *self.step_inputs(batch), lr)

    def step_inputs(self, batch: ViewBatch | DrawnBatch) -> tuple:
        """What step_fn takes besides the state and lr: the two views, or (with the views
        computed on the device) the images, the batch's indices and the views' parameters."""
        if isinstance(batch, ViewBatch):
            return (to_channels_last(batch.view_a, self.device),
                    to_channels_last(batch.view_b, self.device))
        index = torch.from_numpy(batch.index).to(self.device, non_blocking=True)
        return (self.device_images, index, device_params(batch.view_a, device=self.device),
                device_params(batch.view_b, device=self.device))

    @contextlib.contextmanager
    def scratch_copy(self, state: TrainState) -> Iterator[TrainState]:
        """The state itself; its weights, statistics and optimizer state are restored after."""
        weights = copy.deepcopy(network(state).state_dict())
        optimizer = copy.deepcopy(state.optimizer.state_dict())
        try:
            yield state
        finally:
            network(state).load_state_dict(weights)
            state.optimizer.load_state_dict(optimizer)

    def wait(self, value: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def features(self, state: TrainState) -> Features:
        return features_of(backbone_of(network(state)), self.cfg)

    def train_linear(self, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                     num_classes: int, cfg: Config) -> np.ndarray:
        return train_linear(train_x, train_y, test_x, num_classes, cfg)

    def knn_predict(self, bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray,
                    num_classes: int, k: int, temperature: float) -> np.ndarray:
        return knn_predict(bank, bank_labels, queries, num_classes, k, temperature)


@contextlib.contextmanager
def open_backend(cfg: Config, world: World, images: np.ndarray,
                 augment: AugmentParams) -> Iterator[Backend]:
    """Inside: this process's Backend, in the job's process group when there are several."""
    with joined(world) as device:
        yield Backend(cfg, world, images, augment, device)

"""jax_impl's side of the training loop (shared.backend.Backend): the state, the step, the
checkpoint, the devices and the backbone's features, in JAX.

The twin of torch_impl.backend: the same class name, methods and signatures (tests/test_twins.py
checks them against shared.backend.Backend). The state is replicated over a mesh of every device
the job has and each batch sharded over it (jax_impl.distributed).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_impl import checkpoint
from jax_impl.augment import device_params
from jax_impl.distributed import (
    batch_sharding,
    broadcast_from_main,
    data_mesh,
    global_batch,
    on_main,
    replicate,
    replicated,
)
from jax_impl.model import backbone_of, backbone_variables, build_model
from jax_impl.optim import build_optimizer
from jax_impl.probe import features_of, knn_predict, train_linear
from jax_impl.runtime import compute_dtype, device_name, pick_device, precision_name
from jax_impl.step import TrainState, initial_state, make_train_step, network, resumed_state
from shared.augment import AugmentParams
from shared.backend import Features, World, augments_on_device
from shared.config import Config
from shared.errors import UserError
from shared.loader import DrawnBatch, ViewBatch


class Backend:
    """shared.backend.Backend for one process of a (perhaps multi-process) JAX job over every device
    the job has."""

    def __init__(self, cfg: Config, world: World, images: np.ndarray, augment: AugmentParams,
                 device: jax.Device):
        self.cfg, self.world = cfg, world
        self.mesh = data_mesh()
        if self.mesh.size > 1 and not cfg.sync_bn:
            raise UserError(f"--no-sync-bn: jax_impl always normalises over the global batch of "
                            f"its {self.mesh.size} devices (the flag is torch_impl's)")
        self.dtype = compute_dtype(cfg.precision, device)
        self.device_name = device_name(device)
        self.precision_name = precision_name(self.dtype)
        self.batch_split = f" over {self.mesh.size} devices" if self.mesh.size > 1 else ""
        self.on_device = augments_on_device(cfg, device.platform == "gpu")
        self.model = build_model(cfg.arch, cfg.width, cfg.mlp_dims(), cfg.stem(), cfg.last_width,
                                 dtype=self.dtype)
        self.optimizer = build_optimizer(cfg)
        self.batch_sharding = batch_sharding(self.mesh)
        self.device_images = (jax.device_put(images, replicated(self.mesh)) if self.on_device
                              else None)
        self.step_fn = make_train_step(cfg, augment if self.on_device else None,
                                       model=self.model, optimizer=self.optimizer,
                                       mesh=self.mesh)

    def on_main(self, action: Callable[[], object]) -> None:
        on_main(self.world, action)

    def agree(self, value: float) -> float:
        return broadcast_from_main(self.world, value)

    def initial_state(self) -> TrainState:
        state = initial_state(self.cfg, model=self.model, optimizer=self.optimizer)
        return replicate(state, self.mesh)

    def load_checkpoint(self, path: Path) -> dict:
        return checkpoint.load_checkpoint(path)

    def restored_state(self, stored: dict, path: Path) -> TrainState:
        state = resumed_state(self.cfg, stored, path, model=self.model, optimizer=self.optimizer)
        return replicate(state, self.mesh)

    def save_checkpoint(self, path: Path, state: TrainState, progress: dict) -> None:
        checkpoint.save_checkpoint(path, {**network(state), "opt_state": state.opt_state,
                                          **progress})

    def train_step(self, state: TrainState, batch: ViewBatch | DrawnBatch,
                   lr: float) -> tuple[TrainState, dict]:
        return self.step_fn(state, *self.step_inputs(batch), lr)

    def step_inputs(self, batch: ViewBatch | DrawnBatch) -> tuple:
        """What step_fn takes besides the state and lr: the two views, or (with the views
        computed on the device) the images, the batch's indices and the views' parameters, as
        global arrays sharded along the batch (this process supplies its rows)."""
        def rows(local: np.ndarray) -> jax.Array:
            return global_batch(local, self.batch_sharding, self.cfg.batch_size)

        if isinstance(batch, ViewBatch):
            return rows(batch.view_a), rows(batch.view_b)
        return (self.device_images, rows(batch.index.astype(np.int32)),
                *({k: rows(v) for k, v in device_params(view).items()}
                  for view in (batch.view_a, batch.view_b)))

    @contextlib.contextmanager
    def scratch_copy(self, state: TrainState) -> Iterator[TrainState]:
        """A copy of the state (the step donates the buffers it is given)."""
        yield jax.tree.map(jnp.copy, state)

    def wait(self, value: object) -> None:
        jax.block_until_ready(value)

    def features(self, state: TrainState) -> Features:
        # host copies: the replicated arrays span every process's devices, the probe only ours
        variables = jax.device_get(backbone_variables(network(state)))
        return features_of(backbone_of(self.model), variables)

    def train_linear(self, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                     num_classes: int, cfg: Config) -> np.ndarray:
        return train_linear(train_x, train_y, test_x, num_classes, cfg)

    def knn_predict(self, bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray,
                    num_classes: int, k: int, temperature: float) -> np.ndarray:
        return knn_predict(bank, bank_labels, queries, num_classes, k, temperature)


@contextlib.contextmanager
def open_backend(cfg: Config, world: World, images: np.ndarray,
                 augment: AugmentParams) -> Iterator[Backend]:
    """Inside: this process's Backend, over the mesh of every device of the job (joined when
    world_from_env read the environment)."""
    yield Backend(cfg, world, images, augment, pick_device())

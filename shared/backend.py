"""What a framework supplies to a training run, and where the process stands in its job.

The loop (shared.loop) is written once for both frameworks; what differs between PyTorch and JAX
(the state, the compiled step, the checkpoint's format, the device, the backbone's features) is a
Backend. torch_impl.backend and jax_impl.backend each supply one through `open_backend`, and their
train.py hand it to shared.loop.run; tests/test_twins.py checks both against the protocol here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Protocol

import numpy as np

from shared.augment import AugmentParams
from shared.config import Config
from shared.loader import DrawnBatch, ViewBatch

# features(images uint8 [N, S, S, 3], description for the progress bar) -> float32 [N, F]
Features = Callable[[np.ndarray, str], np.ndarray]
# train_linear(train features [N, F], train labels [N], test features [M, F], classes, cfg)
#   -> test logits float32 [M, classes]
LinearTrainer = Callable[[np.ndarray, np.ndarray, np.ndarray, int, Config], np.ndarray]
# knn_predict(bank features [N, F], bank labels int [N], query features [M, F], classes, k,
#   temperature) -> predicted labels int64 [M]
KnnClassifier = Callable[[np.ndarray, np.ndarray, np.ndarray, int, int, float], np.ndarray]


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel job: rank in [0, size), local_rank = its device's
    index on its machine (torch_impl's processes; 0 for jax_impl, whose process drives all of its
    machine's devices), and the `parts` each batch is split into: one per process (torch_impl) or
    per device (jax_impl), named by `part_name`. The default is a job of one process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    parts: int = 1
    part_name: str = "processes"

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run folder, prints, shows the progress bar and runs the probe."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, size): which part of every batch this process loads (shared.loader)."""
        return self.rank, self.size


class Backend(Protocol):
    """A framework's side of a training run. The state is the framework's own (the loop only
    passes it on): a module and its optimizer in torch, a tree of arrays in JAX."""

    device_name: str  # "cpu", "cuda", ...
    precision_name: str  # "fp32" or "bf16"
    batch_split: str  # how the global batch is divided, e.g. " over 2 processes" (or "")
    on_device: bool  # the views are computed on the device: train_step takes DrawnBatch

    def on_main(self, action: Callable[[], object]) -> None:
        """action() on the main process; a UserError there is raised in every process."""

    def agree(self, value: float) -> float:
        """The main process's `value`, in every process."""

    def initial_state(self) -> Any:
        """Fresh weights drawn from cfg.seed and a fresh optimizer state."""

    def load_checkpoint(self, path: Path) -> dict:
        """The checkpoint file at `path` as written by save_checkpoint (UserError if unreadable)."""

    def restored_state(self, stored: dict, path: Path) -> Any:
        """The state a loaded checkpoint holds, checked against the run's model."""

    def save_checkpoint(self, path: Path, state: Any, progress: dict) -> None:
        """Write the state and the `progress` entries to `path` (atomically; main process)."""

    def train_step(self, state: Any, batch: ViewBatch | DrawnBatch,
                   lr: float) -> tuple[Any, dict]:
        """One optimisation step at learning rate lr: (the new state, the loss terms as device
        scalars, not synchronised)."""

    def scratch_copy(self, state: Any) -> ContextManager[Any]:
        """Inside: a state to take steps with (the step rate is timed on it); `state` is as it
        was on the way out."""

    def wait(self, value: Any) -> None:
        """Block until the device has computed `value`."""

    def features(self, state: Any) -> Features:
        """The backbone of `state`, frozen (eval mode), as a feature extractor: uint8 images
        [N, S, S, 3] -> float32 [N, F]. Usable after the backend is closed."""

    def train_linear(self, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                     num_classes: int, cfg: Config) -> np.ndarray:
        """The linear probe's classifier on features (a LinearTrainer)."""

    def knn_predict(self, bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray,
                    num_classes: int, k: int, temperature: float) -> np.ndarray:
        """The weighted kNN of the monitor and the kNN probe (a KnnClassifier): predicted labels
        int64 [M]."""


# open_backend(cfg, world, images uint8 [N, S, S, 3], augment) -> a context manager of the
# framework's Backend (inside it, the process group or device mesh exists).
OpenBackend = Callable[[Config, World, np.ndarray, AugmentParams], ContextManager[Backend]]


def augments_on_device(cfg: Config, on_gpu: bool) -> bool:
    """Whether the trainer computes the views on its device (--augment-on; auto: on a GPU)."""
    return cfg.augment_on == "device" or (cfg.augment_on == "auto" and on_gpu)

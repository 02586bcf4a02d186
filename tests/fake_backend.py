"""A Backend in numpy, a clock that moves only when told, and the trainer run on both, for tests
of the loop's own logic (budget, resume, monitor) without a framework.

    NumpyBackend       shared.backend.Backend with a float64 weight vector as its state: a step
                       moves it towards the batch's mean pixel, at the learning rate
    FakeClock          time that passes only as steps and features say they take
    OnClock            wraps any OpenBackend (numpy, torch_impl's, jax_impl's) so that every step
                       and every feature extraction moves a FakeClock
    train              `python -m <framework>_impl.train ARGV` through shared.loop.run with a
                       given backend and clock: its exit status
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from shared.backend import World
from shared.cli import cli_main, parse_train_args
from shared.loop import run
from shared.records import TERMS
from shared.runio import atomic_write_bytes, corrupt_checkpoint_error


class FakeClock:
    """The time budget's clock in a test: it moves only by what steps and features take."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class NumpyBackend:
    """The Backend protocol in numpy on the host. State: {"w": float64 [3]}; a step at lr moves
    w to w + lr (m - w), m the mean pixel of view_a in [0, 1] per channel, so the weights depend
    on every batch, its order and every learning rate; loss = |w - m|^2."""

    device_name, precision_name, batch_split, on_device = "cpu", "fp64", "", False

    def __init__(self, cfg, world, images, augment):
        self.cfg = cfg

    def on_main(self, action):
        action()

    def agree(self, value):
        return value

    def initial_state(self):
        return {"w": np.random.default_rng(self.cfg.seed).normal(size=3)}

    def load_checkpoint(self, path: Path) -> dict:
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise corrupt_checkpoint_error(path, exc) from None

    def restored_state(self, stored: dict, path: Path):
        return {"w": np.array(stored["w"], np.float64)}

    def save_checkpoint(self, path: Path, state, progress: dict) -> None:
        atomic_write_bytes(path, json.dumps({"w": state["w"].tolist(), **progress}).encode())

    def train_step(self, state, batch, lr):
        mean = batch.view_a.astype(np.float64).mean(axis=(0, 1, 2))
        w = state["w"] + lr * (mean - state["w"])
        loss = float(np.sum((w - mean) ** 2))
        return {"w": w}, {term: loss if term == "loss" else 0.0 for term in TERMS}

    @contextlib.contextmanager
    def scratch_copy(self, state):
        yield {"w": state["w"].copy()}

    def wait(self, value):
        pass

    def features(self, state):
        w = state["w"].astype(np.float32)
        return lambda images, desc: (images.reshape(len(images), -1, 3).mean(axis=1) / 255
                                     + w).astype(np.float32)

    def train_linear(self, train_x, train_y, test_x, num_classes, cfg):
        """Logits of the nearest class mean (-distance)."""
        means = np.stack([train_x[train_y == c].mean(axis=0) if np.any(train_y == c)
                          else np.full(train_x.shape[1], np.inf) for c in range(num_classes)])
        return -np.linalg.norm(test_x[:, None] - means[None], axis=2).astype(np.float32)

    def knn_predict(self, bank, bank_labels, queries, num_classes, k, temperature):
        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
        similarity = unit(queries) @ unit(bank).T
        order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
        votes = np.zeros((len(queries), num_classes))
        for row in range(len(queries)):
            np.add.at(votes[row], bank_labels[order[row]],
                      np.exp(similarity[row, order[row]] / temperature))
        return votes.argmax(axis=1)


@contextlib.contextmanager
def open_numpy_backend(cfg, world, images, augment):
    yield NumpyBackend(cfg, world, images, augment)


class _TimedBackend:
    """A backend whose steps take `step_seconds` on `clock` (`timing_seconds` while the step
    rate is timed on a scratch copy) and whose feature extractions take `feature_seconds` and
    `image_seconds` an image (the first one `compile_seconds` more, as a compiling framework's
    first call does); a
    step at (epoch, step in epoch) `stop_at` raises KeyboardInterrupt, as Ctrl-C there would."""

    def __init__(self, backend, timed: OnClock):
        self.backend, self.timed, self.timing = backend, timed, False

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def train_step(self, state, batch, lr):
        timed = self.timed
        if self.timing:
            timed.clock.now += timed.timing_seconds
            timed.timing_steps += 1
        else:
            if (batch.epoch, batch.step) == timed.stop_at:
                raise KeyboardInterrupt
            timed.clock.now += timed.step_seconds
        return self.backend.train_step(state, batch, lr)

    @contextlib.contextmanager
    def scratch_copy(self, state):
        with self.backend.scratch_copy(state) as scratch:
            self.timing = True
            try:
                yield scratch
            finally:
                self.timing = False

    def features(self, state):
        extract = self.backend.features(state)

        def timed(images, desc):
            self.timed.clock.now += (self.timed.feature_seconds + self.timed.compile_seconds
                                     + self.timed.image_seconds * len(images))
            self.timed.compile_seconds = 0.0
            return extract(images, desc)
        return timed


class OnClock:
    """An OpenBackend: `open_backend`'s backends with their steps and features moving `clock`
    (see _TimedBackend); `timing_steps` counts the steps the rate was timed with."""

    def __init__(self, open_backend, clock: FakeClock, step_seconds: float,
                 timing_seconds: float | None = None, feature_seconds: float = 0.0,
                 compile_seconds: float = 0.0, stop_at: tuple[int, int] | None = None,
                 image_seconds: float = 0.0):
        self.open_backend, self.clock, self.step_seconds = open_backend, clock, step_seconds
        self.timing_seconds = step_seconds if timing_seconds is None else timing_seconds
        self.feature_seconds, self.stop_at, self.timing_steps = feature_seconds, stop_at, 0
        self.compile_seconds, self.image_seconds = compile_seconds, image_seconds

    @contextlib.contextmanager
    def __call__(self, cfg, world, images, augment):
        with self.open_backend(cfg, world, images, augment) as backend:
            yield _TimedBackend(backend, self)


def train(argv: list[str], open_backend=open_numpy_backend, clock=None,
          framework: str = "torch") -> int:
    """`python -m <framework>_impl.train ARGV` with `open_backend`'s backend (default: numpy) on
    `clock` (default: time.perf_counter): its exit status."""
    import time

    def body():
        cfg, resume = parse_train_args(argv, framework)
        return run(cfg, resume, framework, World(), open_backend, clock or time.perf_counter)

    return cli_main(body)

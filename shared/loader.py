"""Epochs of (view_a, view_b) batches, augmented in a background thread so the model never waits.

The batch at (seed, epoch, step) is a pure function of those three numbers and the images: the
image order is a permutation seeded by (seed, epoch), the views come from `shared.augment`. So both
frameworks, and a resumed run, consume byte-identical batches.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from shared.augment import AugmentParams, make_views
from shared.errors import UserError


@dataclass(frozen=True)
class ViewBatch:
    """One step's input: two float32 [B, S, S, 3] NHWC views of the same B images."""

    epoch: int
    step: int
    view_a: np.ndarray
    view_b: np.ndarray


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped, as in the official code)."""
    if batch_size > num_images:
        raise UserError(f"--batch-size {batch_size} is larger than the {num_images} training images "
                        "(lower --batch-size or raise --subset)")
    return num_images // batch_size


def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The image order of an epoch: int64 [num_images], a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_images)


def _make_batch(images: np.ndarray, order: np.ndarray, params: AugmentParams, batch_size: int,
                seed: int, epoch: int, step: int) -> ViewBatch:
    index = order[step * batch_size:(step + 1) * batch_size]
    view_a, view_b = make_views(images[index], params, seed, epoch, step)
    return ViewBatch(epoch, step, view_a, view_b)


def batch_at(images: np.ndarray, params: AugmentParams, batch_size: int, seed: int, epoch: int,
             step: int) -> ViewBatch:
    """The batch of global position (epoch, step); images uint8 [N, H, W, 3]."""
    order = epoch_order(len(images), seed, epoch)
    return _make_batch(images, order, params, batch_size, seed, epoch, step)


def epoch_batches(images: np.ndarray, params: AugmentParams, batch_size: int, seed: int,
                  epoch: int, start_step: int = 0, prefetch: int = 3) -> Iterator[ViewBatch]:
    """Yield the batches of `epoch` from `start_step` on, `prefetch` of them computed ahead."""
    total = steps_per_epoch(len(images), batch_size)
    order = epoch_order(len(images), seed, epoch)
    ready: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce():
        try:
            for step in range(start_step, total):
                item = _make_batch(images, order, params, batch_size, seed, epoch, step)
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            ready.put(exc)
            return
        ready.put(None)

    worker = threading.Thread(target=produce, name=f"views-epoch{epoch}", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)

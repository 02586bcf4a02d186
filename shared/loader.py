"""Epochs of (view_a, view_b) batches, augmented in background threads so the model never waits.

The batch at (seed, epoch, step) is a pure function of those three numbers and the images: the
image order is a permutation seeded by (seed, epoch), the views come from `shared.augment`. So both
frameworks, and a resumed run, consume byte-identical batches.

Data parallel training splits every batch into equal contiguous parts, one per process (`shard`):
part i of n holds rows [i B / n, (i + 1) B / n) of the batch a single process sees, so the parts
together are that batch, byte for byte.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import islice

import numpy as np

from shared.augment import AugmentParams, PixelParams, draw_views, make_views
from shared.errors import UserError

# Salt of the image-order stream, so that it never coincides with the views' streams, which
# shared.augment.view_rng draws from [seed, epoch, step, view] with the same seed and epoch.
_ORDER_SALT = 0x5EED


@dataclass(frozen=True)
class ViewBatch:
    """One step's input: two float32 [B, S, S, 3] NHWC views of the same B images (B: this
    process's part of the batch)."""

    epoch: int
    step: int
    view_a: np.ndarray
    view_b: np.ndarray


@dataclass(frozen=True)
class DrawnBatch:
    """One step's input for a trainer that augments on its device: which training images (int64
    [B], this process's part of the batch) and both views' parameters, drawn exactly as ViewBatch's
    views were (shared.augment.draw_views), without a pixel computed."""

    epoch: int
    step: int
    index: np.ndarray
    view_a: PixelParams
    view_b: PixelParams


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped, as in the official code)."""
    if batch_size > num_images:
        raise UserError(f"--batch-size {batch_size} is larger than the {num_images} training "
                        "images (lower --batch-size or raise --subset)")
    return num_images // batch_size


def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The image order of an epoch: int64 [num_images], a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch, _ORDER_SALT]).permutation(num_images)


def split_batch(batch_size: int, parts: int, what: str = "processes") -> int:
    """Rows per part when the batch is split over `parts` processes or devices; UserError unless
    batch_size is a multiple of parts."""
    if batch_size % parts:
        raise UserError(f"--batch-size {batch_size} does not split evenly over {parts} {what}; "
                        f"use a multiple of {parts}")
    return batch_size // parts


def shard_rows(batch_size: int, shard: tuple[int, int]) -> slice:
    """Part i of n of a batch, shard = (i, n): rows [i B / n, (i + 1) B / n)."""
    index, count = shard
    rows = split_batch(batch_size, count)
    return slice(index * rows, (index + 1) * rows)


def _make_batch(images: np.ndarray, order: np.ndarray, params: AugmentParams, batch_size: int,
                seed: int, epoch: int, shard: tuple[int, int], step: int) -> ViewBatch:
    index = order[step * batch_size:(step + 1) * batch_size]
    view_a, view_b = make_views(images[index], params, seed, epoch, step,
                                shard_rows(batch_size, shard))
    return ViewBatch(epoch, step, view_a, view_b)


def _draw_batch(images: np.ndarray, order: np.ndarray, params: AugmentParams, batch_size: int,
                seed: int, epoch: int, shard: tuple[int, int], step: int) -> DrawnBatch:
    rows = shard_rows(batch_size, shard)
    index = order[step * batch_size:(step + 1) * batch_size]
    _, h, w, _ = images.shape
    view_a, view_b = draw_views(batch_size, h, w, params, seed, epoch, step, rows)
    return DrawnBatch(epoch, step, index[rows], view_a, view_b)


def batch_at(images: np.ndarray, params: AugmentParams, batch_size: int, seed: int, epoch: int,
             step: int, shard: tuple[int, int] = (0, 1)) -> ViewBatch:
    """The batch of global position (epoch, step), or part `shard` = (i, n) of it; images uint8
    [N, H, W, 3]."""
    order = epoch_order(len(images), seed, epoch)
    return _make_batch(images, order, params, batch_size, seed, epoch, shard, step)


def epoch_batches(images: np.ndarray, params: AugmentParams, *, batch_size: int, seed: int,
                  epoch: int, start_step: int = 0, end_step: int | None = None,
                  prefetch: int = 3, workers: int = 1, shard: tuple[int, int] = (0, 1),
                  on_device: bool = False) -> Iterator[ViewBatch | DrawnBatch]:
    """Yield the batches of `epoch` from `start_step` up to `end_step` (default: the epoch's end),
    in order, computed ahead by `workers` background threads with up to `prefetch + workers`
    batches in flight; with shard = (i, n), only part i of n of each batch (see shard_rows).
    on_device: DrawnBatches (indices and drawn parameters, for a trainer that computes the views
    on its device) instead of ViewBatches."""
    total = steps_per_epoch(len(images), batch_size)
    if end_step is not None:
        total = min(total, end_step)
    make = partial(_draw_batch if on_device else _make_batch, images,
                   epoch_order(len(images), seed, epoch), params, batch_size, seed, epoch, shard)
    steps = iter(range(start_step, total))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"views-epoch{epoch}") as pool:
        pending = deque(pool.submit(make, step) for step in islice(steps, prefetch + workers))
        try:
            while pending:
                batch = pending.popleft().result()
                following = next(steps, None)
                if following is not None:
                    pending.append(pool.submit(make, following))
                yield batch
        finally:
            for future in pending:
                future.cancel()

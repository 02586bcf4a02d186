"""shared.loader: determinism by (seed, epoch, step), coverage of an epoch, prefetch, errors."""
import numpy as np
import pytest

from shared.augment import AugmentParams, make_views
from shared.errors import UserError
from shared.loader import batch_at, epoch_batches, epoch_order, steps_per_epoch


def images(n=40):
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_batches_are_byte_identical_to_an_independent_rebuild():
    x, params = images(), AugmentParams()
    batches = list(epoch_batches(x, params, batch_size=8, seed=3, epoch=2))
    assert [b.step for b in batches] == [0, 1, 2, 3, 4]
    order = np.random.default_rng([3, 2, 0x5EED]).permutation(40)
    for b in batches:
        view_a, view_b = make_views(x[order[b.step * 8:(b.step + 1) * 8]], params, 3, 2, b.step)
        assert view_a.tobytes() == b.view_a.tobytes() and view_b.tobytes() == b.view_b.tobytes()
        assert b.view_a.dtype == np.float32 and b.view_a.shape == (8, 32, 32, 3)
    assert batches[3].view_a.tobytes() == batch_at(x, params, 8, 3, 2, 3).view_a.tobytes()


def test_start_step_skips_ahead_and_epochs_differ():
    x, params = images(), AugmentParams()
    tail = list(epoch_batches(x, params, batch_size=8, seed=0, epoch=0, start_step=3))
    assert [b.step for b in tail] == [3, 4]
    assert not np.array_equal(epoch_order(40, 0, 0), epoch_order(40, 0, 1))
    assert sorted(epoch_order(40, 0, 0)) == list(range(40))


def test_partial_last_batch_is_dropped_and_oversized_batch_is_an_error():
    assert steps_per_epoch(41, 8) == 5
    with pytest.raises(UserError, match="larger than the 4 training images"):
        steps_per_epoch(4, 8)


def test_producer_errors_reach_the_consumer():
    bad = np.zeros((16, 32, 32, 3), dtype=np.float32)  # not uint8
    with pytest.raises(ValueError, match="uint8"):
        list(epoch_batches(bad, AugmentParams(), batch_size=8, seed=0, epoch=0))


def test_abandoning_an_epoch_stops_the_producer():
    it = epoch_batches(images(), AugmentParams(), batch_size=8, seed=0, epoch=0, prefetch=1)
    next(it)
    it.close()  # must return promptly (the worker is joined in the generator's finally)


def test_several_workers_deliver_the_same_bytes_in_order():
    x, params = images(64), AugmentParams()
    one = list(epoch_batches(x, params, batch_size=8, seed=5, epoch=1, workers=1))
    four = list(epoch_batches(x, params, batch_size=8, seed=5, epoch=1, workers=4, prefetch=1))
    assert [b.step for b in four] == list(range(8))
    assert all(a.view_a.tobytes() == b.view_a.tobytes() and a.view_b.tobytes() == b.view_b.tobytes()
               for a, b in zip(one, four))

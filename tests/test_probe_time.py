"""--budget-scope job (shared.probe_time, shared.budget): the probes' time is projected from what
they will load, embed and train, and the budget keeps it from training, so that the whole job,
probes included, ends within the budget. Time runs on a FakeClock (tests/fake_backend.py)."""
import math

import numpy as np
import pytest

from jax_impl.backend import open_backend as open_jax_backend
from shared.config import make_config
from shared.data import load_split
from shared.linear_probe import probe_batches
from shared.probe_time import projected_probe_seconds
from tests.fake_backend import FakeClock, OnClock, open_numpy_backend, train
from tests.test_monitor import last_line, records, smoke
from torch_impl import train as torch_train
from torch_impl.backend import open_backend as open_torch_backend

BACKENDS = {"numpy": open_numpy_backend, "torch": open_torch_backend, "jax": open_jax_backend}

IMAGE_S, STEP_S = 1e-3, 1e-2  # what the fakes below take per image embedded and per step


def fakes(clock: FakeClock):
    """A feature extractor taking IMAGE_S an image and a linear trainer taking STEP_S a step
    (the probe's own mini-batches counted), both on `clock`."""
    def features(images, desc):
        clock.now += IMAGE_S * len(images)
        return np.zeros((len(images), 8), np.float32)

    def train_linear(train_x, train_y, test_x, num_classes, cfg):
        clock.now += STEP_S * sum(len(probe_batches(len(train_x), cfg.probe_batch_size, cfg.seed,
                                                    epoch)) for epoch in range(cfg.probe_epochs))
        return np.zeros((len(test_x), num_classes), np.float32)
    return features, train_linear


@pytest.mark.parametrize("subset", [0, 60])
def test_the_projection_counts_every_image_and_step_the_probes_will_take(subset, tiny_data_dir):
    cfg = make_config({"preset": "smoke", "data_dir": str(tiny_data_dir), "probe_subset": subset,
                       "probe_epochs": 7, "probe_batch_size": 16})
    expected = 0.0
    for dataset in ("cifar10", "gtsrb"):
        n_train = len(load_split(dataset, tiny_data_dir, "train")[1])
        n_test = len(load_split(dataset, tiny_data_dir, "test")[1])
        n_train, n_test = (min(n, subset) if subset else n for n in (n_train, n_test))
        expected += IMAGE_S * (n_train + n_test) + STEP_S * 7 * math.ceil(n_train / 16)
    clock = FakeClock()
    assert projected_probe_seconds(cfg, *fakes(clock), clock) == pytest.approx(expected)


def job_run(tiny_data_dir, run, clock, scope, *flags, stop_at=None, framework="numpy"):
    """A 1 s budget of 12.3 ms steps, monitor off, whose feature extractions take 0.2 ms an
    image (the classifier none), on `framework`'s backend (or numpy's, as torch_impl); Ctrl-C at
    (epoch, step) `stop_at`."""
    backend = OnClock(BACKENDS[framework], clock, 0.0123, image_seconds=2e-4, stop_at=stop_at)
    return train(smoke(tiny_data_dir, run, "--time-budget", "1s", "--epochs", "50",
                       "--monitor-every", "0", "--warmup-epochs", "0", "--budget-scope", scope,
                       *flags), backend, clock, "torch" if framework == "numpy" else framework)


@pytest.mark.parametrize("framework", BACKENDS)
def test_a_job_budget_keeps_the_probes_time_and_the_job_ends_within_it(framework, tiny_data_dir,
                                                                      tmp_path):
    """The projection embeds the first train split twice (a warm-up and a timed call, all of its
    images: fewer than 500), and the classifier takes no time on the clock: the probes are
    projected at 0.2 ms x all their images, with each framework's own features and classifier."""
    images = sum(len(load_split(d, tiny_data_dir, s)[1])
                 for d in ("cifar10", "gtsrb") for s in ("train", "test"))
    sampled = len(load_split("cifar10", tiny_data_dir, "train")[1])
    clock = FakeClock()
    assert job_run(tiny_data_dir, tmp_path / "training", clock, "training",
                   framework=framework) == 0
    assert clock.now > 1.0  # the probes come after a budget that training filled
    clock = FakeClock()
    run = tmp_path / "job"
    assert job_run(tiny_data_dir, run, clock, "job", framework=framework) == 0
    assert clock.now <= 1.0
    probes = 2e-4 * images
    [plan] = records(run, "plan")
    assert plan["probes_s"] == pytest.approx(probes)
    # the timing's 86.1 ms and the projection's two extractions used, the probes kept
    used = 0.0861 + 2 * 2e-4 * sampled
    assert plan["epochs"] * 4 == math.floor((0.97 - used - probes) / 0.0123)


def test_a_resumed_job_budget_keeps_the_probes_time_it_planned_with(tiny_data_dir, tmp_path):
    run, clock = tmp_path / "run", FakeClock()
    assert job_run(tiny_data_dir, run, clock, "job", stop_at=(2, 0)) == 130
    [plan] = records(run, "plan")
    assert plan["probes_s"] > 0.05  # more than a re-plan's 5% of the budget
    assert job_run(tiny_data_dir, run, clock, "job", "--resume") == 0
    assert records(run, "plan") == [plan]  # not planned again for the time the probes keep


def test_a_bad_budget_scope_is_one_line(tiny_data_dir, tmp_path, capsys):
    assert torch_train.main(smoke(tiny_data_dir, tmp_path / "run", "--budget-scope", "all")) == 2
    assert last_line(capsys) == ("error: argument --budget-scope: invalid choice: 'all' (choose "
                                 "from 'training', 'job')")

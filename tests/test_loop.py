"""shared.loop's own logic on a numpy Backend (tests/fake_backend.py): the learning rate it hands
each step, resume after Ctrl-C, the kNN monitor's points and what they measure, and a run folder
made by an earlier version. No framework is imported by the runs here, so each takes a second."""
import json

import numpy as np
import pytest

from shared.config import make_config
from shared.data import load_split
from shared.runio import load_run_config
from shared.schedule import Plan, lr_at
from tests import references
from tests.fake_backend import FakeClock, OnClock, open_numpy_backend, train


def smoke(data_dir, out, *extra):
    return ["--preset", "smoke", "--data-dir", str(data_dir), "--out", str(out), "--no-probe",
            *extra]


def lines(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_timing(run) -> list[dict]:
    timing = {"pairs_per_s", "images_per_s", "epoch_time_s", "train_time_s", "seconds"}
    return [{k: v for k, v in r.items() if k not in timing} for r in lines(run)]


def weights(run) -> list[float]:
    return json.loads((run / "checkpoint.pt").read_text())["w"]


def test_each_step_gets_the_plans_learning_rate(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    assert train(smoke(tiny_data_dir, run, "--epochs", "2.5", "--warmup-epochs", "1")) == 0
    cfg = load_run_config(run)
    steps = [r for r in lines(run) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 11))  # 2.5 epochs of 4 steps
    assert [r["lr"] for r in steps] == [lr_at(s - 1, Plan(2.5, 4), cfg) for s in range(1, 11)]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2.5


@pytest.mark.parametrize("stop_at", [(0, 2), (1, 0), (2, 3)])
def test_a_run_stopped_anywhere_and_resumed_ends_as_an_uninterrupted_one(stop_at, tiny_data_dir,
                                                                         tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ["--epochs", "3", "--monitor-every", "0.5", "--log-every", "3"]
    assert train(smoke(tiny_data_dir, straight, *flags)) == 0
    stopped = OnClock(open_numpy_backend, FakeClock(), 0.0, stop_at=stop_at)
    assert train(smoke(tiny_data_dir, resumed, *flags), stopped) == 130
    assert train(["--resume", "--out", str(resumed)]) == 0
    assert weights(resumed) == weights(straight)
    assert without_timing(resumed) == without_timing(straight)


def test_the_monitors_points_are_the_knn_of_the_weights_trained(tiny_data_dir, tmp_path):
    """Points every half epoch and at the end; the last one is a weighted kNN (in float64 numpy)
    of the features of the final weights: the first --monitor-bank training images against the
    first --monitor-test test images."""
    run = tmp_path / "run"
    assert train(smoke(tiny_data_dir, run, "--epochs", "2", "--monitor-every", "0.5")) == 0
    points = [r for r in lines(run) if r["kind"] == "knn"]
    assert [(p["step"], p["epochs"], p["epoch"]) for p in points] == [
        (2, 0.5, 0), (4, 1.0, 0), (6, 1.5, 1), (8, 2.0, 1)]
    cfg = make_config({"preset": "smoke"})
    bank, bank_labels = (a[:cfg.monitor_bank] for a in load_split("cifar10", tiny_data_dir,
                                                                  "train"))
    test, test_labels = (a[:cfg.monitor_test] for a in load_split("cifar10", tiny_data_dir,
                                                                  "test"))
    w = np.asarray(weights(run), np.float32)

    def features(images):
        return (images.reshape(len(images), -1, 3).mean(axis=1) / 255 + w).astype(np.float32)

    predicted = references.knn_predict(features(bank), bank_labels, features(test), 10,
                                       cfg.monitor_k, cfg.monitor_temperature)
    assert points[-1]["knn_top1"] == pytest.approx(np.mean(predicted == test_labels))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["knn_top1"] == points[-1]["knn_top1"]


def test_a_run_folder_of_an_earlier_version_resumes(tiny_data_dir, tmp_path):
    """config.json without the settings added since (here --jax-cache and the monitor's), as
    an earlier version wrote it: the run resumes as it was and gains them."""
    run = tmp_path / "run"
    assert train(smoke(tiny_data_dir, run, "--monitor-every", "0")) == 0
    config = json.loads((run / "config.json").read_text())
    old = {k: v for k, v in config.items() if k != "jax_cache" and not k.startswith("monitor_")}
    (run / "config.json").write_text(json.dumps(old))
    assert train(["--resume", "--out", str(run), "--epochs", "2"]) == 0
    stored = json.loads((run / "config.json").read_text())
    assert stored["jax_cache"] is True and stored["monitor_every"] == 0
    assert [r["step"] for r in lines(run) if r["kind"] == "epoch"] == [4, 8]

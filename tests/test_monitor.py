"""The kNN monitor and the kNN probe: each framework's weighted kNN against a float64 numpy one,
the points a run measures (their records, resume, the time budget, TensorBoard), the final point
against `probe --protocol knn` on the same checkpoint, and the bad inputs."""
import json
import math

import numpy as np
import pytest

from jax_impl import probe as jax_probe
from jax_impl import train as jax_train
from shared.config import make_config
from shared.data import load_split
from shared.errors import UserError
from shared.monitor import MonitorData, is_point, monitor_note
from tests import references
from tests.test_tensorboard import read_scalars
from torch_impl import probe as torch_probe
from torch_impl import train as torch_train
from torch_impl.backend import Backend as TorchBackend

TRAINERS = {"torch": torch_train, "jax": jax_train}
PROBES = {"torch": torch_probe, "jax": jax_probe}
KNN = {"torch": torch_probe.knn_predict, "jax": jax_probe.knn_predict}


def smoke(data_dir, out, *extra):
    return ["--preset", "smoke", "--width", "4", "--data-dir", str(data_dir), "--out", str(out),
            "--probe-epochs", "2", *extra]


def records(run, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


def last_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def trained_arrays(framework: str, run) -> dict[str, np.ndarray]:
    """The weights, BatchNorm statistics and optimizer state in a run's checkpoint, by name."""
    if framework == "torch":
        from torch_impl.checkpoint import load_checkpoint
        stored = load_checkpoint(run / "checkpoint.pt")
        arrays = {f"model/{k}": v for k, v in stored["model"].items()}
        arrays |= {f"mu/{k}": s["mu"] for k, s in stored["optimizer"]["state"].items()}
        return {k: v.numpy() for k, v in arrays.items()}
    from flax.traverse_util import flatten_dict

    from jax_impl.checkpoint import CHECKPOINT_FILE, load_checkpoint
    stored = load_checkpoint(run / CHECKPOINT_FILE)
    return {f"{key}/{'/'.join(map(str, name))}": np.asarray(value)
            for key in ("params", "batch_stats", "opt_state")
            for name, value in flatten_dict(stored[key]).items()}


# ---- the classifier --------------------------------------------------------------------------


def test_the_reference_knn_on_a_case_worked_by_hand():
    """Bank e0 (class 2), e1 (class 0), (e0 + e1) / sqrt 2 (class 0), query e0 at T = 0.5: the
    similarities are 1, 0 and 1/sqrt 2; k = 1 picks class 2; k = 2 weighs class 2 with e^2 =
    7.39 and class 0 with e^(sqrt 2) = 4.11 (class 2); k = 3 adds e^0 = 1 to class 0: 5.11."""
    bank = np.array([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])
    labels = np.array([2, 0, 0])
    query = np.array([[5.0, 0.0]])
    assert [references.knn_predict(bank, labels, query, 3, k, 0.5)[0] for k in (1, 2, 3)] == \
        [2, 2, 2]
    # at T = 2 the weights flatten: class 2 e^0.5 = 1.65 against class 0 e^0.35 + e^0 = 2.42
    assert references.knn_predict(bank, labels, query, 3, 3, 2.0)[0] == 0


@pytest.mark.parametrize("framework", KNN)
@pytest.mark.parametrize("k", [1, 7, 300])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_knn_matches_a_float64_reference_on_random_features(framework, k, temperature):
    rng = np.random.default_rng(k)
    bank = rng.normal(size=(300, 16)).astype(np.float32)
    labels = rng.integers(0, 10, 300)
    queries = rng.normal(size=(2500, 16)).astype(np.float32)  # more than one batch of 1024
    want = references.knn_predict(bank, labels, queries, 10, k, temperature)
    got = KNN[framework](bank, labels, queries, 10, k, temperature)
    assert got.dtype == np.int64 and got.shape == (2500,)
    assert (got == want).mean() >= 0.999  # a vote decided in float32's last bit may differ
    if k == 1:  # the nearest neighbour's label, however it is weighted
        nearest = np.argmax(references.unit(queries) @ references.unit(bank).T, axis=1)
        np.testing.assert_array_equal(got, labels[nearest])


@pytest.mark.parametrize("framework", KNN)
def test_equal_similarities_are_taken_in_bank_order_and_equal_votes_go_to_the_lower_class(
        framework):
    """Bank: the query's own direction three times (classes 3, 1, 4), then an orthogonal one
    (class 0). k = 1 takes the first copy (class 3); k = 2 gives classes 3 and 1 equal votes
    (class 1 wins); k = 3 ties three classes (1 wins again); scaled copies are the same
    direction."""
    bank = np.array([[1, 0], [2, 0], [0.5, 0], [0, 1]], np.float32)
    labels = np.array([3, 1, 4, 0])
    query = np.array([[3, 0]], np.float32)
    got = [int(KNN[framework](bank, labels, query, 5, k, 0.1)[0]) for k in (1, 2, 3)]
    want = [int(references.knn_predict(bank, labels, query, 5, k, 0.1)[0]) for k in (1, 2, 3)]
    assert got == want == [3, 1, 1]


@pytest.mark.parametrize("framework", KNN)
@pytest.mark.parametrize("k,temperature,says", [
    (5, 0.1, "a kNN with k = 5 needs a bank of at least 5 images"),
    (0, 0.1, "k of at least 1"),
    (2, 0.0, "the kNN temperature must be a positive number"),
    (2, float("nan"), "the kNN temperature must be a positive number")])
def test_knn_refuses_k_beyond_the_bank_and_a_bad_temperature(framework, k, temperature, says):
    bank = np.eye(4, dtype=np.float32)
    with pytest.raises(UserError, match=says):
        KNN[framework](bank, np.arange(4), bank, 4, k, temperature)


def test_test_images_that_miss_classes_are_named():
    images = np.zeros((4, 32, 32, 3), np.uint8)
    cfg = make_config({"monitor_bank": 4, "monitor_test": 4, "monitor_k": 4})
    sorted_split = MonitorData(images, np.arange(4), images, np.array([0, 0, 1, 1]), 10, 4)
    assert monitor_note(cfg, sorted_split) == (
        "note: the kNN monitor: its 4 test images hold 2 of 10 classes (this test split is "
        "ordered by class); a larger --monitor-test takes more of them")
    shuffled = MonitorData(images, np.arange(4), images, np.array([1, 0, 1, 0]), 10, 4)
    assert monitor_note(cfg, shuffled) == (
        "note: the kNN monitor: its 4 test images hold 2 of 10 classes; a larger --monitor-test "
        "takes more of them")
    every_class = MonitorData(images, np.arange(4), np.zeros((4, 32, 32, 3), np.uint8),
                              np.arange(4), 4, 4)
    assert monitor_note(cfg, every_class) == ""


@pytest.mark.parametrize("framework", TRAINERS)
def test_a_monitor_larger_than_the_dataset_takes_all_of_it(framework, tiny_data_dir, tmp_path,
                                                           capsys):
    run = tmp_path / "run"
    assert TRAINERS[framework].main(smoke(tiny_data_dir, run, "--no-probe", "--monitor-bank",
                                          "300", "--monitor-test", "101", "--monitor-k",
                                          "250")) == 0
    assert ("note: the kNN monitor: it takes all 200 CIFAR-10 training images (--monitor-bank "
            "300 asks for more); it takes all 100 CIFAR-10 test images (--monitor-test 101 asks "
            "for more); 200 neighbours vote (--monitor-k 250 is more than its bank holds)"
            in capsys.readouterr().out)
    assert PROBES[framework].main(["--run", str(run), "--protocol", "knn", "--probe-subset", "0",
                                   "--monitor-k", "200"]) == 0
    probe = json.loads((run / "probe_cifar10_knn.json").read_text())
    assert records(run, "knn")[-1]["knn_top1"] == probe["top1"]


# ---- where a run measures --------------------------------------------------------------------


@pytest.mark.parametrize("total,every", [(12, 4.0), (12, 2.4), (13, 1.2), (5, 8.0), (40, 0.5)])
def test_points_fall_at_the_first_step_past_each_multiple_and_at_the_end(total, every):
    multiples = [m * every for m in range(1, int(total / every) + 1)]
    want = sorted({math.ceil(x - 1e-9) for x in multiples} | {total})
    assert [s for s in range(1, total + 1) if is_point(s, total, every)] == want


@pytest.mark.parametrize("framework", TRAINERS)
def test_a_run_records_its_points_and_the_last_equals_the_knn_probe(framework, tiny_data_dir,
                                                                     tmp_path, capsys):
    """Two epochs of 4 steps, a point every half epoch: steps 2, 4, 6, 8. The bank is the whole
    tiny training split (200) and the test set the whole test split (100), so the kNN probe on
    the final checkpoint (--probe-subset 0) classifies exactly the monitor's last images."""
    run = tmp_path / "run"
    flags = smoke(tiny_data_dir, run, "--epochs", "2", "--monitor-every", "0.5",
                  "--monitor-bank", "200", "--monitor-test", "100", "--monitor-k", "30",
                  "--no-probe")
    assert TRAINERS[framework].main(flags) == 0
    points = records(run, "knn")
    assert [(p["epoch"], p["step"]) for p in points] == [(0, 2), (0, 4), (1, 6), (1, 8)]
    assert all(0 <= p["knn_top1"] <= 1 and p["seconds"] > 0 for p in points)
    times = [p["train_time_s"] for p in points]
    assert times == sorted(times) and times[0] > 0
    # the epoch's training time leaves the points' own time out
    epochs = records(run, "epoch")
    assert times[1] == pytest.approx(epochs[0]["epoch_time_s"], rel=0.05)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["knn_top1"] == points[-1]["knn_top1"]
    config = json.loads((run / "config.json").read_text())
    assert {k: config[k] for k in ("monitor_every", "monitor_bank", "monitor_test", "monitor_k",
                                   "monitor_temperature")} == \
        {"monitor_every": 0.5, "monitor_bank": 200, "monitor_test": 100, "monitor_k": 30,
         "monitor_temperature": 0.1}
    shown = f"knn={100 * points[0]['knn_top1']:.1f}%"  # the progress bar after the first point
    assert shown in capsys.readouterr().err
    assert PROBES[framework].main(["--run", str(run), "--protocol", "knn", "--probe-subset", "0",
                                   "--monitor-k", "30"]) == 0
    result = json.loads((run / "probe_cifar10_knn.json").read_text())
    assert (result["num_train"], result["num_test"]) == (200, 100)
    assert result["settings"]["k"] == 30 and result["settings"]["temperature"] == 0.1
    assert result["top1"] == points[-1]["knn_top1"]
    assert "cifar10 kNN probe: top-1" in capsys.readouterr().out
    assert "knn" not in json.loads((run / "summary.json").read_text()).get("probe", {})


@pytest.mark.parametrize("framework", TRAINERS)
def test_the_monitor_leaves_the_training_unchanged(framework, tiny_data_dir, tmp_path):
    """Its points switch the backbone to eval mode and back: a run with them trains the same
    weights, BatchNorm statistics and losses as one without."""
    runs = {every: tmp_path / f"every-{every}" for every in ("0", "0.5")}
    for every, run in runs.items():
        assert TRAINERS[framework].main(smoke(tiny_data_dir, run, "--epochs", "2", "--no-probe",
                                              "--monitor-every", every)) == 0
    off, on = (trained_arrays(framework, runs[every]) for every in ("0", "0.5"))
    assert off.keys() == on.keys()
    for name, value in off.items():
        np.testing.assert_array_equal(on[name], value, err_msg=name)
    assert [r["loss"] for r in records(runs["0"], "step")] == \
        [r["loss"] for r in records(runs["0.5"], "step")]
    assert not records(runs["0"], "knn") and len(records(runs["0.5"], "knn")) == 4


def test_the_knn_probe_of_gtsrb_and_of_a_converted_run_has_its_own_file(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    assert torch_train.main(smoke(tiny_data_dir, run, "--no-probe", "--monitor-every", "0")) == 0
    assert torch_probe.main(["--run", str(run), "--protocol", "knn", "--dataset", "gtsrb"]) == 0
    result = json.loads((run / "probe_gtsrb_knn.json").read_text())
    assert result["num_classes"] == 43 and "weighted kNN" in result["protocol"]
    from interop import convert
    assert convert.main([str(run), "--to", "flax"]) == 0
    assert jax_probe.main(["--run", str(run), "--protocol", "knn", "--dataset", "gtsrb"]) == 0
    converted = json.loads((run / "probe_gtsrb_knn_jax.json").read_text())
    assert converted["top1"] == pytest.approx(result["top1"], abs=0.03)


def test_a_resumed_run_neither_repeats_nor_loses_a_point(tiny_data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save = TorchBackend.save_checkpoint

    def stop_late_in_epoch_two(self, path, state, progress):
        if progress["epoch"] == 2:  # epoch 2 has trained: it measures at steps 6 and 8...
            raise KeyboardInterrupt  # ...and dies before epoch 2's checkpoint
        real_save(self, path, state, progress)

    monkeypatch.setattr(TorchBackend, "save_checkpoint", stop_late_in_epoch_two)
    flags = smoke(tiny_data_dir, run, "--epochs", "3", "--no-probe", "--monitor-every", "0.5")
    assert torch_train.main(flags) == 130
    assert [p["step"] for p in records(run, "knn")] == [2, 4, 6, 8]
    monkeypatch.setattr(TorchBackend, "save_checkpoint", real_save)
    assert torch_train.main(["--resume", "--out", str(run)]) == 0
    assert [p["step"] for p in records(run, "knn")] == [2, 4, 6, 8, 10, 12]


def test_a_run_from_before_the_monitor_resumes_without_it(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    assert torch_train.main(smoke(tiny_data_dir, run, "--no-probe", "--monitor-every", "0")) == 0
    config = json.loads((run / "config.json").read_text())
    old = {k: v for k, v in config.items() if not k.startswith("monitor_")}
    (run / "config.json").write_text(json.dumps(old))
    assert torch_train.main(["--resume", "--out", str(run), "--epochs", "2"]) == 0
    assert not records(run, "knn") and len(records(run, "epoch")) == 2
    assert json.loads((run / "config.json").read_text())["monitor_every"] == 0


def test_the_points_are_tensorboard_scalars(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    assert jax_train.main(smoke(tiny_data_dir, run, "--epochs", "2", "--no-probe",
                                "--tensorboard")) == 0
    scalars = read_scalars(run)
    assert scalars["knn_top1"] == [(p["step"], pytest.approx(p["knn_top1"]))
                                   for p in records(run, "knn")]
    assert [step for step, _ in scalars["knn_top1"]] == [4, 8]


@pytest.mark.parametrize("flags,says", [
    (["--monitor-k", "0"], "--monitor-k 0: must be positive"),
    (["--monitor-k", "200"], "--monitor-k 200 is larger than the kNN monitor's bank"),
    (["--monitor-bank", "0"], "--monitor-bank 0: must lie in [1, 50,000]"),
    (["--monitor-every", "-1"], "--monitor-every -1.0: must be 0 or more"),
    (["--monitor-every", "nan"], "--monitor-every nan"),
    (["--monitor-every", "inf"], "--monitor-every inf"),
    (["--monitor-temperature", "0"], "--monitor-temperature 0.0: must be positive"),
    (["--monitor-temperature", "inf"], "--monitor-temperature inf")])
@pytest.mark.parametrize("framework", TRAINERS)
def test_bad_monitor_settings_are_one_line_and_leave_nothing(flags, says, framework,
                                                             tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert TRAINERS[framework].main(smoke(tiny_data_dir, run, *flags)) == 2
    line = last_line(capsys)
    assert line.startswith("error: ") and says in line
    assert not run.exists()


@pytest.mark.parametrize("framework", PROBES)
def test_a_knn_probe_with_more_neighbours_than_images_is_one_line_and_writes_nothing(
        framework, tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    # the run monitored with a bank of 128: the probe's bank is its training split, not that
    assert torch_train.main(smoke(tiny_data_dir, run, "--no-probe")) == 0
    if framework == "jax":
        from interop import convert
        assert convert.main([str(run), "--to", "flax"]) == 0
    before = sorted(p.name for p in run.iterdir())
    capsys.readouterr()
    assert PROBES[framework].main(["--run", str(run), "--protocol", "knn", "--probe-subset", "0",
                                   "--monitor-k", "201"]) == 2
    line = last_line(capsys)
    train_size = len(load_split("cifar10", tiny_data_dir, "train")[1])
    assert line == (f"error: a kNN with k = 201 needs a bank of at least 201 images and k of at "
                    f"least 1; the bank holds {train_size}")
    assert sorted(p.name for p in run.iterdir()) == before

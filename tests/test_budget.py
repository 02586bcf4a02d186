"""--time-budget (shared.budget): the plan fits the budget, a resume keeps it or plans again when
the budget moves, the run plans again when its steps take another time, and the kNN monitor's
points are paid for. Steps run on a FakeClock (tests/fake_backend.py), which moves only by what
each step and feature extraction is said to take, the step's timing included: a plan is a
function of the flags and those times alone.

With steps of s seconds, the timing takes 2 warm-up steps and then steps until 5% of the budget
has passed (at least 2): 7 steps of 12.3 ms in a 1 s budget (86.1 ms), after which 0.97 x 1 s
fills floor((0.97 - 0.0861) / 0.0123) = 71 steps, 17.75 epochs of 4 steps (of 50 allowed).
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from jax_impl.backend import open_backend as open_jax_backend
from shared.budget import measure_step_seconds
from shared.runio import load_run_config
from shared.schedule import Plan, lr_at
from tests.fake_backend import FakeClock, NumpyBackend, OnClock, open_numpy_backend, train
from tests.test_monitor import last_line, records, smoke
from torch_impl import train as torch_train
from torch_impl.backend import open_backend as open_torch_backend

BACKENDS = {"torch": open_torch_backend, "jax": open_jax_backend}


@pytest.mark.parametrize("framework", BACKENDS)
def test_a_time_budget_fixes_the_length_and_a_resume_with_the_same_flags_keeps_it(
        framework, tiny_data_dir, tmp_path, capsys):
    run, clock = tmp_path / "run", FakeClock()
    flags = smoke(tiny_data_dir, run, "--time-budget", "1s", "--epochs", "50", "--no-probe",
                  "--log-every", "4", "--warmup-epochs", "2")
    stopped = OnClock(BACKENDS[framework], clock, 0.0123, stop_at=(2, 0))  # Ctrl-C in epoch 3
    assert train(flags, stopped, clock, framework) == 130
    assert "x 17.75 epochs (what fits the 1s time budget at 1301 pairs/s" in \
        capsys.readouterr().out
    cfg = load_run_config(run)
    assert (cfg.epochs, cfg.time_budget) == (50, "1s")  # config.json keeps the flags
    assert [r["epochs"] for r in records(run, "plan")] == [17.75]
    resumed = OnClock(BACKENDS[framework], clock, 0.0123)
    assert train([*flags, "--resume"], resumed, clock, framework) == 0
    assert resumed.timing_steps == 0  # not timed again
    steps = records(run, "step")
    assert [r["step"] for r in steps] == [4 * e for e in range(1, 18)] + [71]
    # the warmup-cosine over 71 steps, before and after the resume
    assert [r["lr"] for r in steps] == [lr_at(r["step"] - 1, Plan(17.75, 4), cfg) for r in steps]
    assert [r["epochs"] for r in records(run, "plan")] == [17.75]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 17.75


@pytest.mark.parametrize("measured,actual,planned", [(0.0123, 0.05, [17.75, 4.25]),
                                                     (0.05, 0.0123, [3.75, 15.5])])
def test_a_budgeted_run_plans_again_when_its_steps_take_another_time(
        measured, actual, planned, tiny_data_dir, tmp_path):
    """Timed at `measured` s a step, trained at `actual`: the run is planned again once a tenth
    of the budget has shown the rate, and still ends within its budget."""
    run, clock = tmp_path / "run", FakeClock()
    backend = OnClock(open_numpy_backend, clock, actual, timing_seconds=measured)
    assert train(smoke(tiny_data_dir, run, "--time-budget", "1s", "--epochs", "50", "--no-probe",
                       "--log-every", "4", "--warmup-epochs", "0"), backend, clock) == 0
    plans = records(run, "plan")
    assert [r["epochs"] for r in plans] == planned
    assert plans[1]["seconds_per_step"] == pytest.approx(actual)
    last = records(run, "step")[-1]["step"]
    assert last == 4 * planned[-1] and 0.9 <= clock.now <= 1.0  # 97% of it, give or take a step


def test_the_plan_is_checked_whatever_the_log_interval(tiny_data_dir, tmp_path):
    """A --log-every longer than the run does not delay the re-plan: the rate is looked at
    every 1% of the budget, as with --log-every 4 above."""
    run, clock = tmp_path / "run", FakeClock()
    backend = OnClock(open_numpy_backend, clock, 0.05, timing_seconds=0.0123)
    assert train(smoke(tiny_data_dir, run, "--time-budget", "1s", "--epochs", "50", "--no-probe",
                       "--log-every", "1000", "--warmup-epochs", "0"), backend, clock) == 0
    assert [r["epochs"] for r in records(run, "plan")] == [17.75, 4.25]
    assert 0.9 <= clock.now <= 1.0


def test_a_budget_the_start_up_uses_up_is_one_line_and_leaves_nothing(tiny_data_dir, tmp_path,
                                                                       capsys):
    run, clock = tmp_path / "run", FakeClock()
    assert train(smoke(tiny_data_dir, run, "--time-budget", "1s"),
                 OnClock(open_numpy_backend, clock, 2.0), clock) == 2
    assert last_line(capsys).startswith("error: the 1s time budget is used up before training "
                                        "starts")
    assert not run.exists()


def test_timing_a_run_shorter_than_the_timing_ends(tiny_data_dir, tmp_path):
    """The step rate is timed over more steps than this run has (4): the timing goes on into
    the epochs after it, and the run ends."""
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "torch_impl.train",
                             *smoke(tiny_data_dir, run, "--time-budget", "20s", "--epochs", "1",
                                    "--no-probe")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("timing the training step: 2 warm-up steps (they compile), then up to 1 s (5% of the "
            "budget; 2 steps at least)") in \
        result.stdout
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


@pytest.mark.parametrize("budget,says", [(8, "up to 0.4 s (5% of the budget; 2 steps at least)"),
                                         (600, "20 s or more")])
def test_the_timing_says_how_long_it_times(budget, says, capsys):
    """5% of 8 s is 0.4 s, not "0 s or more"; 5% of 600 s leaves the full 20 s."""
    clock = FakeClock()

    class Steps(NumpyBackend):
        def train_step(self, state, batch, lr):
            clock.now += 0.1
            return state, {}

    batches = iter(lambda: None, 1)
    seconds = measure_step_seconds(Steps(None, None, None, None), {"w": np.zeros(3)}, batches,
                                   budget, clock, announce=True)
    assert capsys.readouterr().out == ("timing the training step: 2 warm-up steps (they "
                                       f"compile), then {says}\n")
    assert seconds == pytest.approx(0.1)


@pytest.mark.parametrize("framework", BACKENDS)
def test_the_probes_after_a_time_budgeted_run_record_the_epochs_it_trained(
        framework, tiny_data_dir, tmp_path):
    run, clock = tmp_path / "run", FakeClock()
    assert train(smoke(tiny_data_dir, run, "--time-budget", "1s", "--epochs", "50"),
                 OnClock(BACKENDS[framework], clock, 0.0123), clock, framework) == 0
    for dataset in ("cifar10", "gtsrb"):
        result = json.loads((run / f"probe_{dataset}.json").read_text())
        assert result["checkpoint_epoch"] == 17.75  # not the 50 --epochs allowed


def test_a_longer_budget_on_resume_extends_a_finished_budgeted_run(tiny_data_dir, tmp_path):
    run, clock = tmp_path / "run", FakeClock()
    flags = smoke(tiny_data_dir, run, "--time-budget", "1s", "--epochs", "50", "--no-probe",
                  "--log-every", "4", "--warmup-epochs", "0")
    assert train(flags, OnClock(open_numpy_backend, clock, 0.0123), clock) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == 17.75
    assert train(["--resume", "--out", str(run), "--time-budget", "2s"],
                 OnClock(open_numpy_backend, clock, 0.0123), clock) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert 17.75 < summary["epochs"] <= 50
    assert json.loads((run / "config.json").read_text())["time_budget"] == "2s"
    assert train(["--resume", "--out", str(run), "--time-budget", "1s"],
                 OnClock(open_numpy_backend, clock, 0.0123), clock) == 2


def test_a_budgeted_run_with_slow_points_still_ends_on_time(tiny_data_dir, tmp_path):
    """Steps of 12.3 ms and points of 60 ms (two feature extractions of 30 ms), a point every
    epoch (4 steps). After the timing (86.1 ms) and the plan's own point (60 ms), the last point
    keeps 60 ms, and each step costs 12.3 ms + 60 / 4 ms: floor(0.7639 / 0.0273) = 27 steps
    (6.75 epochs). The run, its points included, ends within the budget."""
    run, clock = tmp_path / "run", FakeClock()
    backend = OnClock(open_numpy_backend, clock, 0.0123, feature_seconds=0.03)
    assert train(smoke(tiny_data_dir, run, "--time-budget", "1s", "--epochs", "50",
                       "--no-probe", "--warmup-epochs", "0"), backend, clock) == 0
    plans = records(run, "plan")
    assert plans[0]["epochs"] == 6.75
    assert 0.85 <= clock.now <= 1.0
    points, last_step = records(run, "knn"), records(run, "step")[-1]["step"]
    assert [p["step"] for p in points] == [*range(4, last_step, 4), last_step]
    assert all(p["seconds"] == pytest.approx(0.06) for p in points)


def test_a_first_point_that_compiles_does_not_leave_the_budget_unused(tiny_data_dir, tmp_path):
    """Steps of 12.3 ms, points of 2 ms, but the plan's own point compiles for 1 s, as jax_impl's
    first feature extraction does: the first plan fits 2 steps (0.7255 s left after the timing,
    the point and its reserve, at 12.3 ms + 1 s / 4 a step). At a plan's last step the run
    measures the rate it has and plans again, and the reserve and each step's share of a point
    follow the points measured since: the run ends within 5% of the 97% aimed at, not after 2
    steps."""
    run, clock = tmp_path / "run", FakeClock()
    backend = OnClock(open_numpy_backend, clock, 0.0123, feature_seconds=0.001,
                      compile_seconds=1.0)
    assert train(smoke(tiny_data_dir, run, "--time-budget", "3s", "--epochs", "1000",
                       "--no-probe", "--warmup-epochs", "0"), backend, clock) == 0
    plans = records(run, "plan")
    assert plans[0]["epochs"] == 0.5 and len(plans) >= 2
    # each plan's last step plans again (at the compiled point's share until a point is measured);
    # then the rate is the step's 12.3 ms plus a quarter of a measured point's 2 ms
    assert [r["step"] for r in plans[1:4]] == [2, 4, 6]
    assert plans[-1]["seconds_per_step"] == pytest.approx(0.0123 + 0.002 / 4)
    assert 0.92 * 3 <= clock.now <= 3.0


@pytest.mark.parametrize("value", ["0", "abc", "-5m", "5x"])
def test_a_bad_time_budget_is_one_line(value, tiny_data_dir, tmp_path, capsys):
    assert torch_train.main(smoke(tiny_data_dir, tmp_path / "run", f"--time-budget={value}")) == 2
    assert last_line(capsys) == (f"error: --time-budget {value}: expected a positive duration "
                                 "like 90s, 15m, 2h or 1h30m")
    assert not (tmp_path / "run").exists()

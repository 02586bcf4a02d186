"""shared.sweep: plans, resumable runs, failures recorded, results tables, and every CLI error.

The runs' commands execute in this process (conftest's InProcessLauncher), which saves an
interpreter start and a torch import per command; test_subprocess_launcher_* checks the real one.
"""
import csv
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from shared import jobs, sweep
from shared.errors import UserError
from shared.runio import run_folder_lock

RUN_NAMES = ["std_coeff=5,subset=32,probe_epochs=2", "std_coeff=25,subset=32,probe_epochs=2",
             "std_coeff=50,subset=32,probe_epochs=2"]


def never_launch(command, log_path):
    raise AssertionError(f"no run should start: {command}")


def sweep_args(out, data_dir, *runs):
    return ["--framework", "torch", "--preset", "smoke", "--out", str(out),
            "--data-dir", str(data_dir), *runs]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_json(path):
    return json.loads(Path(path).read_text())


def test_a_sweep_of_three_runs_trains_probes_and_tabulates_them(smoke_sweep):
    out, launcher = smoke_sweep
    plan = read_json(out / "sweep.json")
    assert plan["framework"] == "torch" and plan["preset"] == "smoke"
    assert [r["name"] for r in plan["runs"]] == RUN_NAMES
    assert plan["runs"][0]["overrides"] == {"std_coeff": 5.0, "subset": 32, "probe_epochs": 2}
    # 3 trainings, then one random-init probe per dataset: the runs differ only in std_coeff,
    # which does not touch an untrained backbone, so the other two runs copy that baseline.
    modules = [c[2] for c in launcher.commands]
    assert modules == ["torch_impl.train", "torch_impl.probe", "torch_impl.probe",
                       "torch_impl.train", "torch_impl.train"]
    assert [c[c.index("--dataset") + 1] for c in launcher.commands[1:3]] == ["cifar10", "gtsrb"]
    assert all("--random-init" in c for c in launcher.commands[1:3])
    first = launcher.commands[0]
    assert first[first.index("--std-coeff") + 1] == "5"
    for name in RUN_NAMES:
        run = out / "runs" / name
        config = read_json(run / "config.json")
        assert (config["subset"], config["probe_epochs"], config["preset"]) == (32, 2, "smoke")
        assert (run / "log.txt").read_text().startswith("$ ")
        for dataset in ("cifar10", "gtsrb"):
            assert read_json(run / f"probe_{dataset}.json")["random_init"] is False
            assert read_json(run / f"probe_{dataset}_random_init.json")["random_init"] is True
    shared = read_json(out / "runs" / RUN_NAMES[2] / "probe_gtsrb_random_init.json")
    assert shared["shared_from"] == RUN_NAMES[0]


def test_results_csv_holds_the_run_folders_numbers(smoke_sweep):
    out, _ = smoke_sweep
    rows = read_csv(out / "results.csv")
    assert [row["run"] for row in rows] == RUN_NAMES
    assert all(row["status"] == "done" and row["error"] == "" for row in rows)
    # Only the setting that differs between runs gets a column.
    assert [float(row["std_coeff"]) for row in rows] == [5.0, 25.0, 50.0]
    assert "subset" not in rows[0] and "probe_epochs" not in rows[0]
    for row, name in zip(rows, RUN_NAMES):
        run = out / "runs" / name
        summary = read_json(run / "summary.json")
        for term in ("loss", "invariance", "variance", "covariance", "embedding_std"):
            assert float(row[f"final_{term}"]) == summary["final"][term]
        assert float(row["train_time_s"]) == summary["train_time_s"]
        for dataset in ("cifar10", "gtsrb"):
            assert float(row[f"{dataset}_top1"]) == read_json(run / f"probe_{dataset}.json")["top1"]
            assert (float(row[f"{dataset}_random_init_top1"])
                    == read_json(run / f"probe_{dataset}_random_init.json")["top1"])


def test_results_markdown_has_one_row_a_run(smoke_sweep):
    out, _ = smoke_sweep
    text = (out / "results.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| std_coeff=")]
    assert len(rows) == 3
    assert "python -m shared.sweep --framework torch --preset smoke" in text
    header = next(line for line in text.splitlines() if line.startswith("| run |"))
    assert "CIFAR-10 top-1" in header and "GTSRB random init" in header
    cifar = read_json(out / "runs" / RUN_NAMES[1] / "probe_cifar10.json")["top1"]
    assert f" {100 * cifar:.2f}% " in rows[1]


def test_rerunning_a_finished_sweep_trains_nothing(smoke_sweep):
    out, _ = smoke_sweep
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*")}
    same_command = shlex.split(read_json(out / "sweep.json")["command"])[3:]
    assert "--grid" in same_command
    assert sweep.main(same_command, launch=never_launch) == 0
    assert sweep.main(["--out", str(out)], launch=never_launch) == 0  # the stored plan
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*")} == before


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tiny_data_dir, tmp_path, capsys,
                                                        in_process_launcher):
    runs_file = tmp_path / "runs.txt"
    # subset=5 passes the settings check but training stops: fewer images than classes.
    runs_file.write_text("# first fails, second trains\nsubset=5 probe_epochs=2\n\n"
                         "subset=32 probe_epochs=2  # a comment\n")
    out = tmp_path / "sweep"
    launcher = in_process_launcher
    code = sweep.main(sweep_args(out, tiny_data_dir, "--runs-file", str(runs_file)),
                      launch=launcher)
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: 1 of 2 runs failed (subset=5,probe_epochs=2); see "
                       f"{out / 'results.md'} and each run's log.txt")
    failed = out / "runs" / "subset=5,probe_epochs=2"
    done = out / "runs" / "subset=32,probe_epochs=2"
    failure = read_json(failed / "failure.json")
    assert failure["step"] == "train" and failure["exit_code"] == 2
    assert failure["error"].startswith("error: --batch-size 16 is larger than the 5 training "
                                       "images")
    assert (done / "probe_gtsrb_random_init.json").exists()
    rows = {row["run"]: row for row in read_csv(out / "results.csv")}
    assert rows["subset=5,probe_epochs=2"]["status"] == "failed"
    assert rows["subset=5,probe_epochs=2"]["error"] == failure["error"]
    assert rows["subset=5,probe_epochs=2"]["cifar10_top1"] == ""
    assert rows["subset=32,probe_epochs=2"]["status"] == "done"
    assert [row["subset"] for row in rows.values()] == ["5", "32"]
    md = (out / "results.md").read_text()
    assert "| subset=5,probe_epochs=2 | failed | 5 |" in md and failure["error"] in md
    # A re-run retries only the failed run.
    launcher.commands.clear()
    assert sweep.main(["--out", str(out)], launch=launcher) == 2
    assert [c[c.index("--out") + 1] for c in launcher.commands] == [str(failed)]


def test_subprocess_launcher_logs_output_and_finds_this_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the child must import shared/ from the checkout, not the cwd
    log = tmp_path / "log.txt"
    command = (sys.executable, "-m", "shared.sweep", "--out", "x", "--framework", "torch",
               "--preset", "smoke", "--grid", "std_coef=1")
    assert jobs.run_logged(command, log) == 2
    assert log.read_text().splitlines()[0] == f"$ {shlex.join(command)}"
    assert jobs.last_log_line(log).startswith("error: --grid std_coef=1: unknown setting")
    log.write_text(log.read_text() + " 50%|#####     | 1/2")  # a killed command's last words
    assert jobs.run_logged(command, log) == 2
    assert f"1/2\n$ {shlex.join(command)}\n" in log.read_text()


def test_last_log_line_skips_progress_bar_redraws(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("start\n 10%|#  | 1/10\r 20%|## | 2/10\rerror: boom\n\n")
    assert jobs.last_log_line(log) == "error: boom"
    assert jobs.last_log_line(tmp_path / "missing.txt") == ""


# ---- what a run needs next, from its folder --------------------------------------------------

def a_job(tmp_path, framework="torch", datasets=("cifar10", "gtsrb"), donors=()):
    return jobs.Job("std_coeff=5", tmp_path / "run", framework,
                    ("--preset", "smoke", "--std-coeff", "5", "--no-lr-scaling"), "/data", datasets,
                    tuple(donors))


def touch(path, content="{}"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)


def test_next_step_from_a_fresh_start_to_the_end(tmp_path):
    job = a_job(tmp_path)
    run = job.run_dir
    step = jobs.next_step(job)
    assert step.label == "train" and step.produces == run / "summary.json"
    assert step.command[1:] == ("-m", "torch_impl.train", "--preset", "smoke", "--std-coeff", "5",
                                "--no-lr-scaling", "--out", str(run), "--data-dir", "/data")
    touch(run / "config.json")
    assert jobs.next_step(job).label == "train"  # stopped before its first checkpoint
    touch(run / "checkpoint.pt")
    step = jobs.next_step(job)
    assert step.label == "resume training"
    assert step.command[1:] == ("-m", "torch_impl.train", "--resume", "--out", str(run),
                                "--data-dir", "/data")
    touch(run / "summary.json")
    touch(run / "probe_cifar10.json")
    step = jobs.next_step(job)  # the trainer stopped between its two probes
    assert step.label == "probe gtsrb" and step.produces == run / "probe_gtsrb.json"
    assert "--random-init" not in step.command
    touch(run / "probe_gtsrb.json")
    step = jobs.next_step(job)
    assert step.label == "random-init probe cifar10"
    assert step.command[-5:] == ("--dataset", "cifar10", "--random-init", "--data-dir", "/data")
    touch(run / "probe_cifar10_random_init.json")
    touch(run / "probe_gtsrb_random_init.json")
    assert jobs.next_step(job) is None


def test_next_step_copies_a_baseline_another_run_already_has(tmp_path):
    donor = tmp_path / "other"
    touch(donor / "probe_cifar10_random_init.json", json.dumps({"top1": 0.25}))
    job = a_job(tmp_path, datasets=("cifar10",), donors=[tmp_path / "missing", donor])
    for name in ("summary.json", "probe_cifar10.json"):
        touch(job.run_dir / name)
    step = jobs.next_step(job)
    assert step.copy_from == donor / "probe_cifar10_random_init.json" and not step.command
    assert jobs.run_job(job, never_launch, lambda line: None) is None
    assert read_json(job.run_dir / "probe_cifar10_random_init.json") == {"top1": 0.25,
                                                                        "shared_from": "other"}


def test_jax_runs_use_the_jax_commands_and_checkpoint(tmp_path):
    job = a_job(tmp_path, framework="jax")
    assert jobs.next_step(job).command[2] == "jax_impl.train"
    touch(job.run_dir / "checkpoint.pt")  # a torch checkpoint does not make a jax run resumable
    assert jobs.next_step(job).label == "train"
    touch(job.run_dir / "checkpoint.msgpack")
    assert jobs.next_step(job).label == "resume training"
    for name in ("summary.json", "probe_cifar10.json", "probe_gtsrb.json"):
        touch(job.run_dir / name)
    assert jobs.next_step(job).command[2] == "jax_impl.probe"


def test_checkpoint_names_match_the_trainers():
    from jax_impl.checkpoint import CHECKPOINT_FILE as JAX_CHECKPOINT_FILE
    from torch_impl.checkpoint import CHECKPOINT_FILE
    assert jobs.CHECKPOINT_FILES == {"torch": CHECKPOINT_FILE, "jax": JAX_CHECKPOINT_FILE}


def test_a_step_that_exits_0_without_its_file_is_a_failure(tmp_path):
    job = a_job(tmp_path)
    failure = jobs.run_job(job, lambda command, log: 0, lambda line: None)
    assert failure["error"] == "train exited 0 but wrote no summary.json"
    assert read_json(job.run_dir / "failure.json") == failure


def test_baselines_are_shared_only_between_runs_with_the_same_untrained_backbone(tmp_path):
    runs = [{"std_coeff": 5.0}, {"std_coeff": 25.0}, {"width": 16}, {"seed": 1}]
    jobs = sweep.plan_jobs(sweep.build_plan("torch", "smoke", runs), tmp_path, str(tmp_path))
    assert [[d.name for d in j.baseline_donors] for j in jobs] == [["std_coeff=25"],
                                                                   ["std_coeff=5"], [], []]
    assert all(j.datasets == ("cifar10",) for j in jobs)  # no gtsrb/ in the data folder


# ---- plans ---------------------------------------------------------------------------------------

def test_grid_values_take_the_settings_types_and_every_combination_runs():
    grid = sweep.parse_grid(["std-coeff=5,2.5e1", "mlp=64-64,128", "lr_scaling=false",
                             "epochs=3"])
    assert grid == [("std_coeff", [5.0, 25.0]), ("mlp", ["64-64", "128"]),
                    ("lr_scaling", [False]), ("epochs", [3])]
    names = [sweep.run_name(o) for o in sweep.grid_runs(grid)]
    assert names == ["std_coeff=5,mlp=64-64,lr_scaling=false,epochs=3",
                     "std_coeff=5,mlp=128,lr_scaling=false,epochs=3",
                     "std_coeff=25,mlp=64-64,lr_scaling=false,epochs=3",
                     "std_coeff=25,mlp=128,lr_scaling=false,epochs=3"]


def test_run_names_are_safe_and_bounded():
    assert sweep.run_name({"base_lr": 1e-06, "arch": "a/b c"}) == "base_lr=1e-06,arch=a_b_c"
    long = sweep.run_name({"mlp": "-".join(["1024"] * 40)})
    assert len(long) == sweep.MAX_NAME and long != sweep.run_name({"mlp": "-".join(["1024"] * 41)})


def test_runs_file_lines_become_runs(tmp_path):
    path = tmp_path / "runs.txt"
    path.write_text("std_coeff=10 mlp=512-512\n# comment\n\n  loss_variant=homework  \n")
    assert sweep.parse_runs_file(path) == [{"std_coeff": 10.0, "mlp": "512-512"},
                                           {"loss_variant": "homework"}]


# ---- every user error: one line, exit 2 ------------------------------------------------------

def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize("runs, message", [
    (["--grid", "std_coef=1,2"], "--grid std_coef=1,2: unknown setting 'std_coef'; did you mean "
                                 "std_coeff?"),
    (["--grid", "std_coeff"], "--grid std_coeff: expected KEY=VALUE, got 'std_coeff'"),
    (["--grid", "=1"], "expected KEY=VALUE"),
    (["--grid", "std_coeff=1,,2"], "expected std_coeff=V1,V2,... with no empty value"),
    (["--grid", "std_coeff=abc"], "std_coeff takes a number, got 'abc'"),
    (["--grid", "std_coeff=inf"], "--std-coeff inf: must be a finite number"),
    (["--grid", "width=1.5"], "width takes an integer, got '1.5'"),
    (["--grid", "lr_scaling=maybe"], "lr_scaling takes true or false, got 'maybe'"),
    (["--grid", "out=x"], "out cannot be swept (the sweep names each run folder"),
    (["--grid", "data_dir=x"], "data_dir cannot be swept (use --data-dir)"),
    (["--grid", "preset=cpu"], "preset cannot be swept (use --preset)"),
    (["--grid", "std_coeff=1,1.0"], "a value of std_coeff is listed twice"),
    (["--grid", "std_coeff=1", "--grid", "std_coeff=2"], "std_coeff is already given"),
    (["--grid", "optimizer=sgd"], "run optimizer=sgd: unknown optimizer 'sgd'; choose one of"),
    (["--grid", "mlp=12-x"], "run mlp=12-x: malformed expander spec"),
    (["--grid", "batch_size=1"], "run batch_size=1: --batch-size 1: VICReg needs at least 2"),
    ([], "give the runs: --grid KEY=V1,V2 (repeatable) or --runs-file FILE"),
    (["--grid", "a=1", "--runs-file", "f"], "not allowed with argument"),
    (["--runs-file", "missing.txt"], "cannot read --runs-file missing.txt"),
])
def test_bad_runs_are_one_line_errors(runs, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sweep.main(sweep_args(tmp_path / "sw", tmp_path, *runs), launch=never_launch) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("text, message", [
    ("std_coeff=1\nstd_coeff 2\n", "runs.txt:2: expected KEY=VALUE, got 'std_coeff'"),
    ("std_coeff=1 std_coeff=2\n", "runs.txt:1: std_coeff is set twice on one line"),
    ("widht=3\n", "runs.txt:1: unknown setting 'widht'; did you mean width?"),
    ("width=wide\n", "runs.txt:1: width takes an integer, got 'wide'"),
    ("# nothing\n\n", "lists no runs"),
    ("std_coeff=1\nstd_coeff=1.0\n", "run std_coeff=1 is listed twice"),
])
def test_bad_runs_files_are_one_line_errors(text, message, tmp_path, capsys):
    path = tmp_path / "runs.txt"
    path.write_text(text)
    args = sweep_args(tmp_path / "sw", tmp_path, "--runs-file", str(path))
    assert sweep.main(args, launch=never_launch) == 2
    assert message in error_line(capsys)


def test_flags_are_checked_before_anything_runs(tmp_path, capsys):
    out = str(tmp_path / "sw")
    for argv, message in (
            (["--out", out, "--grid", "std_coeff=1"], "a new sweep needs --framework"),
            (["--out", out, "--framework", "tf", "--grid", "std_coeff=1"],
             "argument --framework: invalid choice: 'tf'"),
            (["--out", out, "--framework", "torch", "--preset", "nope", "--grid", "std_coeff=1"],
             "argument --preset: invalid choice: 'nope'"),
            (["--framework", "torch"], "the following arguments are required: --out")):
        assert sweep.main(argv, launch=never_launch) == 2
        assert message in error_line(capsys)


def test_a_sweep_folder_keeps_its_plan(tmp_path, capsys):
    out = tmp_path / "sw"
    out.mkdir()
    plan = sweep.build_plan("torch", "smoke", [{"std_coeff": 5.0}])
    (out / "sweep.json").write_text(json.dumps({**plan.to_json(), "data_dir": str(tmp_path),
                                                "command": "python -m shared.sweep ..."}))
    for argv, message in (
            (sweep_args(out, tmp_path, "--grid", "std_coeff=6"),
             f"{out} already holds another sweep (torch, preset smoke, runs std_coeff=5); "
             f"continue it with `python -m shared.sweep --out {out}` or choose another --out"),
            (["--out", str(out), "--framework", "jax"],
             f"{out} is a framework torch sweep, not jax")):
        assert sweep.main(argv, launch=never_launch) == 2
        assert error_line(capsys) == f"error: {message}"
    (out / "sweep.json").write_text("{not json")
    assert sweep.main(["--out", str(out)], launch=never_launch) == 2
    assert f"{out / 'sweep.json'} is not valid JSON" in error_line(capsys)


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--out", "--framework", "--preset", "--grid", "--runs-file", "--data-dir"):
        assert flag in text
    assert "resumes interrupted" in text


def test_setting_errors_name_their_source():
    from shared.cli import parse_setting
    with pytest.raises(UserError, match=r"^f:3: std_coeff takes a number, got 'x'$"):
        parse_setting("std_coeff", "x", "f:3: std_coeff")


def table(path, columns=("run", "status", "final_loss")):
    rows = read_csv(path)
    keys = [k for k in rows[0] if "top1" in k or k in columns]
    return keys, [[row[k] for k in keys] for row in rows]


def test_two_runs_at_a_time_tabulate_what_one_at_a_time_does(smoke_sweep, tiny_data_dir,
                                                             tmp_path, capsys):
    sequential, _ = smoke_sweep
    out = tmp_path / "std"
    args = sweep_args(out, tiny_data_dir, "--grid", "std_coeff=5,25,50", "--grid", "subset=32",
                      "--grid", "probe_epochs=2", "--parallel", "2")
    assert sweep.main(args) == 0, capsys.readouterr().err  # real subprocesses, 2 at a time
    printed = capsys.readouterr().out
    assert "0 finished, 3 to run, 2 at a time" in printed
    assert f"    [{RUN_NAMES[1]}] train" in printed
    keys, rows = table(out / "results.csv")
    assert any("top1" in k for k in keys) and (keys, rows) == table(sequential / "results.csv")


def test_status_shows_each_runs_state_and_starts_nothing(smoke_sweep, tmp_path, capsys,
                                                         monkeypatch):
    out = tmp_path / "std"
    shutil.copytree(smoke_sweep[0], out)
    failing, unstarted, running = (out / "runs" / name for name in RUN_NAMES)
    (failing / "probe_gtsrb.json").unlink()

    def fail(command, log_path):
        with open(log_path, "a") as log:
            log.write("epoch 1/2\rgtsrb probe: 40%\nerror: no space left on device\n")
        return 2

    assert sweep.main(["--out", str(out)], launch=fail) == 2
    shutil.rmtree(unstarted)
    (running / "summary.json").unlink()
    with open(running / "log.txt", "a") as log:
        log.write("epoch 3/60 loss 21.5\r")
    capsys.readouterr()
    with run_folder_lock(running, "python -m torch_impl.train"):
        assert sweep.main(["--out", str(out), "--status"], launch=never_launch) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"sweep {out}: 1 failed, 1 running, 1 to run",
                       f"  {RUN_NAMES[0]}: failed: error: no space left on device",
                       f"  {RUN_NAMES[1]}: to run",
                       f"  {RUN_NAMES[2]}: running (process {os.getpid()}): epoch 3/60 loss 21.5"]
    assert [row[1] for row in table(out / "results.csv")[1]] == ["failed", "pending", "incomplete"]

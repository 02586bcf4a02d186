"""A run folder through both trainers is always resumable or restartable, a finished one is never
damaged, one process writes it at a time, and every failure a user can cause is one line."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jax_impl import train as jax_train
from jax_impl.backend import Backend as JaxBackend
from shared import report as report_cli
from shared import sweep as sweep_cli
from torch_impl import probe as torch_probe
from torch_impl import train as torch_train
from torch_impl.backend import Backend as TorchBackend

TRAINERS = {"torch": torch_train, "jax": jax_train}
BACKENDS = {"torch": TorchBackend, "jax": JaxBackend}
CHECKPOINTS = {"torch": "checkpoint.pt", "jax": "checkpoint.msgpack"}


def smoke(data_dir, out, *extra):
    return ["--preset", "smoke", "--width", "4", "--data-dir", str(data_dir), "--out", str(out),
            "--probe-epochs", "2", *extra]


def last_line(capsys) -> str:
    """The last line on stderr, which must be the whole message (no traceback above it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def folder_bytes(run) -> dict:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.name != ".lock"}


@pytest.mark.parametrize("framework", TRAINERS)
def test_resume_of_a_finished_run_changes_nothing_and_says_how_to_extend(
        framework, tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    trainer = TRAINERS[framework]
    assert trainer.main(smoke(tiny_data_dir, run)) == 0
    before = folder_bytes(run)
    summary = json.loads((run / "summary.json").read_text())
    assert None not in summary["final"].values()
    capsys.readouterr()
    assert trainer.main(["--resume", "--out", str(run)]) == 0
    assert "nothing to do. To train longer: --resume" in capsys.readouterr().out
    assert folder_bytes(run) == before


def test_resume_of_a_run_killed_during_its_probe_completes_it(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    assert torch_train.main(smoke(tiny_data_dir, run, "--no-probe")) == 0
    (run / "summary.json").unlink()  # as if killed between the last checkpoint and the summary
    assert torch_train.main(["--resume", "--out", str(run), "--probe"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert None not in summary["final"].values() and set(summary["probe"]) == {"cifar10", "gtsrb"}


@pytest.mark.parametrize("flags,named", [
    (["--preset", "cpu"], ["--preset cpu (the run has smoke)"]),
    (["--batch-size", "32", "--subset", "128"],
     ["--subset 128 (the run has 64)", "--batch-size 32 (the run has 16)"]),
    (["--epochs", "1"], ["--epochs 1 (the run has 2; a resumed run can only be extended)"]),
    (["--epochs", "3", "--monitor-k", "5", "--monitor-test", "32"],
     ["--monitor-test 32 (the run has 64: its kNN monitor points were measured with it)",
      "--monitor-k 5 (the run has 20: its kNN monitor points were measured with it)"]),
])
def test_resume_refuses_settings_that_contradict_the_run(flags, named, tiny_data_dir, tmp_path,
                                                         capsys):
    run = tmp_path / "run"
    assert torch_train.main(smoke(tiny_data_dir, run, "--epochs", "2", "--no-probe")) == 0
    before = folder_bytes(run)
    assert torch_train.main(["--resume", "--out", str(run), *flags]) == 2
    line = last_line(capsys)
    assert line.startswith(f"error: cannot resume {run} with settings that contradict")
    assert all(part in line for part in named)
    assert folder_bytes(run) == before


def test_resume_may_extend_the_run_and_change_how_it_runs(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    assert torch_train.main(smoke(tiny_data_dir, run, "--no-probe")) == 0
    assert torch_train.main(["--resume", "--out", str(run), "--epochs", "2", "--workers", "2",
                             "--log-every", "2", "--probe-epochs", "1"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["epochs"], config["workers"], config["probe_epochs"]) == (2, 2, 1)


@pytest.mark.parametrize("framework", TRAINERS)
@pytest.mark.parametrize("again", [[], ["--resume"]], ids=["same command", "resume"])
def test_a_run_that_dies_in_its_first_epoch_starts_again(framework, again, tiny_data_dir,
                                                         tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    trainer = TRAINERS[framework]
    backend, real_step = BACKENDS[framework], BACKENDS[framework].train_step
    monkeypatch.setattr(backend, "train_step", lambda self, state, batch, lr: real_step(
        self, state, batch, math_nan() if (batch.epoch, batch.step) == (0, 1) else lr))
    assert trainer.main(smoke(tiny_data_dir, run, "--no-probe")) == 2
    assert "loss became nan" in last_line(capsys)
    assert not (run / CHECKPOINTS[framework]).exists()
    monkeypatch.setattr(backend, "train_step", real_step)
    command = ["--resume", "--out", str(run)] if again else smoke(tiny_data_dir, run, "--no-probe")
    assert trainer.main(command) == 0
    assert "stopped before its first checkpoint; starting it again" in capsys.readouterr().out
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the failed attempt's lines are gone
    assert [(r["kind"], r["step"]) for r in lines] == [("step", 1), ("step", 2), ("step", 3),
                                                        ("step", 4), ("knn", 4), ("epoch", 4)]


def math_nan() -> float:
    return float("nan")


@pytest.fixture
def held(tmp_path):
    """A folder whose lock another process holds, as a running trainer would: (folder, its PID)."""
    folder = tmp_path / "busy"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from pathlib import Path; "
         "from shared.runio import run_folder_lock\n"
         f"with run_folder_lock(Path({str(folder)!r}), 'python -m torch_impl.train --resume'):\n"
         "    print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert holder.stdout.readline().strip() == "held"
    yield folder, holder.pid
    holder.kill()
    holder.wait()


def test_a_second_writer_of_a_folder_exits_2_naming_the_holder(held, tiny_data_dir, tmp_path,
                                                              capsys):
    folder, pid = held
    expected = f"error: {folder} is in use by process {pid} (python -m torch_impl.train --resume)"
    assert torch_train.main(smoke(tiny_data_dir, folder)) == 2
    assert last_line(capsys).startswith(expected)
    (folder / "config.json").write_text(json.dumps({"preset": "smoke"}))
    assert torch_train.main(["--resume", "--out", str(folder)]) == 2
    assert last_line(capsys).startswith(expected)
    assert torch_probe.main(["--run", str(folder)]) == 2
    assert last_line(capsys).startswith(expected)
    assert sweep_cli.main(["--out", str(folder), "--framework", "torch", "--preset", "smoke",
                           "--grid", "std_coeff=5"], launch=lambda *a: 0) == 2
    assert last_line(capsys).startswith(expected)
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "config.json"]


@pytest.mark.parametrize("after_checkpoint", [True, False])
def test_ctrl_c_is_one_line_exit_130_that_says_how_to_go_on(after_checkpoint, tiny_data_dir,
                                                            tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_step = TorchBackend.train_step

    def interrupted_step(self, state, batch, lr):
        if batch.epoch == (1 if after_checkpoint else 0):
            raise KeyboardInterrupt
        return real_step(self, state, batch, lr)

    monkeypatch.setattr(TorchBackend, "train_step", interrupted_step)
    assert torch_train.main(smoke(tiny_data_dir, run, "--epochs", "2")) == 130
    line = last_line(capsys)
    if after_checkpoint:
        assert line == (f"interrupted: {run} keeps its last checkpoint; continue with: "
                        f"python -m torch_impl.train --resume --out {run}")
    else:
        assert line == (f"interrupted: stopped before the first checkpoint; the same command "
                        f"starts {run} again")


def test_out_that_is_a_file_or_cannot_be_created_is_one_line(tiny_data_dir, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert torch_train.main(smoke(tiny_data_dir, a_file)) == 2
    assert last_line(capsys) == f"error: run folder {a_file} is a file, not a folder; choose " \
                                "another path"
    assert torch_train.main(smoke(tiny_data_dir, a_file / "run")) == 2
    assert last_line(capsys).startswith(f"error: cannot create run folder {a_file / 'run'}")
    assert sweep_cli.main(["--out", str(a_file), "--framework", "torch", "--preset", "smoke",
                           "--grid", "std_coeff=5"], launch=lambda *a: 0) == 2
    assert "is a file, not a folder" in last_line(capsys)
    run = tmp_path / "run"
    assert torch_train.main(smoke(tiny_data_dir, run, "--no-probe")) == 0
    assert report_cli.main([str(run), "--out", str(a_file / "report.md")]) == 2
    assert last_line(capsys) == f"error: report folder {a_file} is a file, not a folder; " \
                                "choose another path"
    (tmp_path / "old.md").mkdir()
    assert report_cli.main([str(run), "--out", str(tmp_path / "old.md")]) == 2
    assert "is a folder; give the report's file name" in last_line(capsys)


def test_a_refused_setting_leaves_no_folder(tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert torch_train.main(smoke(tiny_data_dir, run, "--crop-min-scale", "5")) == 2
    assert last_line(capsys) == "error: --crop-min-scale 5.0: must lie in (0, 1]"
    assert not run.exists()
    assert torch_train.main(smoke(tiny_data_dir, run, "--subset", "100000")) == 2
    assert last_line(capsys) == ("error: --subset 100000 is larger than the 200 CIFAR-10 training "
                                 "images; use at most that many (or 0 for all)")
    assert not run.exists()


def test_probes_never_replace_a_good_result_with_a_bad_one(tiny_data_dir, tmp_path, monkeypatch,
                                                          capsys):
    run = tmp_path / "run"
    assert torch_train.main(smoke(tiny_data_dir, run)) == 0
    good = (run / "probe_cifar10.json").read_bytes()
    assert torch_probe.main(["--run", str(run), "--probe-lr", "nan"]) == 2
    assert last_line(capsys) == "error: --probe-lr nan: must be a finite number"
    monkeypatch.setattr(torch_probe, "train_linear",
                        lambda train_x, train_y, test_x, classes, cfg:
                        np.full((len(test_x), classes), np.nan, np.float32))
    assert torch_probe.main(["--run", str(run), "--probe-lr", "9"]) == 2
    assert last_line(capsys) == ("error: the cifar10 linear probe diverged (non-finite outputs) "
                                 "with --probe-lr 9.0; try a lower one. Nothing was written")
    assert (run / "probe_cifar10.json").read_bytes() == good


def test_the_smoke_preset_probes_a_small_stratified_subset(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    assert torch_train.main(smoke(tiny_data_dir, run, "--probe-subset", "50")) == 0
    result = json.loads((run / "probe_cifar10.json").read_text())
    assert (result["num_train"], result["num_test"], result["settings"]["subset"]) == (50, 50, 50)
    per_class = [c for c in result["per_class_top1"] if c is not None]
    assert len(per_class) == 10  # every class is in the test subset
    gtsrb = json.loads((run / "probe_gtsrb.json").read_text())
    assert (gtsrb["num_train"], gtsrb["num_test"]) == (50, 43)  # 43 test images: all of them


def test_a_corrupt_metrics_line_is_refused_before_training(tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert torch_train.main(smoke(tiny_data_dir, run, "--epochs", "2", "--no-probe")) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:2] + ["{not json\n"] + lines[2:]))
    before = folder_bytes(run)
    assert torch_train.main(["--resume", "--out", str(run), "--epochs", "4"]) == 2
    assert last_line(capsys).startswith(f"error: {run / 'metrics.jsonl'}:3 is not a JSON record")
    assert folder_bytes(run) == before  # nothing trained, nothing written


@pytest.mark.parametrize("broken,message", [
    ("test_batch", "CIFAR-10 not found: {data}/cifar-10-batches-py/test_batch does not exist"),
    ("empty gtsrb", "GTSRB in {data}/gtsrb is incomplete: {data}/gtsrb/GTSRB/Training does not "
                    "exist"),
])
def test_the_data_the_probes_need_is_checked_before_training(broken, message, tiny_data,
                                                             tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data.root, data)
    if broken == "test_batch":
        (data / "cifar-10-batches-py" / "test_batch").unlink()
    else:
        shutil.rmtree(data / "gtsrb")
        (data / "gtsrb").mkdir()
    run = tmp_path / "run"
    assert torch_train.main(smoke(data, run)) == 2
    assert last_line(capsys).startswith("error: " + message.format(data=data))
    assert not run.exists()
    if broken == "test_batch":  # the kNN monitor classifies test images too
        assert torch_train.main(smoke(data, run, "--no-probe")) == 2
        assert last_line(capsys).startswith("error: the kNN monitor needs CIFAR-10's labelled "
                                            "images (--monitor-every 0 turns it off): "
                                            + message.format(data=data))
        assert not run.exists()
    # a run that will not probe nor monitor
    assert torch_train.main(smoke(data, run, "--no-probe", "--monitor-every", "0")) == 0


def test_a_batch_larger_than_the_subset_leaves_nothing(tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert torch_train.main(smoke(tiny_data_dir, run, "--batch-size", "65")) == 2
    assert last_line(capsys) == ("error: --batch-size 65 is larger than the 64 training images "
                                 "(lower --batch-size or raise --subset)")
    assert not run.exists()


@pytest.mark.parametrize("failure,message", [
    (MemoryError(), "error: out of memory; lower --batch-size or --width"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate "
                  "memory: you tried to allocate 362797056000 bytes."),
     "error: out of memory ([enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't "
     "allocate memory: you tried to allocate 362797056000 bytes.); lower --batch-size or "
     "--width"),
])
def test_out_of_memory_at_the_start_is_one_line_and_leaves_nothing(failure, message,
                                                                   tiny_data_dir, tmp_path,
                                                                   monkeypatch, capsys):
    def allocate(self):
        raise failure

    monkeypatch.setattr(TorchBackend, "initial_state", allocate)
    run = tmp_path / "run"
    assert torch_train.main(smoke(tiny_data_dir, run)) == 2
    assert last_line(capsys) == message
    assert not run.exists()


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tiny_data_dir, tmp_path,
                                                               monkeypatch, capsys):
    import errno

    from torch_impl import checkpoint as torch_checkpoint
    run = tmp_path / "run"
    real_save = torch_checkpoint.save_checkpoint

    def save_until_full(path, state):
        if state["epoch"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(path, state)

    monkeypatch.setattr(torch_checkpoint, "save_checkpoint", save_until_full)
    assert torch_train.main(smoke(tiny_data_dir, run, "--epochs", "3", "--no-probe")) == 2
    assert last_line(capsys) == (f"error: no space left on the disk holding {run}/checkpoint.pt; "
                                 "what was written before is kept (free some space, then "
                                 "--resume)")
    monkeypatch.setattr(torch_checkpoint, "save_checkpoint", real_save)
    assert torch_train.main(["--resume", "--out", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 12


def test_extending_a_run_says_how_the_schedule_moves(tiny_data_dir, tmp_path, capsys):
    from shared.runio import load_run_config
    from shared.schedule import Plan, lr_at
    run = tmp_path / "run"
    assert torch_train.main(smoke(tiny_data_dir, run, "--epochs", "2", "--no-probe")) == 0
    capsys.readouterr()
    assert torch_train.main(["--resume", "--out", str(run), "--epochs", "3"]) == 0
    cfg = load_run_config(run)
    old = lr_at(8, Plan(2, 4), cfg)
    assert (f"note: extending 2 -> 3 epochs recomputes the warmup-cosine schedule over the longer "
            f"run: the learning rate at step 8 goes from {old:.3g} (the end of the old schedule) "
            f"to {lr_at(8, Plan(3, 4), cfg):.3g}") in capsys.readouterr().out


def test_reprobing_updates_the_summary_and_the_report_flags_older_probes(tiny_data_dir, tmp_path,
                                                                         capsys):
    run = tmp_path / "run"
    assert torch_train.main(smoke(tiny_data_dir, run)) == 0
    assert torch_probe.main(["--run", str(run), "--probe-epochs", "1"]) == 0
    probe = json.loads((run / "probe_cifar10.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["probe"]["cifar10"] == probe["top1"] and probe["checkpoint_epoch"] == 1
    assert torch_train.main(["--resume", "--out", str(run), "--epochs", "3", "--no-probe"]) == 0
    assert "probe" not in json.loads((run / "summary.json").read_text())
    assert report_cli.main([str(run), "--out", str(tmp_path / "report.md")]) == 0
    table = (tmp_path / "report.md").read_text()
    assert f"{100 * probe['top1']:.2f}% (at epoch 1, before the last)" in table

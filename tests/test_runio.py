"""shared.runio and shared.run_folder: atomic writes, run-folder protection, the lock."""
import json
import os
import subprocess
import sys

import pytest

from shared.config import make_config
from shared.errors import UserError
from shared.records import MetricsLog, StepRecord, read_records
from shared.run_folder import start_run_dir
from shared.runio import (
    atomic_write_bytes,
    lock_holder,
    make_folder,
    probe_result_path,
    run_folder_lock,
)


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_permissions_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "f.json", b"{}")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what any other new file gets
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def start(run_dir, resume, framework="torch", **settings):
    cfg = make_config({"preset": "smoke", "out": str(run_dir), **settings})
    return start_run_dir(run_dir, cfg.to_json(), resume, framework)


def test_a_new_run_writes_its_config_and_a_trained_one_is_never_overwritten(tmp_path):
    run = make_folder(tmp_path / "run", "run folder")
    assert start(run, resume=False) is False
    assert json.loads((run / "config.json").read_text())["out"] == str(run)
    (run / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        start(run, resume=False)
    assert start(run, resume=True) is True
    with pytest.raises(UserError, match=r"holds a torch checkpoint \(checkpoint.pt\).*--to flax"):
        start(run, resume=True, framework="jax")
    with pytest.raises(UserError, match="already holds a run"):
        start(run, resume=False, framework="jax")


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_stopped_before_its_first_checkpoint_starts_again(tmp_path, capsys, resume):
    run = make_folder(tmp_path / "run", "run folder")
    start(run, resume=False, epochs=5)
    MetricsLog(run).write(StepRecord(epoch=0, step=1))  # the attempt logged a step, then died
    assert start(run, resume=resume, epochs=7) is False
    assert "stopped before its first checkpoint; starting it again" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["epochs"] == 7
    assert read_records(run) == []


@pytest.mark.parametrize("left", ["summary.json", "probe_cifar10.json", "checkpoint.msgpack"])
def test_a_folder_with_results_is_not_taken_for_a_stopped_start(tmp_path, left):
    run = make_folder(tmp_path / "run", "run folder")
    start(run, resume=False)
    (run / left).write_text("{}")
    with pytest.raises(UserError, match="already holds a run"):
        start(run, resume=False)


def test_resume_of_an_empty_folder_is_an_error(tmp_path):
    run = make_folder(tmp_path / "run", "run folder")
    with pytest.raises(UserError, match="no run in .* start it without --resume"):
        start(run, resume=True)


def test_make_folder_errors_are_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        make_folder(tmp_path / "file", "run folder")
    with pytest.raises(UserError, match="cannot create run folder"):
        make_folder(tmp_path / "file" / "sub", "run folder")


def test_the_lock_names_its_holder_and_is_released_by_a_killed_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from shared.runio import run_folder_lock\n"
         f"with run_folder_lock(Path({str(tmp_path)!r}), 'python -m torch_impl.train'):\n"
         "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in use by process {holder.pid} \(python -m "
                                            r"torch_impl.train\)"):
            with run_folder_lock(tmp_path, "python -m torch_impl.probe"):
                pass
    finally:
        holder.kill()  # kill -9: no clean-up runs, the kernel drops the lock
        holder.wait()
    with run_folder_lock(tmp_path, "python -m torch_impl.probe"):
        assert (tmp_path / ".lock").read_text().startswith(
            f"{os.getpid()} python -m torch_impl.probe")


def test_a_status_look_at_the_lock_does_not_turn_a_starting_trainer_away(tmp_path):
    """lock_holder holds a shared lock for an instant; a trainer starting in that instant waits
    for it instead of reporting the folder in use."""
    (tmp_path / ".lock").write_text("")
    looker = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, time\n"
         f"fd = os.open({str(tmp_path / '.lock')!r}, os.O_RDONLY)\n"
         "fcntl.flock(fd, fcntl.LOCK_SH); print('looking', flush=True); time.sleep(0.3)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert looker.stdout.readline().strip() == "looking"
        assert lock_holder(tmp_path) is None  # a shared lock is no trainer
        with run_folder_lock(tmp_path, "python -m torch_impl.train"):
            assert lock_holder(tmp_path) == f"{os.getpid()} python -m torch_impl.train"
    finally:
        looker.kill()
        looker.wait()


def test_probe_result_names(tmp_path):
    assert probe_result_path(tmp_path, "gtsrb", False).name == "probe_gtsrb.json"
    assert probe_result_path(tmp_path, "cifar10", True).name == "probe_cifar10_random_init.json"
    (tmp_path / "summary.json").write_text(json.dumps({"framework": "torch"}))
    assert probe_result_path(tmp_path, "cifar10", False, "torch").name == "probe_cifar10.json"
    assert probe_result_path(tmp_path, "cifar10", False, "jax").name == "probe_cifar10_jax.json"
    assert probe_result_path(tmp_path, "gtsrb", True, "jax").name == \
        "probe_gtsrb_random_init_jax.json"

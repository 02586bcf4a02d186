"""shared.cluster and --launcher: submitit's local executor stands in for SLURM (it runs the same
job functions in local processes and requeues a job that its preemption signal checkpointed)."""
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shared import cluster, sweep
from shared.cli import cli_main
from shared.launcher import LauncherSettings

pytest.importorskip("submitit")


def trainer_args(data_dir, out, *extra):
    return ["--preset", "smoke", "--no-probe", "--epochs", "60", "--monitor-every", "0",
            "--data-dir", str(data_dir), "--out", str(out), *extra]


def tensors(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from tensors(value, f"{prefix}{key}.")
        elif torch.is_tensor(value):
            yield f"{prefix}{key}", value


def test_a_preempted_job_is_requeued_and_ends_as_an_uninterrupted_run(tiny_data_dir, tmp_path):
    out = tmp_path / "job"
    submit = trainer_args(tiny_data_dir, out, "--launcher", "slurm", "--timeout", "10m")
    assert cli_main(lambda: cluster.submitted_to_cluster(submit, "torch", cluster="local")) == 0
    controller = int(json.loads((out / "jobs.json").read_text())["job"]["job_id"])
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists():
        assert time.monotonic() < deadline, (out / "log.txt").read_text()
        time.sleep(0.05)
    task = subprocess.run(["pgrep", "-P", str(controller)], capture_output=True, text=True,
                          check=True).stdout.split()[0]
    os.kill(int(task), 12)  # SIGUSR2, SLURM's and submitit's preemption signal
    while cluster.pid_state(str(controller)) == "RUNNING":
        assert time.monotonic() < deadline + 120
        time.sleep(0.2)
    log = (out / "log.txt").read_text()
    assert "interrupted:" in log and "--resume" in log.split("interrupted:")[1], log
    assert (out / "summary.json").exists(), log
    uninterrupted = tmp_path / "plain"
    subprocess.run([sys.executable, "-m", "torch_impl.train",
                    *trainer_args(tiny_data_dir, uninterrupted)], check=True,
                   capture_output=True)
    resumed = torch.load(out / "checkpoint.pt", weights_only=False)
    plain = torch.load(uninterrupted / "checkpoint.pt", weights_only=False)
    assert resumed["global_step"] == plain["global_step"]
    for part in ("model", "optimizer"):
        ours, theirs = dict(tensors(resumed[part])), dict(tensors(plain[part]))
        assert ours.keys() == theirs.keys() and ours
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_sweep_through_the_executor_tabulates_what_the_sequential_one_does(
        smoke_sweep, tiny_data_dir, tmp_path, capsys):
    sequential, _ = smoke_sweep
    out = tmp_path / "std"
    args = ["--framework", "torch", "--preset", "smoke", "--out", str(out), "--data-dir",
            str(tiny_data_dir), "--grid", "std_coeff=5,25,50", "--grid", "subset=32",
            "--grid", "probe_epochs=2", "--launcher", "slurm", "--wait"]
    assert sweep.main(args, cluster="local", poll_s=0.5) == 0, capsys.readouterr().err
    assert "submitted 3 jobs" in capsys.readouterr().out
    ours, theirs = read_csv(out / "results.csv"), read_csv(sequential / "results.csv")
    numbers = [k for k in theirs[0] if "top1" in k or k in ("run", "status", "final_loss")]
    assert numbers and [[r[k] for k in numbers] for r in ours] == \
        [[r[k] for k in numbers] for r in theirs]
    assert set(json.loads((out / "jobs.json").read_text())) == {r["run"] for r in theirs}
    assert sweep.main(["--out", str(out), "--status"]) == 0
    status = capsys.readouterr().out
    assert status.startswith(f"sweep {out}: 3 done") and status.count(": done") == 3


def test_a_trainer_world_on_several_gpus_and_nodes():
    command = (sys.executable, "-m", "torch_impl.train", "--out", "r")
    one = LauncherSettings("slurm", gpus_per_node=1)
    assert cluster.world_command(command, "torch", one, 0, ["n0"], "77") == (command, {})
    four = LauncherSettings("slurm", gpus_per_node=4)
    started, env = cluster.world_command(command, "torch", four, 0, ["n0"], "77")
    assert started == (sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                       "--nproc-per-node=4", "--standalone", "-m", "torch_impl.train", "--out",
                       "r") and env == {}
    two = LauncherSettings("slurm", gpus_per_node=8, nodes=2)
    started, _ = cluster.world_command(command, "torch", two, 1, ["n0", "n1"], "77")
    assert "--rdzv-endpoint=n0:29577" in started and "--nnodes=2" in started
    jax_command = (sys.executable, "-m", "jax_impl.train")
    assert cluster.world_command(jax_command, "jax", two, 1, ["n0", "n1"], "77") == (
        jax_command, {"JAX_COORDINATOR_ADDRESS": "n0:29577", "JAX_NUM_PROCESSES": "2",
                      "JAX_PROCESS_ID": "1"})


@pytest.mark.parametrize("flags, message", [
    (["--partition", "gpu"], "--partition is for --launcher slurm"),
    (["--parallel", "0"], "--parallel 0: must be 1 or more"),
    (["--launcher", "slurm", "--parallel", "2"], "--parallel is for --launcher local"),
    (["--launcher", "slurm", "--nodes", "0"], "--nodes 0: must be 1 or more"),
    (["--launcher", "slurm", "--gpus-per-node", "-1"], "--gpus-per-node -1: must be 0 or more"),
    (["--launcher", "slurm", "--timeout", "soon"], "--timeout soon: expected a positive"),
    (["--launcher", "slurm", "--slurm", "qos"], "--slurm 'qos': expected KEY=VALUE"),
    (["--launcher", "pbs"], "argument --launcher: invalid choice"),
    (["--launcher", "slurm"], "no sbatch on this machine"),
])
def test_bad_launcher_flags_are_one_line_errors(flags, message, tiny_data_dir, tmp_path, capsys,
                                                monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    args = ["--framework", "torch", "--preset", "smoke", "--out", str(tmp_path / "s"),
            "--data-dir", str(tiny_data_dir), "--grid", "std_coeff=5", *flags]
    assert sweep.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_without_submitit_slurm_says_how_to_install_it(tiny_data_dir, tmp_path, capsys,
                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    assert cli_main(lambda: cluster.submitted_to_cluster(
        trainer_args(tiny_data_dir, tmp_path / "r", "--launcher", "slurm"), "torch")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[cluster]"' in err, err
    assert not Path(tmp_path / "r" / "jobs.json").exists()

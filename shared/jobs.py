"""One run of a sweep: what it still needs, read from its folder, and bringing it to its end.

A run is a chain of subprocesses: the trainer (which probes the trained backbone itself), then
the probes it still lacks and the random-init baselines (copied from another run with the same
untrained backbone where one has it). What the run needs next is read from its files alone, so
the same call after any stop (a crash, Ctrl-C, a requeued cluster job) goes on where it stopped:
shared.sweep runs these on one machine, shared.cluster as SLURM jobs.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared.data import dataset_key
from shared.results import (
    FAILURE_FILE,
    load_sweep,
    read_sweep_file,
    results_csv,
    sweep_results_markdown,
)
from shared.runio import (
    CHECKPOINT_FILES,
    SUMMARY_FILE,
    atomic_write_bytes,
    probe_result_path,
    read_json,
    tool_module,
    write_json,
)

LOG_FILE = "log.txt"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"


@dataclass(frozen=True)
class Job:
    """One run, with everything needed to build its commands."""

    name: str
    run_dir: Path
    framework: str
    train_flags: tuple[str, ...]  # the trainer's settings, e.g. ("--preset", "cpu", "--wd", "0")
    data_dir: str
    datasets: tuple[str, ...] = ()  # probed (and their random-init baselines) after training
    baseline_donors: tuple[Path, ...] = ()  # other runs with this run's random-init baseline
    resume_flags: tuple[str, ...] = ("--resume",)  # the trainer's settings to continue the run


@dataclass(frozen=True)
class Step:
    """The next thing a run needs: a command to launch, or a baseline file to copy."""

    label: str
    produces: Path
    command: tuple[str, ...] = ()
    copy_from: Path | None = None


def train_command(job: Job, resume: bool) -> tuple[str, ...]:
    """The trainer's command line for a fresh start, or to continue from the checkpoint."""
    settings = job.resume_flags if resume else job.train_flags
    return (sys.executable, "-m", tool_module(job.framework, "train"), *settings,
            "--out", str(job.run_dir), "--data-dir", job.data_dir)


def probe_command(job: Job, dataset: str, random_init: bool) -> tuple[str, ...]:
    """The probe's command line on the run's backbone, or (random_init) an untrained one."""
    return (sys.executable, "-m", tool_module(job.framework, "probe"), "--run", str(job.run_dir),
            "--dataset", dataset, *(["--random-init"] if random_init else []),
            "--data-dir", job.data_dir)


def next_step(job: Job) -> Step | None:
    """What the run in job.run_dir needs next, read from its files; None once it is finished."""
    run_dir = job.run_dir
    summary = run_dir / SUMMARY_FILE
    if not summary.exists():
        if (run_dir / CHECKPOINT_FILES[job.framework]).exists():
            return Step("resume training", summary, train_command(job, resume=True))
        # a start that stopped before its first checkpoint is started again by the same command
        return Step("train", summary, train_command(job, resume=False))
    for dataset in job.datasets:
        path = probe_result_path(run_dir, dataset_key(dataset), random_init=False)
        if not path.exists():
            return Step(f"probe {dataset}", path, probe_command(job, dataset, random_init=False))
    for dataset in job.datasets:
        path = probe_result_path(run_dir, dataset_key(dataset), random_init=True)
        if path.exists():
            continue
        donor = next((p for d in job.baseline_donors
                      if (p := probe_result_path(d, dataset_key(dataset),
                                                 random_init=True)).exists()), None)
        if donor is not None:
            return Step(f"random-init {dataset} baseline shared with {donor.parent.name}", path,
                        copy_from=donor)
        return Step(f"random-init probe {dataset}", path,
                    probe_command(job, dataset, random_init=True))
    return None


Launcher = Callable[[tuple[str, ...], Path], int]


# ---- the subprocesses a run runs -----------------------------------------------------------------

def child_env() -> dict[str, str]:
    """The environment of a run's subprocess: this checkout importable, output unbuffered (so
    log.txt can be followed while it grows)."""
    root = str(Path(__file__).resolve().parent.parent)  # the checkout holding shared/
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def start_logged(command: tuple[str, ...], log_path: Path,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `command` (child_env() updated by `env`) with stdout and stderr appended to
    log_path."""
    # A blank line first: a killed command's last line may lack its newline.
    separator = "\n" if log_path.exists() and log_path.stat().st_size else ""
    with open(log_path, "a") as log:
        log.write(f"{separator}$ {shlex.join(command)}\n")
        log.flush()
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env={**child_env(), **(env or {})})


def run_logged(command: tuple[str, ...], log_path: Path) -> int:
    """Run `command` with stdout and stderr appended to log_path; return its exit status."""
    return start_logged(command, log_path).wait()


def last_log_line(log_path: Path) -> str:
    """The last non-empty line of a log (progress-bar redraws split at carriage returns)."""
    if not log_path.exists():
        return ""
    with open(log_path, "rb") as f:
        f.seek(max(0, log_path.stat().st_size - 8192))
        tail = f.read().decode(errors="replace")
    lines = [line.strip() for line in re.split(r"[\r\n]", tail) if line.strip()]
    return lines[-1] if lines else ""


def describe_exit(code: int, last_line: str) -> str:
    """The failure to show: the command's last line, which names the error, unless the process
    was killed (out of memory, say), when that line is only progress output."""
    return f"killed by signal {-code}; last output: {last_line}" if code < 0 else last_line


def copy_baseline(source: Path, target: Path) -> None:
    """Copy a random-init probe result from the run that computed it, naming that run."""
    result = read_json(source)
    write_json(target, {**result, "shared_from": source.parent.name})


def run_job(job: Job, launch: Launcher, echo: Callable[[str], None]) -> dict | None:
    """Bring one run to its end; return None, or the failure (also written to failure.json)."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    failure_path = job.run_dir / FAILURE_FILE
    failure_path.unlink(missing_ok=True)
    log_path = job.run_dir / LOG_FILE
    while (step := next_step(job)) is not None:
        echo(f"    {step.label}")
        if step.copy_from is not None:
            copy_baseline(step.copy_from, step.produces)
            continue
        code = launch(step.command, log_path)
        if code == 0 and step.produces.exists():
            continue
        error = (describe_exit(code, last_log_line(log_path)) if code != 0 else
                 f"{step.label} exited 0 but wrote no {step.produces.name}")
        failure = {"step": step.label, "command": shlex.join(step.command), "exit_code": code,
                   "error": error, "log": str(log_path)}
        write_json(failure_path, failure)
        return failure
    return None


def write_results(sweep_dir: Path) -> None:
    """Rewrite SWEEP_DIR/results.csv and results.md from the run folders."""
    results = load_sweep(sweep_dir)
    atomic_write_bytes(Path(sweep_dir) / RESULTS_CSV, results_csv(results).encode())
    markdown = sweep_results_markdown(sweep_dir, read_sweep_file(sweep_dir), results)
    atomic_write_bytes(Path(sweep_dir) / RESULTS_MD, markdown.encode())


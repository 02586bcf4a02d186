"""Where runs execute: on this machine (one at a time, or --parallel N), or as SLURM jobs through
submitit (--launcher slurm), one job a run, requeued from its checkpoint when preempted.

    python -m shared.sweep ... --launcher slurm --partition gpu --gpus-per-node 1 --timeout 24h
    python -m torch_impl.train --preset cpu --launcher slurm --partition cpu --gpus-per-node 0

A job is shared.jobs.run_job of one Job, the chain of trainer and probe commands a local sweep
runs, read from the run folder. When SLURM stops a job (preemption, or its time nearly out: it
sends SIGUSR2 first), the job stops its trainer as Ctrl-C would (the run folder keeps its last
epoch's checkpoint) and submitit requeues it; the requeued job reads the folder again and resumes
with --resume, which continues bit for bit. The sweep folder (or the run folder, for a trainer
alone) records the job ids in jobs.json; submitit's own files and logs are in its slurm/.

submitit is an optional extra (`pip install -e ".[cluster]"`), imported only when a job is
submitted or runs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import signal
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from shared.cli import build_train_parser, parse_train_args, setting_flags
from shared.errors import UserError
from shared.jobs import (
    LOG_FILE,
    Job,
    last_log_line,
    next_step,
    run_job,
    start_logged,
    write_results,
)
from shared.launcher import LAUNCHER_DESTS, LauncherSettings, launcher_settings
from shared.results import FAILURE_FILE
from shared.run_folder import results_in
from shared.runio import SUMMARY_FILE, lock_holder, read_json, tool_module, write_json

JOBS_FILE = "jobs.json"
SUBMITIT_DIR = "slurm"
# SLURM sends SIGUSR2 this long before a job's time is out (submitit's signal_delay_s); the
# trainer stops within a step, then the job requeues itself.
SIGNAL_DELAY_S = 120
STOP_WAIT_S = 60  # how long a stopped trainer may take to exit before it is killed
# A trainer stopped by SLURM itself (which signals every process of a preempted job) exits before
# submitit's handler requeues the job; the job waits this long for that signal.
REQUEUE_WAIT_S = 100
POLL_S = 0.2
# How a trainer stopped by a signal exits: 130 after its clean stop, or killed by the signal.
STOPPED_CODES = (130, -signal.SIGINT, -signal.SIGTERM, -signal.SIGUSR2)
# sacct's states of a job that will still run (shown "queued") or runs now.
QUEUED_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                 "RESIZING", "SUSPENDED"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
UNKNOWN_STATE = "UNKNOWN"


# ---- submitting ----------------------------------------------------------------------------------

def require_submitit():
    """The submitit module; UserError saying how to install it when it is missing."""
    try:
        return importlib.import_module("submitit")
    except ImportError:
        raise UserError("--launcher slurm needs submitit: pip install -e \".[cluster]\" (or pip "
                        "install submitit)") from None


def make_executor(settings: LauncherSettings, folder: Path, name: str, cluster: str | None):
    """A submitit executor for `settings`' jobs, its files in `folder`. cluster: submitit's
    ("local" and "debug" run the jobs on this machine, as tests do); None is SLURM, which must be
    here."""
    submitit = require_submitit()
    if cluster is None:
        if shutil.which("sbatch") is None:
            raise UserError("--launcher slurm: no sbatch on this machine; run the command on a "
                            "login node of the SLURM cluster")
        cluster = "slurm"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    slurm = {"slurm_partition": settings.partition, "slurm_account": settings.account}
    executor.update_parameters(
        name=name, timeout_min=settings.timeout_min, nodes=settings.nodes, tasks_per_node=1,
        gpus_per_node=settings.gpus_per_node, cpus_per_task=settings.cpus_per_task,
        slurm_signal_delay_s=SIGNAL_DELAY_S,
        slurm_additional_parameters=dict(settings.slurm_params),
        **{key: value for key, value in slurm.items() if value is not None})
    return executor


def submit(executor, tasks: list[RunTask]) -> list[str]:
    """Submit one job a task (a job array when there are several); their job ids."""
    if len(tasks) == 1:
        return [executor.submit(tasks[0]).job_id]
    with executor.batch():
        jobs = [executor.submit(task) for task in tasks]
    return [job.job_id for job in jobs]


def record_jobs(folder: Path, cluster: str, ids: dict[str, str]) -> None:
    """Add `ids` ({run name: job id}) to FOLDER/jobs.json."""
    recorded = read_jobs(folder)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    recorded.update({name: {"job_id": job_id, "cluster": cluster, "submitted": stamp}
                     for name, job_id in ids.items()})
    write_json(Path(folder) / JOBS_FILE, recorded)


def read_jobs(folder: Path) -> dict[str, dict]:
    """FOLDER/jobs.json: {run name: {"job_id", "cluster", "submitted"}}; {} when there is none."""
    return read_json(Path(folder) / JOBS_FILE) or {}


def job_state(entry: dict, folder: Path) -> str:
    """The scheduler's state of a recorded job: sacct's (PENDING, RUNNING, COMPLETED, FAILED,
    ...; UNKNOWN when sacct does not say), or for submitit's local executor RUNNING while its
    process lives and ENDED after."""
    if entry["cluster"] == "slurm":
        return require_submitit().SlurmJob(folder, entry["job_id"]).state.split()[0]
    return pid_state(entry["job_id"])


# ---- what a job runs -----------------------------------------------------------------------------

class RunTask:
    """The function a job runs: shared.jobs.run_job of `job`, each trainer command started as a
    world of settings.processes (torchrun, or jax.distributed across nodes). Checkpointable as
    submitit wants: on SLURM's stop signal, checkpoint() stops the trainer cleanly and hands
    submitit this same task to requeue; sweep_dir (a sweep's folder) gets its tables rewritten
    when the run ends."""

    def __init__(self, job: Job, settings: LauncherSettings, sweep_dir: Path | None = None,
                 echo: Callable[[str], None] = print):
        self.job, self.settings, self.sweep_dir, self.echo = job, settings, sweep_dir, echo
        self._child = None
        self._stopping = False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_child": None, "_stopping": False}

    def __call__(self) -> dict | None:
        """Bring the run to its end (the first node; others train only); the failure or None."""
        node, hosts, job_id = job_place()
        if node > 0:
            step = next_step(self.job)
            return None if step is None or not self.trains(step.command) else \
                self.launch_as(step.command, self.job.run_dir / LOG_FILE, node, hosts, job_id)
        failure = run_job(self.job, lambda command, log: self.launch_as(command, log, node, hosts,
                                                                         job_id), self.echo)
        if self.sweep_dir is not None:
            write_results(self.sweep_dir)
        return failure

    def trains(self, command: tuple[str, ...]) -> bool:
        return command[2] == tool_module(self.job.framework, "train")

    def launch_as(self, command: tuple[str, ...], log_path: Path, node: int, hosts: list[str],
                  job_id: str) -> int:
        """Run `command` into log_path, a trainer as this node's part of the job's world."""
        env: dict[str, str] = {}
        if self.trains(command):
            command, env = world_command(command, self.job.framework, self.settings, node, hosts,
                                         job_id)
        self._child = start_logged(command, log_path, env)
        try:
            code = wait_for(self._child)
            if code != 0 and not self._stopping:
                # stopped from outside: submitit's requeue signal is on its way (see REQUEUE_WAIT_S)
                deadline = time.monotonic() + (REQUEUE_WAIT_S if code in STOPPED_CODES else 0)
                while time.monotonic() < deadline:
                    time.sleep(POLL_S)
            return code
        finally:
            stop(self._child)

    def checkpoint(self):
        """submitit's preemption hook: stop the trainer as Ctrl-C does (the run folder keeps its
        last checkpoint), then requeue this task, which resumes from it."""
        self._stopping = True
        if self._child is not None:
            stop(self._child)
        return require_submitit().helpers.DelayedSubmission(self)


def job_place() -> tuple[int, list[str], str]:
    """(this node's index, the job's host names, the job id) inside a submitit job."""
    env = require_submitit().JobEnvironment()
    return env.node, list(env.hostnames), str(env.job_id)


def wait_for(child) -> int:
    """The child's exit status, polled so that a signal handler may stop it meanwhile."""
    while (code := child.poll()) is None:
        time.sleep(POLL_S)
    return code


def stop(child) -> None:
    """Stop a running child as Ctrl-C does and wait for it (killed after STOP_WAIT_S)."""
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_WAIT_S
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL_S)
    if child.poll() is None:
        child.kill()
        child.wait()


def world_command(command: tuple[str, ...], framework: str, settings: LauncherSettings,
                  node: int, hosts: list[str], job_id: str) -> tuple[tuple[str, ...], dict]:
    """(command, environment) that start this node's part of a trainer's data-parallel world: for
    torch one process a GPU through torchrun (a c10d rendezvous on the first host across nodes),
    for JAX one process a node joined by jax.distributed; the command as it is for one part."""
    port = str(29500 + int("".join(c for c in job_id if c.isdigit()) or 0) % 10000)
    if framework == "torch" and settings.processes > 1:
        meeting = (["--standalone"] if settings.nodes == 1 else
                   ["--rdzv-backend=c10d", f"--rdzv-endpoint={hosts[0]}:{port}",
                    f"--rdzv-id={job_id}"])
        return ((command[0], "-m", "torch.distributed.run", f"--nnodes={settings.nodes}",
                 f"--nproc-per-node={max(settings.gpus_per_node, 1)}", *meeting, *command[1:]),
                {})
    if framework == "jax" and settings.nodes > 1:
        return command, {"JAX_COORDINATOR_ADDRESS": f"{hosts[0]}:{port}",
                         "JAX_NUM_PROCESSES": str(settings.nodes), "JAX_PROCESS_ID": str(node)}
    return command, {}


# ---- the state of submitted runs -----------------------------------------------------------------

def run_state(job: Job, entry: dict | None, folder: Path, failure: dict | None) -> tuple[str, str]:
    """(state, what to show) of a run: done, failed (its error), queued / running (its job, the
    last line of its log), lost (its job ended without finishing the run), unknown (sacct does
    not know the job), running in a process of this machine (its lock), or to run (not started
    nor submitted)."""
    if next_step(job) is None:
        return "done", "done"
    scheduler = job_state(entry, folder) if entry else None
    job_text = f"job {entry['job_id']}" if entry else ""
    if scheduler in QUEUED_STATES:
        return "queued", f"queued ({job_text}, {scheduler.lower()})"
    if scheduler in RUNNING_STATES:
        return "running", f"running ({job_text}): {last_log_line(job.run_dir / LOG_FILE)}"
    if scheduler == UNKNOWN_STATE:
        return "unknown", f"unknown ({job_text}: sacct does not list it yet)"
    holder = None if entry else lock_holder(job.run_dir)
    if holder:
        return "running", (f"running (process {holder.split()[0]}): "
                           f"{last_log_line(job.run_dir / LOG_FILE)}")
    if failure:
        return "failed", f"failed ({job_text}): {failure['error']}" if entry else \
            f"failed: {failure['error']}"
    if entry:
        return "lost", f"lost ({job_text} ended {scheduler.lower()} before the run finished)"
    return "to run", "to run"


def needs_submitting(state: str) -> bool:
    """Whether a run in `state` (run_state's) is submitted (again) by a sweep's re-run."""
    return state in ("failed", "lost", "to run")


def pid_state(job_id: str) -> str:
    """RUNNING or ENDED: a local executor's job, whose id is its controller's process id."""
    try:
        pid = int(job_id)
        ended, _ = os.waitpid(pid, os.WNOHANG)  # reaps it when it is this process's child
        return "ENDED" if ended else "RUNNING"
    except ChildProcessError:
        pass
    except ValueError:
        return "ENDED"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "ENDED"
    except PermissionError:
        pass
    return "RUNNING"


def states(jobs: list[Job], folder: Path) -> dict[str, tuple[str, str]]:
    """run_state of each job, its entry read from FOLDER/jobs.json."""
    recorded = read_jobs(folder)
    return {job.name: run_state(job, recorded.get(job.name), Path(folder) / SUBMITIT_DIR,
                                read_json(job.run_dir / FAILURE_FILE))
            for job in jobs}


def submit_runs(jobs: list[Job], folder: Path, settings: LauncherSettings, sweep_dir: Path | None,
                cluster: str | None, echo: Callable[[str], None]) -> list[str]:
    """Submit the jobs whose runs need it (not submitted, failed, or lost by their job), record
    their ids in FOLDER/jobs.json and return the names submitted."""
    current = states(jobs, folder)
    todo = [job for job in jobs if needs_submitting(current[job.name][0])]
    if not todo:
        return []
    name = f"vicreg-{Path(sweep_dir or jobs[0].run_dir).name}"
    executor = make_executor(settings, Path(folder) / SUBMITIT_DIR, name, cluster)
    ids = submit(executor, [RunTask(job, settings, sweep_dir) for job in todo])
    record_jobs(folder, cluster or "slurm", dict(zip((job.name for job in todo), ids)))
    echo(f"submitted {len(ids)} job{'s' if len(ids) != 1 else ''}: "
         + ", ".join(f"{job.name} ({job_id})" for job, job_id in zip(todo, ids)))
    return [job.name for job in todo]


def wait_for_runs(jobs: list[Job], folder: Path, echo: Callable[[str], None],
                  poll_s: float) -> dict[str, tuple[str, str]]:
    """Poll the runs' states until none is queued, running or unknown, showing each change."""
    shown: dict[str, str] = {}
    while True:
        current = states(jobs, folder)
        for name, (state, text) in current.items():
            if shown.get(name) != state:
                echo(f"  {name}: {text}")
                shown[name] = state
        if not any(state in LIVE for state, _ in current.values()):
            return current
        time.sleep(poll_s)


LIVE = ("queued", "running", "unknown")


def submit_training(job: Job, settings: LauncherSettings, cluster: str | None,
                    poll_s: float = 30.0) -> None:
    """Submit a trainer's one run as a job: RUN_DIR gets jobs.json and slurm/ beside the run's
    files. The same checks as the trainer's own come first, so a refused start is not queued."""
    folder = job.run_dir
    resume = job.train_flags[:1] == ("--resume",)
    state, text = states([job], folder)[job.name]
    if state in LIVE:
        raise UserError(f"{folder} is already {text}; follow it with: tail -f {folder / LOG_FILE}")
    if state == "done":
        raise UserError(f"{folder} holds a finished run ({SUMMARY_FILE}); --launcher slurm "
                        "continues unfinished runs only")
    if not resume and results_in(folder):
        raise UserError(f"{folder} already holds a run; pass --resume to continue it or choose "
                        "another --out")
    folder.mkdir(parents=True, exist_ok=True)
    submit_runs([job], folder, settings, None, cluster, print)
    print(f"follow with: tail -f {folder / LOG_FILE}")
    if settings.wait:
        final_state, final_text = wait_for_runs([job], folder, print, poll_s)[job.name]
        if final_state != "done":
            raise UserError(f"{job.name}: {final_text}")


def submitted_to_cluster(argv: list[str] | None, framework: str,
                         cluster: str | None = None) -> bool:
    """With --launcher slurm, submit the trainer's run as a SLURM job (shared.cluster) instead of
    training here, and say how to follow it: True then. cluster: submitit's (tests: "local")."""
    args = vars(build_train_parser(framework).parse_args(argv))
    settings = launcher_settings(argparse.Namespace(**{k: args.get(k) for k in LAUNCHER_DESTS}))
    if settings.kind == "local":
        return False
    cfg, resume = parse_train_args(argv, framework)
    given = {k: v for k, v in args.items()
             if k not in (*LAUNCHER_DESTS, "resume", "out", "data_dir")}
    flags = tuple(setting_flags(given))
    run_dir = Path(cfg.out).resolve()
    job = Job(run_dir.name, run_dir, framework, ("--resume", *flags) if resume else flags,
              str(Path(cfg.data_dir).resolve()),
              resume_flags=("--resume", *flags) if resume else ("--resume",))
    submit_training(job, settings, cluster)
    return True

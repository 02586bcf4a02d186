"""Hyperparameter sweeps: every run trains, probes its dataset and GTSRB, and lands in one table.

    python -m shared.sweep --framework torch --preset cpu --out sweeps/std --grid std_coeff=5,25,50

SWEEP_DIR holds sweep.json (the plan; a re-run reads it and refuses another plan), runs/NAME/ (a
run folder per run, with log.txt, and failure.json while its last attempt failed), results.csv
and results.md (shared.results). Each run is a chain of subprocesses: the trainer, which probes
the trained backbone itself, then the probe with --random-init for the baseline. What a run still
needs is read from its folder, so a re-run skips finished runs, resumes interrupted ones and
retries failed ones.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared.cli import (
    UserErrorParser,
    cli_main,
    format_value,
    parse_assignment,
    parse_setting,
    plural,
    setting_flags,
)
from shared.config import (
    BACKBONE,
    DATA_DIR_HOLDS,
    PRESETS,
    PROBE,
    Config,
    make_config,
    settings_with_role,
)
from shared.data import dataset_key, probe_datasets
from shared.errors import Interrupted, UserError
from shared.results import (
    FAILURE_FILE,
    RUNS_DIR,
    SWEEP_FILE,
    accuracy_note,
    format_duration,
    load_sweep,
    read_sweep_file,
    results_csv,
    sweep_results_markdown,
)
from shared.runio import (
    CHECKPOINT_FILES,
    FRAMEWORKS,
    SUMMARY_FILE,
    atomic_write_bytes,
    make_folder,
    probe_result_path,
    read_json,
    run_folder_lock,
    tool_module,
    write_json,
)

LOG_FILE = "log.txt"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
MAX_NAME = 120


# ---- the plan ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What a sweep runs: one framework and preset, and each run's settings on top of the preset."""

    framework: str
    preset: str
    runs: tuple[tuple[str, dict], ...]  # (run name, {setting: value})

    def to_json(self) -> dict:
        return {"framework": self.framework, "preset": self.preset,
                "runs": [{"name": name, "overrides": overrides} for name, overrides in self.runs]}


def parse_grid(specs: list[str]) -> list[tuple[str, list]]:
    """["std_coeff=5,25", "mlp=512-512,1024-1024"] -> [(name, [values...]), ...] in flag order."""
    grid: list[tuple[str, list]] = []
    for spec in specs:
        where = f"--grid {spec}"
        name, values_text = parse_assignment(spec, where)
        if name in dict(grid):
            raise UserError(f"{where}: {name} is already given by another --grid")
        texts = values_text.split(",")
        if any(not t.strip() for t in texts):
            raise UserError(f"{where}: expected {name}=V1,V2,... with no empty value")
        values = [parse_setting(name, t, f"{where}: {name}") for t in texts]
        if len(set(map(format_value, values))) < len(values):
            raise UserError(f"{where}: a value of {name} is listed twice")
        grid.append((name, values))
    return grid


def grid_runs(grid: list[tuple[str, list]]) -> list[dict]:
    """Every combination of the grid's values, the last --grid varying fastest."""
    names = [name for name, _ in grid]
    return [dict(zip(names, combo)) for combo in itertools.product(*(v for _, v in grid))]


def parse_runs_file(path: Path) -> list[dict]:
    """A runs file: one run a line as KEY=VALUE pairs separated by spaces; '#' starts a comment."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read --runs-file {path}: {exc}") from None
    runs = []
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split("#", 1)[0].split()
        where = f"{path}:{number}"
        overrides: dict = {}
        for token in tokens:
            name, value = parse_assignment(token, where)
            if name in overrides:
                raise UserError(f"{where}: {name} is set twice on one line")
            overrides[name] = parse_setting(name, value, f"{where}: {name}")
        if overrides:
            runs.append(overrides)
    if not runs:
        raise UserError(f"--runs-file {path} lists no runs (expected lines like: std_coeff=10 "
                        "mlp=512-512)")
    return runs


def run_name(overrides: dict) -> str:
    """A folder name that reads as the run's settings, e.g. "std_coeff=10,mlp=512-512"."""
    name = ",".join(f"{key}={format_value(value)}" for key, value in overrides.items())
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    if len(name) > MAX_NAME:  # file systems cap names at 255 bytes; the hash keeps them apart
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:MAX_NAME - 11]}-{digest}"
    return name


def build_plan(framework: str, preset: str, runs: list[dict]) -> Plan:
    """Name the runs and check each one's settings as the trainer would."""
    named = [(run_name(overrides), overrides) for overrides in runs]
    seen: set[str] = set()
    for name, overrides in named:
        if name in seen:
            raise UserError(f"run {name} is listed twice")
        seen.add(name)
        try:
            make_config({"preset": preset, **overrides})
        except UserError as exc:
            raise UserError(f"run {name}: {exc}") from None
    return Plan(framework, preset, tuple(named))


def plan_from_json(stored: dict, path: Path) -> Plan:
    try:
        return Plan(stored["framework"], stored["preset"],
                    tuple((r["name"], r["overrides"]) for r in stored["runs"]))
    except (KeyError, TypeError):
        raise UserError(f"{path} is not a sweep plan (framework, preset, runs)") from None


# ---- one run: what it still needs ----------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One run of a sweep, with everything needed to build its commands."""

    name: str
    run_dir: Path
    framework: str
    preset: str
    overrides: dict
    data_dir: str
    datasets: tuple[str, ...]
    baseline_donors: tuple[Path, ...]  # other runs whose random-init baseline equals this one's


@dataclass(frozen=True)
class Step:
    """The next thing a run needs: a command to launch, or a baseline file to copy."""

    label: str
    produces: Path
    command: tuple[str, ...] = ()
    copy_from: Path | None = None


def train_command(job: Job, resume: bool) -> tuple[str, ...]:
    """The trainer's command line for a fresh start, or to continue from the checkpoint."""
    settings = ["--resume"] if resume else ["--preset", job.preset, *setting_flags(job.overrides)]
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


def baseline_key(cfg: Config) -> str:
    """The settings a random-init probe result depends on (those of the untrained backbone and of
    the probe), as one comparable string."""
    values = {name: getattr(cfg, name) for name in settings_with_role(BACKBONE, PROBE)}
    return json.dumps(values, sort_keys=True)


def plan_jobs(plan: Plan, sweep_dir: Path, data_dir: str) -> list[Job]:
    """A Job for each run of the plan, with the datasets it probes and its baseline donors."""
    configs = {name: make_config({"preset": plan.preset, **overrides, "data_dir": data_dir})
               for name, overrides in plan.runs}
    keys = {name: baseline_key(cfg) for name, cfg in configs.items()}
    run_dir = {name: Path(sweep_dir) / RUNS_DIR / name for name, _ in plan.runs}
    jobs = []
    for name, overrides in plan.runs:
        cfg = configs[name]
        datasets = tuple(probe_datasets(cfg.dataset, cfg.data_dir, cfg.download))
        donors = tuple(run_dir[other] for other, _ in plan.runs
                       if other != name and keys[other] == keys[name])
        jobs.append(Job(name, run_dir[name], plan.framework, plan.preset, overrides, data_dir,
                        datasets, donors))
    return jobs


# ---- running -------------------------------------------------------------------------------------

Launcher = Callable[[tuple[str, ...], Path], int]


# ---- the subprocesses a sweep runs ---------------------------------------------------------------

def child_env() -> dict[str, str]:
    """The environment of a run's subprocess: this checkout importable, output unbuffered (so
    log.txt can be followed while it grows)."""
    root = str(Path(__file__).resolve().parent.parent)  # the checkout holding shared/
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def run_logged(command: tuple[str, ...], log_path: Path) -> int:
    """Run `command` with stdout and stderr appended to log_path; return its exit status."""
    # A blank line first: a killed command's last line may lack its newline.
    separator = "\n" if log_path.exists() and log_path.stat().st_size else ""
    with open(log_path, "a") as log:
        log.write(f"{separator}$ {shlex.join(command)}\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                              check=False).returncode


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


def run_sweep(plan: Plan, sweep_dir: Path, data_dir: str, launch: Launcher = run_logged,
              echo: Callable[[str], None] = print) -> list[str]:
    """Run every unfinished run of the plan; return the names of the runs that failed."""
    jobs = plan_jobs(plan, sweep_dir, data_dir)
    todo = [job for job in jobs if next_step(job) is not None]
    finished = len(jobs) - len(todo)
    echo(f"sweep {sweep_dir}: {plural(len(jobs), 'run')} ({plan.framework}, preset {plan.preset}); "
         f"{finished} finished, {len(todo)} to run")
    if jobs and "gtsrb" not in jobs[0].datasets:
        echo(f"note: no {Path(data_dir) / 'gtsrb'}, so runs probe their own dataset only")
    write_results(sweep_dir)
    failed, started = [], time.monotonic()
    for index, job in enumerate(todo, start=1):
        echo(f"[{finished}/{len(jobs)}] {job.name} (output: {job.run_dir / LOG_FILE})")
        failure = run_job(job, launch, echo)
        finished += 1
        if failure:
            failed.append(job.name)
        write_results(sweep_dir)
        left = (time.monotonic() - started) / index * (len(todo) - index)
        outcome = (f"FAILED: {failure['error']}" if failure else
                   f"done: {accuracy_note(job.run_dir, job.datasets)}")
        echo(f"[{finished}/{len(jobs)}] {job.name}: {outcome}"
             + (f"; about {format_duration(left)} left" if index < len(todo) else ""))
    return failed


def write_results(sweep_dir: Path) -> None:
    """Rewrite SWEEP_DIR/results.csv and results.md from the run folders."""
    results = load_sweep(sweep_dir)
    atomic_write_bytes(Path(sweep_dir) / RESULTS_CSV, results_csv(results).encode())
    markdown = sweep_results_markdown(sweep_dir, read_sweep_file(sweep_dir), results)
    atomic_write_bytes(Path(sweep_dir) / RESULTS_MD, markdown.encode())


# ---- command line --------------------------------------------------------------------------------

def build_sweep_parser() -> argparse.ArgumentParser:
    parser = UserErrorParser(
        prog="python -m shared.sweep",
        description="Train and probe one run per combination of settings, then tabulate them in "
                    "SWEEP_DIR/results.csv and results.md. Each run: pretraining (which probes "
                    "its dataset when it has labels, and GTSRB when its data is present), then "
                    "the same probes on an untrained backbone (random-init baseline). Re-running "
                    "the same command (or just --out SWEEP_DIR) skips finished runs, resumes "
                    "interrupted ones from their checkpoint and retries failed ones.",
        epilog="examples: --grid std_coeff=5,25,50 --grid mlp=512-512,2048-2048 (6 runs); "
               "a runs file holds one run a line, e.g. 'std_coeff=10 mlp=512-512' ('#' comments)")
    parser.add_argument("--out", required=True, metavar="SWEEP_DIR",
                        help="sweep folder: sweep.json (the plan), runs/NAME/ (one run folder "
                             "per run, with log.txt), results.csv, results.md")
    parser.add_argument("--framework", choices=FRAMEWORKS,
                        help="train with torch_impl or jax_impl (required for a new sweep)")
    parser.add_argument("--preset", choices=tuple(PRESETS),
                        help="settings every run starts from (required for a new sweep); the "
                             "grid or runs file overrides them")
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                      help="a setting (config.json field name, e.g. std_coeff) and the values to "
                           "try; repeat for more settings, every combination runs; a single "
                           "value sets it for all runs")
    runs.add_argument("--runs-file", type=Path, metavar="FILE",
                      help="file with one run a line: space-separated KEY=VALUE settings")
    parser.add_argument("--data-dir",
                        help=f"{DATA_DIR_HOLDS} (default: the sweep's stored one, else env "
                             "VICREG_DATA_DIR, else ./data)")
    return parser


def resolve_plan(args: argparse.Namespace, stored: dict | None, sweep_path: Path) -> Plan:
    """The plan of this invocation: new from the flags, or the stored one when none are given."""
    stored_plan = plan_from_json(stored, sweep_path) if stored is not None else None
    if stored_plan is not None:
        if not (args.grid or args.runs_file):
            for flag in ("framework", "preset"):
                if getattr(args, flag) not in (None, getattr(stored_plan, flag)):
                    raise UserError(f"{sweep_path.parent} is a {flag} "
                                    f"{getattr(stored_plan, flag)} sweep, not "
                                    f"{getattr(args, flag)}")
            return stored_plan
    if not (args.grid or args.runs_file):
        raise UserError("give the runs: --grid KEY=V1,V2 (repeatable) or --runs-file FILE")
    if args.framework is None or args.preset is None:
        raise UserError("a new sweep needs --framework (torch or jax) and --preset")
    runs = grid_runs(parse_grid(args.grid)) if args.grid else parse_runs_file(args.runs_file)
    plan = build_plan(args.framework, args.preset, runs)
    if stored_plan is not None and plan.to_json() != stored_plan.to_json():
        names = ", ".join(name for name, _ in stored_plan.runs)
        raise UserError(f"{sweep_path.parent} already holds another sweep "
                        f"({stored_plan.framework}, preset {stored_plan.preset}, runs {names}); "
                        f"continue it with `python -m shared.sweep --out {sweep_path.parent}` or "
                        "choose another --out")
    return plan


def main(argv: list[str] | None = None, launch: Launcher = run_logged) -> int:
    """`python -m shared.sweep`; `launch` runs one command into a log (tests run it in-process)."""
    argv = sys.argv[1:] if argv is None else argv

    def body():
        args = build_sweep_parser().parse_args(argv)
        sweep_dir = Path(args.out)
        sweep_path = sweep_dir / SWEEP_FILE
        stored = read_sweep_file(sweep_dir)
        plan = resolve_plan(args, stored, sweep_path)
        data_dir = args.data_dir or (stored or {}).get("data_dir") or Config().data_dir
        command = (stored or {}).get("command") or shlex.join(["python", "-m", "shared.sweep",
                                                               *argv])
        make_folder(sweep_dir, "sweep folder")
        with run_folder_lock(sweep_dir, "python -m shared.sweep"):
            write_json(sweep_path, {**plan.to_json(), "data_dir": data_dir, "command": command})
            try:
                failed = run_sweep(plan, sweep_dir, data_dir, launch)
            except KeyboardInterrupt:
                raise Interrupted("run the same command again to resume") from None
        if failed:
            raise UserError(f"{len(failed)} of {plural(len(plan.runs), 'run')} failed "
                            f"({', '.join(failed)}); see {sweep_dir / RESULTS_MD} and each "
                            f"run's {LOG_FILE}")
        print(f"all {plural(len(plan.runs), 'run')} finished: {sweep_dir / RESULTS_MD}")

    return cli_main(body)


if __name__ == "__main__":
    sys.exit(main())

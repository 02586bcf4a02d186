"""Hyperparameter sweeps: every run trains, probes CIFAR-10 and GTSRB, and lands in one table.

    python -m shared.sweep --framework torch --preset cpu --out sweeps/std --grid std_coeff=5,25,50

SWEEP_DIR/
    sweep.json          the plan: framework, preset, data folder, the creating command, each run's
                        settings; a re-run reads it, and refuses a different plan for the folder
    runs/NAME/          one trainer run folder per run (config.json, metrics.jsonl, checkpoint,
                        summary.json, probe_*.json), plus log.txt (the commands' output) and
                        failure.json (only while the run's last attempt failed)
    results.csv         one row a run, raw numbers (accuracies as fractions), rewritten after
                        each run
    results.md          the same table for reading

Each run is a chain of subprocesses (`python -m {torch,jax}_impl.train`, which probes the trained
backbone itself, then `python -m {torch,jax}_impl.probe --random-init` for the baseline). What a
run still needs is read from its folder, so a re-run skips finished runs, resumes interrupted ones
from their checkpoint and retries failed ones.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import hashlib
import io
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from shared.config import (BACKBONE, PRESETS, PROBE, RUN, Config, UserErrorParser,
                           load_run_config, make_config, setting_types, settings_with_role,
                           sweep_owned)
from shared.errors import UserError
from shared.runio import (CHECKPOINT_FILES, CONFIG_FILE, FRAMEWORKS, SUMMARY_FILE,
                          atomic_write_bytes, make_folder, probe_result_path, read_json,
                          run_folder_lock, run_framework, write_json)
from shared.training import cli_main, gtsrb_available

DATASET_NAMES = {"cifar10": "CIFAR-10", "gtsrb": "GTSRB"}
SWEEP_FILE = "sweep.json"
RUNS_DIR = "runs"
LOG_FILE = "log.txt"
FAILURE_FILE = "failure.json"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
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


def check_setting_name(key: str, where: str) -> str:
    """The Config field named `key` (flag spelling with '-' accepted); UserError otherwise."""
    name = key.strip().replace("-", "_")
    types = setting_types()
    owned = sweep_owned()
    if name in owned:
        raise UserError(f"{where}: {name} cannot be swept ({owned[name]})")
    if name not in types:
        close = difflib.get_close_matches(name, types, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"{where}: unknown setting {key!r}; {hint}settings are config.json's "
                        "field names, listed by `python -m torch_impl.train --help`")
    return name


def parse_value(name: str, text: str, where: str):
    """`text` as the type of setting `name`; UserError naming the expected type otherwise."""
    kind = setting_types()[name]
    text = text.strip()
    if kind is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise UserError(f"{where}: {name} takes true or false, got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise UserError(f"{where}: {name} takes an integer, got {text!r}") from None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise UserError(f"{where}: {name} takes a number, got {text!r}") from None
        if not math.isfinite(value):
            raise UserError(f"{where}: {name} must be a finite number, got {text!r}")
        return value
    if not text:
        raise UserError(f"{where}: {name} needs a value")
    return text


def split_assignment(text: str, where: str) -> tuple[str, str]:
    """"KEY=VALUE" -> (setting name, value text)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"{where}: expected KEY=VALUE, got {text!r}")
    return check_setting_name(key, where), value


def parse_grid(specs: list[str]) -> list[tuple[str, list]]:
    """["std_coeff=5,25", "mlp=512-512,1024-1024"] -> [(name, [values...]), ...] in flag order."""
    grid: list[tuple[str, list]] = []
    for spec in specs:
        where = f"--grid {spec}"
        name, values_text = split_assignment(spec, where)
        if name in dict(grid):
            raise UserError(f"{where}: {name} is already given by another --grid")
        texts = values_text.split(",")
        if any(not t.strip() for t in texts):
            raise UserError(f"{where}: expected {name}=V1,V2,... with no empty value")
        values = [parse_value(name, t, where) for t in texts]
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
            name, value = split_assignment(token, where)
            if name in overrides:
                raise UserError(f"{where}: {name} is set twice on one line")
            overrides[name] = parse_value(name, value, where)
        if overrides:
            runs.append(overrides)
    if not runs:
        raise UserError(f"--runs-file {path} lists no runs (expected lines like: std_coeff=10 "
                        "mlp=512-512)")
    return runs


def format_value(value) -> str:
    """A setting value as it appears in run names and commands: 10.0 -> "10", True -> "true"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


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


def read_sweep_file(sweep_dir: Path) -> dict | None:
    """SWEEP_DIR/sweep.json, or None when the folder holds no sweep yet."""
    return read_json(Path(sweep_dir) / SWEEP_FILE)


def plan_from_json(stored: dict, path: Path) -> Plan:
    try:
        return Plan(stored["framework"], stored["preset"],
                    tuple((r["name"], r["overrides"]) for r in stored["runs"]))
    except (KeyError, TypeError):
        raise UserError(f"{path} is not a sweep plan (framework, preset, runs)") from None


def sweep_run_dirs(sweep_dir: Path) -> list[tuple[str, Path, dict]]:
    """(run name, run folder, planned config as a dict) for each run of the sweep in SWEEP_DIR."""
    path = Path(sweep_dir) / SWEEP_FILE
    stored = read_sweep_file(sweep_dir)
    if stored is None:
        raise UserError(f"no sweep in {sweep_dir}: {path} is missing")
    plan = plan_from_json(stored, path)
    return [(name, Path(sweep_dir) / RUNS_DIR / name,
             dataclasses.asdict(make_config({"preset": plan.preset, **overrides,
                                             "data_dir": stored.get("data_dir", "")})))
            for name, overrides in plan.runs]


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


def override_flags(overrides: dict) -> list[str]:
    """{"std_coeff": 10.0, "lr_scaling": False} -> ["--std-coeff", "10", "--no-lr-scaling"]."""
    flags = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, format_value(value)]
    return flags


def train_command(job: Job, resume: bool) -> tuple[str, ...]:
    """The trainer's command line for a fresh start, or to continue from the checkpoint."""
    settings = ["--resume"] if resume else ["--preset", job.preset, *override_flags(job.overrides)]
    return (sys.executable, "-m", f"{job.framework}_impl.train", *settings,
            "--out", str(job.run_dir), "--data-dir", job.data_dir)


def probe_command(job: Job, dataset: str, random_init: bool) -> tuple[str, ...]:
    return (sys.executable, "-m", f"{job.framework}_impl.probe", "--run", str(job.run_dir),
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
        path = probe_result_path(run_dir, dataset, random_init=False)
        if not path.exists():
            return Step(f"probe {dataset}", path, probe_command(job, dataset, random_init=False))
    for dataset in job.datasets:
        path = probe_result_path(run_dir, dataset, random_init=True)
        if path.exists():
            continue
        donor = next((p for d in job.baseline_donors
                      if (p := probe_result_path(d, dataset, random_init=True)).exists()), None)
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
        datasets = ("cifar10", "gtsrb") if gtsrb_available(configs[name]) else ("cifar10",)
        donors = tuple(run_dir[other] for other, _ in plan.runs
                       if other != name and keys[other] == keys[name])
        jobs.append(Job(name, run_dir[name], plan.framework, plan.preset, overrides, data_dir,
                        datasets, donors))
    return jobs


# ---- running -------------------------------------------------------------------------------------

Launcher = Callable[[tuple[str, ...], Path], int]


def child_env() -> dict[str, str]:
    """The environment of a run's subprocess: this checkout importable, output unbuffered (so
    log.txt can be followed while it grows)."""
    root = str(Path(__file__).resolve().parent.parent)
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
    if code < 0:
        return f"killed by signal {-code}; last output: {last_line}"
    return last_line


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


def format_duration(seconds: float) -> str:
    """3725 -> "1h02m", 192 -> "3m12s", 42 -> "42s"."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def accuracy_note(job: Job) -> str:
    """"CIFAR-10 top-1 62.00% (random init 41.00%), ..." from a finished run's probe files."""
    notes = []
    for dataset in job.datasets:
        trained = read_json(probe_result_path(job.run_dir, dataset, random_init=False))["top1"]
        baseline = read_json(probe_result_path(job.run_dir, dataset, random_init=True))["top1"]
        notes.append(f"{DATASET_NAMES[dataset]} top-1 {100 * trained:.2f}% "
                     f"(random init {100 * baseline:.2f}%)")
    return ", ".join(notes)


def run_sweep(plan: Plan, sweep_dir: Path, data_dir: str, launch: Launcher = run_logged,
              echo: Callable[[str], None] = print) -> list[str]:
    """Run every unfinished run of the plan; return the names of the runs that failed."""
    jobs = plan_jobs(plan, sweep_dir, data_dir)
    todo = [job for job in jobs if next_step(job) is not None]
    finished = len(jobs) - len(todo)
    echo(f"sweep {sweep_dir}: {len(jobs)} runs ({plan.framework}, preset {plan.preset}); "
         f"{finished} finished, {len(todo)} to run")
    if jobs and "gtsrb" not in jobs[0].datasets:
        echo(f"note: no {Path(data_dir) / 'gtsrb'}, so runs probe CIFAR-10 only")
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
        outcome = f"FAILED: {failure['error']}" if failure else f"done: {accuracy_note(job)}"
        echo(f"[{finished}/{len(jobs)}] {job.name}: {outcome}"
             + (f"; about {format_duration(left)} left" if index < len(todo) else ""))
    return failed


# ---- results tables ------------------------------------------------------------------------------

@dataclass
class RunResult:
    """What one run folder holds, read without changing anything."""

    label: str
    run_dir: Path
    status: str  # done, failed, incomplete (started, not finished) or pending (not started)
    framework: str
    config: dict | None
    summary: dict | None
    probes: dict  # "cifar10", "gtsrb", "cifar10_random_init", ... -> the probe JSON
    failure: dict | None


def load_run(run_dir: Path, label: str, planned_config: dict | None = None,
             planned_framework: str = "") -> RunResult:
    """Read a run folder; a sweep run not started yet is described by its planned settings."""
    run_dir = Path(run_dir)
    has_config = (run_dir / CONFIG_FILE).is_file()
    config = dataclasses.asdict(load_run_config(run_dir)) if has_config else planned_config
    summary = read_json(run_dir / SUMMARY_FILE)
    failure = read_json(run_dir / FAILURE_FILE)
    probes = {}
    for dataset in ("cifar10", "gtsrb"):
        for random_init, key in ((False, dataset), (True, f"{dataset}_random_init")):
            result = read_json(probe_result_path(run_dir, dataset, random_init))
            if result is not None:
                probes[key] = result
    if failure:
        status = "failed"
    elif summary is not None and "cifar10" in probes:
        status = "done"
    else:
        status = "incomplete" if has_config else "pending"
    return RunResult(label, run_dir, status, run_framework(run_dir, planned_framework or "torch"),
                     config, summary, probes, failure)


def load_sweep(sweep_dir: Path) -> list[RunResult]:
    """The runs of the sweep in SWEEP_DIR, in plan order."""
    framework = read_sweep_file(sweep_dir)["framework"]
    return [load_run(run_dir, name, config, framework)
            for name, run_dir, config in sweep_run_dirs(sweep_dir)]


def differing_settings(results: list[RunResult]) -> list[str]:
    """The settings (and framework) whose values are not the same in all runs, in Config order."""
    def values(name):
        return {json.dumps(r.config.get(name)) for r in results if r.config}
    names = [f.name for f in fields(Config) if f.metadata["role"] != RUN]
    varying = [n for n in names if len(values(n)) > 1]
    frameworks = {r.framework for r in results}
    return (["framework"] if len(frameworks) > 1 else []) + varying


TERM_COLUMNS = ("loss", "invariance", "variance", "covariance", "embedding_std")
PROBE_COLUMNS = ("cifar10", "cifar10_random_init", "gtsrb", "gtsrb_random_init")


def result_row(result: RunResult, settings: list[str]) -> dict:
    """One table row of raw values (None where the run has no such number)."""
    final = (result.summary or {}).get("final") or {}
    row = {"run": result.label, "status": result.status}
    for name in settings:
        row[name] = result.framework if name == "framework" else (result.config or {}).get(name)
    row.update({f"final_{term}": final.get(term) for term in TERM_COLUMNS})
    row.update({f"{key}_top1": result.probes[key]["top1"] if key in result.probes else None
                for key in PROBE_COLUMNS})
    row["train_time_s"] = (result.summary or {}).get("train_time_s")
    row["error"] = (result.failure or {}).get("error")
    return row


def results_csv(results: list[RunResult]) -> str:
    """The results table as CSV: raw values, accuracies as fractions, empty where missing."""
    settings = differing_settings(results)
    rows = [result_row(r, settings) for r in results]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["run"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in rows])
    return buffer.getvalue()


def _cell(column: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return format_value(value)
    if column.endswith("_top1"):
        return f"{100 * value:.2f}%"
    if column == "train_time_s":
        return format_duration(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


MD_HEADERS = {"final_loss": "loss", "final_invariance": "invariance",
              "final_variance": "variance", "final_covariance": "covariance",
              "final_embedding_std": "embedding std", "cifar10_top1": "CIFAR-10 top-1",
              "cifar10_random_init_top1": "CIFAR-10 random init", "gtsrb_top1": "GTSRB top-1",
              "gtsrb_random_init_top1": "GTSRB random init", "train_time_s": "train time"}


def results_markdown_table(results: list[RunResult]) -> str:
    """The results table in Markdown: losses are the last epoch's means of the unweighted terms."""
    settings = differing_settings(results)
    rows = [result_row(r, settings) for r in results]
    if not rows:
        return "(no runs)\n"
    if not any(row["error"] for row in rows):
        rows = [{k: v for k, v in row.items() if k != "error"} for row in rows]
    columns = list(rows[0])
    lines = ["| " + " | ".join(MD_HEADERS.get(c, c) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(c, row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(sweep_dir: Path) -> None:
    """Rewrite SWEEP_DIR/results.csv and results.md from the run folders."""
    results = load_sweep(sweep_dir)
    stored = read_sweep_file(sweep_dir)
    atomic_write_bytes(Path(sweep_dir) / RESULTS_CSV, results_csv(results).encode())
    markdown = (f"# Sweep results: {sweep_dir}\n\n"
                f"Framework {stored['framework']}, preset {stored['preset']}; created with\n\n"
                f"    {stored['command']}\n\n"
                "Final losses are the last epoch's means of the unweighted terms; top-1 is the "
                "linear probe's test accuracy (random init: the same probe on an untrained "
                "backbone).\n\n" + results_markdown_table(results))
    atomic_write_bytes(Path(sweep_dir) / RESULTS_MD, markdown.encode())


# ---- command line --------------------------------------------------------------------------------

def build_sweep_parser() -> argparse.ArgumentParser:
    parser = UserErrorParser(
        prog="python -m shared.sweep",
        description="Train and probe one run per combination of settings, then tabulate them in "
                    "SWEEP_DIR/results.csv and results.md. Each run: pretraining (which probes "
                    "CIFAR-10, and GTSRB when its data is present), then the same probes on an "
                    "untrained backbone (random-init baseline). Re-running the same command (or "
                    "just --out SWEEP_DIR) skips finished runs, resumes interrupted ones from "
                    "their checkpoint and retries failed ones.",
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
                        help="folder holding cifar-10-batches-py/ and gtsrb/ (default: the "
                             "sweep's stored one, else env VICREG_DATA_DIR, else ./data)")
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
            failed = run_sweep(plan, sweep_dir, data_dir, launch)
        if failed:
            raise UserError(f"{len(failed)} of {len(plan.runs)} runs failed ({', '.join(failed)}); "
                            f"see {sweep_dir / RESULTS_MD} and each run's {LOG_FILE}")
        print(f"all {len(plan.runs)} runs finished: {sweep_dir / RESULTS_MD}")

    try:
        return cli_main(body)
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

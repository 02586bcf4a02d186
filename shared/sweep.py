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
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
from shared.cluster import states, submit_runs, wait_for_runs
from shared.config import (
    BACKBONE,
    DATA_DIR_HOLDS,
    PRESETS,
    PROBE,
    Config,
    make_config,
    settings_with_role,
)
from shared.data import probe_datasets
from shared.errors import Interrupted, UserError
from shared.jobs import (
    LOG_FILE,
    RESULTS_MD,
    Job,
    Launcher,
    next_step,
    run_job,
    run_logged,
    start_logged,
    write_results,
)
from shared.launcher import add_launcher_arguments, launcher_settings
from shared.results import (
    RUNS_DIR,
    SWEEP_FILE,
    accuracy_note,
    format_duration,
    read_sweep_file,
)
from shared.runio import FRAMEWORKS, make_folder, run_folder_lock, write_json

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
        train_flags = ("--preset", plan.preset, *setting_flags(overrides))
        jobs.append(Job(name, run_dir[name], plan.framework, train_flags, data_dir, datasets,
                        donors))
    return jobs


def run_sweep(plan: Plan, sweep_dir: Path, data_dir: str, launch: Launcher = run_logged,
              echo: Callable[[str], None] = print, parallel: int = 1) -> list[str]:
    """Run every unfinished run of the plan, `parallel` at a time (each on a GPU of its own when
    the machine has GPUs); return the names of the runs that failed."""
    jobs = plan_jobs(plan, sweep_dir, data_dir)
    todo = [job for job in jobs if next_step(job) is not None]
    finished = len(jobs) - len(todo)
    echo(f"sweep {sweep_dir}: {plural(len(jobs), 'run')} ({plan.framework}, preset {plan.preset}); "
         f"{finished} finished, {len(todo)} to run"
         + (f", {parallel} at a time" if parallel > 1 and len(todo) > 1 else ""))
    if jobs and "gtsrb" not in jobs[0].datasets:
        echo(f"note: no {Path(data_dir) / 'gtsrb'}, so runs probe their own dataset only")
    write_results(sweep_dir)
    slots: queue.Queue = queue.Queue()
    for environment in slot_environments(parallel):
        slots.put(environment)
    failed, started, done, lock = [], time.monotonic(), [finished], threading.Lock()

    def one(job: Job) -> None:
        environment = slots.get()
        try:
            with lock:
                echo(f"[{done[0]}/{len(jobs)}] {job.name} (output: {job.run_dir / LOG_FILE})")
            prefix = f"    [{job.name}] " if parallel > 1 else "    "
            failure = run_job(job, launch if not environment else
                              lambda command, log: start_logged(command, log, environment).wait(),
                              lambda line: echo(prefix + line.strip()))
        finally:
            slots.put(environment)
        with lock:
            done[0] += 1
            if failure:
                failed.append(job.name)
            write_results(sweep_dir)
            count = done[0] - finished
            left = (time.monotonic() - started) / count * (len(todo) - count)
            outcome = (f"FAILED: {failure['error']}" if failure else
                       f"done: {accuracy_note(job.run_dir, job.datasets)}")
            echo(f"[{done[0]}/{len(jobs)}] {job.name}: {outcome}"
                 + (f"; about {format_duration(left)} left" if count < len(todo) else ""))

    if parallel == 1:
        for job in todo:
            one(job)
    else:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            for future in [pool.submit(one, job) for job in todo]:
                future.result()
    return failed


def visible_gpus() -> list[str]:
    """The GPUs of this machine a run can be given: CUDA_VISIBLE_DEVICES's, else nvidia-smi's."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu for gpu in listed.split(",") if gpu.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    found = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return [str(i) for i, line in enumerate(found.stdout.splitlines()) if line.startswith("GPU")]


def slot_environments(parallel: int) -> list[dict[str, str]]:
    """The environment of each of `parallel` runs at a time: a GPU each where there are GPUs,
    nothing to add on one slot or a machine without them."""
    if parallel == 1:
        return [{}]
    gpus = visible_gpus()
    if not gpus:
        return [{} for _ in range(parallel)]
    if parallel > len(gpus):
        raise UserError(f"--parallel {parallel}: this machine has {plural(len(gpus), 'GPU')} "
                        "(one run a GPU)")
    return [{"CUDA_VISIBLE_DEVICES": gpu} for gpu in gpus[:parallel]]


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
    parser.add_argument("--status", action="store_true",
                        help="show each run's state (done, queued, running with its log's last "
                             "line, failed with its error, lost, to run) and rewrite the results "
                             "tables; starts and submits nothing")
    add_launcher_arguments(parser, sweep=True)
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


def main(argv: list[str] | None = None, launch: Launcher = run_logged,
         cluster: str | None = None, poll_s: float = 30.0) -> int:
    """`python -m shared.sweep`; `launch` runs one command into a log (tests run it in-process),
    `cluster` is submitit's for --launcher slurm (None: SLURM; tests: "local"), `poll_s` how
    often --wait looks at the jobs."""
    argv = sys.argv[1:] if argv is None else argv

    def body():
        args = build_sweep_parser().parse_args(argv)
        settings = launcher_settings(args)
        sweep_dir = Path(args.out)
        sweep_path = sweep_dir / SWEEP_FILE
        stored = read_sweep_file(sweep_dir)
        if args.status and stored is None:
            raise UserError(f"--status: no sweep in {sweep_dir} (no {SWEEP_FILE})")
        plan = resolve_plan(args, stored, sweep_path)
        data_dir = args.data_dir or (stored or {}).get("data_dir") or Config().data_dir
        if args.status:
            show_status(plan_jobs(plan, sweep_dir, data_dir), sweep_dir)
            return
        command = (stored or {}).get("command") or shlex.join(["python", "-m", "shared.sweep",
                                                               *argv])
        make_folder(sweep_dir, "sweep folder")
        with run_folder_lock(sweep_dir, "python -m shared.sweep"):
            write_json(sweep_path, {**plan.to_json(), "data_dir": data_dir, "command": command})
            if settings.kind == "local":
                try:
                    failed = run_sweep(plan, sweep_dir, data_dir, launch, print,
                                       settings.parallel)
                except KeyboardInterrupt:
                    raise Interrupted("run the same command again to resume") from None
            else:
                # the jobs run elsewhere, so their paths must not depend on this directory
                jobs = plan_jobs(plan, sweep_dir.resolve(), str(Path(data_dir).resolve()))
                submit_runs(jobs, sweep_dir, settings, sweep_dir.resolve(), cluster, print)
                write_results(sweep_dir)
        if settings.kind == "slurm":
            if not settings.wait:
                show_status(jobs, sweep_dir)
                print(f"follow with: python -m shared.sweep --out {sweep_dir} --status")
                return
            final = wait_for_runs(jobs, sweep_dir, print, poll_s)
            write_results(sweep_dir)
            failed = [name for name, (state, _) in final.items() if state != "done"]
        if failed:
            raise UserError(f"{len(failed)} of {plural(len(plan.runs), 'run')} failed "
                            f"({', '.join(failed)}); see {sweep_dir / RESULTS_MD} and each "
                            f"run's {LOG_FILE}")
        print(f"all {plural(len(plan.runs), 'run')} finished: {sweep_dir / RESULTS_MD}")

    return cli_main(body)


def show_status(jobs: list[Job], sweep_dir: Path) -> None:
    """Print each run's state (shared.cluster.run_state) and rewrite the results tables."""
    current = states(jobs, sweep_dir)
    counts = Counter(state for state, _ in current.values())
    print(f"sweep {sweep_dir}: " + ", ".join(f"{count} {state}" for state, count in
                                             sorted(counts.items())))
    for name, (_, text) in current.items():
        print(f"  {name}: {text}")
    write_results(sweep_dir)


if __name__ == "__main__":
    sys.exit(main())

"""A training run's folder through its life: made and locked, started or continued, checkpointed
after every epoch, left with one line on Ctrl-C, and removed again when a refused start made it.

What a folder holds and how its files are written is shared.runio's; what its metrics.jsonl
holds, shared.records'. A folder holds training once it has a checkpoint, a summary, a probe
result (its results: never overwritten) or a logged step (kept when a later error ends the run).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.backend import Backend, World
from shared.config import Config
from shared.errors import Interrupted, UserError
from shared.records import METRICS_FILE, MetricsLog
from shared.runio import (
    CHECKPOINT_FILES,
    CONFIG_FILE,
    LOCK_FILE,
    SUMMARY_FILE,
    atomic_write_bytes,
    convert_command,
    make_folder,
    read_json,
    record_checkpoint,
    refuse_stale_checkpoint,
    run_folder_lock,
    tool_command,
    write_json,
)
from shared.schedule import Plan, lr_at
from shared.tensorboard import require_tensorboard


def results_in(folder: Path) -> list[str]:
    """The files of FOLDER that hold a run's results (a checkpoint of either framework,
    summary.json, a probe result): a folder with any is never started again from scratch."""
    names = [*CHECKPOINT_FILES.values(), SUMMARY_FILE]
    return sorted([name for name in names if (folder / name).exists()]
                  + [p.name for p in folder.glob("probe_*.json")])


def holds_training(folder: Path) -> bool:
    """Whether FOLDER holds anything of a run to keep: its results (results_in) or a logged
    step in metrics.jsonl."""
    metrics = folder / METRICS_FILE
    return bool(results_in(folder)) or (metrics.is_file() and metrics.stat().st_size > 0)


@contextlib.contextmanager
def run_folder(out: Path, framework: str, world: World) -> Iterator[None]:
    """Inside: on the main process, the run folder `out` exists and this process holds its lock
    (a second trainer, probe or sweep on it exits with a line naming this one). A folder this
    command made is removed again when a refused start (a UserError before it held training)
    ends it, or when nothing but the lock is in it."""
    if not world.is_main:
        yield
        return
    folder = Path(out)
    existed = folder.exists()
    make_folder(folder, "run folder")
    refused = False
    try:
        with run_folder_lock(folder, tool_command(framework, "train")):
            try:
                yield
            except Interrupted:
                raise
            except UserError:
                refused = not holds_training(folder)
                raise
    finally:
        if not existed and (refused or {p.name for p in folder.iterdir()} <= {LOCK_FILE}):
            _remove_new_folder(folder)


def _remove_new_folder(folder: Path) -> None:
    """Remove a run folder this command made and filled with its start only."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()
    folder.rmdir()


@contextlib.contextmanager
def resumable_on_interrupt(framework: str, run_dir: Path) -> Iterator[None]:
    """Turn Ctrl-C inside into one line that says what the run folder keeps and how to go on."""
    try:
        yield
    except KeyboardInterrupt:
        if (Path(run_dir) / CHECKPOINT_FILES[framework]).is_file():
            raise Interrupted(f"{run_dir} keeps its last checkpoint; continue with: "
                              f"{tool_command(framework, 'train')} --resume --out {run_dir}"
                              ) from None
        raise Interrupted(f"stopped before the first checkpoint; the same command starts "
                          f"{run_dir} again") from None


def start_run_dir(run_dir: Path, config_json: str, resume: bool, framework: str) -> bool:
    """Make RUN_DIR ready for training (the caller holds its lock): True when it holds a checkpoint
    of `framework` to continue from, False when training starts from scratch, after writing
    config.json.

    A folder whose earlier attempt stopped before its first checkpoint (a crash, a kill, a NaN
    in the first epoch) holds no results, so the same command, or --resume, starts it again. A
    folder with results (results_in) is never overwritten.
    """
    run_dir = Path(run_dir)
    checkpoint = run_dir / CHECKPOINT_FILES[framework]
    if resume and checkpoint.is_file():
        return True
    others = [name for fw, name in CHECKPOINT_FILES.items()
              if fw != framework and (run_dir / name).exists()]
    if results_in(run_dir):
        if resume and others:
            other = next(fw for fw, name in CHECKPOINT_FILES.items() if name == others[0])
            raise UserError(f"{run_dir} holds a {other} checkpoint ({others[0]}), not a "
                            f"{framework} one; convert it with: "
                            f"{convert_command(run_dir, framework)}")
        if resume:
            raise UserError(f"cannot resume {run_dir}: it holds no {checkpoint.name}")
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose "
                        "another --out")
    if resume and not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"cannot resume: no run in {run_dir} (no {CONFIG_FILE}); start it "
                        "without --resume")
    if (run_dir / CONFIG_FILE).is_file():
        print(f"note: {run_dir} holds a run that stopped before its first checkpoint; starting "
              "it again", flush=True)
    MetricsLog(run_dir).truncate(0)
    atomic_write_bytes(run_dir / CONFIG_FILE, (config_json + "\n").encode())
    return False


def prepare_run_dir(cfg: Config, resume: bool, framework: str) -> bool:
    """Make the run folder ready (main process, lock held): True when there is a checkpoint of
    `framework` to continue from (start_run_dir). A --tensorboard without its package is refused
    first, and a checkpoint older than the other framework's."""
    if cfg.tensorboard:
        require_tensorboard()
    resuming = start_run_dir(Path(cfg.out), cfg.to_json(), resume, framework)
    if resuming:
        refuse_stale_checkpoint(Path(cfg.out), framework)
    return resuming


@dataclass(frozen=True)
class Progress:
    """How far a run has come, as its checkpoint records it: epochs done, training time so far
    (the epochs' own), the wall time its sessions have taken (start-up, epochs and checkpoints:
    what a time budget counts), the size of metrics.jsonl when the checkpoint was written (lines
    after it are rolled back on resume) and the run's planned length then."""

    epoch: int = 0
    train_time_s: float = 0.0
    metrics_bytes: int = 0
    elapsed_s: float = 0.0
    planned_epochs: float | None = None

    def record(self, plan: Plan, cfg: Config) -> dict:
        """The checkpoint's progress entries: these, the global step and the settings, with
        epochs the plan the run follows."""
        global_step = min(self.epoch * plan.steps_per_epoch, plan.total_steps)
        return {"epoch": self.epoch, "global_step": global_step,
                "train_time_s": self.train_time_s, "metrics_bytes": self.metrics_bytes,
                "elapsed_s": self.elapsed_s,
                "config": {**dataclasses.asdict(cfg), "epochs": plan.epochs}}

    @classmethod
    def of_checkpoint(cls, stored: dict) -> Progress:
        """The progress a checkpoint records (one written before elapsed_s existed counts its
        training time)."""
        train_time = float(stored["train_time_s"])
        config = stored.get("config")
        planned = config.get("epochs") if isinstance(config, dict) else None
        return cls(int(stored["epoch"]), train_time, int(stored["metrics_bytes"]),
                   float(stored.get("elapsed_s", train_time)),
                   float(planned) if planned is not None else None)


def save_checkpoint(backend: Backend, framework: str, run_dir: Path, state: Any,
                    progress: Progress, plan: Plan, cfg: Config) -> None:
    """Write `framework`'s checkpoint of `state` at `progress` into RUN_DIR (main process) and
    note its global step in checkpoints.json."""
    record = progress.record(plan, cfg)
    backend.save_checkpoint(Path(run_dir) / CHECKPOINT_FILES[framework], state, record)
    record_checkpoint(run_dir, framework, record["global_step"])


def finished_summary(run_dir: Path, progress: Progress, plan: Plan, cfg: Config,
                     announce: bool) -> dict | None:
    """For a resumed run that has already trained all its steps and holds its summary (and
    probe results, unless --no-probe): that summary, left as it is (`announce`: say how to extend
    the run); None when work remains. Every process reads the same folder, so all agree."""
    if progress.epoch * plan.steps_per_epoch < plan.total_steps:
        return None
    summary = read_json(Path(run_dir) / SUMMARY_FILE)
    if (not isinstance(summary, dict) or summary.get("steps") != plan.total_steps
            or (cfg.probe and "probe" not in summary)):
        return None
    if announce:
        # a budgeted run that trained all of --epochs needs more epochs, not more time
        longer = (f"--time-budget longer than {cfg.time_budget}"
                  if cfg.time_budget and plan.epochs < cfg.epochs
                  else f"--epochs N with N > {plan.epochs:g}")
        print(f"{cfg.out} has trained all its {plan.epochs:g} epochs and holds its summary"
              f"{' and probe results' if cfg.probe else ''}; nothing to do. To train longer: "
              f"--resume --out {cfg.out} {longer}", flush=True)
    return summary


def store_resumed_settings(run_dir: Path, cfg: Config, progress: Progress, plan: Plan,
                           budgeted: bool) -> None:
    """On the main process of a run continued from a checkpoint, with work left: store the
    settings the run continues with in config.json (a larger --epochs or --time-budget, new probe
    settings), and say how a longer run changes the schedule."""
    write_json(Path(run_dir) / CONFIG_FILE, dataclasses.asdict(cfg))
    before = progress.planned_epochs
    if budgeted or before is None or plan.epochs <= before:
        return
    step = progress.epoch * plan.steps_per_epoch
    old = lr_at(step, Plan(before, plan.steps_per_epoch), cfg)
    print(f"note: extending {before:g} -> {plan.epochs:g} epochs recomputes the warmup-cosine "
          f"schedule over the longer run: the learning rate at step {step} goes from {old:.3g} "
          f"(the end of the old schedule) to {lr_at(step, plan, cfg):.3g}", flush=True)

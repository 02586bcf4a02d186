"""One training run's life, written once for both frameworks.

A run folder is made (or continued), the state is built or restored, the epochs are trained with a
checkpoint after each, the time budget is planned and kept, Ctrl-C and divergence end the run with
one line, and the summary and the probes close it. What differs between PyTorch and JAX (the
state, the compiled step, the checkpoint's format, the device, the features of the backbone) is a
Backend: torch_impl.backend and jax_impl.backend each supply one through `open_backend`, and their
train.py hand it to `run`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Protocol

import numpy as np
from tqdm import tqdm

from shared.augment import AugmentParams, view_params
from shared.cli import plural
from shared.config import Config
from shared.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    check_probe_data,
    dataset_title,
    pretraining_split,
    probe_datasets,
    stratified_subset,
)
from shared.errors import Interrupted, UserError, check_interrupted, resources_as_user_errors
from shared.linear_probe import Features, LinearTrainer, probe_after_training
from shared.loader import DrawnBatch, ViewBatch, epoch_batches, split_batch, steps_per_epoch
from shared.monitor import MonitorData, is_point, knn_top1, monitor_data, monitor_note
from shared.runio import (
    CHECKPOINT_FILES,
    CONFIG_FILE,
    LOCK_FILE,
    SUMMARY_FILE,
    TERMS,
    MetricsLog,
    last_record,
    make_folder,
    read_json,
    read_metrics,
    record_checkpoint,
    refuse_stale_checkpoint,
    run_folder_lock,
    start_run_dir,
    write_json,
)
from shared.schedule import lr_at
from shared.tensorboard import EventLog, require_tensorboard


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the last checkpoint is kept."""


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel job: rank in [0, size), local_rank = its device's
    index on its machine (torch_impl's processes; 0 for jax_impl, whose process drives all of its
    machine's devices), and the `parts` each batch is split into: one per process (torch_impl) or
    per device (jax_impl), named by `part_name`. The default is a job of one process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    parts: int = 1
    part_name: str = "processes"

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run folder, prints, shows the progress bar and runs the probe."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, size): which part of every batch this process loads (shared.loader)."""
        return self.rank, self.size


class Backend(Protocol):
    """A framework's side of a training run. The state is the framework's own (the loop only
    passes it on): a module and its optimizer in torch, a tree of arrays in JAX."""

    framework: str  # "torch" or "jax": the checkpoint's file, the commands, summary.json
    device_name: str  # "cpu", "cuda", ...
    precision_name: str  # "fp32" or "bf16"
    batch_split: str  # how the global batch is divided, e.g. " over 2 processes" (or "")
    on_device: bool  # the views are computed on the device: the loader yields DrawnBatch

    def on_main(self, action: Callable[[], object]) -> None:
        """action() on the main process; a UserError there is raised in every process."""

    def agree(self, value: float) -> float:
        """The main process's `value`, in every process."""

    def initial_state(self) -> Any:
        """Fresh weights drawn from cfg.seed and a fresh optimizer state."""

    def load_checkpoint(self, path: Path) -> dict:
        """The checkpoint file at `path` as written by save_checkpoint (UserError if unreadable)."""

    def restored_state(self, stored: dict, path: Path) -> Any:
        """The state a loaded checkpoint holds, checked against the run's model."""

    def save_checkpoint(self, path: Path, state: Any, progress: dict) -> None:
        """Write the state and the `progress` entries to `path` (atomically; main process)."""

    def train_step(self, state: Any, batch: ViewBatch | DrawnBatch,
                   lr: float) -> tuple[Any, dict]:
        """One optimisation step at learning rate lr: (the new state, the loss terms as device
        scalars, not synchronised)."""

    def scratch_copy(self, state: Any) -> ContextManager[Any]:
        """Inside: a state to take steps with (the step rate is timed on it); `state` is as it
        was on the way out."""

    def wait(self, value: Any) -> None:
        """Block until the device has computed `value`."""

    def features(self, state: Any) -> Features:
        """The backbone of `state`, frozen (eval mode), as a feature extractor: uint8 images
        [N, S, S, 3] -> float32 [N, F]. Usable after the backend is closed."""

    def train_linear(self, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                     num_classes: int, cfg: Config) -> np.ndarray:
        """The linear probe's classifier on features (shared.linear_probe.LinearTrainer)."""

    def knn_predict(self, bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray,
                    num_classes: int, k: int, temperature: float) -> np.ndarray:
        """The weighted kNN of the monitor and the kNN probe (shared.linear_probe.KnnClassifier):
        predicted labels int64 [M]."""


# open_backend(cfg, world, images uint8 [N, S, S, 3], augment) -> a context manager of the
# framework's Backend (inside it, the process group or device mesh exists).
OpenBackend = Callable[[Config, World, np.ndarray, AugmentParams], ContextManager[Backend]]


def augments_on_device(cfg: Config, on_gpu: bool) -> bool:
    """Whether the trainer computes the views on its device (--augment-on; auto: on a GPU)."""
    return cfg.augment_on == "device" or (cfg.augment_on == "auto" and on_gpu)


def train_images(cfg: Config, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The images a run trains on, uint8 [N, S, S, 3]: its dataset's pretraining images (`images`,
    `labels`: shared.data.pretraining_split, perhaps memory-mapped), or a stratified subset of
    them when cfg.subset > 0."""
    if cfg.subset > len(images):
        raise UserError(f"--subset {cfg.subset} is larger than the {len(images)} "
                        f"{dataset_title(cfg.dataset)} training images; use at most that many (or "
                        "0 for all)")
    if cfg.subset:
        images = images[stratified_subset(labels, cfg.subset, cfg.seed)]
    return np.ascontiguousarray(images)


# ---- the run folder's life -----------------------------------------------------------------------

@contextlib.contextmanager
def run_folder(cfg: Config, framework: str, world: World) -> Iterator[None]:
    """Inside: on the main process, the run folder cfg.out exists and this process holds its lock
    (a second trainer, probe or sweep on it exits with a line naming this one). A folder this
    command made is removed again when a refused start (a UserError before anything was trained:
    no checkpoint, no metrics) ends it, or when nothing but the lock is in it."""
    if not world.is_main:
        yield
        return
    folder = Path(cfg.out)
    existed = folder.exists()
    make_folder(folder, "run folder")
    refused = False
    try:
        with run_folder_lock(folder, f"python -m {framework}_impl.train"):
            try:
                yield
            except Interrupted:
                raise
            except UserError:
                refused = not _holds_training(folder)
                raise
    finally:
        if not existed and (refused or {p.name for p in folder.iterdir()} <= {LOCK_FILE}):
            _remove_new_folder(folder)


def _holds_training(folder: Path) -> bool:
    metrics = folder / "metrics.jsonl"
    return (any((folder / name).exists() for name in CHECKPOINT_FILES.values())
            or (metrics.is_file() and metrics.stat().st_size > 0))


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
        checkpoint = Path(run_dir) / CHECKPOINT_FILES[framework]
        if checkpoint.is_file():
            raise Interrupted(f"{run_dir} keeps its last checkpoint; continue with: python -m "
                              f"{framework}_impl.train --resume --out {run_dir}") from None
        raise Interrupted(f"stopped before the first checkpoint; the same command starts "
                          f"{run_dir} again") from None


def prepare_run_dir(cfg: Config, resume: bool, framework: str) -> bool:
    """Make the run folder ready (main process, lock held): True when there is a checkpoint of
    `framework` to continue from (see runio.start_run_dir). A --tensorboard without its package
    is refused first, and a checkpoint older than the other framework's."""
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

    def record(self, per_epoch: int, cfg: Config) -> dict:
        """The checkpoint's progress entries: these, the global step and the settings (epochs:
        the plan the run follows)."""
        global_step = min(self.epoch * per_epoch, cfg.total_steps(per_epoch))
        return {"epoch": self.epoch, "global_step": global_step,
                "train_time_s": self.train_time_s, "metrics_bytes": self.metrics_bytes,
                "elapsed_s": self.elapsed_s, "config": dataclasses.asdict(cfg)}

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


# ---- the time budget -----------------------------------------------------------------------------

# The share of a time budget a plan fills: the rest absorbs what the plan does not see (an epoch's
# start and its checkpoint, the rate's wobble).
BUDGET_USE = 0.97
# A plan is made again when the end it projects moves by more than REPLAN_SHARE of the budget,
# at the rate measured over at least the last RATE_WINDOW of it.
REPLAN_SHARE, RATE_WINDOW = 0.05, 0.1
# The rate is timed (after two steps that warm up and compile) over at least TIMED_STEPS steps and
# TIMED_SECONDS seconds, since a few fast steps fed from the loader's prefetched batches flatter
# it, but over at most TIMING_SHARE of the budget's time.
TIMED_STEPS, TIMED_SECONDS, TIMING_SHARE = 8, 20.0, 0.05


def clock() -> float:
    """The seconds a time budget is kept by (time.perf_counter; a test may stand in its own)."""
    return time.perf_counter()


@dataclass
class Budget:
    """A --time-budget run's clock. `seconds`: the budget; `max_steps`: --epochs' worth of steps;
    `used_before`: the seconds earlier sessions of the run used, `started`: when this session
    began (clock()); `reserve`: seconds kept for the kNN monitor's last point, at the end; the
    rate is measured from step `window_step`, reached at `window_time`."""

    seconds: float
    max_steps: int
    used_before: float = 0.0
    reserve: float = 0.0
    started: float = field(default_factory=clock)
    window_step: int = 0
    window_time: float = field(default_factory=clock)

    def used(self) -> float:
        """Seconds of the budget used so far, this session's start-up included."""
        return self.used_before + clock() - self.started


def steps_that_fit(budget: Budget, done: int, seconds_per_step: float) -> int:
    """The run's length in steps when it has trained `done` steps at `seconds_per_step`:
    N = done + floor((BUDGET_USE * budget - used - reserve) / seconds_per_step), within
    [done, max_steps]."""
    left = BUDGET_USE * budget.seconds - budget.used() - budget.reserve
    more = int(left / seconds_per_step) if left > 0 else 0
    return max(done, min(budget.max_steps, done + more))


def projected_end_moved(budget: Budget, done: int, planned: int,
                        seconds_per_step: float) -> bool:
    """Whether the plan's end, projected at `seconds_per_step`, lies more than REPLAN_SHARE of the
    budget from the end it aims at (BUDGET_USE of it); a plan capped by --epochs that ends early
    is kept."""
    projected = budget.used() + (planned - done) * seconds_per_step + budget.reserve
    target = BUDGET_USE * budget.seconds
    if planned >= budget.max_steps and projected <= target:
        return False
    return abs(projected - target) > REPLAN_SHARE * budget.seconds


def apply_plan(session: Session, steps: int, done: int, seconds_per_step: float) -> None:
    """Make `steps` the run's length: session.cfg.epochs, the budget's rate window, a "plan"
    record in metrics.jsonl (so the report shows it, and a resume rolls it back with the steps
    after its checkpoint; the checkpoint itself records the plan it was trained under)."""
    budget = session.budget
    session.cfg = dataclasses.replace(session.cfg, epochs=steps / session.steps_per_epoch)
    record = {"kind": "plan", "step": done, "epochs": session.cfg.epochs,
              "seconds_per_step": seconds_per_step, "budget_s": budget.seconds,
              "budget_used_s": budget.used()}
    if session.metrics is not None:
        session.metrics.write(record)


def replan(session: Session, done: int, seconds_per_step: float | None = None) -> bool:
    """At a point where the loss was read back (the device is in step), `done` steps trained:
    plan the run again when its projected end moved (projected_end_moved), at
    `seconds_per_step`, or at the rate since the last measurement once RATE_WINDOW of the budget
    has passed since it. Every process takes the main process's decision. Returns whether the
    plan changed."""
    budget, per_epoch = session.budget, session.steps_per_epoch
    planned = session.cfg.total_steps(per_epoch)
    if seconds_per_step is None:
        window = clock() - budget.window_time
        if done > budget.window_step and window >= RATE_WINDOW * budget.seconds:
            seconds_per_step = window / (done - budget.window_step)
            budget.window_step, budget.window_time = done, clock()
    steps = planned
    if seconds_per_step and projected_end_moved(budget, done, planned, seconds_per_step):
        steps = steps_that_fit(budget, done, seconds_per_step)
    steps = int(session.backend.agree(steps))
    if steps == planned:
        return False
    apply_plan(session, steps, done, seconds_per_step or 0.0)
    if session.world.is_main:
        rate = session.cfg.batch_size / seconds_per_step
        tqdm.write(f"re-planned at step {done}: {session.cfg.epochs:.3f} epochs fit the "
                   f"{session.cfg.time_budget} time budget at {rate:.0f} pairs/s",
                   file=sys.stderr)
    return True


def timing_batches(session: Session) -> Iterator[ViewBatch | DrawnBatch]:
    """The run's batches from its first, epoch after epoch, whatever its length: what the step
    rate is timed on."""
    epoch = 0
    while True:
        yield from session_batches(session, epoch, session.steps_per_epoch)
        epoch += 1


def measure_step_seconds(session: Session, state: Any) -> float:
    """Seconds per training step here, timed on a scratch copy of `state`: two warm-up steps
    (which compile), then at least TIMED_STEPS steps and TIMED_SECONDS seconds, or fewer (at
    least 2) where they would take more than TIMING_SHARE of the time budget."""
    backend = session.backend
    limit = TIMING_SHARE * (session.cfg.time_budget_s() or float("inf"))
    if session.world.is_main:
        print(f"timing the training step: 2 warm-up steps (they compile), then "
              f"{min(TIMED_SECONDS, limit):.0f} s or more", flush=True)
    stream = timing_batches(session)
    try:
        with backend.scratch_copy(state) as scratch:
            for _ in range(2):
                scratch, terms = backend.train_step(scratch, next(stream), 0.0)
                backend.wait(terms)
            start, timed = time.perf_counter(), 0
            while True:
                scratch, terms = backend.train_step(scratch, next(stream), 0.0)
                check_interrupted()
                timed += 1
                backend.wait(terms)
                elapsed = time.perf_counter() - start
                enough = timed >= TIMED_STEPS and elapsed >= TIMED_SECONDS
                if timed >= 2 and (enough or elapsed >= limit):
                    return elapsed / timed
    finally:
        stream.close()


def plan_budget(session: Session, state: Any) -> str:
    """The first plan of a run with a --time-budget, before its first step: time the step, fit
    the steps to what the start-up left. Returns the start-up line's note. A budget that the
    start-up uses up, or that fits less than the warmup, is a UserError."""
    cfg, per_epoch = session.cfg, session.steps_per_epoch
    seconds_per_step = session.backend.agree(measure_step_seconds(session, state))
    budget = session.budget
    if session.monitor is not None:  # its points cost their share of every step's time
        point_s = monitor_point(session, state)[1] if session.world.is_main else 0.0
        budget.reserve = float(session.backend.agree(point_s))
        seconds_per_step += budget.reserve / session.monitor_every_steps()
    steps = int(session.backend.agree(steps_that_fit(budget, 0, seconds_per_step)))
    if steps == 0:
        raise UserError(f"the {cfg.time_budget} time budget is used up before training starts: "
                        f"loading, compiling and timing took {budget.used():.0f} s and a step "
                        f"{seconds_per_step:.2g} s; give a longer --time-budget")
    if cfg.warmup_epochs * per_epoch > steps:
        raise UserError(f"the {cfg.time_budget} time budget fits {steps / per_epoch:.2f} epochs, "
                        f"fewer than --warmup-epochs {cfg.warmup_epochs:g}; lower it or give "
                        "more time")
    apply_plan(session, steps, 0, seconds_per_step)
    session.budget.window_time = clock()
    end = time.time() + steps * seconds_per_step
    return (f" (what fits the {cfg.time_budget} time budget at "
            f"{cfg.batch_size / seconds_per_step:.0f} pairs/s: ends about "
            f"{time.strftime('%H:%M', time.localtime(end))}, re-planned if the rate changes)")


# ---- the session ---------------------------------------------------------------------------------

@dataclass
class Session:
    """What one training process holds besides the state.

    settings: the run's settings as given (config.json holds them); cfg: the same, with epochs
    the run's current plan (with a --time-budget, what fits it; else --epochs).
    """

    settings: Config
    images: np.ndarray  # uint8 [N, S, S, 3], S = cfg.image_size
    augment: AugmentParams
    world: World
    backend: Backend
    metrics: MetricsLog | None  # None in the processes other than the main one: they write nothing
    started: float = field(default_factory=clock)  # when the command began
    monitor: MonitorData | None = None  # the kNN monitor's images (None: it is off)
    cfg: Config = field(init=False)
    steps_per_epoch: int = field(init=False)
    budget: Budget | None = field(default=None, init=False)
    events: EventLog | None = field(default=None, init=False)  # --tensorboard, main process
    stepped: bool = field(default=False, init=False)  # a step (and its compilation) has run
    train_time_s: float = field(default=0.0, init=False)  # training seconds before this epoch
    last_knn_top1: float | None = field(default=None, init=False)  # the monitor's, for the bar

    def __post_init__(self):
        self.cfg = self.settings
        self.steps_per_epoch = steps_per_epoch(len(self.images), self.settings.batch_size)

    @property
    def run_dir(self) -> Path:
        return Path(self.settings.out)

    def total_steps(self) -> int:
        return self.cfg.total_steps(self.steps_per_epoch)

    def monitor_every_steps(self) -> float:
        """The steps between two points of the kNN monitor."""
        return self.cfg.monitor_every * self.steps_per_epoch


def session_batches(session: Session, epoch: int,
                    end_step: int | None = None) -> Iterator[ViewBatch | DrawnBatch]:
    """The batches of `epoch` (shared.loader.epoch_batches), up to `end_step` (default: where
    the plan ends the epoch; a budgeted run's whole epoch, since a new plan may move its end):
    views, or drawn parameters when the backend computes the views; this process's rows."""
    cfg, per_epoch = session.cfg, session.steps_per_epoch
    if end_step is None:
        end_step = per_epoch if session.budget else cfg.steps_in_epoch(epoch, per_epoch)
    return epoch_batches(session.images, session.augment, batch_size=cfg.batch_size,
                         seed=cfg.seed, epoch=epoch, end_step=end_step,
                         workers=cfg.loader_workers(), shard=session.world.shard,
                         on_device=session.backend.on_device)


def start_state(session: Session, resume: bool) -> tuple[Any, Progress]:
    """The state to train and the progress so far: fresh, or the checkpoint's (rank 0 has decided
    whether there is one to continue from). With a --time-budget the session gets its clock; a
    resumed run follows the plan its checkpoint was trained under."""
    backend, cfg = session.backend, session.settings
    path = session.run_dir / CHECKPOINT_FILES[backend.framework]
    if cfg.time_budget:
        session.budget = Budget(cfg.time_budget_s(), cfg.total_steps(session.steps_per_epoch),
                                started=session.started)
    if not (resume and path.is_file()):
        return backend.initial_state(), Progress()
    stored = backend.load_checkpoint(path)
    progress = Progress.of_checkpoint(stored)
    if session.budget is not None:
        session.budget.used_before = progress.elapsed_s
        if progress.planned_epochs is not None:
            session.cfg = dataclasses.replace(session.cfg, epochs=progress.planned_epochs)
    return backend.restored_state(stored, path), progress


def resume_settings(session: Session, progress: Progress) -> None:
    """On the main process of a run continued from a checkpoint, with work left: store the
    settings the run continues with (a larger --epochs or --time-budget, new probe settings),
    and say how a longer run changes the schedule."""
    if session.metrics is None or progress.epoch == 0:
        return
    write_json(session.run_dir / CONFIG_FILE, dataclasses.asdict(session.settings))
    before = progress.planned_epochs
    if session.budget is None and before is not None and session.cfg.epochs > before:
        per_epoch, step = session.steps_per_epoch, progress.epoch * session.steps_per_epoch
        old = lr_at(step, per_epoch, dataclasses.replace(session.cfg, epochs=before))
        print(f"note: extending {before:g} -> {session.cfg.epochs:g} epochs recomputes the "
              f"warmup-cosine schedule over the longer run: the learning rate at step {step} "
              f"goes from {old:.3g} (the end of the old schedule) to "
              f"{lr_at(step, per_epoch, session.cfg):.3g}", flush=True)


def resume_budget(session: Session, progress: Progress) -> None:
    """A budgeted run continued from a checkpoint: plan again when its end moved (a longer
    --time-budget, or the time used is not what the plan assumed), at the rate the plan in force
    was made with (a run from before plans were recorded: its last epoch's)."""
    if session.budget is None or progress.epoch == 0:
        return
    seconds_per_step = point_s = 0.0
    if session.world.is_main:
        records = read_metrics(session.run_dir)
        plan, epoch = last_record(records, "plan"), last_record(records, "epoch")
        if plan:
            seconds_per_step = plan["seconds_per_step"]
        elif epoch.get("pairs_per_s"):
            seconds_per_step = session.cfg.batch_size / epoch["pairs_per_s"]
        if session.monitor is not None:
            point_s = last_record(records, "knn").get("seconds", 0.0)
    seconds_per_step = float(session.backend.agree(seconds_per_step))
    session.budget.reserve = float(session.backend.agree(point_s))
    done = min(progress.epoch * session.steps_per_epoch, session.total_steps())
    session.budget.window_step = done
    if seconds_per_step > 0:
        replan(session, done, seconds_per_step)


def finished_summary(session: Session, progress: Progress) -> dict | None:
    """For a resumed run that has already trained all its steps and holds its summary (and
    probe results, unless --no-probe): that summary, left as it is (the main process says how to
    extend the run); None when work remains. Every process reads the same folder, so all agree."""
    cfg, world = session.cfg, session.world
    if progress.epoch * session.steps_per_epoch < session.total_steps():
        return None
    summary = read_json(session.run_dir / SUMMARY_FILE)
    if (not isinstance(summary, dict) or summary.get("steps") != session.total_steps()
            or (cfg.probe and "probe" not in summary)):
        return None
    if world.is_main:
        longer = (f"--time-budget longer than {cfg.time_budget}" if cfg.time_budget
                  else f"--epochs N with N > {cfg.epochs:g}")
        print(f"{cfg.out} has trained all its {cfg.epochs:g} epochs and holds its summary"
              f"{' and probe results' if cfg.probe else ''}; nothing to do. To train longer: "
              f"--resume --out {cfg.out} {longer}", flush=True)
    return summary


def train_remaining(session: Session, state: Any,
                    progress: Progress) -> tuple[Any, Progress, dict | None]:
    """Everything between loading a session and the end of its run: (state, progress, None) after
    the steps not yet done, each epoch followed by its checkpoint; or, for a resumed run that has
    already finished, (state, progress, its summary), with nothing written (finished_summary).
    A run that starts with a --time-budget first fixes its length (plan_budget); a resumed one
    rolls metrics.jsonl back to its checkpoint, then plans again if its budget moved."""
    budget_note = ""
    if progress.epoch == 0 and session.budget is not None:
        budget_note = plan_budget(session, state)
    if progress.epoch and session.metrics is not None:  # the lines after the checkpoint go
        session.metrics.truncate(progress.metrics_bytes)
    resume_budget(session, progress)
    done = finished_summary(session, progress)
    if done is not None:
        return state, progress, done
    resume_settings(session, progress)
    if session.settings.tensorboard and session.metrics is not None:
        resumed_at = progress.epoch * session.steps_per_epoch + 1 if progress.epoch else None
        session.events = EventLog(session.run_dir, resumed_at)
    startup_line(session, budget_note)
    elapsed_before = progress.elapsed_s
    with progress_bar(session, progress) as bar:
        epoch = progress.epoch
        while epoch * session.steps_per_epoch < session.total_steps():
            session.train_time_s = progress.train_time_s
            state, epoch_record = train_epoch(session, state, epoch, bar)
            epoch += 1
            progress = Progress(epoch, progress.train_time_s + epoch_record["epoch_time_s"],
                                session.metrics.size() if session.metrics else 0,
                                elapsed_before + clock() - session.started,
                                session.cfg.epochs)
            if session.world.is_main:
                framework, record = (session.backend.framework,
                                     progress.record(session.steps_per_epoch, session.cfg))
                session.backend.save_checkpoint(
                    session.run_dir / CHECKPOINT_FILES[framework], state, record)
                record_checkpoint(session.run_dir, framework, record["global_step"])
            if session.events is not None:
                session.events.flush()
    return state, progress, None


def monitor_point(session: Session, state: Any) -> tuple[float, float]:
    """The kNN monitor's top-1 for the backbone of `state`, and the seconds it took (on the time
    budget's clock)."""
    started = clock()
    top1 = knn_top1(session.backend.features(state), session.backend.knn_predict,
                    session.monitor, session.cfg)
    return top1, clock() - started


def record_point(session: Session, state: Any, log: EpochLog, step: int) -> None:
    """A point of the kNN monitor once `step` steps are trained (main process): its "knn" record
    in metrics.jsonl with the training seconds so far (its own time left out of them and of the
    epoch's rate, though a time budget counts it), TensorBoard and the bar."""
    if not session.world.is_main:
        return
    top1, seconds = monitor_point(session, state)
    log.pause(seconds)
    session.last_knn_top1 = top1
    record = {"kind": "knn", "epoch": log.epoch, "step": step,
              "epochs": step / session.steps_per_epoch, "knn_top1": top1,
              "train_time_s": session.train_time_s + log.training_seconds(),
              "seconds": seconds}
    session.metrics.write(record)
    if session.events is not None:
        session.events.scalars(step, {"knn_top1": top1})


def train_epoch(session: Session, state: Any, epoch: int, bar: tqdm) -> tuple[Any, dict]:
    """One epoch of steps, logged every cfg.log_every steps; with a time budget the plan is
    checked wherever the loss is read back, and the epoch ends where the plan does. Returns
    (state, the epoch record)."""
    log = EpochLog(session, bar, epoch)
    per_epoch, backend = session.steps_per_epoch, session.backend
    with contextlib.closing(session_batches(session, epoch)) as batches:
        for batch in batches:
            step = epoch * per_epoch + batch.step
            lr = lr_at(step, per_epoch, session.cfg)
            state, terms = backend.train_step(state, batch, lr)
            check_interrupted()
            if not session.stepped:  # the bar's rate leaves out the first step's compilation
                session.stepped = True
                bar.unpause()
            end = min(session.total_steps(), (epoch + 1) * per_epoch)
            if log.add(batch.step, lr, terms, last=step + 1 >= end) and session.budget:
                if replan(session, step + 1):
                    bar.total = session.total_steps()
                    bar.refresh()
            if session.monitor is not None and is_point(step + 1, session.total_steps(),
                                                        session.monitor_every_steps()):
                record_point(session, state, log, step + 1)
            if step + 1 >= session.total_steps():
                break
    return state, log.close()


def startup_line(session: Session, note: str = "") -> None:
    """Print, on the main process, what is about to be trained, on what, and where it is written
    (note: after the epochs)."""
    cfg, backend = session.cfg, session.backend
    if session.world.is_main:
        print(f"{backend.framework}_impl: {cfg.model_description()}, {len(session.images)} "
              f"images, {session.steps_per_epoch} steps/epoch x {cfg.epochs:g} epochs{note}, "
              f"batch {cfg.batch_size}{backend.batch_split}, {backend.device_name} "
              f"{backend.precision_name}, run folder {cfg.out}", flush=True)


def progress_bar(session: Session, progress: Progress) -> tqdm:
    """The run's tqdm bar over all its steps (on stderr; shown by the main process only)."""
    total = session.total_steps()
    return tqdm(total=total, initial=min(progress.epoch * session.steps_per_epoch, total),
                unit="step", dynamic_ncols=True, mininterval=1.0, file=sys.stderr,
                disable=not session.world.is_main)


def check_finite(window: list[tuple[int, int, dict]], run_dir: Path,
                 per_epoch: int) -> dict[str, float]:
    """Bring a window of (epoch, step in epoch, terms) to the host; stop on the first non-finite
    loss, naming its step as the progress bar counts them (from 1)."""
    rows = [(epoch, step, {k: float(v) for k, v in terms.items()}) for epoch, step, terms in window]
    for epoch, step, values in rows:
        if not np.isfinite(values["loss"]):
            kept = (f"the checkpoint of epoch {epoch} stays in {run_dir}" if epoch else
                    "no checkpoint was written yet")
            raise TrainingDiverged(
                f"loss became {values['loss']} at step {epoch * per_epoch + step + 1} (epoch "
                f"{epoch + 1}); stopped, {kept} (try a lower --base-lr)")
    return {k: float(np.mean([v[k] for _, _, v in rows])) for k in TERMS}


class EpochLog:
    """Collects one epoch's step terms (device scalars, read back only every cfg.log_every steps
    and at the epoch's last step, so the device is not synchronised each step) and writes
    metrics.jsonl lines and the bar. Processes other than the main one (session.metrics None)
    check the loss (the same global loss everywhere, so all stop together) but write nothing."""

    def __init__(self, session: Session, bar: tqdm, epoch: int):
        self.session, self.bar, self.epoch = session, bar, epoch
        self.rows: list[dict[str, float]] = []
        self.window: list = []
        self.lr = 0.0
        self.t_epoch = self.t_window = time.perf_counter()

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (spent on something else than training) out of the epoch's time and
        rate."""
        self.t_epoch += seconds
        self.t_window += seconds

    def training_seconds(self) -> float:
        """The seconds this epoch has trained so far."""
        return time.perf_counter() - self.t_epoch

    def add(self, step: int, lr: float, terms: dict, last: bool) -> bool:
        """Record step `step` (0-based within the epoch) trained at `lr`; `last`: the epoch's
        last step. Returns whether the window was read back and written."""
        self.window.append((self.epoch, step, terms))
        self.lr = lr
        self.bar.update(1)
        if len(self.window) < self.session.cfg.log_every and not last:
            return False
        self._flush()
        return True

    def _flush(self) -> None:
        session = self.session
        per_epoch, batch = session.steps_per_epoch, session.cfg.batch_size
        means = check_finite(self.window, session.run_dir, per_epoch)
        elapsed = time.perf_counter() - self.t_window
        pairs_per_s = len(self.window) * batch / elapsed
        step = self.window[-1][1]
        self._write({"kind": "step", "epoch": self.epoch,
                     "step": self.epoch * per_epoch + step + 1, "lr": self.lr,
                     "pairs_per_s": pairs_per_s, "images_per_s": 2 * pairs_per_s, **means})
        self.rows += [means] * len(self.window)
        knn = self.session.last_knn_top1
        shown = {} if knn is None else {"knn": f"{100 * knn:.1f}%"}
        self.bar.set_postfix(epoch=self.epoch + 1, loss=f"{means['loss']:.3f}",
                             img_s=f"{2 * pairs_per_s:.0f}", **shown)
        self.window, self.t_window = [], time.perf_counter()

    def close(self) -> dict:
        """Write and return the epoch record (mean terms, time, throughput)."""
        if self.window:
            self._flush()
        epoch_time = time.perf_counter() - self.t_epoch
        steps = len(self.rows)
        pairs_per_s = steps * self.session.cfg.batch_size / epoch_time
        record = {"kind": "epoch", "epoch": self.epoch,
                  "step": self.epoch * self.session.steps_per_epoch + steps,
                  "lr": self.lr, "epoch_time_s": epoch_time, "pairs_per_s": pairs_per_s,
                  "images_per_s": 2 * pairs_per_s,
                  **{k: float(np.mean([r[k] for r in self.rows])) for k in TERMS}}
        self._write(record)
        return record

    def _write(self, record: dict) -> None:
        if self.session.metrics is not None:
            self.session.metrics.write(record)
        if self.session.events is not None:
            self.session.events.write(record)


# ---- the end of a run ----------------------------------------------------------------------------

def run_summary(session: Session, train_time: float) -> dict:
    """The summary.json of a finished run (before the probe results are added); the final losses
    are the last epoch's record in metrics.jsonl, so a resumed run reports them too."""
    cfg, backend = session.cfg, session.backend
    steps = session.total_steps()
    records = read_metrics(session.run_dir)
    last_epoch, last_point = last_record(records, "epoch"), last_record(records, "knn")
    return {"framework": backend.framework, "device": backend.device_name,
            "precision": backend.precision_name, "epochs": cfg.epochs, "steps": steps,
            "train_images": len(session.images),
            "train_time_s": train_time,
            "pairs_per_s": steps * cfg.batch_size / max(train_time, 1e-9),
            "final": {k: last_epoch.get(k) for k in TERMS},
            **({"knn_top1": last_point["knn_top1"]} if last_point else {})}


def finish_run(session: Session, progress: Progress, features: Features | None,
               train_linear: LinearTrainer) -> dict:
    """The end of a run, on the main process: write summary.json, then (unless --no-probe) probe
    the backbone's `features` and write it again with the results (and to TensorBoard, as
    probe/<dataset>_top1 at the last step); returns the summary."""
    cfg = session.cfg
    summary = run_summary(session, progress.train_time_s)
    write_json(session.run_dir / SUMMARY_FILE, summary)
    minutes = summary["train_time_s"] / 60
    print(f"trained {plural(cfg.epochs, 'epoch')} in {minutes:.1f} min" if session.stepped else
          f"{cfg.out} had trained its {plural(cfg.epochs, 'epoch')} ({minutes:.1f} min) before",
          flush=True)
    if cfg.probe:
        summary["probe"] = probe_after_training(cfg, session.run_dir,
                                                framework=session.backend.framework,
                                                features=features, train_linear=train_linear)
        write_json(session.run_dir / SUMMARY_FILE, summary)
        if session.events is not None:
            session.events.scalars(summary["steps"], {f"{dataset}_top1": top1 for dataset, top1
                                                      in summary["probe"].items()},
                                   prefix="probe/")
    if session.events is not None:
        session.events.close()
    return summary


def run(cfg: Config, resume: bool, framework: str, world: World,
        open_backend: OpenBackend) -> dict:
    """Train (or resume) as `cfg` says with the framework's backend, then probe; returns the
    summary written to summary.json.

    In a data-parallel job the main process alone writes the run folder and, once the job's
    processes have parted (the backend closed), runs the probes; the others return {}.
    """
    started = clock()
    split_batch(cfg.batch_size, world.parts, world.part_name)
    with (run_folder(cfg, framework, world), resumable_on_interrupt(framework, Path(cfg.out)),
          resources_as_user_errors()):
        if cfg.probe:
            check_probe_data(probe_datasets(cfg.dataset, cfg.data_dir, cfg.download),
                             cfg.data_dir, cfg.download)
        images = train_images(cfg, *pretraining_split(cfg.dataset, cfg.data_dir, cfg.download,
                                                      cfg.image_size, cfg.bad_images))
        monitor = monitor_data(cfg)
        note = monitor_note(cfg, monitor)
        if note and world.is_main:
            print(note, flush=True)
        augment = view_params(cfg, CIFAR10_MEAN, CIFAR10_STD)
        with open_backend(cfg, world, images, augment) as backend:
            backend.on_main(lambda: prepare_run_dir(cfg, resume, framework))
            # a corrupt metrics.jsonl line is refused before training, not after it
            backend.on_main(lambda: read_metrics(Path(cfg.out)))
            session = Session(cfg, images, augment, world, backend,
                              MetricsLog(cfg.out) if world.is_main else None, started, monitor)
            state, progress = start_state(session, resume)
            state, progress, done = train_remaining(session, state, progress)
            if done is not None or not world.is_main:
                return done or {}
            features = backend.features(state) if cfg.probe else None
            train_linear = backend.train_linear
        return finish_run(session, progress, features, train_linear)

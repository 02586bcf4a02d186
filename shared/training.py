"""The framework-neutral parts of a training run: data, the run folder's life, step logging,
divergence, the checkpoint's progress record, the summary and probes that end a run, the CLI.

torch_impl.train and jax_impl.train differ only in how a step is computed; what they log, when
they stop, and what they write come from here, so their run folders have the same shape.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shared.config import Config
from shared.data import load_split, stratified_subset
from shared.errors import Interrupted, UserError
from shared.loader import epoch_batches
from shared.runio import (
    CHECKPOINT_FILES,
    CONFIG_FILE,
    LOCK_FILE,
    SUMMARY_FILE,
    MetricsLog,
    last_epoch_record,
    make_folder,
    read_json,
    run_folder_lock,
    start_run_dir,
    write_json,
)
from shared.tensorboard import EventLog, require_tensorboard

TERMS = ("loss", "invariance", "variance", "covariance", "embedding_std")


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the last checkpoint is kept."""


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel job: rank in [0, size), local_rank = its device's
    index on its machine (torch_impl's processes; 0 for jax_impl, whose process drives all of its
    machine's devices). The default is a job of one process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run folder, prints, shows the progress bar and runs the probe."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, size): which part of every batch this process loads (shared.loader)."""
        return self.rank, self.size


def augments_on_device(cfg: Config, on_gpu: bool) -> bool:
    """Whether the trainer computes the views on its device (--augment-on; auto: on a GPU)."""
    return cfg.augment_on == "device" or (cfg.augment_on == "auto" and on_gpu)


def train_images(cfg: Config) -> np.ndarray:
    """CIFAR-10 train images uint8 [N, 32, 32, 3] (a stratified subset when cfg.subset > 0)."""
    images, labels = load_split("cifar10", cfg.data_dir, "train", download=cfg.download)
    if cfg.subset > len(images):
        raise UserError(f"--subset {cfg.subset} is larger than the {len(images)} CIFAR-10 "
                        "training images; use at most that many (or 0 for all)")
    if cfg.subset:
        images = images[stratified_subset(labels, cfg.subset, cfg.seed)]
    return np.ascontiguousarray(images)


# ---- the run folder's life -----------------------------------------------------------------------

@contextlib.contextmanager
def run_folder(cfg: Config, framework: str, world: World) -> Iterator[None]:
    """Inside: on the main process, the run folder cfg.out exists and this process holds its lock
    (a second trainer, probe or sweep on it exits with a line naming this one). A folder made here
    that holds nothing else on the way out (the data was missing, a setting was refused) is
    removed again."""
    if not world.is_main:
        yield
        return
    folder = Path(cfg.out)
    existed = folder.exists()
    make_folder(folder, "run folder")
    try:
        with run_folder_lock(folder, f"python -m {framework}_impl.train"):
            yield
    finally:
        if not existed and {p.name for p in folder.iterdir()} <= {LOCK_FILE}:
            (folder / LOCK_FILE).unlink(missing_ok=True)
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
    is refused first."""
    if cfg.tensorboard:
        require_tensorboard()
    return start_run_dir(Path(cfg.out), cfg.to_json(), resume, framework)


@dataclass(frozen=True)
class Progress:
    """How far a run has come, as its checkpoint records it: epochs done, training time so far,
    and the size of metrics.jsonl when the checkpoint was written (lines after it are rolled
    back on resume)."""

    epoch: int = 0
    train_time_s: float = 0.0
    metrics_bytes: int = 0

    def record(self, per_epoch: int, cfg: Config) -> dict:
        """The checkpoint's progress entries: these, the global step and the settings."""
        global_step = min(self.epoch * per_epoch, cfg.total_steps(per_epoch))
        return {"epoch": self.epoch, "global_step": global_step,
                "train_time_s": self.train_time_s, "metrics_bytes": self.metrics_bytes,
                "config": dataclasses.asdict(cfg)}

    @classmethod
    def of_checkpoint(cls, stored: dict) -> Progress:
        return cls(int(stored["epoch"]), float(stored["train_time_s"]),
                   int(stored["metrics_bytes"]))


def resume_progress(cfg: Config, progress: Progress, metrics: MetricsLog | None) -> None:
    """On the main process of a run continued from a checkpoint: roll metrics.jsonl back to it,
    and store the settings the run continues with (a larger --epochs, new probe settings)."""
    if metrics is None or progress.epoch == 0:
        return
    metrics.truncate(progress.metrics_bytes)
    write_json(Path(cfg.out) / CONFIG_FILE, dataclasses.asdict(cfg))


def finished_summary(session, progress: Progress) -> dict | None:
    """For a resumed run that has already trained all its epochs and holds its summary (and
    probe results, unless --no-probe): that summary, left as it is (the main process says how to
    extend the run); None when work remains. Every process reads the same folder, so all agree.
    session: the trainer's Session."""
    cfg, world = session.cfg, session.world
    if progress.epoch < cfg.epoch_count(session.steps_per_epoch):
        return None
    summary = read_json(Path(cfg.out) / SUMMARY_FILE)
    if not isinstance(summary, dict) or (cfg.probe and "probe" not in summary):
        return None
    if world.is_main:
        print(f"{cfg.out} has trained all its {cfg.epochs:g} epochs and holds its summary"
              f"{' and probe results' if cfg.probe else ''}; nothing to do. To train longer: "
              f"--resume --out {cfg.out} --epochs N with N > {cfg.epochs:g}", flush=True)
    return summary


def train_remaining(framework: str, session, state, progress: Progress, *, train_epoch, save_state,
                    time_step, agree) -> tuple[object, Progress, dict | None]:
    """Everything between loading a session and the end of its run: (state, progress, None) after
    the epochs not yet done, each followed by its checkpoint; or, for a resumed run that has
    already finished, (state, progress, its summary), with nothing written (finished_summary).

    session: the trainer's Session. The trainer's own parts: train_epoch(session, state, epoch,
    bar) -> (state, epoch record); save_state(session, state, progress); time_step(session,
    state) -> seconds a step takes here, measured on a copy of the state; agree(value) -> the
    main process's value, in every process. A run that starts with a --time-budget first fixes
    its length (fit_time_budget). Before the first epoch metrics.jsonl is rolled back to the
    checkpoint and config.json holds the settings the run continues with.
    """
    done = finished_summary(session, progress)
    if done is not None:
        return state, progress, done
    budget_note = ""
    if progress.epoch == 0 and session.cfg.time_budget:
        started = time.perf_counter()
        seconds_per_step = time_step(session, state)
        steps = agree(fit_time_budget(session, seconds_per_step, time.perf_counter() - started))
        session.cfg = dataclasses.replace(session.cfg, epochs=steps / session.steps_per_epoch)
        end = time.time() + steps * seconds_per_step
        budget_note = (f" (what fits the {session.cfg.time_budget} time budget at "
                       f"{session.cfg.batch_size / seconds_per_step:.0f} pairs/s: ends about "
                       f"{time.strftime('%H:%M', time.localtime(end))})")
        if session.metrics is not None:
            write_json(Path(session.cfg.out) / CONFIG_FILE, dataclasses.asdict(session.cfg))
    resume_progress(session.cfg, progress, session.metrics)
    if session.cfg.tensorboard and session.metrics is not None:
        resumed_at = progress.epoch * session.steps_per_epoch + 1 if progress.epoch else None
        session.events = EventLog(session.cfg.out, resumed_at)
    startup_line(framework, session, budget_note)
    with progress_bar(session.cfg, session.steps_per_epoch, progress, session.world) as bar:
        for epoch in range(progress.epoch, session.cfg.epoch_count(session.steps_per_epoch)):
            state, epoch_record = train_epoch(session, state, epoch, bar)
            progress = Progress(epoch + 1, progress.train_time_s + epoch_record["epoch_time_s"],
                                session.metrics.size() if session.metrics else 0)
            save_state(session, state, progress)
            if session.events is not None:
                session.events.flush()
    return state, progress, None


# The share of what is left of a time budget the planned epochs may fill: the rest absorbs what
# the measured steps do not show (an epoch's start and its checkpoint, the rate's wobble).
BUDGET_USE = 0.97
# The rate is timed (after two steps that warm up and compile) over at least TIMED_STEPS steps and
# TIMED_SECONDS seconds, since a few fast steps fed from the loader's prefetched batches flatter
# it, but over at most TIMING_SHARE of the budget's time.
TIMED_STEPS, TIMED_SECONDS, TIMING_SHARE = 8, 20.0, 0.05


def fit_time_budget(session, seconds_per_step: float, spent_s: float) -> int:
    """The steps that fill BUDGET_USE of what the time budget leaves after `spent_s` seconds
    (at least 1, at most --epochs' worth), at `seconds_per_step`."""
    cfg, per_epoch = session.cfg, session.steps_per_epoch
    left = cfg.time_budget_s() - spent_s
    steps = max(1, min(cfg.total_steps(per_epoch), int(BUDGET_USE * left / seconds_per_step)))
    if cfg.warmup_epochs * per_epoch > steps:
        raise UserError(f"the {cfg.time_budget} time budget fits {steps / per_epoch:.2f} epochs, "
                        f"fewer than --warmup-epochs {cfg.warmup_epochs:g}; lower it or give "
                        "more time")
    return steps


def session_batches(session, epoch: int):
    """The batches of `epoch` a trainer's Session trains on (shared.loader.epoch_batches): views,
    or drawn parameters when session.on_device; this process's rows of each."""
    cfg = session.cfg
    return epoch_batches(session.images, session.augment, batch_size=cfg.batch_size,
                         seed=cfg.seed, epoch=epoch,
                         end_step=cfg.steps_in_epoch(epoch, session.steps_per_epoch),
                         workers=cfg.loader_workers(), shard=session.world.shard,
                         on_device=session.on_device)


def measure_step_seconds(session, run_step: Callable[[object], object],
                         sync: Callable[[object], None]) -> float:
    """Seconds per step of run_step(batch) on the session's batches: two warm-up steps (which
    compile), then at least TIMED_STEPS steps and TIMED_SECONDS seconds, or fewer (at least 2)
    where they would take more than TIMING_SHARE of the time budget. sync(result) waits for the
    device."""
    def batches():
        epoch = 0
        while True:
            yield from session_batches(session, epoch)
            epoch += 1

    stream = batches()
    for _ in range(2):
        sync(run_step(next(stream)))
    limit = TIMING_SHARE * (session.cfg.time_budget_s() or float("inf"))
    start, timed = time.perf_counter(), 0
    while True:
        result = run_step(next(stream))
        timed += 1
        sync(result)
        elapsed = time.perf_counter() - start
        enough = timed >= TIMED_STEPS and elapsed >= TIMED_SECONDS
        if timed >= 2 and (enough or elapsed >= limit):
            break
    return (time.perf_counter() - start) / timed


def startup_line(framework: str, session, note: str = "") -> None:
    """Print, on the main process, what is about to be trained, on what, and where it is written.

    session: the trainer's Session (cfg, images, steps_per_epoch, world, device_name,
    precision_name, and batch_split, how the batch is divided, e.g. " over 2 processes"); note:
    after the epochs.
    """
    cfg = session.cfg
    if session.world.is_main:
        print(f"{framework}_impl: {cfg.model_description()}, {len(session.images)} images, "
              f"{session.steps_per_epoch} steps/epoch x {cfg.epochs:g} epochs{note}, batch "
              f"{cfg.batch_size}{session.batch_split}, {session.device_name} "
              f"{session.precision_name}, run folder {cfg.out}", flush=True)


def progress_bar(cfg: Config, per_epoch: int, progress: Progress, world: World):
    """The run's tqdm bar over all its steps (on stderr; shown by the main process only)."""
    return tqdm(total=cfg.total_steps(per_epoch),
                initial=min(progress.epoch * per_epoch, cfg.total_steps(per_epoch)), unit="step",
                dynamic_ncols=True, mininterval=1.0, file=sys.stderr, disable=not world.is_main)


def gtsrb_available(cfg: Config) -> bool:
    """Whether the end-of-training probe should include GTSRB."""
    return cfg.download or (Path(cfg.data_dir) / "gtsrb").is_dir()


def check_finite(window: list[tuple[int, int, dict]], run_dir: Path) -> dict[str, float]:
    """Bring a window of (epoch, step, terms) to the host; stop on the first non-finite loss."""
    rows = [(epoch, step, {k: float(v) for k, v in terms.items()}) for epoch, step, terms in window]
    for epoch, step, values in rows:
        if not np.isfinite(values["loss"]):
            raise TrainingDiverged(
                f"loss became {values['loss']} at epoch {epoch} step {step}; stopped. The last "
                f"good checkpoint stays in {run_dir} (try a lower --base-lr)")
    return {k: float(np.mean([v[k] for _, _, v in rows])) for k in TERMS}


class EpochLog:
    """Collects one epoch's step terms (device scalars, read back only every cfg.log_every steps,
    so the device is not synchronised each step) and writes metrics.jsonl lines and the bar.

    session: the trainer's Session (cfg, metrics, steps_per_epoch). Its metrics are None in the
    processes of a data-parallel run other than the first: they check the loss (the same global
    loss everywhere, so all stop together) but write nothing.
    """

    def __init__(self, session, bar, epoch: int):
        self.cfg, self.metrics, self.events, self.bar = (session.cfg, session.metrics,
                                                         session.events, bar)
        self.run_dir = Path(session.cfg.out)
        self.epoch, self.steps_per_epoch = epoch, session.steps_per_epoch
        self.steps = session.cfg.steps_in_epoch(epoch, session.steps_per_epoch)  # this epoch's
        self.rows: list[dict[str, float]] = []
        self.window: list = []
        self.lr = 0.0
        self.t_epoch = self.t_window = time.perf_counter()

    def add(self, step: int, lr: float, terms: dict) -> None:
        """Record step `step` (0-based within the epoch) trained at `lr`."""
        self.window.append((self.epoch, step, terms))
        self.lr = lr
        self.bar.update(1)
        if len(self.window) == self.cfg.log_every or step == self.steps - 1:
            means = check_finite(self.window, self.run_dir)
            elapsed = time.perf_counter() - self.t_window
            pairs_per_s = len(self.window) * self.cfg.batch_size / elapsed
            self._write({"kind": "step", "epoch": self.epoch,
                         "step": self.epoch * self.steps_per_epoch + step + 1, "lr": lr,
                         "pairs_per_s": pairs_per_s, "images_per_s": 2 * pairs_per_s, **means})
            self.rows += [means] * len(self.window)
            self.bar.set_postfix(epoch=self.epoch + 1, loss=f"{means['loss']:.3f}",
                                 img_s=f"{2 * pairs_per_s:.0f}")
            self.window, self.t_window = [], time.perf_counter()

    def close(self) -> dict:
        """Write and return the epoch record (mean terms, time, throughput)."""
        epoch_time = time.perf_counter() - self.t_epoch
        pairs_per_s = self.steps * self.cfg.batch_size / epoch_time
        record = {"kind": "epoch", "epoch": self.epoch,
                  "step": self.epoch * self.steps_per_epoch + self.steps,
                  "lr": self.lr, "epoch_time_s": epoch_time, "pairs_per_s": pairs_per_s,
                  "images_per_s": 2 * pairs_per_s,
                  **{k: float(np.mean([r[k] for r in self.rows])) for k in TERMS}}
        self._write(record)
        return record

    def _write(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)
        if self.events is not None:
            self.events.write(record)


def run_summary(framework: str, session, train_time: float) -> dict:
    """The summary.json of a finished run (before the probe results are added); the final losses
    are the last epoch's record in metrics.jsonl, so a resumed run reports them too.
    session: the trainer's Session."""
    cfg = session.cfg
    steps = cfg.total_steps(session.steps_per_epoch)
    last_epoch = last_epoch_record(Path(cfg.out))
    return {"framework": framework, "device": session.device_name,
            "precision": session.precision_name, "epochs": cfg.epochs, "steps": steps,
            "train_images": len(session.images),
            "train_time_s": train_time,
            "pairs_per_s": steps * cfg.batch_size / max(train_time, 1e-9),
            "final": {k: last_epoch.get(k) for k in TERMS}}


def finish_run(framework: str, session, progress: Progress, probe: Callable[[], dict]) -> dict:
    """The end of a run, on the main process: write summary.json, then (unless --no-probe) run
    `probe` (-> {dataset: top-1}) and write it again with the results (and to TensorBoard, as
    probe/<dataset>_top1 at the last step); returns the summary. session: the trainer's Session."""
    cfg = session.cfg
    summary = run_summary(framework, session, progress.train_time_s)
    run_dir = Path(cfg.out)
    write_json(run_dir / SUMMARY_FILE, summary)
    print(f"trained {cfg.epochs:g} epochs in {summary['train_time_s'] / 60:.1f} min", flush=True)
    if cfg.probe:
        summary["probe"] = probe()
        write_json(run_dir / SUMMARY_FILE, summary)
        if session.events is not None:
            session.events.scalars(summary["steps"], {f"{dataset}_top1": top1 for dataset, top1
                                                      in summary["probe"].items()},
                                   prefix="probe/")
    if session.events is not None:
        session.events.close()
    return summary

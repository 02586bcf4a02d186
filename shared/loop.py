"""One training run, written once for both frameworks: `run` assembles it, `fit` trains it.

run: the run folder is made or continued (shared.run_folder), the data and the kNN monitor's
images are read (shared.data, shared.monitor), the framework's Backend is opened
(shared.backend), the state is built or restored, the run's length planned (--epochs, or what
fits a --time-budget: shared.budget); then fit, the summary and the probes (shared.summary).

fit: epoch after epoch, step after step: the plan's learning rate (shared.schedule), the
backend's step, the log (shared.epoch_log), a look at the time budget, a kNN point, and a
checkpoint after every epoch.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from shared.augment import AugmentParams, view_params
from shared.backend import Backend, OpenBackend, World
from shared.budget import Clock, TimeBudget, measure_step_seconds
from shared.config import Config
from shared.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    check_probe_data,
    pretraining_images,
    probe_datasets,
)
from shared.epoch_log import EpochLog, Sinks
from shared.errors import check_interrupted, resources_as_user_errors
from shared.loader import DrawnBatch, ViewBatch, epoch_batches, split_batch, steps_per_epoch
from shared.monitor import Monitor, monitor_data, monitor_note
from shared.probe_time import projected_probe_seconds
from shared.records import MetricsLog, read_records
from shared.run_folder import (
    Progress,
    finished_summary,
    prepare_run_dir,
    resumable_on_interrupt,
    run_folder,
    save_checkpoint,
    store_resumed_settings,
)
from shared.runio import CHECKPOINT_FILES
from shared.schedule import Plan, lr_at
from shared.summary import finish_run
from shared.tensorboard import EventLog


@dataclass(frozen=True)
class Trainer:
    """What one process of a run trains with, fixed for the run: the settings as given (config.json
    holds them), the framework and its backend, this process's place in the job, the training
    images uint8 [N, S, S, 3] and their views' parameters, the kNN monitor (None: off), where the
    records go, the clock a time budget is kept by and when on it the command began."""

    cfg: Config
    framework: str
    backend: Backend
    world: World
    images: np.ndarray
    augment: AugmentParams
    monitor: Monitor | None
    sinks: Sinks
    clock: Clock
    started: float

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.images), self.cfg.batch_size)

    def batches(self, epoch: int, end_step: int) -> Iterator[ViewBatch | DrawnBatch]:
        """This process's part of the batches of `epoch` up to `end_step` (shared.loader): views,
        or drawn parameters when the backend computes the views."""
        cfg = self.cfg
        return epoch_batches(self.images, self.augment, batch_size=cfg.batch_size, seed=cfg.seed,
                             epoch=epoch, end_step=end_step, workers=cfg.loader_workers(),
                             shard=self.world.shard, on_device=self.backend.on_device)

    def endless_batches(self) -> Iterator[ViewBatch | DrawnBatch]:
        """The run's batches from its first, epoch after epoch: what the step rate is timed on."""
        epoch = 0
        while True:
            with contextlib.closing(self.batches(epoch, self.steps_per_epoch)) as batches:
                yield from batches
            epoch += 1


def fit(trainer: Trainer, state: Any, progress: Progress, plan: Plan,
        budget: TimeBudget | None) -> tuple[Any, Progress, Plan]:
    """Train from `progress` to the end of `plan` (a time budget may move it), each epoch
    followed by its checkpoint; returns the state, the progress and the plan at the end."""
    cfg, backend, monitor, per_epoch = (trainer.cfg, trainer.backend, trainer.monitor,
                                        trainer.steps_per_epoch)
    elapsed_before, first_step, knn = progress.elapsed_s, progress.epoch * per_epoch, None
    with progress_bar(plan, progress, trainer.world.is_main) as bar:
        epoch = progress.epoch
        while epoch * per_epoch < plan.total_steps:
            log = EpochLog(epoch, steps_per_epoch=per_epoch, batch_size=cfg.batch_size,
                           log_every=cfg.log_every, run_dir=trainer.run_dir, sinks=trainer.sinks,
                           bar=bar, knn_top1=knn)
            # a budgeted run loads whole epochs, since a new plan may move the end of this one
            end = per_epoch if budget else plan.steps_in_epoch(epoch)
            with contextlib.closing(trainer.batches(epoch, end)) as batches:
                for batch in batches:
                    step = epoch * per_epoch + batch.step
                    lr = lr_at(step, plan, cfg)
                    state, terms = backend.train_step(state, batch, lr)
                    check_interrupted()
                    if step == first_step:  # the bar's rate leaves out the compilation
                        bar.unpause()
                    done = step + 1
                    log.add(batch.step, lr, terms,
                            last=done >= min(plan.total_steps, (epoch + 1) * per_epoch))
                    if budget is not None and (done % budget.check_every == 0
                                               or done >= plan.total_steps):
                        backend.wait(terms)
                        new = budget.checked(plan, done)
                        if new != plan:
                            plan, bar.total = new, new.total_steps
                            bar.refresh()
                    if (monitor is not None and trainer.world.is_main
                            and monitor.due(done, plan.total_steps)):
                        point = monitor.point(backend, state, done, epoch,
                                              progress.train_time_s + log.training_seconds())
                        log.pause(point.seconds)
                        if budget is not None:
                            budget.point_took(point.seconds)
                        knn = log.knn_top1 = point.knn_top1
                        trainer.sinks.write(point)
                    if done >= plan.total_steps:
                        break
            record = log.close()
            epoch += 1
            progress = Progress(epoch, progress.train_time_s + record.epoch_time_s,
                                trainer.sinks.metrics.size() if trainer.sinks.metrics else 0,
                                elapsed_before + trainer.clock() - trainer.started,
                                plan.epochs)
            if trainer.world.is_main:
                save_checkpoint(backend, trainer.framework, trainer.run_dir, state, progress, plan,
                                cfg)
            trainer.sinks.flush()
    return state, progress, plan


def progress_bar(plan: Plan, progress: Progress, shown: bool) -> tqdm:
    """The run's tqdm bar over all its steps (on stderr; shown by the main process only)."""
    total = plan.total_steps
    return tqdm(total=total, initial=min(progress.epoch * plan.steps_per_epoch, total),
                unit="step", dynamic_ncols=True, mininterval=1.0, file=sys.stderr,
                disable=not shown)


def start_state(trainer: Trainer, resume: bool) -> tuple[Any, Progress, Plan]:
    """The state to train, the progress so far and the plan: fresh (--epochs), or the
    checkpoint's (rank 0 has decided whether there is one to continue from); a resumed run with a
    time budget follows the plan its checkpoint was trained under."""
    backend, cfg = trainer.backend, trainer.cfg
    path = trainer.run_dir / CHECKPOINT_FILES[trainer.framework]
    plan = Plan(cfg.epochs, trainer.steps_per_epoch)
    if not (resume and path.is_file()):
        return backend.initial_state(), Progress(), plan
    stored = backend.load_checkpoint(path)
    progress = Progress.of_checkpoint(stored)
    if cfg.time_budget and progress.planned_epochs is not None:
        plan = Plan(progress.planned_epochs, trainer.steps_per_epoch)
    return backend.restored_state(stored, path), progress, plan


def planned(trainer: Trainer, state: Any, progress: Progress, plan: Plan,
            budget: TimeBudget | None) -> tuple[Plan, str]:
    """The plan the run trains to, and the start-up line's note: a budgeted run that starts
    times its step (and a monitor point, and under --budget-scope job projects the probes' time)
    first; a resumed one plans again if its budget moved."""
    if budget is None:
        return plan, ""
    if progress.epoch:
        records = read_records(trainer.run_dir) if trainer.world.is_main else None
        done = min(progress.epoch * plan.steps_per_epoch, plan.total_steps)
        return budget.resumed_plan(plan, done, records,
                                   trainer.monitor.every_steps if trainer.monitor else None), ""
    backend = trainer.backend
    with contextlib.closing(trainer.endless_batches()) as batches:
        seconds_per_step = backend.agree(measure_step_seconds(
            backend, state, batches, budget.seconds, trainer.clock, trainer.world.is_main))
    point_s = None
    if trainer.monitor is not None:
        point_s = trainer.monitor.measure(backend, state)[1] if trainer.world.is_main else 0.0
        point_s = float(backend.agree(point_s))
    every = trainer.monitor.every_steps if trainer.monitor else 1.0
    probes_s = 0.0
    if trainer.cfg.budget_scope == "job" and trainer.cfg.probe:
        probes_s = (projected_probe_seconds(trainer.cfg, backend.features(state),
                                            backend.train_linear, trainer.clock)
                    if trainer.world.is_main else 0.0)
        probes_s = float(backend.agree(probes_s))
    return budget.first_plan(plan, seconds_per_step, point_s, every, probes_s)


def startup_line(trainer: Trainer, plan: Plan, note: str) -> None:
    """Print, on the main process, what is about to be trained, on what, and where it is written
    (note: after the epochs)."""
    cfg, backend = trainer.cfg, trainer.backend
    if trainer.world.is_main:
        print(f"{trainer.framework}_impl: {cfg.model_description()}, {len(trainer.images)} "
              f"images, {trainer.steps_per_epoch} steps/epoch x {plan.epochs:g} epochs{note}, "
              f"batch {cfg.batch_size}{backend.batch_split}, {backend.device_name} "
              f"{backend.precision_name}, run folder {cfg.out}", flush=True)


def run(cfg: Config, resume: bool, framework: str, world: World, open_backend: OpenBackend,
        clock: Clock = time.perf_counter) -> dict:
    """Train (or resume) as `cfg` says with `framework`'s backend, then probe; returns the summary
    written to summary.json. `clock` keeps the time budget.

    In a data-parallel job the main process alone writes the run folder and, once the job's
    processes have parted (the backend closed), runs the probes; the others return {}.
    """
    started = clock()
    split_batch(cfg.batch_size, world.parts, world.part_name)
    run_dir = Path(cfg.out)
    with (run_folder(run_dir, framework, world), resumable_on_interrupt(framework, run_dir),
          resources_as_user_errors()):
        if cfg.probe:
            check_probe_data(probe_datasets(cfg.dataset, cfg.data_dir, cfg.download),
                             cfg.data_dir, cfg.download)
        images = pretraining_images(cfg)
        monitored = monitor_data(cfg)
        note = monitor_note(cfg, monitored)
        if note and world.is_main:
            print(note, flush=True)
        augment = view_params(cfg, CIFAR10_MEAN, CIFAR10_STD)
        with open_backend(cfg, world, images, augment) as backend:
            backend.on_main(lambda: prepare_run_dir(cfg, resume, framework))
            # a corrupt metrics.jsonl line is refused before training, not after it
            backend.on_main(lambda: read_records(run_dir))
            sinks = Sinks(MetricsLog(run_dir)) if world.is_main else Sinks()
            per_epoch = steps_per_epoch(len(images), cfg.batch_size)
            monitor = Monitor(monitored, cfg, per_epoch, clock) if monitored else None
            trainer = Trainer(cfg, framework, backend, world, images, augment, monitor, sinks,
                              clock, started)
            state, progress, plan = start_state(trainer, resume)
            most = Plan(cfg.epochs, per_epoch).total_steps
            budget = (TimeBudget(cfg, cfg.time_budget_s(), most, clock, started,
                                 backend.agree, sinks.write, world.is_main,
                                 used_before=progress.elapsed_s) if cfg.time_budget else None)
            if progress.epoch and sinks.metrics:  # the lines after the checkpoint go
                sinks.metrics.truncate(progress.metrics_bytes)
            plan, budget_note = planned(trainer, state, progress, plan, budget)
            done = finished_summary(run_dir, progress, plan, cfg, world.is_main)
            if done is not None:
                return done
            if progress.epoch and world.is_main:
                store_resumed_settings(run_dir, cfg, progress, plan, budget is not None)
            if cfg.tensorboard and world.is_main:
                sinks.events = EventLog(run_dir, progress.epoch * per_epoch + 1
                                        if progress.epoch else None)
            startup_line(trainer, plan, budget_note)
            trained_from = progress.epoch
            state, progress, plan = fit(trainer, state, progress, plan, budget)
            if not world.is_main:
                return {}
            features = backend.features(state) if cfg.probe else None
        return finish_run(cfg, framework, backend, run_dir, len(images), progress, plan,
                          trained=progress.epoch > trained_from, features=features,
                          train_linear=backend.train_linear, sinks=sinks)

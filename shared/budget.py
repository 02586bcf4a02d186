"""--time-budget: time the step, plan the run's length to fit, and plan again as the rate moves.

Before its first step a budgeted run times its training step on a scratch copy of the state (and,
with the kNN monitor on, one monitor point), then fits its length to what the start-up left:

    N = done + floor((BUDGET_USE * budget - used - reserve - probes) / seconds_per_step)

within [done, --epochs' steps], where `reserve` keeps the monitor's last point (what the latest
point took), a point's cost is spread over the steps between points, and `probes` keeps, when
the budget covers the whole job (--budget-scope job), the probes' projected time
(shared.probe_time; 0 otherwise). The warmup and the cosine
then span exactly N steps (shared.schedule.Plan). Every `check_every` steps (about CHECK_SHARE of
the budget) the run measures its rate over the last RATE_WINDOW of the budget, and at a plan's
last step over whatever time has passed since the last measurement, and plans again when the end
that rate projects lies more than REPLAN_SHARE of the budget from the end aimed at. Each plan is a
PlanRecord in metrics.jsonl; the checkpoint records the plan it was trained under, so a resumed
run follows it, planned again only if its budget or the time used moved.

Time comes from an injected clock (time.perf_counter in the trainers), so tests can run a budget
on a clock of their own.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from shared.backend import Backend
from shared.config import Config
from shared.errors import UserError, check_interrupted
from shared.loader import DrawnBatch, ViewBatch
from shared.records import EpochRecord, KnnRecord, PlanRecord, Record, last_of
from shared.schedule import Plan

Clock = Callable[[], float]

# The share of a time budget a plan fills: the rest absorbs what the plan does not see (an epoch's
# start and its checkpoint, the rate's wobble).
BUDGET_USE = 0.97
# A plan is made again when the end it projects moves by more than REPLAN_SHARE of the budget,
# at the rate measured over at least the last RATE_WINDOW of it, looked at about every
# CHECK_SHARE of it.
REPLAN_SHARE, RATE_WINDOW, CHECK_SHARE = 0.05, 0.1, 0.01
# The rate is timed (after two steps that warm up and compile) over at least TIMED_STEPS steps and
# TIMED_SECONDS seconds, since a few fast steps fed from the loader's prefetched batches flatter
# it, but over at most TIMING_SHARE of the budget's time.
TIMED_STEPS, TIMED_SECONDS, TIMING_SHARE = 8, 20.0, 0.05


def measure_step_seconds(backend: Backend, state: Any,
                         batches: Iterator[ViewBatch | DrawnBatch], budget_s: float,
                         clock: Clock, announce: bool) -> float:
    """Seconds per training step here, timed on a scratch copy of `state` with `batches`: two
    warm-up steps (which compile), then at least TIMED_STEPS steps and TIMED_SECONDS seconds, or
    fewer (at least 2) where they would take more than TIMING_SHARE of `budget_s`."""
    limit = TIMING_SHARE * budget_s
    if announce:
        timed = (f"{TIMED_SECONDS:.0f} s or more" if limit >= TIMED_SECONDS else
                 f"up to {limit:.2g} s ({TIMING_SHARE:.0%} of the budget; 2 steps at least)")
        print(f"timing the training step: 2 warm-up steps (they compile), then {timed}",
              flush=True)
    with backend.scratch_copy(state) as scratch:
        for _ in range(2):
            scratch, terms = backend.train_step(scratch, next(batches), 0.0)
            backend.wait(terms)
        start, timed = clock(), 0
        while True:
            scratch, terms = backend.train_step(scratch, next(batches), 0.0)
            check_interrupted()
            timed += 1
            backend.wait(terms)
            elapsed = clock() - start
            enough = timed >= TIMED_STEPS and elapsed >= TIMED_SECONDS
            if timed >= 2 and (enough or elapsed >= limit):
                return elapsed / timed


@dataclass
class TimeBudget:
    """A --time-budget run's clock and plans, in one process of the job.

    `seconds` the budget, `max_steps` --epochs' worth of steps, `started` when this session began
    (on `clock`), `used_before` what the run's earlier sessions used; `agree` gives every process
    the main process's value (Backend.agree), `write` records a plan (metrics.jsonl and
    TensorBoard on the main process), `is_main` prints."""

    cfg: Config
    seconds: float
    max_steps: int
    clock: Clock
    started: float
    agree: Callable[[float], float]
    write: Callable[[Record], None]
    is_main: bool
    used_before: float = 0.0
    reserve: float = 0.0  # seconds kept for the kNN monitor's last point, at the end
    probes: float = 0.0  # seconds kept for the probes after training (--budget-scope job)
    point_every: float = 0.0  # steps between two monitor points (0: no monitor)
    check_every: int = 1  # steps between two looks at the rate
    window_step: int = 0  # the rate is measured from this step...
    window_time: float = 0.0  # ...reached at this time...
    window_points: float = 0.0  # ...with this many seconds of monitor points since

    def point_took(self, seconds: float) -> None:
        """A monitor point took `seconds` (on the main process): the last point is expected to
        take as long, and the rate's window leaves it out (step_seconds counts points by their
        share instead)."""
        self.reserve = seconds
        self.window_points += seconds

    def step_seconds(self, window: float, steps: int) -> float:
        """Seconds a step costs, from `steps` steps that took `window` seconds with
        window_points of monitor points among them: their own time, plus each step's share of a
        point (reserve / point_every), so a window's rate does not depend on how many points fell
        in it."""
        share = self.reserve / self.point_every if self.point_every else 0.0
        return (window - self.window_points) / steps + share

    def _new_window(self, done: int) -> None:
        self.window_step, self.window_time, self.window_points = done, self.clock(), 0.0

    def used(self) -> float:
        """Seconds of the budget used so far, this session's start-up included."""
        return self.used_before + self.clock() - self.started

    def steps_that_fit(self, done: int, seconds_per_step: float) -> int:
        """The run's length in steps when `done` are trained at `seconds_per_step` (the formula
        above), within [done, max_steps]."""
        left = BUDGET_USE * self.seconds - self.used() - self.reserve - self.probes
        more = int(left / seconds_per_step) if left > 0 else 0
        return max(done, min(self.max_steps, done + more))

    def end_moved(self, done: int, planned: int, seconds_per_step: float) -> bool:
        """Whether the end of a plan of `planned` steps, projected at `seconds_per_step`, lies
        more than REPLAN_SHARE of the budget from the end it aims at; a plan capped by --epochs
        that ends early is kept."""
        projected = (self.used() + (planned - done) * seconds_per_step + self.reserve
                     + self.probes)
        target = BUDGET_USE * self.seconds
        if planned >= self.max_steps and projected <= target:
            return False
        return abs(projected - target) > REPLAN_SHARE * self.seconds

    def first_plan(self, plan: Plan, seconds_per_step: float, point_seconds: float | None,
                   monitor_every_steps: float, probe_seconds: float = 0.0) -> tuple[Plan, str]:
        """The plan of a run that starts, its step timed at `seconds_per_step`, (None: no
        monitor) a monitor point at `point_seconds` and the probes after it projected at
        `probe_seconds` (kept from training's time: --budget-scope job); and the start-up line's
        note. A budget the start-up used up, or one that fits less than the warmup, is a
        UserError."""
        self.probes = probe_seconds
        if point_seconds is not None:  # its points cost their share of every step's time
            self.reserve, self.point_every = point_seconds, monitor_every_steps
            seconds_per_step += point_seconds / monitor_every_steps
        steps = int(self.agree(self.steps_that_fit(0, seconds_per_step)))
        cfg, per_epoch = self.cfg, plan.steps_per_epoch
        if steps == 0:
            kept = f", the probes after it {self.probes:.3g} s" if self.probes else ""
            raise UserError(f"the {cfg.time_budget} time budget is used up before training "
                            f"starts: loading, compiling and timing took {self.used():.0f} s{kept} "
                            f"and a step {seconds_per_step:.2g} s; give a longer --time-budget")
        if cfg.warmup_epochs * per_epoch > steps:
            raise UserError(f"the {cfg.time_budget} time budget fits {steps / per_epoch:.2f} "
                            f"epochs, fewer than --warmup-epochs {cfg.warmup_epochs:g}; lower it "
                            "or give more time")
        plan = self._adopt(Plan.of_steps(steps, per_epoch), 0, seconds_per_step)
        end = time.time() + steps * seconds_per_step
        kept = f" with {self.probes:.3g} s kept for the probes" if self.probes else ""
        return plan, (f" (what fits the {cfg.time_budget} time budget{kept} at "
                      f"{cfg.batch_size / seconds_per_step:.0f} pairs/s: ends about "
                      f"{time.strftime('%H:%M', time.localtime(end))}, re-planned if the rate "
                      "changes)")

    def resumed_plan(self, plan: Plan, done: int, records: list[Record] | None,
                     monitor_every_steps: float | None) -> Plan:
        """The plan of a run resumed after `done` steps under `plan`: planned again when its end
        moved (a longer --time-budget, or the time used is not what the plan assumed), at the rate
        the plan in force was made with (`records`, metrics.jsonl's, on the main process; a run
        from before plans were recorded: its last epoch's), with a monitor point every
        `monitor_every_steps` steps (None: no monitor) and, under --budget-scope job, the probes'
        time the plan in force kept for them."""
        seconds_per_step = point_s = probes_s = 0.0
        if records is not None:
            last_plan, epoch = last_of(records, PlanRecord), last_of(records, EpochRecord)
            if last_plan is not None and last_plan.probes_s:
                probes_s = last_plan.probes_s
            if last_plan is not None and last_plan.seconds_per_step:
                seconds_per_step = last_plan.seconds_per_step
            elif epoch is not None and epoch.pairs_per_s:
                seconds_per_step = self.cfg.batch_size / epoch.pairs_per_s
            point = last_of(records, KnnRecord) if monitor_every_steps else None
            if point is not None and point.seconds:
                point_s = point.seconds
        seconds_per_step = float(self.agree(seconds_per_step))
        self.reserve = float(self.agree(point_s))
        self.probes = float(self.agree(probes_s))
        self.point_every = monitor_every_steps or 0.0
        self._new_window(done)
        self.check_every = _check_every(self.seconds, seconds_per_step)
        if seconds_per_step > 0:
            return self._replan(plan, done, seconds_per_step)
        return plan

    def checked(self, plan: Plan, done: int) -> Plan:
        """At a step every process reaches (`done` a multiple of check_every, or the plan's
        last) with the device in step: the plan again when the rate since the last measurement,
        once RATE_WINDOW of the budget has passed since it or at the plan's last step, moves the
        projected end (end_moved); else `plan`."""
        seconds_per_step = None
        window = self.clock() - self.window_time
        # a plan's last step looks whatever the window: a plan that ends before RATE_WINDOW has
        # passed (a first timing that compile slowed) would otherwise leave the budget unused
        if done > self.window_step and (window >= RATE_WINDOW * self.seconds
                                        or done >= plan.total_steps):
            seconds_per_step = self.step_seconds(window, done - self.window_step)
            self._new_window(done)
        return self._replan(plan, done, seconds_per_step)

    def _replan(self, plan: Plan, done: int, seconds_per_step: float | None) -> Plan:
        """`plan`, or the plan that fits at `seconds_per_step` when the end moved; every process
        takes the main process's decision."""
        planned = plan.total_steps
        steps = planned
        if seconds_per_step and self.end_moved(done, planned, seconds_per_step):
            steps = self.steps_that_fit(done, seconds_per_step)
        steps = int(self.agree(steps))
        if steps == planned:
            return plan
        new = self._adopt(Plan.of_steps(steps, plan.steps_per_epoch), done, seconds_per_step or 0.0)
        if self.is_main:
            tqdm.write(f"re-planned at step {done}: {new.epochs:.3f} epochs fit the "
                       f"{self.cfg.time_budget} time budget at "
                       f"{self.cfg.batch_size / seconds_per_step:.0f} pairs/s", file=sys.stderr)
        return new

    def _adopt(self, plan: Plan, done: int, seconds_per_step: float) -> Plan:
        """Make `plan` the run's, made at `done` steps: its PlanRecord (so the report shows it,
        and a resume rolls it back with the steps after its checkpoint), a new rate window."""
        self.write(PlanRecord(step=done, epochs=plan.epochs, seconds_per_step=seconds_per_step,
                              budget_s=self.seconds, budget_used_s=self.used(),
                              probes_s=self.probes or None))
        self._new_window(done)
        # every process must look at the rate at the same steps: the main process's rate decides
        self.check_every = int(self.agree(_check_every(self.seconds, seconds_per_step)))
        return plan


def _check_every(budget_s: float, seconds_per_step: float) -> int:
    """Steps between two looks at the rate: about CHECK_SHARE of the budget, at least 1."""
    if seconds_per_step <= 0:
        return 1
    return max(1, int(CHECK_SHARE * budget_s / seconds_per_step))

"""metrics.jsonl: one JSON object a line, each a record of one of the kinds below.

    step   a window of --log-every steps: the mean loss terms, the learning rate, the rate
    epoch  an epoch: the mean loss terms, its time and rate
    plan   a time budget's plan: the run's length in epochs and the step rate it was made at
    knn    a point of the kNN monitor: top-1, when in the run it was measured, what it cost

Every writer and reader of the file goes through these classes (trainers, resume, TensorBoard,
the report, the results table, bench/), so a field has one name and one meaning. A record read
back from an older run lacks the fields added since; they read as None. Lines of a kind this
version does not know are left out.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar, TypeVar

from shared.errors import UserError

METRICS_FILE = "metrics.jsonl"
# The loss terms every step and epoch record holds (means over its steps).
TERMS = ("loss", "invariance", "variance", "covariance", "embedding_std")


@dataclass(frozen=True)
class StepRecord:
    """The window of logged steps that ends once `step` global steps are trained (in 0-based
    `epoch`): the mean of each of TERMS over it, the learning rate of its last step, pairs/s."""

    kind: ClassVar[str] = "step"
    step: int
    epoch: int | None = None
    lr: float | None = None
    pairs_per_s: float | None = None
    images_per_s: float | None = None
    loss: float | None = None
    invariance: float | None = None
    variance: float | None = None
    covariance: float | None = None
    embedding_std: float | None = None

    def terms(self) -> dict[str, float | None]:
        """TERMS -> their values."""
        return {term: getattr(self, term) for term in TERMS}


@dataclass(frozen=True)
class EpochRecord(StepRecord):
    """Epoch `epoch` (0-based), ended once `step` global steps are trained: the mean of each of
    TERMS over its steps, the learning rate of its last step, its training seconds (kNN points
    left out) and pairs/s."""

    kind: ClassVar[str] = "epoch"
    epoch_time_s: float | None = None


@dataclass(frozen=True)
class PlanRecord:
    """A time budget's plan, made once `step` steps were trained: the run's length in `epochs`
    at `seconds_per_step`, with `budget_used_s` of the `budget_s` seconds used and (--budget-scope
    job) `probes_s` kept for the probes after training."""

    kind: ClassVar[str] = "plan"
    step: int
    epochs: float
    seconds_per_step: float | None = None
    budget_s: float | None = None
    budget_used_s: float | None = None
    probes_s: float | None = None


@dataclass(frozen=True)
class KnnRecord:
    """A point of the kNN monitor once `step` steps (`epochs` epochs, in 0-based `epoch`) are
    trained: its top-1, the training seconds before it, and the seconds it took."""

    kind: ClassVar[str] = "knn"
    step: int
    knn_top1: float
    epoch: int | None = None
    epochs: float | None = None
    train_time_s: float | None = None
    seconds: float | None = None


Record = StepRecord | EpochRecord | PlanRecord | KnnRecord
KINDS: dict[str, type] = {cls.kind: cls for cls in (StepRecord, EpochRecord, PlanRecord,
                                                     KnnRecord)}
R = TypeVar("R", StepRecord, EpochRecord, PlanRecord, KnnRecord)


def to_json(record: Record) -> dict:
    """The line's object: "kind" and every field, a non-finite number as null."""
    values = {name: (None if isinstance(value, float) and not math.isfinite(value) else value)
              for name, value in asdict(record).items()}
    return {"kind": record.kind, **values}


def from_json(line: dict) -> Record | None:
    """The record a line's object holds (optional fields it lacks: None), or None for a kind this
    version does not know; TypeError when it lacks a required field."""
    cls = KINDS.get(line.get("kind"))
    if cls is None:
        return None
    return cls(**{f.name: line[f.name] for f in fields(cls) if f.name in line})


class MetricsLog:
    """Appends records to RUN_DIR/metrics.jsonl; `truncate` rolls back to a checkpoint."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, size: int) -> None:
        """Drop lines written after the checkpoint that is being resumed (its size in bytes)."""
        if self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(size)

    def write(self, record: Record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(to_json(record), sort_keys=True) + "\n")


def read_records(run_dir: Path) -> list[Record]:
    """The records of RUN_DIR/metrics.jsonl, oldest first. A last line without its newline is one
    being written (or cut off by a kill) and is left out; any other line that is not a JSON object
    is a UserError naming the file and the line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    records = []
    for number, line in enumerate(text.split("\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number} is not a JSON record ({exc.msg}): {line[:60]!r}; "
                            "delete that line to read the rest") from None
        if not isinstance(value, dict):
            raise UserError(f"{path}:{number} is not a JSON object: {line[:60]!r}")
        try:
            record = from_json(value)
        except TypeError:
            raise UserError(f"{path}:{number} lacks a field of its kind: {line[:60]!r}; "
                            "delete that line to read the rest") from None
        if record is not None:
            records.append(record)
    return records


def of_kind(records: list[Record], kind: type[R]) -> list[R]:
    """The records of exactly class `kind` (an EpochRecord is not a StepRecord here)."""
    return [r for r in records if type(r) is kind]


def last_of(records: list[Record], kind: type[R]) -> R | None:
    """The last record of class `kind`, or None when there is none."""
    found = of_kind(records, kind)
    return found[-1] if found else None

"""Live curves in TensorBoard for both trainers: RUN/tensorboard/, written as training goes.

    pip install -e ".[tensorboard]"     # the tensorboard package: its writer, reader and UI
    python -m torch_impl.train --preset cpu --tensorboard --out runs/cpu
    tensorboard --logdir runs/cpu/tensorboard

Every step line of metrics.jsonl becomes scalars at its global step (the loss, its three
unweighted terms, the embedding std, the learning rate, pairs/s), every kNN monitor point
`knn_top1`, and the probe results that end a run become `probe/<dataset>_top1` at the last step.
One framework-neutral writer serves both trainers (tensorboard's own event-file writer, no torch
or TensorFlow needed).

A resumed run starts a new event file with a session-start record at the checkpoint's step:
TensorBoard then drops what the interrupted attempt had logged after that step, so the curves
show each step once.
"""
from __future__ import annotations

import time
from pathlib import Path

from shared.errors import UserError
from shared.records import TERMS, KnnRecord, Record, StepRecord

FOLDER = "tensorboard"
SCALARS = (*TERMS, "lr", "pairs_per_s")
INSTALL = 'pip install -e ".[tensorboard]"'


def require_tensorboard() -> None:
    """UserError, saying what to install, unless the tensorboard package is importable."""
    try:
        import tensorboard.summary.writer.event_file_writer  # noqa: F401
    except ImportError:
        raise UserError(f"--tensorboard needs the tensorboard package: {INSTALL}") from None


class EventLog:
    """Scalars into RUN_DIR/tensorboard/. resumed_at: the first global step a resumed run writes
    (None for a run that starts from scratch): TensorBoard then drops the earlier attempt's
    events from that step on, which the resumed run writes again."""

    def __init__(self, run_dir: Path, resumed_at: int | None = None):
        require_tensorboard()
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        folder = Path(run_dir) / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(folder))
        if resumed_at is not None:
            self._writer.add_event(Event(wall_time=time.time(), step=resumed_at,
                                         session_log=SessionLog(status=SessionLog.START)))

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """One scalar per entry of `values` (None and missing ones skipped) at `step`."""
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        entries = [Summary.Value(tag=prefix + tag, simple_value=float(value))
                   for tag, value in values.items() if value is not None]
        if entries:
            self._writer.add_event(Event(wall_time=time.time(), step=step,
                                         summary=Summary(value=entries)))

    def write(self, record: Record) -> None:
        """A metrics.jsonl record: step records become the curves, kNN points `knn_top1`; epoch
        and plan records are left out."""
        if type(record) is StepRecord:
            self.scalars(record.step, {tag: getattr(record, tag) for tag in SCALARS})
        elif type(record) is KnnRecord:
            self.scalars(record.step, {"knn_top1": record.knn_top1})

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

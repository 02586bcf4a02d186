"""The run folder both trainers write: config.json, metrics.jsonl, summary.json, probe_*.json.

Files are replaced atomically (temp file in the same folder, then rename), so an interrupted run
never leaves a half-written file behind.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from shared.config import Config
from shared.errors import UserError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file and a rename: readers see old or new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def corrupt_checkpoint_error(path: Path, exc: BaseException) -> UserError:
    """The error both frameworks raise for a checkpoint file that exists but cannot be decoded."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UserError(f"{path} is corrupt or truncated and cannot be loaded ({reason[:120]})")


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def prepare_run_dir(cfg: Config, resume: bool, checkpoint_name: str) -> Path:
    """Create (or check, when resuming) the run folder; never overwrite an existing run."""
    run_dir = Path(cfg.out)
    checkpoint = run_dir / checkpoint_name
    if resume:
        if not checkpoint.exists():
            raise UserError(f"cannot resume: no {checkpoint_name} in {run_dir} "
                            "(start a new run without --resume)")
        return run_dir
    if (run_dir / CONFIG_FILE).exists() or checkpoint.exists():
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose "
                        "another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / CONFIG_FILE, (cfg.to_json() + "\n").encode())
    return run_dir


class MetricsLog:
    """Appends one JSON object a line to metrics.jsonl; `truncate` rolls back to a checkpoint."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, size: int) -> None:
        """Drop lines written after the checkpoint that is being resumed (its size in bytes)."""
        if self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(size)

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean, sort_keys=True) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def probe_result_path(run_dir: Path, dataset: str, random_init: bool) -> Path:
    suffix = "_random_init" if random_init else ""
    return Path(run_dir) / f"probe_{dataset}{suffix}.json"

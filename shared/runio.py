"""The run folder both trainers write: config.json, metrics.jsonl (shared.records), summary.json,
probe_*.json (and log.txt, the output of the commands a sweep runs in it), the checkpoints and
checkpoints.json, how they are written and read, and the folder's lock. A training run's life in
its folder (made, started, continued, cleaned up) is shared.run_folder's.

Files are replaced atomically (temp file in the same folder, then rename), so an interrupted run
never leaves a half-written file behind, and they get the permissions the umask gives any other
new file. One process at a time writes a folder: trainers, probes and sweeps hold its lock file
while they work (run_folder_lock).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

from shared.config import (
    BACKBONE,
    MONITOR_MEASURE,
    PRETRAINING,
    Config,
    flag,
    make_config,
    settings_with_role,
)
from shared.errors import UserError

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
CHECKPOINT_STEPS_FILE = "checkpoints.json"
LOCK_FILE = ".lock"
FRAMEWORKS = ("torch", "jax")
CHECKPOINT_FILES = {"torch": "checkpoint.pt", "jax": "checkpoint.msgpack"}
FRAMEWORK_NAMES = {"torch": "PyTorch", "jax": "JAX"}
# How interop.convert names each framework's checkpoint format (--to).
CONVERT_TARGETS = {"torch": "torch", "jax": "flax"}


def tool_module(framework: str, tool: str) -> str:
    """The module of one of a framework's commands: ("torch", "train") -> "torch_impl.train"."""
    return f"{framework}_impl.{tool}"


def tool_command(framework: str, tool: str) -> str:
    """How messages name one of a framework's commands: "python -m torch_impl.train"."""
    return f"python -m {tool_module(framework, tool)}"


def convert_command(run_dir: Path, framework: str, force: bool = False) -> str:
    """The command that writes `framework`'s checkpoint of RUN_DIR from the other framework's."""
    return (f"python -m interop.convert {run_dir} --to {CONVERT_TARGETS[framework]}"
            f"{' --force' if force else ''}")


def trained_epochs(stored: dict) -> float:
    """The epochs a checkpoint (of either framework) has trained: its epoch count, or the
    run's planned length where the last epoch ended early (19.5 after 20 epochs begun)."""
    config = stored.get("config")
    planned = config.get("epochs") if isinstance(config, dict) else None
    return float(min(stored["epoch"], planned)) if planned is not None else float(stored["epoch"])


def record_checkpoint(run_dir: Path, framework: str, global_step: int) -> None:
    """Note in RUN_DIR/checkpoints.json the global step `framework`'s checkpoint holds (written
    by a trainer after each checkpoint, and by a conversion for the checkpoint it writes)."""
    path = Path(run_dir) / CHECKPOINT_STEPS_FILE
    steps = read_json(path)
    write_json(path, {**(steps if isinstance(steps, dict) else {}), framework: int(global_step)})


def outgrown_checkpoint(run_dir: Path, framework: str) -> tuple[int | None, int] | None:
    """(the step of `framework`'s checkpoint, the later step of the other framework's) when the
    run trained on in the other framework after a conversion, by checkpoints.json; else None.
    A checkpoint checkpoints.json does not know (converted before it existed) beside one it
    knows counts as outgrown, with step None; a run from before checkpoints.json passes."""
    steps = read_json(Path(run_dir) / CHECKPOINT_STEPS_FILE)
    if not isinstance(steps, dict) or not (Path(run_dir) / CHECKPOINT_FILES[framework]).is_file():
        return None
    own = steps.get(framework)
    for other, name in CHECKPOINT_FILES.items():
        if (other != framework and (Path(run_dir) / name).is_file() and other in steps
                and (own is None or steps[other] > own)):
            return own, steps[other]
    return None


def refuse_stale_checkpoint(run_dir: Path, framework: str) -> None:
    """UserError when `framework`'s checkpoint in RUN_DIR was outgrown by the other framework's
    (outgrown_checkpoint): the older weights are never used silently; the message names the
    conversion that brings them up to date."""
    outgrown = outgrown_checkpoint(run_dir, framework)
    if outgrown is not None:
        other = next(name for fw, name in CHECKPOINT_FILES.items() if fw != framework)
        held = f"step {outgrown[0]}" if outgrown[0] is not None else "an unrecorded step"
        raise UserError(f"{Path(run_dir) / CHECKPOINT_FILES[framework]} holds {held}, the "
                        f"run's {other} step {outgrown[1]} (it trained on after a conversion); "
                        f"convert again with: {convert_command(run_dir, framework, force=True)}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file and a rename: readers see old or new, never
    half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; a run's files are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def corrupt_checkpoint_error(path: Path, exc: BaseException) -> UserError:
    """The error both frameworks raise for a checkpoint file that exists but cannot be decoded."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UserError(f"{path} is corrupt or truncated and cannot be loaded ({reason[:120]})")


def missing_checkpoint_error(path: Path, framework: str) -> UserError:
    """The error for a `framework` checkpoint that is not at `path`: it names the conversion when
    the other framework's checkpoint sits beside it."""
    path = Path(path)
    for other, name in CHECKPOINT_FILES.items():
        if other != framework and path.with_name(name).is_file():
            return UserError(f"{path.parent} holds a {FRAMEWORK_NAMES[other]} checkpoint ({name}), "
                             f"not a {FRAMEWORK_NAMES[framework]} one; convert it with: "
                             f"{convert_command(path.parent, framework)}")
    return UserError(f"no checkpoint at {path} (train first, or check --run/--out)")


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path):
    """The JSON in `path`, or None when it does not exist; UserError when it is malformed."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def make_folder(path: Path, what: str) -> Path:
    """mkdir -p `path`; a file in the way or a place that cannot be written is a UserError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{what} {path} is a file, not a folder; choose another path") from None
    except OSError as exc:
        raise UserError(f"cannot create {what} {path}: {exc.strerror or exc}") from None
    return path


def writable_folder(path: Path, what: str) -> Path:
    """make_folder(path, what), then proof that a file can be written there (a read-only or
    special file system fails here, before anything else is written); UserError otherwise."""
    folder = make_folder(path, what)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserError(f"cannot write in {what} {folder}: {exc.strerror or exc}") from None
    return folder


# A lock_holder look (a shared lock held for an instant) can meet a trainer's start; the trainer
# waits this long for the folder before it reports it in use.
_LOCK_PATIENCE_S = 0.5


def _locked_within(fd: int, kind: int, patience_s: float) -> bool:
    """Take the flock `kind` (LOCK_EX or LOCK_SH) on fd, trying again for up to patience_s
    seconds; False if another process holds it all that time."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _holder_text(fd: int) -> str:
    """The "PID command" a lock holder wrote into the lock file, or "unknown"."""
    return os.pread(fd, 1024, 0).decode(errors="replace").strip() or "unknown"


@contextlib.contextmanager
def run_folder_lock(folder: Path, command: str) -> Iterator[None]:
    """Hold FOLDER/.lock while inside, so that no second trainer, probe or sweep writes the same
    folder: the holder's PID and `command` are written into it, and another process that finds
    it held gets a UserError naming them. The lock is the kernel's (flock), so it is released
    on any exit, a crash or kill -9 included, and is never left stale. FOLDER must exist."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise UserError(f"cannot write in {folder}: {exc.strerror or exc}") from None
    try:
        if not _locked_within(fd, fcntl.LOCK_EX, _LOCK_PATIENCE_S):
            pid, _, what = _holder_text(fd).partition(" ")
            raise UserError(f"{folder} is in use by process {pid} ({what or 'unknown command'}); "
                            "wait for it to finish or stop it, then try again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def lock_holder(folder: Path) -> str | None:
    """The "PID command" holding FOLDER/.lock (run_folder_lock), or None when no process does."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        return None if _locked_within(fd, fcntl.LOCK_SH, 0.0) else _holder_text(fd)
    finally:
        os.close(fd)


def run_framework(run_dir: Path, default: str | None = "torch") -> str | None:
    """The framework that trained the run: summary.json's, else the one whose checkpoint is the
    only one there, else `default`."""
    summary = read_json(Path(run_dir) / SUMMARY_FILE)
    if isinstance(summary, dict) and summary.get("framework") in FRAMEWORKS:
        return summary["framework"]
    present = [fw for fw, name in CHECKPOINT_FILES.items() if (Path(run_dir) / name).exists()]
    return present[0] if len(present) == 1 else default


def probe_result_path(run_dir: Path, dataset: str, random_init: bool,
                      framework: str | None = None, protocol: str = "linear") -> Path:
    """RUN_DIR/probe_<dataset>[_random_init][_knn].json, the result of the run's own framework
    (_knn for --protocol knn). A probe by the other framework (of a converted run) gets a file of
    its own, probe_<dataset>[_random_init][_knn]_<framework>.json, so neither replaces the other;
    where the folder does not tell which framework trained it, the first to write the plain name
    owns it."""
    suffix = "" if protocol == "linear" else f"_{protocol}"
    stem = Path(run_dir) / f"probe_{dataset}{'_random_init' if random_init else ''}{suffix}"
    plain = stem.with_name(stem.name + ".json")
    if framework is None:
        return plain
    owner = run_framework(run_dir, default=None)
    if owner is None:
        existing = read_json(plain)
        owner = existing.get("framework", framework) if isinstance(existing, dict) else framework
    return plain if owner == framework else stem.with_name(f"{stem.name}_{framework}.json")


def load_run_config(run_dir: Path) -> Config:
    """The Config stored in RUN_DIR/config.json; UserError if missing or malformed."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"no run folder at {run_dir}: {path} is missing "
                        "(train first, or pass the folder given as --out)")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} does not hold a settings object")
    added_later = {f.name: f.metadata["absent"] for f in fields(Config)
                   if f.metadata["absent"] is not None and f.name not in values}
    try:
        return make_config({**values, **added_later}, base=Config())
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def check_resumable(stored: Config, cfg: Config, run_dir: Path) -> None:
    """UserError naming every setting in which `cfg` contradicts the run it resumes (`stored`, its
    config.json): only RUN and PROBE settings may change, but not what the kNN monitor's points
    were measured with (MONITOR_MEASURE) once it is on, and --epochs and a run's --time-budget may
    only grow."""
    fixed = settings_with_role(BACKBONE, PRETRAINING)
    growing = ("epochs", "time_budget") if stored.time_budget else ("epochs",)
    changed = [name for name in fixed if name not in growing
               and getattr(stored, name) != getattr(cfg, name)]
    problems = [f"{flag(name)} {getattr(cfg, name)} (the run has {getattr(stored, name)})"
                for name in changed]
    if stored.monitor_every:
        problems += [f"{flag(name)} {getattr(cfg, name)} (the run has {getattr(stored, name)}: "
                     "its kNN monitor points were measured with it)"
                     for name in MONITOR_MEASURE if getattr(stored, name) != getattr(cfg, name)]
    if cfg.epochs < stored.epochs:
        problems.append(f"--epochs {cfg.epochs:g} (the run has {stored.epochs:g}; a resumed run "
                        "can only be extended)")
    if stored.time_budget and not (cfg.time_budget
                                   and cfg.time_budget_s() >= stored.time_budget_s()):
        problems.append(f"--time-budget {cfg.time_budget or '(none)'} (the run has "
                        f"{stored.time_budget}; a resumed run's budget can only grow)")
    if problems:
        raise UserError(f"cannot resume {run_dir} with settings that contradict its "
                        f"{CONFIG_FILE}: {'; '.join(problems)}. Drop them, or start a new run "
                        "in another --out")

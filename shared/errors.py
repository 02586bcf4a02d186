"""The exception types for what a user can cause (bad flags, missing data, bad checkpoints, Ctrl-C).

Command-line entry points catch them and print one line instead of a traceback: a UserError exits
with status 2, an Interrupted (Ctrl-C, with what was kept and how to go on) with 130.
"""
import contextlib
import errno
import signal
import threading
from collections.abc import Iterator


class UserError(Exception):
    """A problem with the user's input (data, flags, files), reported as one line, exit code 2."""

    exit_code = 2
    label = "error"


class Interrupted(UserError):
    """Ctrl-C, reported as one line saying what was kept and how to continue; exit code 130."""

    exit_code = 130
    label = "interrupted"


# What the frameworks' allocators say when memory runs out (torch's CUDA and CPU allocators,
# XLA's RESOURCE_EXHAUSTED).
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "RESOURCE_EXHAUSTED",
                  "Out of memory")


@contextlib.contextmanager
def resources_as_user_errors() -> Iterator[None]:
    """Inside: running out of memory or of disk space is a one-line UserError that says what to
    change, not a traceback (files are written atomically, so what was written before stays)."""
    try:
        yield
    except MemoryError:
        raise UserError("out of memory; lower --batch-size or --width") from None
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise UserError(f"no space left on the disk holding {exc.filename or 'the run folder'}; "
                        "what was written before is kept (free some space, then --resume)") \
            from None
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not any(sign in str(exc) for sign in _OUT_OF_MEMORY):
            raise
        raise UserError(f"out of memory ({first[:160]}); lower --batch-size or --width") \
            from None


# Set by the Ctrl-C handler of kept_interrupts, cleared when a command starts.
_INTERRUPTED = threading.Event()


@contextlib.contextmanager
def kept_interrupts() -> Iterator[None]:
    """Inside (on the main thread): Ctrl-C, SIGTERM and SIGUSR2 raise KeyboardInterrupt and are
    also remembered, so that one landing where Python drops exceptions (a garbage-collector
    callback that XLA runs) is raised again at the next check_interrupted()."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _INTERRUPTED.clear()

    def interrupt(signum, frame):
        _INTERRUPTED.set()
        raise KeyboardInterrupt

    # SLURM stops a job with SIGTERM (preemption, scancel) or SIGUSR2 (time nearly out): the
    # same clean stop as Ctrl-C, so the run folder keeps its last checkpoint for --resume.
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
    previous = {signum: signal.signal(signum, interrupt) for signum in stops}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed inside kept_interrupts (see there)."""
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt

"""Fetching a dataset with torchvision's downloaders, and the errors its files can cause.

A failed download leaves nothing behind and says how to use a local copy instead; a data file that
is there but cannot be read says which one, and how to get a fresh copy.
"""
from __future__ import annotations

import contextlib
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from shared.errors import UserError

# What a failed download can raise: network (URLError is an OSError), md5 mismatch (RuntimeError),
# bad archive.
DOWNLOAD_ERRORS = (OSError, RuntimeError, ValueError, tarfile.TarError, zipfile.BadZipFile)


def one_line(error: BaseException) -> str:
    """The exception's message with newlines collapsed, since CLIs print a UserError as one line."""
    return " ".join(str(error).split()) or type(error).__name__


def corrupt(path: Path, reason: str) -> UserError:
    """The error for a dataset file that exists but does not hold what its format says."""
    return UserError(f"{path} is corrupt or truncated ({reason}); delete {path.parent} "
                     "and re-run with --download to fetch a fresh copy")


@contextlib.contextmanager
def cleaned_up_on_failure(data_dir: Path, name: str, layout: str) -> Iterator[None]:
    """Run a download of dataset `name` (laid out as `layout`) into data_dir; when it fails,
    remove every file and folder it created (data_dir itself included when it did not exist) and
    raise a UserError that says how to use a local copy."""
    existed = data_dir.exists()
    before = set(data_dir.rglob("*")) if existed else set()
    try:
        yield
    except DOWNLOAD_ERRORS as e:
        created = (set(data_dir.rglob("*")) if data_dir.exists() else set()) - before
        for path in sorted(created, key=lambda p: len(p.parts), reverse=True):
            if not (path.is_dir() and not path.is_symlink()):
                path.unlink(missing_ok=True)
            elif not any(path.iterdir()):  # its files were created here too, and are gone
                path.rmdir()
        if not existed and data_dir.exists() and not any(data_dir.iterdir()):
            data_dir.rmdir()
        raise UserError(f"downloading {name} into {data_dir} failed: {one_line(e)}. If you "
                        f"have a copy ({layout}), point --data-dir or VICREG_DATA_DIR at the "
                        "folder holding it") from e

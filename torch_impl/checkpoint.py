"""torch_impl's checkpoint.pt: model and optimizer state, progress and settings, loadable with
`torch.load(..., weights_only=True)` (tensors, numbers, strings and containers only)."""
from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch

from shared.errors import UserError
from shared.runio import (
    CHECKPOINT_FILES,
    atomic_write_bytes,
    corrupt_checkpoint_error,
    missing_checkpoint_error,
)

CHECKPOINT_FILE = CHECKPOINT_FILES["torch"]
FORMAT = "vicreg-interop/torch"


def save_checkpoint(path: Path, state: dict) -> None:
    """Write {"format", **state} atomically (temp file, then rename)."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by save_checkpoint; UserError if missing, corrupt or foreign."""
    path = Path(path)
    if not path.is_file():
        raise missing_checkpoint_error(path, "torch")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as exc:
        raise corrupt_checkpoint_error(path, exc) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a vicreg-interop PyTorch checkpoint")
    return state


def load_model_state(model: torch.nn.Module, stored: dict, path: Path, what: str) -> None:
    """Load the weights `stored` (a state_dict) into `model`, turning a shape or name mismatch
    into a one-line UserError naming `what` (the run's architecture)."""
    try:
        model.load_state_dict(stored)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"{path} does not fit {what}: it was written for another architecture "
                        f"({first[:160]})") from None

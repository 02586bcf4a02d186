"""jax_impl's checkpoint.msgpack: variables, optimizer state, progress and settings.

The twin of torch_impl.checkpoint: flax.serialization's msgpack of {"format", "params",
"batch_stats", "opt_state", "epoch", "global_step", "train_time_s", "metrics_bytes", "config"},
written atomically; every problem reading one is a one-line UserError.
"""
from __future__ import annotations

from pathlib import Path

import jax
import msgpack
import numpy as np
from flax import linen as nn
from flax import serialization
from flax.traverse_util import flatten_dict

from jax_impl.model import variable_shapes
from shared.errors import UserError
from shared.runio import (
    CHECKPOINT_FILES,
    atomic_write_bytes,
    convert_command,
    corrupt_checkpoint_error,
    missing_checkpoint_error,
)

CHECKPOINT_FILE = CHECKPOINT_FILES["jax"]
FORMAT = "vicreg-interop/jax"
# What garbage or a cut-off file can raise inside msgpack_restore (bad bytes, wrong ext payloads).
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
_READ_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError,
                msgpack.exceptions.UnpackException)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write {"format", **state} atomically; arrays are fetched to the host, namedtuples become
    dicts."""
    tree = serialization.to_state_dict({"format": FORMAT, **jax.device_get(state)})
    atomic_write_bytes(path, serialization.msgpack_serialize(tree))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by save_checkpoint (numpy leaves); UserError if missing, corrupt or
    foreign."""
    path = Path(path)
    if not path.is_file():
        raise missing_checkpoint_error(path, "jax")
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if blob[:4] == _ZIP_MAGIC:
        raise UserError(f"{path} is a PyTorch checkpoint (torch.save's zip), not a JAX one; "
                        f"rename it to {CHECKPOINT_FILES['torch']} and convert it with: "
                        f"{convert_command(path.parent, 'jax')}")
    try:
        state = serialization.msgpack_restore(blob)
    except _READ_ERRORS as exc:
        raise corrupt_checkpoint_error(path, exc) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a vicreg-interop JAX checkpoint")
    return state


def _shapes(tree: dict) -> dict[str, tuple]:
    return {"/".join(k): tuple(np.shape(v)) for k, v in flatten_dict(tree).items()}


def load_model_state(model: nn.Module, stored: dict, path: Path, what: str) -> dict:
    """The {"params", "batch_stats"} that `stored` (a checkpoint, or any dict holding those two)
    carries, as float32/int32 jax arrays, if they fit `model`'s variables: a missing, extra or
    reshaped variable is a one-line UserError naming `what` (the run's architecture)."""
    variables = {"params": stored["params"], "batch_stats": stored["batch_stats"]}
    expected = variable_shapes(model)
    got, want = _shapes(variables), _shapes(expected)
    if got != want:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        reshaped = sorted(k for k in set(got) & set(want) if got[k] != want[k])
        detail = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else
                  f"{reshaped[0]} is {got[reshaped[0]]}, expected {want[reshaped[0]]}")
        raise UserError(f"{path} does not fit {what}: it was written for another architecture "
                        f"({detail}; {len(missing)} missing, {len(extra)} unexpected, "
                        f"{len(reshaped)} reshaped)")
    return jax.tree.map(lambda v, e: jax.numpy.asarray(v, e.dtype), variables, expected)


def restore_opt_state(template, stored: dict, path: Path):
    """The optimizer state `stored` (a state dict) in the structure of `template`
    (optimizer.init)."""
    try:
        restored = serialization.from_state_dict(template, stored)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} holds optimizer state for another optimizer or model "
                        f"({str(exc).splitlines()[0][:120]}); start a new run") from None
    return jax.tree.map(lambda v, t: jax.numpy.asarray(v, t.dtype), restored, template)

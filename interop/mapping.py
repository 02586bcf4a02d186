"""The weight mapping between the two frameworks' VICReg networks.

torch's checkpoint.pt holds VICReg.state_dict() (`backbone.layer1.0.conv1.weight`, ...); the flax
variables carry the same names as paths (jax_impl.model), so a key is the path joined with "."
with `kernel` read as `weight`. Conv kernels are HWIO in flax and OIHW in torch, linear kernels
[in, out] and [out, in]; BN statistics and num_batches_tracked map one to one. Arrays are numpy on
both sides, so this module needs neither framework.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from shared.errors import UserError


def torch_name(path: tuple[str, ...]) -> str:
    """Flax variable path (no collection) -> torch key: ("projector", "0", "kernel")
    -> "projector.0.weight"."""
    *modules, leaf = path
    return ".".join([*modules, "weight" if leaf == "kernel" else leaf])


def kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    """Conv HWIO -> OIHW, linear [in, out] -> [out, in]."""
    return kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T


def kernel_from_torch(weight: np.ndarray) -> np.ndarray:
    """Conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
    return weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T


def to_torch_state(variables: dict) -> dict[str, np.ndarray]:
    """{"params", "batch_stats"} -> {torch key: array in torch's layout} (num_batches_tracked
    int64)."""
    state = {}
    for (_, *path), value in flatten_dict(variables).items():
        value = np.asarray(value)
        if path[-1] == "kernel":
            value = kernel_to_torch(value)
        elif path[-1] == "num_batches_tracked":
            value = value.astype(np.int64)
        state[torch_name(tuple(path))] = np.array(value, order="C")  # 0-d stays 0-d
    return state


def from_torch_state(state: dict[str, np.ndarray], expected: dict, source: Path,
                     what: str) -> dict:
    """{torch key: array} -> {"params", "batch_stats"} of numpy arrays, with the paths of
    `expected` (variable_shapes; jax_impl.checkpoint.load_model_state checks the shapes).

    A missing or extra tensor is a one-line UserError naming `what`.
    """
    paths = list(flatten_dict(expected))
    flat = {}
    for (collection, *path) in paths:
        key = torch_name(tuple(path))
        if key not in state:
            raise UserError(f"{source} does not fit {what}: it was written for another "
                            f"architecture (missing {key})")
        value = np.array(state[key])  # a copy: torch tensors' numpy views may change later
        flat[(collection, *path)] = kernel_from_torch(value) if path[-1] == "kernel" else value
    extra = sorted(set(state) - {torch_name(tuple(p)) for _, *p in paths})
    if extra:
        raise UserError(f"{source} does not fit {what}: it was written for another architecture "
                        f"(unexpected {extra[0]}, {len(extra)} in all)")
    return unflatten_dict(flat)

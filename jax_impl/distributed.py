"""Data-parallel training for jax_impl: the batch sharded over every device, the state replicated.

One process drives the devices of its machine; several processes (machines, or one process per
GPU under Slurm) form one job through jax.distributed.initialize(), which initialize_from_env calls
when the environment describes such a job.

The train step is jit-compiled with the views sharded along the batch over a 1-D mesh of all the
job's devices, NamedSharding(mesh, P("data")), and the state replicated, NamedSharding(mesh, P()).
XLA's partitioner (GSPMD) turns every mean over the batch axis (the loss's invariance, variance and
covariance terms, BatchNorm's statistics) into per-device partial sums and an all-reduce. So every
quantity is the one-device quantity of the global batch, the gradients too: no loss scaling, and
BatchNorm always normalises over the global batch (--no-sync-bn has nothing to switch off).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from shared.backend import World
from shared.errors import UserError

DATA_AXIS = "data"
_JAX_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# Process 0 probes alone after training while the others wait for it at exit; jax.distributed
# kills the job when the wait outlasts this (its default, 5 minutes, is shorter than a probe).
_SHUTDOWN_TIMEOUT_S = 24 * 3600
_MESSAGE_BYTES = 1024


def distributed_env(environ: Mapping[str, str]) -> dict | None:
    """jax.distributed.initialize's arguments when `environ` describes a job of several processes,
    else None: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID, or a Slurm step of several tasks (jax reads Slurm's variables itself)."""
    if any(name in environ for name in _JAX_VARIABLES):
        try:
            return {"coordinator_address": environ["JAX_COORDINATOR_ADDRESS"],
                    "num_processes": int(environ["JAX_NUM_PROCESSES"]),
                    "process_id": int(environ["JAX_PROCESS_ID"])}
        except (KeyError, ValueError):
            raise UserError("a multi-process JAX job needs all of JAX_COORDINATOR_ADDRESS "
                            "(host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                            "(integers)") from None
    if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in environ:
        return {}
    return None


def world_from_env(environ: Mapping[str, str] = os.environ) -> World:
    """Join the job the environment describes (see distributed_env; nothing for one process) and
    return this process's place in it. Must run before anything asks jax for its devices."""
    args = distributed_env(environ)
    if args is not None:
        jax.distributed.initialize(**args, shutdown_timeout_seconds=_SHUTDOWN_TIMEOUT_S)
    return World(jax.process_index(), jax.process_count(), parts=jax.device_count(),
                 part_name="devices")


def data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh, axis "data", over `devices` (default: all the job's), grouped by process so
    that each process's devices hold one contiguous block of the batch."""
    ordered = sorted(devices or jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(ordered), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays [B, ...] split along B over the mesh's devices."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def global_batch(rows: np.ndarray, sharding: NamedSharding, batch_size: int) -> jax.Array:
    """This process's rows [B / P, ...] of a view -> the global [B, ...] array, sharded."""
    return jax.make_array_from_process_local_data(sharding, rows, (batch_size, *rows.shape[1:]))


def replicate(tree, mesh: Mesh):
    """Every leaf of `tree` copied to every device of the mesh (through the host, so that arrays
    committed to one device may go to devices of other processes)."""
    return jax.device_put(jax.device_get(tree), replicated(mesh))


def broadcast_from_main(world: World, value: float) -> float:
    """Process 0's `value` (a number) in every process (the job's processes agree on what
    process 0 decided)."""
    if world.size == 1:
        return value
    return float(multihost_utils.broadcast_one_to_all(np.float64(value)))


def on_main(world: World, action: Callable[[], object]) -> None:
    """action() on process 0 only; a UserError there is raised in every process (its message cut
    to 1 KiB), so the job stops as one instead of leaving the others waiting in the first step."""
    if world.size == 1:
        action()
        return
    message = b""
    if world.is_main:
        try:
            action()
        except UserError as exc:
            message = str(exc).encode()[:_MESSAGE_BYTES]
    buffer = np.zeros(_MESSAGE_BYTES, np.uint8)
    buffer[:len(message)] = np.frombuffer(message, np.uint8)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    if shared.any():
        raise UserError(shared.tobytes().rstrip(b"\0").decode(errors="replace"))

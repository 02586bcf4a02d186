"""Device and precision for jax_impl: the GPU when jax sees one, bf16 compute where it is fast;
and the persistent compilation cache, so that XLA compiles a program once per machine."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from shared.errors import UserError
from shared.machine import JAX_CACHE_BYTES, JAX_CACHE_ENV, jax_cache_dir

# CPU flags that make bf16 matmuls and convolutions native (torch asks oneDNN the same question).
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def pick_device() -> jax.Device:
    """jax's default device: the first GPU when jax sees one, else the CPU."""
    return jax.devices()[0]


def device_name(device: jax.Device) -> str:
    """"cuda" for an NVIDIA GPU (torch_impl's name for it), else jax's platform ("cpu", "tpu")."""
    return "cuda" if device.platform == "gpu" else device.platform


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags")
            for flag in line.split(":", 1)[1].split()}


def bf16_supported(device: jax.Device) -> bool:
    """True where bf16 runs natively: TPU, NVIDIA compute capability >= 8.0, or AVX512-BF16/AMX
    CPUs."""
    if device.platform == "tpu":
        return True
    if device.platform == "gpu":
        return float(getattr(device, "compute_capability", "0")) >= 8.0
    return any(flag in _cpu_flags() for flag in _CPU_BF16_FLAGS)


def compute_dtype(precision: str, device: jax.Device) -> jnp.dtype:
    """The model's compute dtype for --precision (parameters always stay float32)."""
    if precision == "fp32":
        return jnp.float32
    if precision == "bf16":
        return jnp.bfloat16
    if precision == "auto":
        return jnp.bfloat16 if bf16_supported(device) else jnp.float32
    raise UserError(f"unknown precision {precision!r}; choose one of: auto, bf16, fp32")


def precision_name(dtype: jnp.dtype) -> str:
    """"bf16" or "fp32", as summary.json and the start-up line report it."""
    return "bf16" if jnp.dtype(dtype) == jnp.bfloat16 else "fp32"


def use_compilation_cache(enabled: bool) -> str | None:
    """Point XLA's persistent compilation cache at shared.machine.jax_cache_dir() (--jax-cache),
    before anything is compiled, unless `enabled` is False, the folder is off, or a folder was
    chosen already (JAX_COMPILATION_CACHE_DIR, or an earlier call); returns the folder in use.
    A folder that cannot be made leaves the cache off, with a warning."""
    if jax.config.jax_compilation_cache_dir or not enabled:
        return jax.config.jax_compilation_cache_dir
    folder = jax_cache_dir()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"warning: no compilation cache: cannot create {folder} ({exc.strerror or exc}); "
              f"set {JAX_CACHE_ENV} to a folder you can write to, or to off", flush=True)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_compilation_cache_max_size", JAX_CACHE_BYTES)
    return str(folder)

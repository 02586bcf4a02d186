"""What settings default to on this machine: where the data is, how many loader threads, where
jax_impl keeps what it compiles. Nothing here imports the rest of the project."""
from __future__ import annotations

import os
from pathlib import Path

# jax_impl's persistent compilation cache: this environment variable names another folder, or
# "off"; the cache stays under JAX_CACHE_BYTES, its least recently used programs dropped first.
JAX_CACHE_ENV = "VICREG_JAX_CACHE"
JAX_CACHE_BYTES = 2 * 1024 ** 3


def default_data_dir() -> Path:
    """$VICREG_DATA_DIR if set and non-empty, else ./data."""
    return Path(os.environ.get("VICREG_DATA_DIR") or "data").expanduser()


def auto_workers() -> int:
    """Augmentation threads when --workers is 0: half the cores, 1 to 8 (numpy releases the GIL
    inside its array operations, so threads scale while the trainer keeps the other cores)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def jax_cache_dir() -> Path | None:
    """Where jax_impl keeps compiled programs: $VICREG_JAX_CACHE (None when it is "off" or "0"),
    else $XDG_CACHE_HOME/vicreg-interop/jax, else ~/.cache/vicreg-interop/jax."""
    chosen = os.environ.get(JAX_CACHE_ENV, "").strip()
    if chosen.lower() in ("off", "0", "false", "no"):
        return None
    if chosen:
        return Path(chosen).expanduser()
    home = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(home) / "vicreg-interop" / "jax"

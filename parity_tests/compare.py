"""Compare a torch result with a JAX result and, on failure, say where they part."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from parity_tests.tolerances import TINY, TOLERANCES


def as_numpy(value) -> np.ndarray:
    """A torch tensor (any device, any layout), jax array, numpy array or scalar -> numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().contiguous().numpy()
    return np.asarray(value)


def relative_difference(torch_value: np.ndarray, jax_value: np.ndarray, scale: float = 0.0) -> float:
    """max|torch - jax| / max(max|torch|, scale, TINY), in float64; 0 for two empty arrays."""
    a, b = np.asarray(torch_value, np.float64), np.asarray(jax_value, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.abs(a - b).max() / max(np.abs(a).max(), scale, TINY))


def first_parting(name: str, torch_value: np.ndarray, jax_value: np.ndarray, rel: float,
                  tol: float) -> str:
    """The failure message: the tensor, the index of the largest difference, both values."""
    diff = np.abs(np.asarray(torch_value, np.float64) - np.asarray(jax_value, np.float64))
    index = np.unravel_index(int(np.nanargmax(diff)) if np.isfinite(diff).any() else 0, diff.shape)
    where = f"[{', '.join(map(str, index))}]" if diff.ndim else ""
    return (f"{name}{where}: torch {torch_value[index].item()!r} vs jax {jax_value[index].item()!r} "
            f"(largest difference relative to max|torch| = {rel:.3g}, tolerance {tol:.3g})")


class ParityReport:
    """Checks pairs of results against TOLERANCES and keeps the largest difference per group."""

    def __init__(self):
        self.largest: dict[tuple[str, str], tuple[float, str]] = defaultdict(lambda: (0.0, ""))

    def record(self, group: str, dtype: str, name: str, rel: float) -> None:
        if rel >= self.largest[(group, dtype)][0]:
            self.largest[(group, dtype)] = (rel, name)

    def check(self, group: str, dtype: str, name: str, torch_value, jax_value,
              tol: float | None = None, scale: float = 0.0) -> float:
        """Assert torch_value and jax_value (same shape) agree within the (group, dtype) tolerance.

        The difference is taken relative to max(max|torch_value|, scale): pass the scale of the
        whole model for a tensor that is zero in exact arithmetic (see models.inert_under_batchnorm).
        Returns the relative difference; NaN and inf must sit at the same places on both sides.
        """
        tol = TOLERANCES[(group, dtype)] if tol is None else tol
        a, b = as_numpy(torch_value), as_numpy(jax_value)
        assert a.shape == b.shape, f"{name}: torch shape {a.shape} vs jax shape {b.shape}"
        finite_a, finite_b = np.isfinite(a), np.isfinite(b)
        same_special = (a == b) | (np.isnan(a) & np.isnan(b))
        mismatch = (finite_a != finite_b) | (~finite_a & ~finite_b & ~same_special)
        if mismatch.any():
            index = tuple(int(i) for i in np.argwhere(mismatch)[0])
            raise AssertionError(f"{name}{list(index)}: torch {a[index].item()!r} vs jax {b[index].item()!r} "
                                 "(non-finite on one side only)")
        a, b = np.where(finite_a, a, 0), np.where(finite_b, b, 0)
        rel = relative_difference(a, b, scale)
        self.record(group, dtype, name, rel)
        if not rel <= tol:
            raise AssertionError(first_parting(name, a, b, rel, tol))
        return rel

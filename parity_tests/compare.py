"""Compare a torch result with a JAX result and, on failure, say where they part."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from parity_tests.tolerances import FLOAT32_FLOOR, FLOAT32_SPREAD, FLOAT64, KINK_ALLOWANCE, TINY


def as_numpy(value) -> np.ndarray:
    """A torch tensor (any device, any layout), jax array, numpy array or scalar -> numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().contiguous().numpy()
    return np.asarray(value)


def relative_difference(torch_value: np.ndarray, jax_value: np.ndarray,
                        scale: float = 0.0) -> float:
    """max|torch - jax| / max(max|torch|, scale, TINY), in float64; 0 for two empty arrays."""
    a, b = np.asarray(torch_value, np.float64), np.asarray(jax_value, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.abs(a - b).max() / max(np.abs(a).max(), scale, TINY))


def first_parting(name: str, dtype: str, torch_value: np.ndarray, jax_value: np.ndarray,
                  rel: float, tol: float) -> str:
    """The failure message: the tensor, the index of the largest difference, both values."""
    diff = np.abs(np.asarray(torch_value, np.float64) - np.asarray(jax_value, np.float64))
    index = np.unravel_index(int(np.nanargmax(diff)) if np.isfinite(diff).any() else 0, diff.shape)
    where = f"[{', '.join(map(str, index))}]" if diff.ndim else ""
    return (f"{name}{where} in {dtype}: torch {torch_value[index].item()!r} vs jax "
            f"{jax_value[index].item()!r} (largest difference relative to max|torch| = {rel:.3g}, "
            f"tolerance {tol:.3g})")


@dataclass
class Float32Measure:
    """One float32 comparison: the two sides' difference and each side's distance from float64."""

    difference: float
    error_torch: float
    error_jax: float
    kink_allowance: float = 0.0

    @property
    def bound(self) -> float:
        return (FLOAT32_SPREAD * min(self.error_torch, self.error_jax) + FLOAT32_FLOOR
                + KINK_ALLOWANCE * self.kink_allowance)

    @property
    def used(self) -> float:
        """The fraction of the bound the difference takes (above 1: a failure)."""
        return self.difference / self.bound


class ParityReport:
    """Checks pairs of results against the tolerances and keeps the largest difference per group."""

    def __init__(self):
        self.largest: dict[str, tuple[float, str]] = defaultdict(lambda: (0.0, ""))
        self.float32: dict[str, tuple[Float32Measure, str]] = {}

    def record(self, group: str, name: str, rel: float) -> None:
        if rel >= self.largest[group][0]:
            self.largest[group] = (rel, name)

    def check(self, group: str, name: str, torch64, jax64, torch32, jax32, scale: float = 0.0,
              kink_allowance: float = 0.0) -> tuple[float, float]:
        """Assert that torch and jax agree in float64 within FLOAT64[group], and in float32 within
        the bound derived from their own float32 errors (see tolerances.py).

        Differences are taken relative to max(max|torch64|, scale): pass the scale of the whole
        model for a tensor that is zero in exact arithmetic (see models.inert_under_batchnorm).
        kink_allowance: for a result computed from a ReLU derivative, kinks.kink_allowance.
        NaN and inf must sit at the same places on both sides. Returns the float64 and float32
        differences.
        """
        return (self.check_float64(group, name, torch64, jax64, scale),
                self.check_float32(group, name, torch32, jax32, torch64, scale, kink_allowance))

    def check_float64(self, group: str, name: str, torch_value, jax_value,
                      scale: float = 0.0, tol: float | None = None) -> float:
        """Assert torch_value and jax_value (same shape) agree within FLOAT64[group] (or tol)."""
        tol = FLOAT64[group] if tol is None else tol
        a, b = finite_pair(name, "float64", torch_value, jax_value)
        rel = relative_difference(a, b, scale)
        self.record(group, f"{name}", rel)
        if not rel <= tol:
            raise AssertionError(first_parting(name, "float64", a, b, rel, tol))
        return rel

    def check_float32(self, group: str, name: str, torch_value, jax_value, reference,
                      scale: float = 0.0, kink_allowance: float = 0.0) -> float:
        """Assert the float32 results agree within FLOAT32_SPREAD x the smaller of their distances
        from `reference` (the float64 result), plus FLOAT32_FLOOR and KINK_ALLOWANCE x
        kink_allowance; returns their difference."""
        a, b = finite_pair(name, "float32", torch_value, jax_value)
        reference = np.where(np.isfinite(as_numpy(reference)), as_numpy(reference), 0)
        scale = max(float(np.abs(np.asarray(reference, np.float64)).max(initial=0.0)), scale)
        measure = Float32Measure(relative_difference(a, b, scale),
                                 relative_difference(a, reference, scale),
                                 relative_difference(b, reference, scale), kink_allowance)
        if group not in self.float32 or measure.used >= self.float32[group][0].used:
            self.float32[group] = (measure, name)
        if not measure.difference <= measure.bound:
            raise AssertionError(
                first_parting(name, "float32", a, b, measure.difference, measure.bound)
                + f"; distance from float64: torch {measure.error_torch:.3g}, jax "
                  f"{measure.error_jax:.3g}; kink allowance {kink_allowance:.3g}")
        return measure.difference


def finite_pair(name: str, dtype: str, torch_value, jax_value) -> tuple[np.ndarray, np.ndarray]:
    """Both values as numpy arrays with their (matching) non-finite entries set to 0; an
    AssertionError names the first entry that is finite on one side only, or differs in sign."""
    a, b = as_numpy(torch_value), as_numpy(jax_value)
    assert a.shape == b.shape, f"{name} in {dtype}: torch shape {a.shape} vs jax shape {b.shape}"
    finite_a, finite_b = np.isfinite(a), np.isfinite(b)
    same_special = (a == b) | (np.isnan(a) & np.isnan(b))
    mismatch = (finite_a != finite_b) | (~finite_a & ~finite_b & ~same_special)
    if mismatch.any():
        index = tuple(int(i) for i in np.argwhere(mismatch)[0])
        raise AssertionError(f"{name}{list(index)} in {dtype}: torch {a[index].item()!r} vs jax "
                             f"{b[index].item()!r} (non-finite on one side only)")
    return np.where(finite_a, a, 0), np.where(finite_b, b, 0)

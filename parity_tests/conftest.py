"""Shared pieces of the parity suite: the report of measured differences, float64 for JAX.

Every comparison runs in float64 and in float32 (see tolerances.py). The table printed at the end
of `pytest parity_tests` lists, per group, the largest float64 difference against its bound and the
float32 comparison that came closest to its derived bound, with both sides' distances from float64.
"""
import contextlib

import jax
import numpy as np
import pytest
import torch

from parity_tests.compare import ParityReport
from parity_tests.tolerances import FLOAT64, PROBE_TOP1_POINTS

_REPORT = ParityReport()

DTYPES = ("float64", "float32")


@pytest.fixture(scope="session")
def parity() -> ParityReport:
    return _REPORT


def jax_precision(dtype: str):
    """A context in which JAX computes in `dtype`: x64 switched on for float64."""
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def np_dtype(name: str) -> np.dtype:
    return np.dtype(name)


def pytest_terminal_summary(terminalreporter):
    if not (_REPORT.largest or _REPORT.float32):
        return
    write = terminalreporter.write_line
    terminalreporter.section("parity: largest differences per group (relative to the tensor's "
                             "scale)")
    write(f"{'group':<18} {'float64':>9} {'bound':>7}  {'float32':>9} {'torch32':>9} "
          f"{'jax32':>9} {'kink':>9} {'of bound':>8}  where (float32)")
    for group in sorted(set(_REPORT.largest) | set(_REPORT.float32)):
        if group == "loader":
            write(f"{group:<18} {'bytes equal':>17}")
            continue
        if group == "probe_top1_points":  # in percentage points, not relative
            points, name = _REPORT.largest[group]
            write(f"{group:<18} {points:>9.2f} {PROBE_TOP1_POINTS:>7.2f}  {name}")
            continue
        rel64, _ = _REPORT.largest.get(group, (float("nan"), ""))
        row = f"{group:<18} {rel64:>9.2e} {FLOAT64.get(group, 0.0):>7.0e}"
        if group in _REPORT.float32:
            measure, name = _REPORT.float32[group]
            row += (f"  {measure.difference:>9.2e} {measure.error_torch:>9.2e} "
                    f"{measure.error_jax:>9.2e} {measure.kink_allowance:>9.2e} "
                    f"{measure.used:>8.1%}  {name}")
        write(row)
    write("float32: the two sides' difference, each side's distance from float64, the kink "
          "allowance, and the share of the derived bound used (parity_tests/tolerances.py)")

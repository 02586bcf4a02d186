"""Shared pieces of the parity suite: the report of measured differences, float64 for JAX.

The table printed at the end of `pytest parity_tests` lists, for each group and dtype, the largest
difference measured (relative to the tensor's scale) and the tensor where it occurred.
"""
import jax
import numpy as np
import pytest
import torch

from parity_tests.compare import ParityReport
from parity_tests.tolerances import PROBE_TOP1_POINTS, TOLERANCES

_REPORT = ParityReport()

DTYPES = ("float32", "float64")


@pytest.fixture(scope="session")
def parity() -> ParityReport:
    return _REPORT


@pytest.fixture(params=DTYPES)
def dtype(request) -> str:
    """Each test using it runs once in float32 and once in float64 (JAX x64 switched on for it)."""
    if request.param == "float64":
        with jax.enable_x64(True):
            yield request.param
    else:
        yield request.param


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def np_dtype(name: str) -> np.dtype:
    return np.dtype(name)


def pytest_terminal_summary(terminalreporter):
    if not _REPORT.largest:
        return
    write = terminalreporter.write_line
    terminalreporter.section("parity: largest difference per group (max|torch - jax| / max|torch|)")
    write(f"{'group':<16} {'dtype':<8} {'measured':>10} {'tolerance':>10}  where")
    for (group, dtype), (rel, name) in sorted(_REPORT.largest.items()):
        if group == "probe_top1_points":  # in percentage points, not relative
            write(f"{group:<16} {dtype:<8} {rel:>10.2f} {PROBE_TOP1_POINTS:>10.2f}  {name}")
        else:
            write(f"{group:<16} {dtype:<8} {rel:>10.2e} {TOLERANCES[(group, dtype)]:>10.0e}  {name}")

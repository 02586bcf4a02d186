"""The one table of bench/gpu_check.sh: `python bench/gpu_report.py CHECK_DIR`.

Prints the bench's tables (CHECK_DIR/bench.log, compile.log) and a row per training run
(CHECK_DIR/<run>/): epochs, end-to-end pairs/s (the mean over the epochs after the first, whose
time includes compiling), training time, the kNN monitor's last point, CIFAR-10 probe top-1.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.records import EpochRecord, of_kind, read_records  # noqa: E402
from shared.runio import read_json  # noqa: E402


def table_lines(log: Path) -> list[str]:
    """The Markdown table rows and the summary lines a bench/throughput.py log ends with."""
    if not log.is_file():
        return [f"({log.name}: not run)"]
    lines = log.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| path")), None)
    return lines[start:] if start is not None else [f"({log.name}: no table; see the log)"]


def run_row(run: Path) -> str:
    epochs = of_kind(read_records(run), EpochRecord)
    summary = read_json(run / "summary.json") or {}
    steady = [r.pairs_per_s for r in epochs[1:]]
    rate = f"{sum(steady) / len(steady):,.0f}" if steady else "-"
    probe = summary.get("probe", {}).get("cifar10")
    minutes = f"{summary['train_time_s'] / 60:.1f}" if "train_time_s" in summary else "-"
    top1 = f"{100 * probe:.2f}%" if probe is not None else "-"
    knn = f"{100 * summary['knn_top1']:.2f}%" if "knn_top1" in summary else "-"
    device = f"{summary.get('device', '?')} {summary.get('precision', '')}".strip()
    return f"| {run.name} | {device} | {len(epochs)} | {rate} | {minutes} | {knn} | {top1} |"


def main(check_dir: Path) -> None:
    print(f"\n## GPU check: {check_dir}\n")
    versions = check_dir / "versions.log"
    if versions.is_file():
        print(versions.read_text())
    for name in ("bench.log", "compile.log"):
        print("\n".join(table_lines(check_dir / name)) + "\n")
    print("| run | device | epochs | end-to-end pairs/s (epochs 2+) | train min | last kNN top-1 "
          "| CIFAR-10 top-1 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for run in sorted(p for p in check_dir.iterdir() if (p / "config.json").is_file()):
        print(run_row(run))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Reading run and sweep folders, and the results tables both shared.sweep and shared.report show.

Nothing here writes: a folder is read as it is, so a table can be made while a sweep still runs.
A run folder holds config.json, metrics.jsonl, the checkpoint, summary.json and probe_*.json; a
sweep folder holds sweep.json (the plan) and runs/NAME/, one run folder per run of the plan, with
failure.json while a run's last attempt failed.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass, fields
from pathlib import Path

from shared.cli import format_value
from shared.config import RUN, Config, make_config
from shared.data import TITLES, dataset_key, key_title
from shared.errors import UserError
from shared.records import TERMS, KnnRecord, of_kind, read_records
from shared.runio import (
    CONFIG_FILE,
    SUMMARY_FILE,
    load_run_config,
    probe_result_path,
    read_json,
    run_framework,
)

SWEEP_FILE = "sweep.json"
RUNS_DIR = "runs"
FAILURE_FILE = "failure.json"


def read_sweep_file(sweep_dir: Path) -> dict | None:
    """SWEEP_DIR/sweep.json, or None when the folder holds no sweep yet."""
    return read_json(Path(sweep_dir) / SWEEP_FILE)


def sweep_run_dirs(sweep_dir: Path) -> list[tuple[str, Path, dict]]:
    """(run name, run folder, planned config as a dict) for each run of the sweep in SWEEP_DIR."""
    path = Path(sweep_dir) / SWEEP_FILE
    stored = read_sweep_file(sweep_dir)
    if stored is None:
        raise UserError(f"no sweep in {sweep_dir}: {path} is missing")
    try:
        runs = [(r["name"], r["overrides"]) for r in stored["runs"]]
        preset = stored["preset"]
    except (KeyError, TypeError):
        raise UserError(f"{path} is not a sweep plan (framework, preset, runs)") from None
    return [(name, Path(sweep_dir) / RUNS_DIR / name,
             dataclasses.asdict(make_config({"preset": preset, **overrides,
                                             "data_dir": stored.get("data_dir", "")})))
            for name, overrides in runs]


def format_duration(seconds: float) -> str:
    """3725 -> "1h02m", 192 -> "3m12s", 42 -> "42s"."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


@dataclass
class RunResult:
    """What one run folder holds, read without changing anything."""

    label: str
    run_dir: Path
    status: str  # done, failed, incomplete (started, not finished) or pending (not started)
    framework: str
    config: dict | None
    summary: dict | None
    probes: dict  # "cifar10", "gtsrb", "cifar10_random_init", ... -> the probe JSON
    failure: dict | None


def in_key_order(keys) -> list[str]:
    """Dataset keys (shared.data.dataset_key) in the order tables and figures show them: the named
    datasets in TITLES order, then folders by key."""
    named = [key for key in TITLES if key in keys]
    return named + sorted(set(keys) - set(named))


def probed_datasets(probe_keys) -> list[str]:
    """The dataset keys of probe result keys ("gtsrb", "gtsrb_random_init", ...), each once, in
    in_key_order."""
    return in_key_order({key.removesuffix("_random_init") for key in probe_keys})


def pretraining_datasets(results: list[RunResult]) -> dict[str, str]:
    """The datasets the runs (with settings) pretrained on: dataset key -> its --dataset value,
    in_key_order."""
    sources = {dataset_key(r.config["dataset"]): r.config["dataset"] for r in results if r.config}
    return {key: sources[key] for key in in_key_order(sources)}


def probed_keys(run_dir: Path) -> list[str]:
    """The dataset keys of the probe files in RUN_DIR (probe_<key>[_...].json), in_key_order."""
    return in_key_order({path.stem.removeprefix("probe_").split("_")[0]
                         for path in Path(run_dir).glob("probe_*.json")})


def load_run(run_dir: Path, label: str, planned_config: dict | None = None,
             planned_framework: str = "") -> RunResult:
    """Read a run folder; a sweep run not started yet is described by its planned settings."""
    run_dir = Path(run_dir)
    has_config = (run_dir / CONFIG_FILE).is_file()
    config = dataclasses.asdict(load_run_config(run_dir)) if has_config else planned_config
    summary = read_json(run_dir / SUMMARY_FILE)
    failure = read_json(run_dir / FAILURE_FILE)
    probes = {}
    for dataset in probed_keys(run_dir):
        for random_init, key in ((False, dataset), (True, f"{dataset}_random_init")):
            result = read_json(probe_result_path(run_dir, dataset, random_init))
            if result is not None:
                probes[key] = result
    if failure:
        status = "failed"
    elif summary is not None and any(not key.endswith("_random_init") for key in probes):
        status = "done"
    else:
        status = "incomplete" if has_config else "pending"
    return RunResult(label, run_dir, status, run_framework(run_dir, planned_framework or "torch"),
                     config, summary, probes, failure)


def load_sweep(sweep_dir: Path) -> list[RunResult]:
    """The runs of the sweep in SWEEP_DIR, in plan order."""
    framework = read_sweep_file(sweep_dir)["framework"]
    return [load_run(run_dir, name, config, framework)
            for name, run_dir, config in sweep_run_dirs(sweep_dir)]


def differing_settings(results: list[RunResult]) -> list[str]:
    """The settings (and framework) whose values are not the same in all runs, in Config order."""
    def values(name):
        return {json.dumps(r.config.get(name)) for r in results if r.config}
    names = [f.name for f in fields(Config) if f.metadata["role"] != RUN]
    varying = [n for n in names if len(values(n)) > 1]
    frameworks = {r.framework for r in results}
    return (["framework"] if len(frameworks) > 1 else []) + varying


# The probe columns every table has; the other datasets' appear when some run has them.
PROBE_COLUMNS = ("cifar10", "cifar10_random_init", "gtsrb", "gtsrb_random_init")


def probe_columns(results: list[RunResult]) -> list[str]:
    """The probe keys a table of `results` shows: PROBE_COLUMNS, and every other dataset's (with
    its random init) that some run has a probe of, in_key_order."""
    datasets = probed_datasets([*PROBE_COLUMNS, *(key for r in results for key in r.probes)])
    return [key for dataset in datasets for key in (dataset, f"{dataset}_random_init")]


def trained_epochs(result: RunResult) -> float | None:
    """The epochs the run has trained, as its summary says (None before it has one)."""
    epochs = (result.summary or {}).get("epochs")
    return float(epochs) if epochs is not None else None


def stale_probe(result: RunResult, key: str) -> float | None:
    """The epoch a probe of the trained backbone (key "cifar10", "gtsrb", ...) measured, when it
    is not the epoch the run has trained to (the run went on after it); else None."""
    probe, trained = result.probes.get(key), trained_epochs(result)
    measured = (probe or {}).get("checkpoint_epoch")
    if measured is None or trained is None or abs(float(measured) - trained) < 1e-9:
        return None
    return float(measured)


def monitor_points(run_dir: Path) -> list[KnnRecord]:
    """The kNN monitor's points in the run's metrics.jsonl, oldest first."""
    return of_kind(read_records(run_dir), KnnRecord)


def result_row(result: RunResult, settings: list[str],
               probe_keys: list[str] | tuple[str, ...] = PROBE_COLUMNS) -> dict:
    """One table row of raw values (None where the run has no such number), with the probes of
    `probe_keys` (probe_columns); a probe's epoch is given beside its top-1 when it is not the
    epoch the run trained to."""
    final = (result.summary or {}).get("final") or {}
    row = {"run": result.label, "status": result.status}
    for name in settings:
        row[name] = result.framework if name == "framework" else (result.config or {}).get(name)
    row["trained_epochs"] = trained_epochs(result)
    row.update({f"final_{term}": final.get(term) for term in TERMS})
    for key in probe_keys:
        row[f"{key}_top1"] = result.probes[key]["top1"] if key in result.probes else None
        if not key.endswith("random_init"):
            row[f"{key}_stale_epoch"] = stale_probe(result, key)
    points = [p.knn_top1 for p in monitor_points(result.run_dir)]
    row["knn_last_top1"] = points[-1] if points else None
    row["knn_best_top1"] = max(points) if points else None
    row["train_time_s"] = (result.summary or {}).get("train_time_s")
    row["error"] = (result.failure or {}).get("error")
    return row


def results_csv(results: list[RunResult]) -> str:
    """The results table as CSV: raw values, accuracies as fractions, empty where missing."""
    settings = differing_settings(results)
    rows = [result_row(r, settings, probe_columns(results)) for r in results]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["run"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in rows])
    return buffer.getvalue()


def _cell(column: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return format_value(value)
    if column.endswith("_top1"):
        return f"{100 * value:.2f}%"
    if column == "train_time_s":
        return format_duration(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


MD_HEADERS = {"trained_epochs": "epochs trained", "final_loss": "loss",
              "final_invariance": "invariance",
              "final_variance": "variance", "final_covariance": "covariance",
              "final_embedding_std": "embedding std", "knn_last_top1": "kNN top-1 (last)",
              "knn_best_top1": "kNN top-1 (best)", "train_time_s": "train time"}


def md_header(column: str) -> str:
    """A column's header in the Markdown table: MD_HEADERS', "<dataset> top-1" and "<dataset>
    random init" for a probe's, else the column's name."""
    if column in MD_HEADERS:
        return MD_HEADERS[column]
    if column.endswith("_random_init_top1"):
        return f"{key_title(column.removesuffix('_random_init_top1'))} random init"
    if column.endswith("_top1") and not column.startswith("knn_"):
        return f"{key_title(column.removesuffix('_top1'))} top-1"
    return column


def results_markdown_table(results: list[RunResult]) -> str:
    """The results table in Markdown: losses are the last epoch's means of the unweighted terms."""
    settings = differing_settings(results)
    rows = [result_row(r, settings, probe_columns(results)) for r in results]
    if not rows:
        return "(no runs)\n"
    unused = [c for c in ("error", "knn_last_top1", "knn_best_top1")
              if all(row[c] is None for row in rows)]
    rows = [{k: v for k, v in row.items() if k not in unused} for row in rows]
    columns = [c for c in rows[0] if not c.endswith("_stale_epoch")]

    def cell(row: dict, column: str) -> str:
        text = _cell(column, row[column])
        stale = row.get(column.removesuffix("_top1") + "_stale_epoch")
        return f"{text} (at epoch {stale:g}, before the last)" if stale is not None else text

    lines = ["| " + " | ".join(md_header(c) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row, c) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def sweep_results_markdown(sweep_dir: Path, stored: dict, results: list[RunResult]) -> str:
    """SWEEP_DIR/results.md: how the sweep was made, and its results table."""
    return (f"# Sweep results: {sweep_dir}\n\n"
            f"Framework {stored['framework']}, preset {stored['preset']}; created with\n\n"
            f"    {stored['command']}\n\n"
            "Final losses are the last epoch's means of the unweighted terms; top-1 is the "
            "linear probe's test accuracy (random init: the same probe on an untrained "
            "backbone).\n\n" + results_markdown_table(results))


def accuracy_note(run_dir: Path, datasets: tuple[str, ...]) -> str:
    """"CIFAR-10 top-1 62.00% (random init 41.00%), ..." from a finished run's probe files."""
    notes = []
    for dataset in datasets:
        key = dataset_key(dataset)
        trained = read_json(probe_result_path(run_dir, key, random_init=False))["top1"]
        baseline = read_json(probe_result_path(run_dir, key, random_init=True))["top1"]
        notes.append(f"{key_title(key)} top-1 {100 * trained:.2f}% "
                     f"(random init {100 * baseline:.2f}%)")
    return ", ".join(notes)

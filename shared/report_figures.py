"""The report's figures (shared.report): loss curves, the embedding standard deviation, the kNN
monitor's accuracy during training, and the probes' accuracy against the random-init baseline,
one PNG each, drawn with matplotlib's Figure
objects (no pyplot: no GUI backend and no global figure state, so they render without a display).
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from shared.data import NUM_CLASSES, key_title
from shared.records import StepRecord, of_kind, read_records
from shared.results import RunResult, in_key_order, monitor_points, pretraining_datasets

LOSS_PANELS = (("loss", "total loss (weighted sum)"),
               ("invariance", "invariance: MSE between the two views"),
               ("variance", "variance: hinge on each dimension's std"),
               ("covariance", "covariance: squared off-diagonal covariances"))
FIGURES = ("loss_curves", "embedding_std", "knn_accuracy", "probe_accuracy")


def step_series(run_dir: Path, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the run's logged step windows, non-finite values dropped."""
    records = [r for r in of_kind(read_records(run_dir), StepRecord)
               if getattr(r, key) is not None]
    return [r.step for r in records], [getattr(r, key) for r in records]


def log_scale_helps(values: list[float]) -> bool:
    """A log axis when all values are positive and span at least a factor of 10."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 10


def _legend_below(fig, ax, rows: int) -> None:
    """One legend for the whole figure, under the panels, in up to 3 columns."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize="medium",
               frameon=False)
    fig.tight_layout(rect=(0, 0.02 + 0.04 * rows, 1, 1))


def _line_style(points: int) -> dict:
    # Short runs log a handful of points; markers keep them visible.
    return {"linewidth": 1.4, "marker": "o" if points <= 20 else None, "markersize": 3}


def plot_loss_curves(results: list[RunResult], path: Path) -> bool:
    """Total loss and the three unweighted terms over training, one panel each, a line per run."""
    series = {r.label: {key: step_series(r.run_dir, key) for key, _ in LOSS_PANELS}
              for r in results}
    series = {label: s for label, s in series.items() if s["loss"][0]}
    if not series:
        return False
    rows = (len(series) + 2) // 3
    fig = Figure(figsize=(11, 7.5 + 0.35 * rows))
    axes = fig.subplots(2, 2)
    for ax, (key, title) in zip(axes.flat, LOSS_PANELS):
        for label, s in series.items():
            ax.plot(*s[key], label=label, **_line_style(len(s[key][0])))
        if log_scale_helps([v for s in series.values() for v in s[key][1]]):
            ax.set_yscale("log")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("training step")
        ax.set_ylabel("loss" if key == "loss" else "term value (unweighted)")
        ax.grid(alpha=0.3)
    _legend_below(fig, axes.flat[0], rows)
    fig.savefig(path, dpi=120)
    return True


def plot_embedding_std(results: list[RunResult], path: Path) -> bool:
    """Mean per-dimension std of the embeddings over training, against the hinge's target of 1."""
    series = {r.label: step_series(r.run_dir, "embedding_std") for r in results}
    series = {label: s for label, s in series.items() if s[0]}
    if not series:
        return False
    rows = (len(series) + 1 + 2) // 3
    fig = Figure(figsize=(9, 5 + 0.3 * rows))
    ax = fig.subplots()
    for label, (steps, values) in series.items():
        ax.plot(steps, values, label=label, **_line_style(len(steps)))
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="variance hinge target (1)")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("embedding std (mean over dimensions)")
    ax.set_title("Embedding standard deviation: near 0 means collapse")
    ax.grid(alpha=0.3)
    # below the axes: inside, the legend would cover the target line or the runs near it
    _legend_below(fig, ax, rows)
    fig.savefig(path, dpi=120)
    return True


def plot_knn_accuracy(results: list[RunResult], path: Path) -> bool:
    """The kNN monitor's top-1 during training, a line per run: against epochs trained (left) and
    against training minutes (right), where runs of different speeds compare."""
    series = {r.label: monitor_points(r.run_dir) for r in results}
    series = {label: points for label, points in series.items() if points}
    if not series:
        return False
    datasets = list(pretraining_datasets([r for r in results if r.label in series]))
    where = key_title(datasets[0]) if len(datasets) == 1 else "each run's dataset's"
    classes = {NUM_CLASSES.get((r.config or {}).get("dataset")) for r in results
               if r.label in series}
    chance = 1 / classes.pop() if len(classes) == 1 and None not in classes else None
    rows = (len(series) + 2) // 3
    fig = Figure(figsize=(11, 4.8 + 0.35 * rows))
    axes = fig.subplots(1, 2)
    for ax, (key, scale, name) in zip(axes, (("epochs", 1, "epochs trained"),
                                             ("train_time_s", 60, "training time (minutes)"))):
        for label, points in series.items():
            ax.plot([getattr(p, key) / scale for p in points], [100 * p.knn_top1 for p in points],
                    label=label, **_line_style(len(points)))
        if chance is not None:
            ax.axhline(100 * chance, color="black", linestyle=":", linewidth=1,
                       label="chance level" if key == "epochs" else None)
        ax.set_xlabel(name)
        ax.set_ylabel(f"kNN top-1 on {where} test images (%)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].set_title("kNN accuracy by epoch", fontsize="medium")
    axes[1].set_title("kNN accuracy by training time", fontsize="medium")
    _legend_below(fig, axes[0], rows)
    fig.savefig(path, dpi=120)
    return True


def plot_probe_accuracy(results: list[RunResult], path: Path) -> bool:
    """Linear-probe top-1 per run, trained against random-init backbone, one panel per dataset."""
    datasets = [d for d in in_key_order({key for r in results for key in r.probes})
                if not d.endswith("_random_init")]
    if not datasets:
        return False
    fig = Figure(figsize=(6 * len(datasets), 5.5))
    axes = fig.subplots(1, len(datasets), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        runs = [r for r in results if dataset in r.probes]
        chance = 1 / runs[0].probes[dataset]["num_classes"]
        x = range(len(runs))
        for offset, key, name, style in (
                (-0.2, dataset, "pretrained with VICReg", {}),
                (0.2, f"{dataset}_random_init", "random init (baseline)",
                 {"hatch": "//", "alpha": 0.6})):
            # a run without this probe (no baseline yet) gets no bar, not a bar at 0
            measured = [(i, 100 * r.probes[key]["top1"]) for i, r in enumerate(runs)
                        if key in r.probes]
            bars = ax.bar([i + offset for i, _ in measured], [h for _, h in measured],
                          width=0.4, label=name, **style)
            ax.bar_label(bars, fmt="%.1f", fontsize="small")
        ax.axhline(100 * chance, color="black", linestyle=":", linewidth=1,
                   label="chance level")
        ax.set_xticks(list(x), [r.label for r in runs], rotation=20, ha="right",
                      fontsize="small")
        ax.set_ylabel("test top-1 accuracy (%)")
        ax.set_ylim(0, 108)
        ax.set_title(f"{key_title(dataset)} linear probe (chance {100 * chance:.1f}%)")
    _legend_below(fig, axes[0][0], 1)
    fig.savefig(path, dpi=120)
    return True


def figure_paths(out: Path) -> dict[str, Path]:
    return {name: out.with_name(f"{out.stem}_{name}.png") for name in FIGURES}


def write_figures(results: list[RunResult], out: Path) -> dict[str, Path]:
    """Draw every figure the runs have data for; returns name -> written file."""
    plotters = {"loss_curves": plot_loss_curves, "embedding_std": plot_embedding_std,
                "knn_accuracy": plot_knn_accuracy, "probe_accuracy": plot_probe_accuracy}
    return {name: path for name, path in figure_paths(out).items()
            if plotters[name](results, path)}


# ---- written sections ----------------------------------------------------------------------------

"""A Markdown report with PNG figures from run and sweep folders.

    python -m shared.report sweeps/std [runs/cpu-torch ...] [--out docs/results/report.md]

The report opens with what VICReg, the expander, the linear probe and GTSRB are, then shows the
results table, loss curves, the embedding standard deviation, probe accuracies against the
random-init baseline, GTSRB accuracy per sign, and the commands that reproduce every run. Figures
are written next to the report as <report name>_<figure>.png. Nothing in the run folders changes.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import string
import sys
from pathlib import Path

# Figure objects without pyplot: no GUI backend, no global figure state, so the report renders
# on machines without a display.
from matplotlib.figure import Figure

from shared.cli import UserErrorParser, cli_main, format_value, plural, setting_flags
from shared.config import Config, make_config
from shared.errors import UserError
from shared.report_pdf import write_pdf
from shared.results import (
    DATASET_NAMES,
    SWEEP_FILE,
    RunResult,
    format_duration,
    load_run,
    load_sweep,
    read_sweep_file,
    results_markdown_table,
)
from shared.runio import CONFIG_FILE, atomic_write_bytes, read_metrics, writable_folder

# The 43 classes of GTSRB by class id, as the benchmark's signnames list them.
GTSRB_CLASS_NAMES = (
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)",
    "Speed limit (60km/h)", "Speed limit (70km/h)", "Speed limit (80km/h)",
    "End of speed limit (80km/h)", "Speed limit (100km/h)", "Speed limit (120km/h)",
    "No passing", "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 metric tons prohibited", "No entry", "General caution",
    "Dangerous curve to the left", "Dangerous curve to the right", "Double curve", "Bumpy road",
    "Slippery road", "Road narrows on the right", "Road work", "Traffic signals", "Pedestrians",
    "Children crossing", "Bicycles crossing", "Beware of ice/snow", "Wild animals crossing",
    "End of all speed and passing limits", "Turn right ahead", "Turn left ahead", "Ahead only",
    "Go straight or right", "Go straight or left", "Keep right", "Keep left",
    "Roundabout mandatory", "End of no passing",
    "End of no passing by vehicles over 3.5 metric tons")

CHANCE = {"cifar10": 1 / 10, "gtsrb": 1 / 43}
LOSS_PANELS = (("loss", "total loss (weighted sum)"),
               ("invariance", "invariance: MSE between the two views"),
               ("variance", "variance: hinge on each dimension's std"),
               ("covariance", "covariance: squared off-diagonal covariances"))
FIGURES = ("loss_curves", "embedding_std", "probe_accuracy")
TRANSFER_EXAMPLES = 5
# The report's text, with $placeholders for what the runs decide.
TEMPLATE = string.Template((Path(__file__).with_name("report_template.md")).read_text())


# ---- which runs ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sources:
    """The runs a report covers, and the sweeps they came from (folder, stored sweep.json)."""

    results: list[RunResult]
    sweeps: list[tuple[Path, dict]]


def collect_runs(paths: list[Path]) -> Sources:
    """Read each path: a sweep folder (sweep.json) gives all its runs, a run folder (config.json)
    itself; labels are folder names, or the paths as given where names collide."""
    results, sweeps, seen = [], [], set()
    for path in map(Path, paths):
        if not path.is_dir():
            raise UserError(f"no folder {path} (give run folders or sweep folders)")
        if (path / SWEEP_FILE).is_file():
            sweeps.append((path, read_sweep_file(path)))
            found = load_sweep(path)
        elif (path / CONFIG_FILE).is_file():
            found = [load_run(path, path.name)]
        else:
            raise UserError(f"{path} is neither a run folder (no {CONFIG_FILE}) nor a sweep "
                            f"folder (no {SWEEP_FILE})")
        for result in found:
            if result.run_dir.resolve() not in seen:
                seen.add(result.run_dir.resolve())
                results.append(result)
    labels = [r.label for r in results]
    if len(set(labels)) < len(labels):
        results = [dataclasses.replace(r, label=str(r.run_dir)) for r in results]
    return Sources(results, sweeps)


# ---- figures -------------------------------------------------------------------------------------

def step_series(run_dir: Path, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the run's logged step windows, non-finite values dropped."""
    records = [r for r in read_metrics(run_dir)
               if r.get("kind") == "step" and r.get(key) is not None]
    return [r["step"] for r in records], [r[key] for r in records]


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


def plot_probe_accuracy(results: list[RunResult], path: Path) -> bool:
    """Linear-probe top-1 per run, trained against random-init backbone, one panel per dataset."""
    datasets = [d for d in DATASET_NAMES if any(d in r.probes for r in results)]
    if not datasets:
        return False
    fig = Figure(figsize=(6 * len(datasets), 5.5))
    axes = fig.subplots(1, len(datasets), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        runs = [r for r in results if dataset in r.probes]
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
        ax.axhline(100 * CHANCE[dataset], color="black", linestyle=":", linewidth=1,
                   label="chance level")
        ax.set_xticks(list(x), [r.label for r in runs], rotation=20, ha="right",
                      fontsize="small")
        ax.set_ylabel("test top-1 accuracy (%)")
        ax.set_ylim(0, 108)
        ax.set_title(f"{DATASET_NAMES[dataset]} linear probe "
                     f"(chance {100 * CHANCE[dataset]:.1f}%)")
    _legend_below(fig, axes[0][0], 1)
    fig.savefig(path, dpi=120)
    return True


def figure_paths(out: Path) -> dict[str, Path]:
    return {name: out.with_name(f"{out.stem}_{name}.png") for name in FIGURES}


def write_figures(results: list[RunResult], out: Path) -> dict[str, Path]:
    """Draw every figure the runs have data for; returns name -> written file."""
    plotters = {"loss_curves": plot_loss_curves, "embedding_std": plot_embedding_std,
                "probe_accuracy": plot_probe_accuracy}
    return {name: path for name, path in figure_paths(out).items()
            if plotters[name](results, path)}


# ---- written sections ----------------------------------------------------------------------------

def configs(results: list[RunResult]) -> list[dict]:
    """The settings of every run that has them (the defaults when none has)."""
    return [r.config for r in results if r.config] or [dataclasses.asdict(Config())]


def setting_in_runs(results: list[RunResult], name: str, form: str = "{}") -> str:
    """How the report's prose gives a setting: "25 here", or "5 and 25 in these runs" when the
    runs differ in it; each value written as the flags write it, in `form`."""
    values = sorted({c[name] for c in configs(results)},
                    key=lambda v: (isinstance(v, str), v))
    texts = [form.format(format_value(v)) for v in values]
    if len(texts) == 1:
        return f"{texts[0]} here"
    return f"{', '.join(texts[:-1])} and {texts[-1]} in these runs"


def feature_dim(results: list[RunResult]) -> int | None:
    return next((p["feature_dim"] for r in results for p in r.probes.values()), None)


def gtsrb_split_note(results: list[RunResult]) -> str:
    """Which GTSRB images the probes used, read from their probe_gtsrb*.json files."""
    groups: dict[tuple[int, int], list[str]] = {}
    for r in results:
        counts = {(p["num_train"], p["num_test"]) for key, p in r.probes.items()
                  if key.startswith("gtsrb")}
        for count in counts:
            groups.setdefault(count, []).append(r.label)
    if not groups:
        return "No run in this report has a GTSRB probe result yet."
    sentences = []
    for (train, test), labels in groups.items():
        who = "" if len(groups) == 1 else f"For {', '.join(labels)}, the"
        sentences.append(f"{who or 'In this report the'} GTSRB probe trained on {train:,} images "
                         "of the official training split (`GTSRB/Training`, torchvision's "
                         f"`split=\"train\"`) and was tested on {test:,} images of the official "
                         "test split.")
    return " ".join(sentences)


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def gtsrb_per_class_table(results: list[RunResult]) -> str:
    """Per-sign test accuracy (%) of each run with a GTSRB probe: trained (random init)."""
    runs = [r for r in results if "gtsrb" in r.probes]
    if not runs:
        return "No run has a GTSRB probe result.\n"
    lines = ["| id | sign | " + " | ".join(r.label for r in runs) + " |",
             "|---|---|" + "|".join("---" for _ in runs) + "|"]
    for cls, name in enumerate(GTSRB_CLASS_NAMES):
        cells = []
        for r in runs:
            trained = r.probes["gtsrb"]["per_class_top1"][cls]
            baseline = r.probes.get("gtsrb_random_init", {}).get("per_class_top1")
            cell = _percent(trained)
            if baseline is not None and baseline[cls] is not None:
                cell += f" ({_percent(baseline[cls])})"
            cells.append(cell)
        lines.append(f"| {cls} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def transfer_summary(results: list[RunResult]) -> str:
    """Which signs the best GTSRB run recognises best and worst, and where pretraining helped."""
    runs = [r for r in results if "gtsrb" in r.probes]
    if not runs:
        return ""
    best = max(runs, key=lambda r: r.probes["gtsrb"]["top1"])
    per_class = best.probes["gtsrb"]["per_class_top1"]
    present = [c for c, acc in enumerate(per_class) if acc is not None]

    def names(classes):
        return ", ".join(f"{GTSRB_CLASS_NAMES[c]} ({_percent(per_class[c])}%)" for c in classes)

    ranked = sorted(present, key=lambda c: (-per_class[c], c))
    text = (f"In the run with the best GTSRB accuracy, **{best.label}** "
            f"({100 * best.probes['gtsrb']['top1']:.2f}%), the signs recognised best are "
            f"{names(ranked[:TRANSFER_EXAMPLES])}; the worst are "
            f"{names(ranked[::-1][:TRANSFER_EXAMPLES])}.")
    baseline = best.probes.get("gtsrb_random_init", {}).get("per_class_top1")
    if baseline:
        gains = sorted((c for c in present if baseline[c] is not None),
                       key=lambda c: (baseline[c] - per_class[c], c))

        def changes(classes):
            return ", ".join(f"{GTSRB_CLASS_NAMES[c]} ({100 * (per_class[c] - baseline[c]):+.1f} "
                             "points)" for c in classes)

        text += (" Against the random-init baseline, pretraining helped most for "
                 f"{changes(gains[:TRANSFER_EXAMPLES])}, and least for "
                 f"{changes(gains[::-1][:TRANSFER_EXAMPLES])}.")
    return text + "\n"


# ---- commands ------------------------------------------------------------------------------------

def train_command_line(result: RunResult) -> str:
    """The trainer command that reproduces a run: its preset, and the settings that differ."""
    cfg = result.config
    preset = dataclasses.asdict(make_config({"preset": cfg["preset"]}))
    changed = {k: v for k, v in cfg.items()
               if k not in ("out", "preset") and v != preset.get(k)}
    framework = result.framework or "<torch|jax>"
    return " ".join([f"python -m {framework}_impl.train --preset {cfg['preset']} "
                     f"--out {result.run_dir}", *setting_flags(changed)])


def commands_section(sources: Sources, report_command: str) -> str:
    lines = ["## Commands", ""]
    for sweep_dir, stored in sources.sweeps:
        lines += [f"Sweep `{sweep_dir}` was created with", "", f"    {stored['command']}", ""]
    lines += ["Each run's training (which also runs the probes on the trained backbone), from its "
              "config.json, and the random-init baselines:", ""]
    for r in sources.results:
        if r.config is None:
            continue
        lines.append(f"    {train_command_line(r)}")
        framework = r.framework or "<torch|jax>"
        for dataset in DATASET_NAMES:
            if f"{dataset}_random_init" in r.probes:
                lines.append(f"    python -m {framework}_impl.probe --run {r.run_dir} "
                             f"--dataset {dataset} --random-init")
    lines += ["", "This report:", "", f"    {report_command}", ""]
    return "\n".join(lines)


# ---- the report ----------------------------------------------------------------------------------

def status_note(results: list[RunResult]) -> str:
    unfinished = [r for r in results if r.status != "done"]
    if not unfinished:
        return ""
    return ("Not finished: " + ", ".join(f"{r.label} ({r.status})" for r in unfinished)
            + ". Failed runs show the last line of their log in the table.\n\n")


def report_markdown(sources: Sources, figures: dict[str, Path], report_command: str,
                    notes: str = "") -> str:
    """The whole report, from report_template.md; figures maps figure name -> PNG path (linked by
    file name, as the figures sit next to the report); `notes` (Markdown) become its "Findings"
    section."""
    results = sources.results
    dim = feature_dim(results)
    settings = next((p["settings"] for r in results for p in r.probes.values()), None)
    trained = sum(r.status == "done" for r in results)
    times = [r.summary["train_time_s"] for r in results if r.summary]
    figure_text = {name: (f"![{name.replace('_', ' ')}]({figures[name].name})"
                          if name in figures else "No run has data for this figure yet.")
                   for name in FIGURES}
    return TEMPLATE.substitute(
        overview=f"{plural(len(results), 'run')} ({trained} finished)"
                 + (f", {format_duration(sum(times))} of training in total" if times else "")
                 + ".",
        findings=f"## Findings\n\n{notes.strip()}\n\n" if notes.strip() else "",
        sim_coeff=setting_in_runs(results, "sim_coeff"),
        std_coeff=setting_in_runs(results, "std_coeff"),
        cov_coeff=setting_in_runs(results, "cov_coeff"),
        mlp=setting_in_runs(results, "mlp", "`{}`"),
        feature_source=(f"the backbone's {dim} features" if dim else "the backbone's features"),
        embedding_dim=" or ".join(sorted({c["mlp"].split("-")[-1] for c in configs(results)},
                                         key=int)),
        probe_settings=(f" ({settings['epochs']} epochs, learning rate {settings['lr']}, batch "
                        f"{settings['batch_size']}, weight decay {settings['wd']})"
                        if settings else ""),
        gtsrb_split=gtsrb_split_note(results), status=status_note(results),
        results_table=results_markdown_table(results), **figure_text,
        transfer_summary=transfer_summary(results), gtsrb_table=gtsrb_per_class_table(results),
        commands=commands_section(sources, report_command))



def read_notes(path: Path) -> str:
    """The text of a --notes file, or a UserError saying why it cannot be read."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise UserError(f"--notes {path}: cannot read it ({reason})") from None


def write_report(paths: list[Path], out: Path | None, notes_path: Path | None = None,
                 pdf: Path | None = None) -> list[Path]:
    """Read the folders, draw the figures next to `out`, write the Markdown and (given `pdf`) the
    same report as a PDF; returns the paths written."""
    out = Path(out) if out else Path(paths[0]) / "report.md"
    if out.suffix.lower() != ".md":
        raise UserError(f"--out {out}: the report is Markdown, give a file name ending in .md")
    if pdf is not None and Path(pdf).suffix.lower() != ".pdf":
        raise UserError(f"--pdf {pdf}: give a file name ending in .pdf")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the report's file name, e.g. "
                        f"{out}/report.md")
    notes = read_notes(notes_path) if notes_path else ""
    sources = collect_runs(paths)
    if pdf is not None:
        writable_folder(Path(pdf).parent, "PDF folder")
    writable_folder(out.parent, "report folder")
    command = shlex.join(["python", "-m", "shared.report", *map(str, paths), "--out", str(out),
                          *(["--notes", str(notes_path)] if notes_path else []),
                          *(["--pdf", str(pdf)] if pdf else [])])
    try:
        figures = write_figures(sources.results, out)
        markdown = report_markdown(sources, figures, command, notes)
        atomic_write_bytes(out, markdown.encode())
        if pdf is not None:
            write_pdf(markdown, out.parent, Path(pdf))
    except OSError as exc:
        raise UserError(f"cannot write the report: {exc.strerror or exc} ({exc.filename})") \
            from None
    return [out] + ([Path(pdf)] if pdf else [])


def build_report_parser() -> argparse.ArgumentParser:
    parser = UserErrorParser(
        prog="python -m shared.report",
        description="Write a Markdown report with PNG figures (loss curves, embedding std, probe "
                    "accuracy against the random-init baseline), the results table, GTSRB "
                    "accuracy per sign and the commands of every run. Run folders are only read.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="RUN_OR_SWEEP_DIR",
                        help="a sweep folder (holding sweep.json: all its runs) or a run folder "
                             "(holding config.json); give several to compare them")
    parser.add_argument("--out", type=Path, metavar="REPORT.md",
                        help="the Markdown file to write; figures go next to it as "
                             "<name>_loss_curves.png, <name>_embedding_std.png, "
                             "<name>_probe_accuracy.png (default: report.md in the first folder)")
    parser.add_argument("--notes", type=Path, metavar="NOTES.md",
                        help="your findings in Markdown, placed under the title as the report's "
                             "\"Findings\" section (the numbers themselves are read from the runs)")
    parser.add_argument("--pdf", type=Path, metavar="REPORT.pdf",
                        help="also write the report as a PDF (the same text, tables and figures, "
                             "laid out by matplotlib)")
    return parser


def main(argv: list[str] | None = None) -> int:
    def body():
        args = build_report_parser().parse_args(argv)
        written = write_report(args.paths, args.out, args.notes, args.pdf)
        print("wrote " + ", ".join(map(str, written)))
    return cli_main(body)


if __name__ == "__main__":
    sys.exit(main())

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

from shared.cli import UserErrorParser, cli_main, format_value, plural, setting_flags
from shared.config import Config, make_config
from shared.data import TITLES, is_folder, key_title
from shared.errors import UserError
from shared.gtsrb import GTSRB_CLASS_NAMES
from shared.image_folder import folder_root
from shared.report_figures import FIGURES, write_figures
from shared.report_pdf import write_pdf
from shared.results import (
    SWEEP_FILE,
    RunResult,
    format_duration,
    load_run,
    load_sweep,
    pretraining_datasets,
    probed_datasets,
    read_sweep_file,
    results_markdown_table,
)
from shared.runio import CONFIG_FILE, atomic_write_bytes, tool_command, writable_folder

TRANSFER_EXAMPLES = 5
# What each named dataset's images show, for the report's GTSRB section.
DATASET_CONTENTS = {"cifar10": "animals and vehicles",
                    "cifar100": "animals, plants, vehicles, household objects and outdoor scenes",
                    "stl10": "animals and vehicles", "gtsrb": "traffic signs"}
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


def configs(results: list[RunResult]) -> list[dict]:
    """The settings of every run that has them (the defaults when none has)."""
    return [r.config for r in results if r.config] or [dataclasses.asdict(Config())]


def joined(texts: list[str]) -> str:
    """["a"] -> "a", ["a", "b", "c"] -> "a, b and c"."""
    return texts[0] if len(texts) == 1 else f"{', '.join(texts[:-1])} and {texts[-1]}"


def setting_in_runs(results: list[RunResult], name: str, form: str = "{}") -> str:
    """How the report's prose gives a setting: "25 here", or "5 and 25 in these runs" when the
    runs differ in it; each value written as the flags write it, in `form`."""
    values = sorted({c[name] for c in configs(results)},
                    key=lambda v: (isinstance(v, str), v))
    texts = [form.format(format_value(v)) for v in values]
    return f"{joined(texts)} {'here' if len(texts) == 1 else 'in these runs'}"


def dataset_titles(results: list[RunResult]) -> list[str]:
    """How the report names the datasets the runs pretrained on (CIFAR-10 when none has
    settings yet)."""
    return [key_title(key) for key in pretraining_datasets(results)] or [TITLES["cifar10"]]


def pretrained_on(results: list[RunResult]) -> str:
    """The GTSRB section's sentences on what the runs pretrained on, and whether it held traffic
    signs."""
    datasets = pretraining_datasets(results) or {"cifar10": "cifar10"}
    described = [f"{key_title(key)} ({DATASET_CONTENTS[key]})" if key in DATASET_CONTENTS
                 else f"{key_title(key)} (your own images in `{folder_root(name)}`)"
                 for key, name in datasets.items()]
    text = f"Pretraining here used {joined(described)}."
    if "gtsrb" in datasets:
        return (text + " A run pretrained on GTSRB has seen the signs (without their labels): its "
                "GTSRB probe measures learning within that domain, not transfer.")
    if any(is_folder(name) for name in datasets.values()):
        return text + " Unless a folder holds some, the backbone never saw a traffic sign."
    return text + " The backbone never saw a traffic sign."


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
    return " ".join([f"{tool_command(framework, 'train')} --preset {cfg['preset']} "
                     f"--out {result.run_dir}", *setting_flags(changed)])


def commands_section(sources: Sources, report_command: str) -> str:
    lines = ["## Commands", ""]
    for sweep_dir, stored in sources.sweeps:
        lines += [f"Sweep `{sweep_dir}` was created with", "", f"    {stored['command']}", ""]
    lines += ["Each run's training (which also probes the trained backbone on its dataset and "
              "GTSRB), from its config.json, the probes of other datasets, and the random-init "
              "baselines:", ""]
    for r in sources.results:
        if r.config is None:
            continue
        lines.append(f"    {train_command_line(r)}")
        probe = f"{tool_command(r.framework or '<torch|jax>', 'probe')} --run {r.run_dir}"
        for key in probed_datasets(r.probes):
            trained, baseline = r.probes.get(key), r.probes.get(f"{key}_random_init")
            if trained is not None and trained.get("source", key) not in (
                    r.config.get("dataset"), "gtsrb"):
                lines.append(f"    {probe} --dataset {trained.get('source', key)}")
            if baseline is not None:
                lines.append(f"    {probe} --dataset {baseline.get('source', key)} "
                             "--random-init")
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
    titles = dataset_titles(results)
    return TEMPLATE.substitute(
        datasets=joined(titles),
        image_size=setting_in_runs(results, "image_size", "{0}x{0}"),
        pretrained_on=pretrained_on(results),
        monitored=titles[0] if len(titles) == 1 else "each run's dataset",
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
                             "<name>_knn_accuracy.png (when a run has kNN monitor points), "
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

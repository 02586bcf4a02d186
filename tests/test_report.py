"""shared.report: figures that open, sections, the numbers of the run folders, and CLI errors."""
import json
import shutil
from pathlib import Path

import matplotlib.image
import pytest
from PIL import Image

from shared import report, report_figures
from shared.config import make_config
from shared.data import dataset_key
from shared.gtsrb import GTSRB_CLASS_NAMES
from shared.results import format_duration

FIGURES = ("loss_curves", "embedding_std", "knn_accuracy", "probe_accuracy")


def read_json(path):
    return json.loads(Path(path).read_text())


def table_rows(text: str, first_header: str) -> list[dict]:
    """The rows of the Markdown table whose header starts with `first_header`, as dicts."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def run_dirs(sweep_dir):
    """The sweep's run folders in plan order."""
    return [sweep_dir / "runs" / run["name"] for run in read_json(sweep_dir / "sweep.json")["runs"]]


@pytest.fixture(scope="module")
def written_report(smoke_sweep, tmp_path_factory):
    """The report of the smoke sweep, written to a folder of its own: (report path, sweep dir)."""
    out, _ = smoke_sweep
    path = tmp_path_factory.mktemp("report") / "docs" / "report.md"
    assert report.main([str(out), "--out", str(path)]) == 0
    return path, out


def test_every_figure_is_written_and_opens(written_report):
    path, _ = written_report
    text = path.read_text()
    for name in FIGURES:
        png = path.with_name(f"report_{name}.png")
        assert png.stat().st_size > 10_000
        pixels = matplotlib.image.imread(png)
        assert pixels.ndim == 3 and pixels.shape[0] >= 500 and pixels.shape[1] >= 900
        assert pixels.std() > 0.05  # drawn on, not a blank canvas
        with Image.open(png) as image:
            assert image.format == "PNG"
        assert f"]({png.name})" in text


def test_sections_explain_the_method_and_the_gtsrb_split(written_report):
    path, sweep_dir = written_report
    text = path.read_text()
    for heading in ("## The principle of VICReg", "## The expander: loss after it, probe before "
                    "it", "## The linear probe", "## GTSRB: does it transfer?", "## Results",
                    "### GTSRB accuracy per sign", "## Commands"):
        assert heading in text
    assert text.index("## The principle of VICReg") < text.index("## Results")
    for words in ("**Invariance**", "**Variance**", "**Covariance**", "dimensional collapse",
                  "backbone is frozen", "43 classes", "39,209 training and 12,630 test images"):
        assert words in text
    probe = read_json(run_dirs(sweep_dir)[0] / "probe_gtsrb.json")
    assert (f"In this report the GTSRB probe trained on {probe['num_train']:,} images of the "
            f"official training split") in text
    assert f"tested on {probe['num_test']:,} images of the official test split" in text
    assert f"the backbone's {probe['feature_dim']} features" in text


def test_the_results_table_holds_the_run_folders_numbers(written_report):
    path, sweep_dir = written_report
    rows = {row["run"]: row for row in table_rows(path.read_text(), "run")}
    assert len(rows) == 3
    for run in run_dirs(sweep_dir):
        row, summary = rows[run.name], read_json(run / "summary.json")
        assert row["status"] == "done"
        assert row["std_coeff"] == f"{read_json(run / 'config.json')['std_coeff']:g}"
        for term, header in (("loss", "loss"), ("invariance", "invariance"),
                             ("variance", "variance"), ("covariance", "covariance"),
                             ("embedding_std", "embedding std")):
            assert row[header] == f"{summary['final'][term]:.4g}"
        assert row["train time"] == format_duration(summary["train_time_s"])
        points = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        points = [p["knn_top1"] for p in points if p["kind"] == "knn"]
        assert (row["kNN top-1 (last)"], row["kNN top-1 (best)"]) == \
            (f"{100 * points[-1]:.2f}%", f"{100 * max(points):.2f}%")
        for dataset, name in (("cifar10", "CIFAR-10"), ("gtsrb", "GTSRB")):
            trained = read_json(run / f"probe_{dataset}.json")["top1"]
            baseline = read_json(run / f"probe_{dataset}_random_init.json")["top1"]
            assert row[f"{name} top-1"] == f"{100 * trained:.2f}%"
            assert row[f"{name} random init"] == f"{100 * baseline:.2f}%"


def test_the_gtsrb_table_names_every_sign_with_its_accuracies(written_report):
    path, sweep_dir = written_report
    rows = table_rows(path.read_text(), "id")
    assert [row["sign"] for row in rows] == list(GTSRB_CLASS_NAMES)
    assert len(rows) == 43 and rows[14]["sign"] == "Stop" and rows[13]["sign"] == "Yield"
    for run in run_dirs(sweep_dir):
        trained = read_json(run / "probe_gtsrb.json")["per_class_top1"]
        baseline = read_json(run / "probe_gtsrb_random_init.json")["per_class_top1"]
        assert [row[run.name] for row in rows] == [
            f"{100 * t:.1f} ({100 * b:.1f})" for t, b in zip(trained, baseline)]


def test_the_commands_reproduce_every_run(written_report):
    path, sweep_dir = written_report
    text = path.read_text()
    assert read_json(sweep_dir / "sweep.json")["command"] in text
    for run in run_dirs(sweep_dir):
        config = read_json(run / "config.json")
        start = f"python -m torch_impl.train --preset smoke --out {run} "
        line = next(s.strip() for s in text.splitlines() if s.strip().startswith(start))
        assert "--subset 32" in line and "--probe-epochs 2" in line
        assert f"--data-dir {config['data_dir']}" in line
        assert (config["std_coeff"] == 25.0) == ("--std-coeff" not in line)  # the preset's value
        assert f"python -m torch_impl.probe --run {run} --dataset gtsrb --random-init" in text
    assert f"python -m shared.report {sweep_dir} --out {path}" in text


def test_notes_become_the_findings_section_under_the_title(smoke_sweep, tmp_path):
    sweep_dir, _ = smoke_sweep
    notes = tmp_path / "notes.md"
    notes.write_text("The variance term matters: *std_coeff=10* probes worse.\n\n")
    out = tmp_path / "r.md"
    assert report.main([str(sweep_dir), "--out", str(out), "--notes", str(notes)]) == 0
    headings = [line for line in out.read_text().splitlines() if line.startswith("## ")]
    assert headings[:2] == ["## Findings", "## The principle of VICReg"]
    text = out.read_text()
    assert "## Findings\n\nThe variance term matters: *std_coeff=10* probes worse.\n\n## " in text
    assert f"python -m shared.report {sweep_dir} --out {out} --notes {notes}" in text
    plain = tmp_path / "plain.md"
    assert report.main([str(sweep_dir), "--out", str(plain)]) == 0
    assert "## Findings" not in plain.read_text()


def test_run_folders_join_a_sweep_in_one_report(smoke_sweep, tmp_path):
    sweep_dir, _ = smoke_sweep
    first = run_dirs(sweep_dir)[0]
    solo = tmp_path / "solo"
    shutil.copytree(first, solo)
    out = tmp_path / "r.md"
    # A run given on its own as well as inside its sweep is reported once.
    assert report.main([str(sweep_dir), str(solo), str(first), "--out", str(out)]) == 0
    rows = table_rows(out.read_text(), "run")
    assert [row["run"] for row in rows] == [p.name for p in run_dirs(sweep_dir)] + ["solo"]
    assert rows[-1]["CIFAR-10 top-1"] == rows[0]["CIFAR-10 top-1"]


def test_colliding_run_names_are_told_apart_by_path(smoke_sweep, tmp_path):
    sweep_dir, _ = smoke_sweep
    copy = tmp_path / "elsewhere" / run_dirs(sweep_dir)[0].name
    shutil.copytree(run_dirs(sweep_dir)[0], copy)
    sources = report.collect_runs([sweep_dir, copy])
    assert [r.label for r in sources.results] == [str(p) for p in run_dirs(sweep_dir)] + [str(copy)]


def a_run_folder(path: Path, **files) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(make_config({"preset": "smoke"}).to_json())
    for name, content in files.items():
        (path / name.replace("_json", ".json")).write_text(content)
    return path


def test_unfinished_and_failed_runs_are_shown_not_hidden(tmp_path):
    failure = {"step": "train", "error": "error: loss became nan at epoch 0 step 3; stopped"}
    failed = a_run_folder(tmp_path / "failed", failure_json=json.dumps(failure))
    started = a_run_folder(tmp_path / "started")
    out = tmp_path / "report.md"
    assert report.main([str(failed), str(started), "--out", str(out)]) == 0
    text = out.read_text()
    rows = table_rows(text, "run")
    assert [(r["run"], r["status"]) for r in rows] == [("failed", "failed"),
                                                       ("started", "incomplete")]
    assert rows[0]["error"] == failure["error"]
    assert "Not finished: failed (failed), started (incomplete)" in text
    assert text.count("No run has data for this figure yet.") == 4
    assert "kNN top-1" not in text  # no run has monitor points: no empty columns
    assert not list(tmp_path.glob("*.png"))


def test_the_knn_monitor_gives_the_table_its_last_and_best_point_and_a_figure(tmp_path):
    points = [(2, 0.5, 30.0, 0.21), (4, 1.0, 61.0, 0.47), (6, 1.5, 90.0, 0.43)]
    metrics = "".join(json.dumps({"kind": "knn", "epoch": int(epochs), "step": step,
                                  "epochs": epochs, "knn_top1": top1, "train_time_s": seconds,
                                  "seconds": 0.5}) + "\n"
                      for step, epochs, seconds, top1 in points)
    run = a_run_folder(tmp_path / "monitored", metrics_jsonl=metrics)  # metrics.jsonl
    out = tmp_path / "report.md"
    assert report.main([str(run), "--out", str(out)]) == 0
    row = table_rows(out.read_text(), "run")[0]
    assert (row["kNN top-1 (last)"], row["kNN top-1 (best)"]) == ("43.00%", "47.00%")
    pixels = matplotlib.image.imread(tmp_path / "report_knn_accuracy.png")
    assert pixels.std() > 0.05


def test_log_scale_only_where_values_span_a_factor_of_10():
    assert report_figures.log_scale_helps([0.5, 2.0, 8.0])
    assert not report_figures.log_scale_helps([1.0, 5.0])
    assert not report_figures.log_scale_helps([0.0, 50.0])  # the variance hinge can reach 0
    assert not report_figures.log_scale_helps([])


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_bad_folders_and_files_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_config = tmp_path / "bad_config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{oops")
    bad_probe = a_run_folder(tmp_path / "bad_probe", probe_gtsrb_json="[1,")
    bad_metrics = a_run_folder(tmp_path / "bad_metrics")
    (bad_metrics / "metrics.jsonl").write_text('{"kind": "step", "step": 1}\n{"kind": "st\n{}\n')
    for argv, message in (
            ([str(tmp_path / "nowhere")], f"no folder {tmp_path / 'nowhere'} (give run folders "
                                         "or sweep folders)"),
            ([str(empty)], f"{empty} is neither a run folder (no config.json) nor a sweep folder "
                           "(no sweep.json)"),
            ([str(bad_config)], f"{bad_config / 'config.json'} is not valid JSON"),
            ([str(bad_probe)], f"{bad_probe / 'probe_gtsrb.json'} is not valid JSON"),
            ([str(bad_metrics)], f"{bad_metrics / 'metrics.jsonl'}:2 is not a JSON record"),
            ([str(bad_probe), "--out", str(tmp_path / "report.txt")],
             "the report is Markdown, give a file name ending in .md"),
            ([str(bad_probe), "--notes", str(tmp_path / "missing.md")],
             f"--notes {tmp_path / 'missing.md'}: cannot read it (No such file or directory)"),
            ([], "the following arguments are required: RUN_OR_SWEEP_DIR")):
        assert report.main(argv) == 2
        assert message in error_line(capsys)


def test_help_explains_every_argument(capsys):
    with pytest.raises(SystemExit):
        report.main(["--help"])
    text = capsys.readouterr().out
    assert "RUN_OR_SWEEP_DIR" in text and "sweep.json" in text and "--out" in text
    assert "--notes" in text and "Findings" in text
    assert "_loss_curves.png" in text


def test_the_pdf_holds_the_reports_runs_and_accuracies(smoke_sweep, tmp_path):
    from pypdf import PdfReader

    out, _ = smoke_sweep
    markdown, pdf = tmp_path / "report.md", tmp_path / "pdf" / "report.pdf"
    assert report.main([str(out), "--out", str(markdown), "--pdf", str(pdf)]) == 0
    reader = PdfReader(pdf)
    assert len(reader.pages) >= 3
    text = " ".join(page.extract_text() for page in reader.pages)
    words = " ".join(text.split())
    for heading in ("The principle of VICReg", "The linear probe", "GTSRB accuracy per sign",
                    "Commands"):
        assert heading in words
    for run in run_dirs(out):
        assert run.name in words
        for dataset in ("cifar10", "gtsrb"):
            top1 = read_json(run / f"probe_{dataset}.json")["top1"]
            assert f"{100 * top1:.2f}%" in words  # as the results table writes it
    # matplotlib's pages share one resource dictionary, so every page lists every image
    images = {image.name for page in reader.pages for image in page.images}
    assert len(images) == len(FIGURES)


def test_a_pdf_name_that_is_not_a_pdf_is_one_line(smoke_sweep, tmp_path, capsys):
    out, _ = smoke_sweep
    assert report.main([str(out), "--out", str(tmp_path / "r.md"), "--pdf",
                        str(tmp_path / "r.txt")]) == 2
    expected = f"error: --pdf {tmp_path / 'r.txt'}: give a file name ending in .pdf"
    assert error_line(capsys) == expected


def a_probe(source: str, top1: float, classes: int) -> str:
    return json.dumps({"source": source, "top1": top1, "num_classes": classes,
                       "checkpoint_epoch": 1.0, "feature_dim": 64,
                       "settings": {"epochs": 5, "lr": 0.1, "batch_size": 32, "wd": 0.0}})


def test_the_prose_and_the_columns_follow_each_runs_dataset_and_size(tmp_path):
    pets, other = f"folder:{tmp_path / 'pets'}", f"folder:{tmp_path / 'other'}"
    summary = json.dumps({"epochs": 1.0, "steps": 4, "train_time_s": 10.0})
    runs = []
    for name, flags, probes in (
            ("c10", {}, {"cifar10": ("cifar10", 0.5, 10), dataset_key(other): (other, 0.4, 3)}),
            ("stl", {"dataset": "stl10"}, {"stl10": ("stl10", 0.3, 10)}),
            ("pets", {"dataset": pets}, {dataset_key(pets): (pets, 0.75, 2)})):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(make_config({"preset": "smoke", **flags}).to_json())
        (run / "summary.json").write_text(summary)
        for key, (source, top1, classes) in probes.items():
            (run / f"probe_{key}.json").write_text(a_probe(source, top1, classes))
            (run / f"probe_{key}_random_init.json").write_text(a_probe(source, top1 / 2, classes))
        runs.append(run)
    out = tmp_path / "report.md"
    assert report.main([*map(str, runs), "--out", str(out)]) == 0
    text = " ".join(out.read_text().split())
    assert text.startswith("# VICReg on CIFAR-10, STL-10 and folder pets: results")
    assert "at the run's image size, 32x32 and 96x96 in these runs," in text
    assert ("Pretraining here used CIFAR-10 (animals and vehicles), STL-10 (animals and vehicles) "
            f"and folder pets (your own images in `{tmp_path / 'pets'}`). Unless a folder holds "
            "some, the backbone never saw a traffic sign.") in text
    assert "the first test images of each run's dataset are classified" in text
    for stale in ("CIFAR-10 holds", "first CIFAR-10 test images", "resized to 32x32"):
        assert stale not in text
    rows = {row["run"]: row for row in table_rows(out.read_text(), "run")}
    assert rows["pets"]["folder pets top-1"] == "75.00%"
    assert rows["pets"]["folder other top-1"] == ""
    assert rows["c10"]["folder other top-1"] == "40.00%"
    # the probe of another folder gets its command; the run's own folder probe is its training's
    assert f"torch_impl.probe --run {runs[0]} --dataset {other}" in text
    pets_probes = [line.strip() for line in out.read_text().splitlines()
                   if f"probe --run {runs[2]} " in line]
    assert pets_probes == [f"python -m torch_impl.probe --run {runs[2]} --dataset {pets} "
                           "--random-init"]


def test_a_wide_table_is_split_into_tables_that_fit_the_page_and_keep_values_under_headers():
    from shared.report_pdf import TABLE_MIN, chars_that_fit, table_lines

    header = ["run"] + [f"col{i:02d} {'x' * (i % 7)}" for i in range(1, 27)]
    row = ["a-run-label"] + [f"val{i:02d}" for i in range(1, 27)]
    lines = table_lines([header, row])
    tables = [[]]
    for line in lines:
        assert line.size >= TABLE_MIN and len(line.text) <= chars_that_fit(line.size)
        if line.text:
            tables[-1].append(line.text)
        else:
            tables.append([])
    assert len(tables) > 1 and all(len(table) == 3 for table in tables)  # no line wrapped
    seen = []
    for heads, rule, values in tables:
        assert heads.startswith("run ") and values.startswith("a-run-label")
        assert set(rule) <= {"-", " "}
        for i in range(1, 27):
            if f"col{i:02d}" in heads:
                assert values.index(f"val{i:02d}") == heads.index(f"col{i:02d}")
                seen.append(i)
    assert seen == list(range(1, 27))
    narrow = table_lines([["run", "loss"], ["a", "1.0"]])
    assert [line.text for line in narrow] == ["run  loss", "---  ----", "a    1.0"]

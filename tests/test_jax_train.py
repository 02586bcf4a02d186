"""jax_impl.train and jax_impl.probe end to end on the tiny datasets: run folder, resume, CLI
errors."""
import json
import math

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from jax_impl import probe as jax_probe
from jax_impl import train as jax_train
from jax_impl.backend import Backend as JaxBackend
from jax_impl.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from jax_impl.model import build_model, variable_shapes
from shared.config import make_config
from shared.records import TERMS

STEP_KEYS = {"kind", "epoch", "step", "lr", "pairs_per_s", "images_per_s", "loss", "invariance",
             "variance", "covariance", "embedding_std"}
SUMMARY_KEYS = {"framework", "device", "precision", "epochs", "steps", "train_images",
                "train_time_s", "pairs_per_s", "final", "knn_top1", "probe"}
PROBE_KEYS = {"framework", "dataset", "source", "top1", "per_class_top1", "num_train", "num_test",
              "num_classes", "feature_dim", "random_init", "checkpoint_epoch", "protocol",
              "settings", "time_s"}


def smoke(data_dir, out, *extra):
    """Flags of a seconds-long run: the smoke preset (64 images, batch 16: 4 steps/epoch) at
    width 4."""
    return ["--preset", "smoke", "--width", "4", "--data-dir", str(data_dir), "--out", str(out),
            *extra]


def summary_of(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def error_line(capsys) -> str:
    """The one-line error message, the last line on stderr (after any progress bar)."""
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    return last


def test_smoke_train_then_probe_writes_the_run_folder(tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert jax_train.main(smoke(tiny_data_dir, run)) == 0
    assert json.loads((run / "config.json").read_text()) == {
        **json.loads(make_config({"preset": "smoke", "width": 4}).to_json()),
        "data_dir": str(tiny_data_dir), "out": str(run)}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and records[-1]["kind"] == "epoch"
    point = records[-2]  # the monitor's point at the end of training, before the epoch closes
    assert point["kind"] == "knn" and point["step"] == 4 and summary_of(run)["knn_top1"] == \
        point["knn_top1"]
    assert all(set(r) == STEP_KEYS for r in steps)
    assert set(records[-1]) == STEP_KEYS | {"epoch_time_s"}
    peak = 0.3 * 16 / 256  # smoke: LARS, base lr 0.3 scaled by batch / 256, no warmup, cosine
    for r in steps:
        q = 0.5 * (1 + math.cos(math.pi * (r["step"] - 1) / 4))
        assert r["lr"] == pytest.approx(peak * q + peak * 0.001 * (1 - q), rel=1e-12)
        # lambda s + mu v + nu c with the default coefficients, on the logged (window-mean) terms
        assert r["loss"] == pytest.approx(25 * r["invariance"] + 25 * r["variance"]
                                          + r["covariance"], rel=1e-5)
        assert r["images_per_s"] == pytest.approx(2 * r["pairs_per_s"])
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert (summary["framework"], summary["precision"], summary["steps"],
            summary["train_images"]) == ("jax", "fp32", 4, 64)
    assert set(summary["final"]) == set(TERMS)
    stored = load_checkpoint(run / CHECKPOINT_FILE)
    assert (stored["epoch"], stored["global_step"]) == (1, 4)
    assert stored["metrics_bytes"] == (run / "metrics.jsonl").stat().st_size
    assert stored["config"] == json.loads((run / "config.json").read_text())
    for dataset, train, test, classes in (("cifar10", 200, 100, 10), ("gtsrb", 86, 43, 43)):
        result = json.loads((run / f"probe_{dataset}.json").read_text())
        assert set(result) == PROBE_KEYS
        assert ((result["framework"], result["num_train"], result["num_test"],
                 result["num_classes"], result["feature_dim"], result["checkpoint_epoch"])
                == ("jax", train, test, classes, 32, 1))
        assert len(result["per_class_top1"]) == classes
        assert summary["probe"][dataset] == result["top1"]
    assert summary["probe"]["cifar10"] > 0.3  # class-structured images: far above chance (0.1)

    capsys.readouterr()
    assert jax_probe.main(["--run", str(run), "--dataset", "cifar10", "--random-init",
                           "--data-dir", str(tiny_data_dir), "--probe-epochs", "2"]) == 0
    baseline = json.loads((run / "probe_cifar10_random_init.json").read_text())
    assert baseline["random_init"] is True and baseline["checkpoint_epoch"] is None
    assert baseline["settings"]["epochs"] == 2
    assert "cifar10 linear probe (random init): top-1" in capsys.readouterr().out


def nan_lr_at(epoch, step, train_step):
    """Wrap Backend.train_step so that the update of (epoch, step in epoch) uses lr = NaN: the
    weights diverge."""
    return lambda self, state, batch, lr: train_step(
        self, state, batch, float("nan") if (batch.epoch, batch.step) == (epoch, step) else lr)


def test_divergence_stops_and_resume_continues_exactly(tiny_data_dir, tmp_path, monkeypatch,
                                                       capsys):
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert jax_train.main(smoke(tiny_data_dir, reference, "--epochs", "2", "--no-probe")) == 0

    # The update of epoch 1 step 1 (global step 5) makes every weight NaN; step 2's loss shows it.
    monkeypatch.setattr(JaxBackend, "train_step", nan_lr_at(1, 1, JaxBackend.train_step))
    assert jax_train.main(smoke(tiny_data_dir, run, "--epochs", "2", "--no-probe")) == 2
    assert "loss became nan at step 7 (epoch 2); stopped" in error_line(capsys)
    kept = load_checkpoint(run / CHECKPOINT_FILE)
    assert kept["epoch"] == 1  # the epoch-0 checkpoint stays
    assert (run / "metrics.jsonl").stat().st_size > kept["metrics_bytes"]

    monkeypatch.undo()
    assert jax_train.main(["--resume", "--out", str(run)]) == 0
    want, got = load_checkpoint(reference / CHECKPOINT_FILE), load_checkpoint(run / CHECKPOINT_FILE)
    assert (got["epoch"], got["global_step"]) == (2, 8)
    for key in ("params", "batch_stats", "opt_state"):
        expected, actual = flatten_dict(want[key]), flatten_dict(got[key])
        assert expected.keys() == actual.keys()
        for name, value in expected.items():
            np.testing.assert_allclose(actual[name], value, rtol=0, atol=1e-6, err_msg=str(name))
    timing = {"pairs_per_s", "images_per_s", "epoch_time_s", "train_time_s", "seconds"}
    lines = [[{k: v for k, v in json.loads(line).items() if k not in timing}
              for line in (folder / "metrics.jsonl").read_text().splitlines()]
             for folder in (reference, run)]
    assert lines[0] == lines[1]  # the diverged epoch's lines were rolled back, then redone


# ---- bad input: one line on stderr, exit code 2 --------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--preset", "turbo"], "unknown preset 'turbo'"),
    (["--arch", "resnet19"], "invalid choice: 'resnet19'"),
    (["--mlp", "32-x"], "malformed expander spec --mlp '32-x'"),
    (["--batch-size", "1"], "VICReg needs at least 2 images per batch"),
])
def test_bad_flags(flags, message, tiny_data_dir, tmp_path, capsys):
    assert jax_train.main(smoke(tiny_data_dir, tmp_path / "run", *flags)) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_missing_dataset(tmp_path, capsys):
    assert jax_train.main(smoke(tmp_path / "empty", tmp_path / "run")) == 2
    assert "CIFAR-10 not found" in error_line(capsys)


def run_folder(path, width=4, checkpoint: bytes | None = None):
    """A run folder with config.json (smoke, `width`) and, when given, checkpoint.msgpack bytes."""
    path.mkdir()
    (path / "config.json").write_text(make_config({"preset": "smoke", "width": width,
                                                   "out": str(path)}).to_json())
    if checkpoint is not None:
        (path / CHECKPOINT_FILE).write_bytes(checkpoint)
    return path


def zero_checkpoint(path, width):
    """checkpoint.msgpack with all-zero variables of a resnet18 at `width` (no compilation
    needed)."""
    shapes = variable_shapes(build_model("resnet18", width, [32, 32]))
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    save_checkpoint(path, {**zeros, "opt_state": {}, "epoch": 1, "global_step": 4,
                           "train_time_s": 1.0, "metrics_bytes": 0, "config": {}})


def probe_args(run, data_dir):
    return ["--run", str(run), "--dataset", "cifar10", "--data-dir", str(data_dir)]


def test_corrupt_and_truncated_checkpoints(tiny_data_dir, tmp_path, capsys):
    good = tmp_path / "good.msgpack"
    zero_checkpoint(good, 4)
    blob = good.read_bytes()
    for name, data in (("garbage", b"\x93\x00not msgpack at all" * 50),
                       ("truncated", blob[:len(blob) // 2])):
        run = run_folder(tmp_path / name, checkpoint=data)
        assert jax_probe.main(probe_args(run, tiny_data_dir)) == 2
        assert "is corrupt or truncated and cannot be loaded" in error_line(capsys)
    run = run_folder(tmp_path / "foreign", checkpoint=b"\x81\xa3abc\x01")  # msgpack {"abc": 1}
    assert jax_probe.main(probe_args(run, tiny_data_dir)) == 2
    assert "is not a vicreg-interop JAX checkpoint" in error_line(capsys)


def test_checkpoint_of_another_architecture(tiny_data_dir, tmp_path, capsys):
    run = run_folder(tmp_path / "run", width=8)
    zero_checkpoint(run / CHECKPOINT_FILE, width=4)
    assert jax_probe.main(probe_args(run, tiny_data_dir)) == 2
    line = error_line(capsys)
    assert "does not fit resnet18 width 8 expander 32-32 (from config.json)" in line
    assert "written for another architecture" in line
    assert jax_train.main(["--resume", "--out", str(run), "--arch", "resnet34"]) == 2
    assert "--arch resnet34 (the run has resnet18)" in error_line(capsys)


def test_torch_checkpoint_where_a_jax_one_is_expected(tiny_data_dir, tmp_path, capsys):
    run = run_folder(tmp_path / "run")
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 a torch zip")
    convert = f"python -m interop.convert {run} --to flax"
    assert jax_probe.main(probe_args(run, tiny_data_dir)) == 2
    assert convert in error_line(capsys)
    assert jax_train.main(["--resume", "--out", str(run), "--data-dir", str(tiny_data_dir)]) == 2
    assert convert in error_line(capsys)
    (run / "checkpoint.pt").rename(run / CHECKPOINT_FILE)  # a torch file under the JAX name
    assert jax_probe.main(probe_args(run, tiny_data_dir)) == 2
    assert "is a PyTorch checkpoint" in error_line(capsys)



@pytest.mark.parametrize("delay", [0.5, 3.0])
def test_ctrl_c_while_xla_compiles_is_exit_130(delay, tiny_data_dir, tmp_path):
    """SIGINT a moment after the start-up line, while the first step compiles: the one
    "interrupted" line and exit 130, not a crash of the interpreter's shutdown."""
    import signal
    import subprocess
    import sys
    import time
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "jax_impl.train",
                                *smoke(tiny_data_dir, run, "--epochs", "3")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("jax_impl: resnet18")
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: ")


def test_a_run_keeps_its_compiled_programs_in_the_cache_folder(tiny_data_dir, tmp_path):
    """VICREG_JAX_CACHE names the folder, and a second run of the same shapes reads what the
    first compiled: every program's entry is read (its access time written) and none is
    written again."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(VICREG_JAX_CACHE=str(cache), JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    stamps = []
    for run in ("first", "second"):
        result = subprocess.run([sys.executable, "-m", "jax_impl.train",
                                 *smoke(tiny_data_dir, tmp_path / run, "--no-probe",
                                        "--monitor-every", "0")],
                                capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        stamps.append({p.name: p.stat().st_mtime_ns for p in cache.iterdir()
                       if p.name.endswith(("-cache", "-atime"))})
    first, second = stamps
    entries = [name for name in first if name.endswith("-cache")]
    assert entries and first.keys() == second.keys()
    assert all(second[name] == first[name] for name in entries)
    assert all(second[name.replace("-cache", "-atime")] > first[name.replace("-cache", "-atime")]
               for name in entries)


def test_the_cache_is_off_with_the_flag_or_the_environment(tmp_path, monkeypatch):
    from jax_impl.runtime import use_compilation_cache
    from shared.cli import build_train_parser
    from shared.machine import jax_cache_dir

    monkeypatch.setenv("VICREG_JAX_CACHE", str(tmp_path / "cache"))
    assert jax_cache_dir() == tmp_path / "cache"
    chosen = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert use_compilation_cache(False) is None  # --no-jax-cache
        monkeypatch.setenv("VICREG_JAX_CACHE", "off")
        assert jax_cache_dir() is None and use_compilation_cache(True) is None
        assert jax.config.jax_compilation_cache_dir is None and not (tmp_path / "cache").exists()
        monkeypatch.setenv("VICREG_JAX_CACHE", str(tmp_path / "cache"))
        assert use_compilation_cache(True) == str(tmp_path / "cache")
        assert (tmp_path / "cache").is_dir()
    finally:
        jax.config.update("jax_compilation_cache_dir", chosen)
    assert use_compilation_cache(True) == chosen  # JAX_COMPILATION_CACHE_DIR's folder wins
    monkeypatch.delenv("VICREG_JAX_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    help_text = " ".join(build_train_parser("jax").format_help().split())
    assert "--jax-cache, --no-jax-cache" in help_text
    assert f"(default: on, in {jax_cache_dir()})" in help_text.replace("- ", "-")

"""torch_impl end to end on a tiny dataset: train, probe, resume, divergence, and every CLI
error."""
import json

import numpy as np
import pytest
import torch

from torch_impl import checkpoint as torch_checkpoint
from torch_impl import probe as probe_cli
from torch_impl import step as torch_step
from torch_impl import train as train_cli
from torch_impl.checkpoint import load_checkpoint

KEYS = {"kind", "epoch", "step", "lr", "pairs_per_s", "images_per_s", "loss", "invariance",
        "variance", "covariance", "embedding_std"}


def smoke_args(data_dir, out, *extra):
    return ["--preset", "smoke", "--data-dir", str(data_dir), "--out", str(out), *extra]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_smoke_train_then_probe_writes_the_run_folder(tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli.main(smoke_args(tiny_data_dir, run, "--epochs", "2")) == 0
    out = capsys.readouterr().out
    assert "cifar10 linear probe: top-1" in out and "gtsrb linear probe: top-1" in out
    config = json.loads((run / "config.json").read_text())
    assert config["width"] == 8 and config["epochs"] == 2 and config["preset"] == "smoke"
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines].count("epoch") == 2
    assert all(KEYS <= set(r) for r in lines if r["kind"] != "knn")
    assert [r["step"] for r in lines if r["kind"] == "knn"] == [4, 8]  # the monitor, every epoch
    assert [r["step"] for r in lines if r["kind"] == "step"] == [1, 2, 3, 4, 5, 6, 7, 8]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["framework"] == "torch" and summary["steps"] == 8
    for dataset, classes, n_test in (("cifar10", 10, 100), ("gtsrb", 43, 43)):
        result = json.loads((run / f"probe_{dataset}.json").read_text())
        assert result["num_classes"] == classes and result["num_test"] == n_test
        assert 0.0 <= result["top1"] <= 1.0
        assert summary["probe"][dataset] == result["top1"]
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["epoch"] == 2 and state["global_step"] == 8


def test_last_width_sets_the_feature_the_probes_read(tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli.main(smoke_args(tiny_data_dir, run, "--last-width", "24")) == 0
    assert "resnet18 width 8 last stage 24 expander 32-32" in capsys.readouterr().out
    model = load_checkpoint(run / "checkpoint.pt")["model"]
    assert tuple(model["backbone.layer4.1.conv2.weight"].shape) == (24, 24, 3, 3)
    assert tuple(model["backbone.layer3.1.conv2.weight"].shape) == (32, 32, 3, 3)
    assert tuple(model["projector.0.weight"].shape) == (32, 24)
    for dataset in ("cifar10", "gtsrb"):
        result = json.loads((run / f"probe_{dataset}.json").read_text())
        assert result["feature_dim"] == 24 and result["settings"]["last_width"] == 24


def test_probe_cli_and_random_init_baseline(tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli.main(smoke_args(tiny_data_dir, run, "--no-probe")) == 0
    assert not (run / "probe_cifar10.json").exists()
    assert probe_cli.main(["--run", str(run), "--dataset", "cifar10", "--probe-epochs", "3"]) == 0
    assert probe_cli.main(["--run", str(run), "--dataset", "cifar10", "--random-init"]) == 0
    trained = json.loads((run / "probe_cifar10.json").read_text())
    baseline = json.loads((run / "probe_cifar10_random_init.json").read_text())
    assert trained["settings"]["epochs"] == 3 and trained["checkpoint_epoch"] == 1
    assert baseline["random_init"] and baseline["checkpoint_epoch"] is None
    assert "random init" in capsys.readouterr().out


def test_probe_reaches_full_accuracy_on_separable_features():
    from shared.config import make_config
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 4
    labels = rng.integers(0, 5, 400)
    feats = (centres[labels] + rng.normal(size=(400, 16))).astype(np.float32)
    cfg = make_config({"probe_epochs": 20, "probe_batch_size": 32})
    logits = probe_cli.train_linear(feats[:300], labels[:300], feats[300:], 5, cfg)
    assert (logits.argmax(1) == labels[300:]).mean() == 1.0


class Interrupted(Exception):
    pass


def test_resume_equals_an_uninterrupted_run(tiny_data_dir, tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ("--epochs", "2", "--no-probe", "--precision", "fp32")
    assert train_cli.main(smoke_args(tiny_data_dir, straight, *args)) == 0

    real_save = torch_checkpoint.save_checkpoint

    def save_then_crash(path, state):
        real_save(path, state)
        raise Interrupted  # the process dies right after epoch 1's checkpoint

    monkeypatch.setattr(torch_checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(Interrupted):
        train_cli.main(smoke_args(tiny_data_dir, resumed, *args))
    monkeypatch.setattr(torch_checkpoint, "save_checkpoint", real_save)
    assert train_cli.main(["--resume", "--out", str(resumed)]) == 0

    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(resumed / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["mu"], b["optimizer"]["state"][key]["mu"])
    def strip(path):
        return [{k: v for k, v in json.loads(s).items()
                 if "per_s" not in k and "time" not in k and k != "seconds"}
                for s in (path / "metrics.jsonl").read_text().splitlines()]
    assert strip(straight) == strip(resumed)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_data_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_loss, calls = torch_step.vicreg_loss, []

    def loss_that_diverges(z_a, z_b, **kw):
        calls.append(1)
        loss, terms = real_loss(z_a, z_b, **kw)
        return (loss * float("nan"), terms) if len(calls) == 6 else (loss, terms)

    monkeypatch.setattr(torch_step, "vicreg_loss", loss_that_diverges)
    assert train_cli.main(smoke_args(tiny_data_dir, run, "--epochs", "3")) == 2
    line = error_line(capsys)
    assert f"loss became nan at step 6 (epoch 2); stopped, the checkpoint of epoch 1 stays in " \
           f"{run}" in line
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1


@pytest.mark.parametrize("flags,message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--arch", "resnet19"], "invalid choice: 'resnet19'"),
    (["--mlp", "2048-x-2048"], "malformed expander spec"),
    (["--batch-size", "1"], "at least 2 images per batch"),
    (["--batch-size", "100000"], "larger than the 64 training images"),
    (["--epochs", "two"], "--epochs takes a number, got 'two'"),
])
def test_bad_flags_are_one_line_errors(tiny_data_dir, tmp_path, capsys, flags, message):
    run = tmp_path / "run"
    assert train_cli.main(smoke_args(tiny_data_dir, run, *flags)) == 2
    assert message in error_line(capsys)
    assert not (run / "checkpoint.pt").exists()


def test_missing_dataset_names_path_layout_and_download(tmp_path, capsys):
    assert train_cli.main(smoke_args(tmp_path / "nowhere", tmp_path / "run")) == 2
    line = error_line(capsys)
    assert str(tmp_path / "nowhere") in line and "data_batch_1" in line and "--download" in line
    assert not (tmp_path / "run").exists()


def test_existing_run_is_never_overwritten(tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli.main(smoke_args(tiny_data_dir, run, "--no-probe")) == 0
    before = (run / "checkpoint.pt").read_bytes()
    assert train_cli.main(smoke_args(tiny_data_dir, run, "--no-probe")) == 2
    assert "already holds a run" in error_line(capsys)
    assert (run / "checkpoint.pt").read_bytes() == before
    assert train_cli.main(["--resume", "--out", str(run), "--arch", "resnet34"]) == 2
    assert "cannot resume" in error_line(capsys)
    assert (run / "checkpoint.pt").read_bytes() == before


def test_resume_without_a_run_is_an_error(tmp_path, capsys):
    assert train_cli.main(["--resume", "--out", str(tmp_path / "none")]) == 2
    assert "config.json is missing" in error_line(capsys)
    assert train_cli.main(["--resume"]) == 2
    assert "--resume needs --out" in error_line(capsys)


def test_probe_errors_for_missing_corrupt_and_foreign_checkpoints(tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli.main(smoke_args(tiny_data_dir, run, "--no-probe")) == 0
    ckpt = run / "checkpoint.pt"
    good = ckpt.read_bytes()

    ckpt.write_bytes(good[: len(good) // 2])
    assert probe_cli.main(["--run", str(run)]) == 2
    assert "corrupt or truncated" in error_line(capsys)

    ckpt.unlink()
    assert probe_cli.main(["--run", str(run)]) == 2
    assert "no checkpoint at" in error_line(capsys)

    (run / "checkpoint.msgpack").write_bytes(b"\x80")
    assert probe_cli.main(["--run", str(run)]) == 2
    assert "python -m interop.convert" in error_line(capsys)

    ckpt.write_bytes(good)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "arch": "resnet34"}))
    assert probe_cli.main(["--run", str(run)]) == 2
    assert "another architecture" in error_line(capsys)

    assert probe_cli.main(["--run", str(tmp_path / "missing")]) == 2
    assert "config.json is missing" in error_line(capsys)


def test_views_reach_torch_as_channels_last_without_a_copy():
    from torch_impl.runtime import to_channels_last
    view = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    tensor = to_channels_last(view, torch.device("cpu"))
    assert tensor.shape == (4, 3, 32, 32)
    assert tensor.is_contiguous(memory_format=torch.channels_last)
    assert tensor.data_ptr() == view.ctypes.data
    assert torch.equal(tensor[1, 2], torch.from_numpy(view[1, :, :, 2]))


def test_command_line_error_is_one_line_with_exit_code_2(tmp_path):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "torch_impl.train", "--preset", "nope",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown preset 'nope'; choose one of: default, " \
                                    "homework, cpu, smoke"
    assert not (tmp_path / "run").exists()


def test_compiled_step_is_traced_once_whatever_the_learning_rate(monkeypatch):
    """With --compile a new learning rate each step must not make torch.compile trace again (each
    trace takes seconds on a GPU); dynamo's own eager backend keeps the test fast on a CPU."""
    import torch._dynamo

    from shared.backend import World
    from shared.config import make_config

    compile_for_real = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda fn, **kwargs: compile_for_real(fn, backend="eager", **kwargs))
    cfg = make_config({"preset": "smoke", "compile": True})
    state = torch_step.initial_state(cfg, device=torch.device("cpu"), world=World())
    step = torch_step.make_train_step(cfg, dtype=torch.float32)
    views = [torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
             for _ in range(2)]
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lr in (0.1, 0.2, 0.3):
            state, terms = step(state, views[0], views[1], lr)
    assert torch.isfinite(terms["loss"])


# oneDNN's ISA cap and ATen's kernel choice as on a CPU without AVX-512 (a no-op on one).
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@pytest.mark.parametrize("width", [3, 4])
def test_narrow_networks_train_on_every_cpu_kind(width, tiny_data_dir, tmp_path):
    """Below 8 channels oneDNN's channels_last kernels hang or corrupt memory on AVX2 CPUs. A
    narrow network trains in a subprocess with the default kernels and with AVX2's; the first
    step's loss is the same in both (the same arithmetic, rounding apart; later steps part as
    LARS on a batch of 16 amplifies the rounding)."""
    import os
    import subprocess
    import sys
    losses = {}
    for kind, env in {"default": {}, "avx2": AVX2_ONLY}.items():
        run = tmp_path / kind
        result = subprocess.run(
            [sys.executable, "-m", "torch_impl.train",
             *smoke_args(tiny_data_dir, run, "--width", str(width), "--epochs", "2",
                         "--no-probe")],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-2000:]
        records = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
        losses[kind] = np.array([r["loss"] for r in records if r["kind"] == "step"])
    for kind in losses:
        assert len(losses[kind]) == 8 and np.isfinite(losses[kind]).all(), kind
    np.testing.assert_allclose(losses["avx2"][0], losses["default"][0], rtol=1e-5)

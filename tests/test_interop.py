"""interop: exact round trips through interop.convert, equal features across frameworks, probes
of converted runs, interop.load_backbone, checkpoints that a run outgrew, errors."""
import json
from dataclasses import asdict

import jax
import numpy as np
import pytest
import torch

import interop
import jax_impl
import torch_impl
from interop import convert
from jax_impl import probe as jax_probe
from jax_impl.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from jax_impl.model import build_model, init_variables
from jax_impl.optim import build_optimizer
from shared.config import make_config
from shared.errors import UserError
from torch_impl import probe as torch_probe
from torch_impl import train as torch_train
from torch_impl.checkpoint import load_checkpoint as load_torch
from torch_impl.checkpoint import save_checkpoint as save_torch
from torch_impl.model import VICReg as TorchVICReg
from torch_impl.optim import build_optimizer as build_torch_optimizer

PROGRESS = {"epoch": 3, "global_step": 12, "train_time_s": 5.0, "metrics_bytes": 0}


def config_for(run, data_dir, width=4, last_width=0):
    return make_config({"preset": "smoke", "width": width, "last_width": last_width,
                        "data_dir": str(data_dir), "out": str(run), "epochs": PROGRESS["epoch"]})


def torch_run(run, data_dir, width=4, config_width=None, last_width=0):
    """A torch run folder: config.json and checkpoint.pt of a resnet18 (its last stage last_width
    wide; 0: 8 x width) whose BN statistics moved."""
    torch.manual_seed(0)
    model = TorchVICReg("resnet18", width, [32, 32], last_width=last_width)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32) + 0.5)
    cfg = config_for(run, data_dir, config_width or width, last_width)
    run.mkdir()
    (run / "config.json").write_text(cfg.to_json())
    optimizer = build_torch_optimizer(cfg, model=model)
    save_torch(run / "checkpoint.pt", {"model": model.state_dict(),
                                       "optimizer": optimizer.state_dict(),
                                       "config": asdict(cfg), **PROGRESS})
    return run


def jax_run(run, data_dir):
    """A JAX run folder: config.json and checkpoint.msgpack with random BN statistics."""
    cfg = config_for(run, data_dir)
    variables = init_variables(build_model(cfg.arch, cfg.width, cfg.mlp_dims()), seed=5)
    rng = np.random.default_rng(5)
    stats = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
                         if s.dtype == np.float32
                         else np.full(s.shape, 7, s.dtype), variables["batch_stats"])
    run.mkdir()
    (run / "config.json").write_text(cfg.to_json())
    save_checkpoint(run / CHECKPOINT_FILE, {
        "params": variables["params"], "batch_stats": stats,
        "opt_state": build_optimizer(cfg).init(variables["params"]), "config": asdict(cfg),
        **PROGRESS})
    return run


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def probe_features_of_both(cfg, run, count):
    """(jax_impl's probe features, torch_impl's, the checkpoint's epoch) of `count` random uint8
    images, each framework reading `run` as its probe does."""
    images = np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), np.uint8)
    (backbone, variables), epoch = jax_probe.backbone_to_probe(cfg, run, random_init=False)
    with jax.default_matmul_precision("highest"):
        mine = jax_probe.extract_features(backbone, variables, images, "jax")
    torch_backbone, _ = torch_probe.backbone_to_probe(cfg, run, random_init=False)
    return mine, torch_probe.extract_features(torch_backbone, images, cfg, "torch"), epoch


def test_torch_to_flax_to_torch_is_exact(tiny_data_dir, tmp_path, capsys):
    run, back = torch_run(tmp_path / "run", tiny_data_dir), tmp_path / "back"
    assert convert.main([str(run), "--to", "flax"]) == 0
    assert "optimizer state not converted" in capsys.readouterr().out
    assert convert.main([str(run), "--to", "torch", "--out", str(back)]) == 0
    assert (back / "config.json").read_bytes() == (run / "config.json").read_bytes()
    original, restored = load_torch(run / "checkpoint.pt"), load_torch(back / "checkpoint.pt")
    assert list(restored["model"]) == list(original["model"])
    for key, tensor in original["model"].items():
        assert restored["model"][key].dtype == tensor.dtype, key
        assert torch.equal(restored["model"][key], tensor), key
    assert ({k: restored[k] for k in [*PROGRESS, "config"]}
            == {k: original[k] for k in [*PROGRESS, "config"]})
    assert restored["optimizer"]["state"] == {}  # weights only: a fresh optimizer

    flax = load_checkpoint(run / CHECKPOINT_FILE)  # the layouts, by hand
    weight = original["model"]["backbone.layer2.0.conv1.weight"].numpy()  # OIHW
    np.testing.assert_array_equal(flax["params"]["backbone"]["layer2"]["0"]["conv1"]["kernel"],
                                  weight.transpose(2, 3, 1, 0))
    linear = original["model"]["projector.3.weight"].numpy()  # [out, in]
    np.testing.assert_array_equal(flax["params"]["projector"]["3"]["kernel"], linear.T)
    bn = flax["batch_stats"]["backbone"]["layer1"]["1"]["bn2"]
    np.testing.assert_array_equal(bn["running_var"],
                                  original["model"]["backbone.layer1.1.bn2.running_var"])
    assert bn["num_batches_tracked"] == 1
    assert flax["epoch"] == 3 and flax["config"] == original["config"]


def test_flax_to_torch_features_match_and_both_probes_read_it(tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 parity on a GPU too
    run = jax_run(tmp_path / "run", tiny_data_dir)
    assert convert.main([str(run), "--to", "torch"]) == 0
    mine, theirs, epoch = probe_features_of_both(config_for(run, tiny_data_dir), run, 20)
    assert mine.shape == theirs.shape == (20, 32) and epoch == 3
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())

    results = {}
    # the first probe owns probe_cifar10.json; the other framework's gets its own file
    for name, module, file in (("torch", torch_probe, "probe_cifar10.json"),
                               ("jax", jax_probe, "probe_cifar10_jax.json")):
        assert module.main(["--run", str(run), "--dataset", "cifar10", "--probe-epochs", "2",
                            "--data-dir", str(tiny_data_dir)]) == 0
        results[name] = json.loads((run / file).read_text())
    assert results["torch"].keys() == results["jax"].keys()
    assert (results["torch"]["framework"], results["jax"]["framework"]) == ("torch", "jax")
    for key in ("num_train", "num_test", "feature_dim", "checkpoint_epoch", "settings", "protocol"):
        assert results["torch"][key] == results["jax"][key], key


def test_torch_run_converted_to_flax_is_probed_by_jax(tiny_data_dir, tmp_path):
    run = torch_run(tmp_path / "run", tiny_data_dir)
    assert convert.main([str(run), "--to", "flax"]) == 0
    assert jax_probe.main(["--run", str(run), "--dataset", "gtsrb", "--probe-epochs", "2",
                           "--data-dir", str(tiny_data_dir)]) == 0
    result = json.loads((run / "probe_gtsrb.json").read_text())
    assert ((result["framework"], result["checkpoint_epoch"], result["num_classes"])
            == ("jax", 3, 43))


def test_a_wider_last_stage_converts_and_both_frameworks_embed_it_alike(tiny_data_dir, tmp_path):
    run = torch_run(tmp_path / "run", tiny_data_dir, last_width=12)
    assert convert.main([str(run), "--to", "flax"]) == 0
    kernel = load_checkpoint(run / CHECKPOINT_FILE)["params"]["backbone"]["layer4"]["0"]["conv1"]
    assert kernel["kernel"].shape == (3, 3, 16, 12)  # HWIO: layer 3's 16 channels to 12
    mine, theirs, _ = probe_features_of_both(config_for(run, tiny_data_dir, last_width=12), run,
                                             10)
    assert mine.shape == theirs.shape == (10, 12)
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_a_probe_by_the_other_framework_keeps_the_trained_runs_result(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    assert torch_train.main(["--preset", "smoke", "--width", "4", "--data-dir", str(tiny_data_dir),
                             "--out", str(run), "--probe-epochs", "2"]) == 0
    own = (run / "probe_cifar10.json").read_bytes()
    assert convert.main([str(run), "--to", "flax"]) == 0
    for random_init in ([], ["--random-init"]):
        assert jax_probe.main(["--run", str(run), "--dataset", "cifar10", "--probe-epochs", "2",
                               *random_init]) == 0
    assert (run / "probe_cifar10.json").read_bytes() == own
    assert json.loads((run / "probe_cifar10_jax.json").read_text())["framework"] == "jax"
    assert json.loads((run / "probe_cifar10_random_init_jax.json").read_text())["random_init"]


def test_refuses_to_overwrite_unless_forced(tiny_data_dir, tmp_path, capsys):
    run = torch_run(tmp_path / "run", tiny_data_dir)
    assert convert.main([str(run), "--to", "flax"]) == 0
    before = (run / CHECKPOINT_FILE).read_bytes()
    assert convert.main([str(run), "--to", "flax"]) == 2
    assert "already exists; pass --force" in error_line(capsys)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert convert.main([str(run), "--to", "flax", "--out", str(other)]) == 2
    assert "holds other settings" in error_line(capsys)
    assert convert.main([str(run), "--to", "flax", "--force"]) == 0
    assert (run / CHECKPOINT_FILE).read_bytes() == before


@pytest.mark.parametrize("case,args,message", [
    ("wrong direction", ["--to", "flax"],
     "holds a flax checkpoint (checkpoint.msgpack) and no torch one"),
    ("other architecture", ["--to", "flax"], "does not fit resnet18 width 8 expander 32-32"),
    ("corrupt", ["--to", "flax"], "is corrupt or truncated"),
    ("no run folder", ["--to", "flax"], "config.json is missing"),
    ("bad target", ["--to", "tf"], "invalid choice: 'tf'"),
])
def test_bad_input(case, args, message, tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    if case == "wrong direction":
        jax_run(run, tiny_data_dir)
    elif case == "other architecture":
        torch_run(run, tiny_data_dir, width=4, config_width=8)
    elif case == "corrupt":
        torch_run(run, tiny_data_dir)
        blob = (run / "checkpoint.pt").read_bytes()
        (run / "checkpoint.pt").write_bytes(blob[:len(blob) // 3])
    assert convert.main([str(run), *args]) == 2
    assert message in error_line(capsys)
    assert not (run / CHECKPOINT_FILE).exists() or case == "wrong direction"


def test_help_says_the_optimizer_state_does_not_convert():
    assert "the optimizer state does not" in " ".join(convert.build_parser().format_help().split())


def test_load_backbone_reads_either_frameworks_run_into_either(tiny_data_dir, tmp_path):
    images = np.random.default_rng(1).normal(size=(6, 32, 32, 3)).astype(np.float32)
    for make, own in ((torch_run, "torch"), (jax_run, "jax")):
        run = make(tmp_path / own, tiny_data_dir)
        torch_backbone = interop.load_backbone(run, framework="torch")
        module, variables = interop.load_backbone(run, framework="jax")
        with torch.no_grad():
            theirs = torch_backbone(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        with jax.default_matmul_precision("highest"):
            mine = np.asarray(module.apply(variables, images, train=False))
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
        own_loader = {"torch": torch_impl.load_backbone, "jax": jax_impl.load_backbone}[own]
        assert own_loader(run) is not None
    with pytest.raises(UserError, match="convert it with: python -m interop.convert"):
        jax_impl.load_backbone(tmp_path / "torch")  # its own loader reads its own checkpoints


def test_a_checkpoint_the_run_outgrew_is_refused_until_converted_again(tiny_data_dir, tmp_path,
                                                                        capsys):
    run = tmp_path / "run"
    train = ["--preset", "smoke", "--width", "4", "--data-dir", str(tiny_data_dir), "--out",
             str(run), "--no-probe"]
    assert torch_train.main(train) == 0
    assert convert.main([str(run), "--to", "flax"]) == 0
    assert jax_probe.main(["--run", str(run), "--probe-epochs", "1"]) == 0  # up to date
    assert torch_train.main(["--resume", "--out", str(run), "--epochs", "2"]) == 0
    capsys.readouterr()
    stale = (f"{run}/checkpoint.msgpack holds step 4, the run's checkpoint.pt step 8 (it "
             f"trained on after a conversion); convert again with: python -m interop.convert "
             f"{run} --to flax --force")
    assert jax_probe.main(["--run", str(run), "--probe-epochs", "1"]) == 2
    assert error_line(capsys) == f"error: {stale}"
    with pytest.raises(UserError, match="holds step 4"):
        jax_impl.load_backbone(run)
    module, variables = interop.load_backbone(run, framework="jax")  # the newer, converted
    expected = interop.load_backbone(run, framework="torch")
    images = np.zeros((2, 32, 32, 3), np.float32)
    with torch.no_grad():
        want = expected(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(np.asarray(module.apply(variables, images, train=False)), want,
                               rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert convert.main([str(run), "--to", "flax", "--force"]) == 0
    assert jax_probe.main(["--run", str(run), "--probe-epochs", "1"]) == 0


def test_the_conversion_command_runs_without_a_warning(tiny_data_dir, tmp_path):
    import subprocess
    import sys
    run = torch_run(tmp_path / "run", tiny_data_dir)
    result = subprocess.run([sys.executable, "-m", "interop.convert", str(run), "--to", "flax"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Warning" not in result.stderr, result.stderr


def test_a_checkpoint_converted_before_checkpoints_json_is_refused_once_the_run_moves_on(
        tiny_data_dir, tmp_path, capsys):
    """A folder converted by an earlier version has no checkpoints.json; when the trainer goes on
    it records its own step only, and the converted checkpoint, of an unknown step, is refused."""
    run = tmp_path / "run"
    assert torch_train.main(["--preset", "smoke", "--width", "4", "--data-dir",
                             str(tiny_data_dir), "--out", str(run), "--no-probe"]) == 0
    assert convert.main([str(run), "--to", "flax"]) == 0
    (run / "checkpoints.json").unlink()  # as an earlier version left the folder
    assert jax_probe.main(["--run", str(run), "--probe-epochs", "1"]) == 0
    assert torch_train.main(["--resume", "--out", str(run), "--epochs", "2"]) == 0
    capsys.readouterr()
    assert jax_probe.main(["--run", str(run), "--probe-epochs", "1"]) == 2
    assert "checkpoint.msgpack holds an unrecorded step, the run's checkpoint.pt step 8" in \
        error_line(capsys)

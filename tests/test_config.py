"""shared.config: presets, flag precedence, config.json round trip, and bad settings."""
import json

import pytest

from shared.cli import build_train_parser, parse_train_args
from shared.config import PRESETS, Config, make_config, parse_mlp
from shared.errors import UserError
from shared.runio import load_run_config


def test_defaults_are_solo_learns_cifar_recipe():
    cfg = make_config({})
    assert (cfg.arch, cfg.width, cfg.mlp, cfg.epochs, cfg.batch_size) == \
        ("resnet18", 64, "2048-2048-2048", 1000, 256)
    assert (cfg.optimizer, cfg.base_lr, cfg.lars_eta, cfg.wd) == ("lars", 0.3, 0.02, 1e-4)
    assert (cfg.warmup_epochs, cfg.final_lr_ratio, cfg.schedule_unit) == (10.0, 0.001, "step")
    assert (cfg.solarize_p, cfg.blur_p, cfg.loss_variant) == (0.1, 0.0, "solo-learn")
    assert cfg.peak_lr() == pytest.approx(0.3)
    assert make_config({"batch_size": 1024}).peak_lr() == pytest.approx(1.2)


def test_homework_preset_is_the_seed_course():
    cfg = make_config({"preset": "homework"})
    assert (cfg.batch_size, cfg.epochs, cfg.optimizer, cfg.base_lr, cfg.wd) == \
        (512, 100, "adam", 2e-4, 1e-6)
    assert (cfg.blur_p, cfg.blur_kernel, cfg.solarize_p, cfg.loss_variant) == \
        (0.5, 3, 0.2, "no-eps")
    assert cfg.schedule_unit == "epoch" and cfg.peak_lr() == 2e-4


def test_flags_override_the_preset_and_keep_the_rest():
    cfg, resume = parse_train_args(["--preset", "cpu", "--epochs", "3", "--no-probe",
                                    "--std-coeff", "10"], "torch")
    assert not resume
    assert (cfg.epochs, cfg.probe, cfg.std_coeff) == (3, False, 10.0)
    assert cfg.width == PRESETS["cpu"]["width"] and cfg.out == "runs/torch-cpu"


def test_every_field_has_a_flag_with_help_naming_its_default():
    help_text = build_train_parser("torch").format_help()
    for flag in ("--arch", "--mlp", "--epochs", "--batch-size", "--base-lr", "--wd",
                 "--sim-coeff", "--std-coeff", "--cov-coeff", "--preset", "--resume"):
        assert flag in help_text
    assert "(default: 1000)" in help_text and "homework:" in help_text


def test_the_help_follows_the_dataset_and_names_what_the_tools_write():
    from shared import report, sweep
    from shared.report_figures import FIGURES

    def said(parser, dest):
        action = next(a for a in parser._actions if a.dest == dest)
        return " ".join(action.help.split())

    train = build_train_parser("torch")
    for dest in ("monitor_bank", "monitor_test", "probe"):
        assert "CIFAR-10" not in said(train, dest) and "run's dataset" in said(train, dest)
    assert "--time-budget" in said(train, "resume") and "--monitor-k" in said(train, "resume")
    data_dirs = said(sweep.build_sweep_parser(), "data_dir")
    assert all(part in data_dirs for part in ("cifar-100-python/", "stl10_binary/", "gtsrb/"))
    figures = said(report.build_report_parser(), "out")
    assert all(f"<name>_{figure}.png" in figures for figure in FIGURES)


def test_config_json_round_trip(tmp_path):
    cfg = make_config({"preset": "smoke", "std_coeff": 5.0})
    (tmp_path / "config.json").write_text(cfg.to_json())
    assert load_run_config(tmp_path) == cfg
    assert json.loads(cfg.to_json())["std_coeff"] == 5.0


def test_a_cpu_run_from_before_last_width_keeps_its_narrow_last_stage(tmp_path):
    stored = json.loads(make_config({"preset": "cpu"}).to_json())
    assert stored.pop("last_width") == 256
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert load_run_config(tmp_path).last_width == 0


def test_resume_reads_the_stored_config_and_applies_new_flags(tmp_path):
    cfg = make_config({"preset": "smoke", "out": str(tmp_path)})
    (tmp_path / "config.json").write_text(cfg.to_json())
    resumed, resume = parse_train_args(["--resume", "--out", str(tmp_path), "--epochs", "5"], "jax")
    assert resume and resumed.epochs == 5 and resumed.width == cfg.width


@pytest.mark.parametrize("overrides,message", [
    ({"preset": "fast"}, "unknown preset"),
    ({"arch": "vgg"}, "unknown arch"),
    ({"mlp": "2048--2048"}, "malformed expander spec"),
    ({"mlp": "0-8"}, "malformed expander spec"),
    ({"batch_size": 1}, "at least 2"),
    ({"blur_kernel": 4}, "odd"),
    ({"optimizer": "sgd"}, "unknown optimizer"),
    ({"nonsense": 1}, "unknown setting"),
    ({"std_coeff": -1.0}, r"--std-coeff -1.0: must be 0 or more"),
    ({"flip_p": 2.0}, r"--flip-p 2.0: must be a probability in \[0, 1\]"),
    ({"gray_p": -1.0}, r"--gray-p -1.0: must be a probability in \[0, 1\]"),
    ({"crop_min_scale": 5.0}, r"--crop-min-scale 5.0: must lie in \(0, 1\]"),
    ({"epochs": 10, "warmup_epochs": 20.0}, r"--warmup-epochs 20 is longer than the run "
                                            r"\(--epochs 10\)"),
    ({"base_lr": float("nan")}, "--base-lr nan: must be a finite number"),
    ({"base_lr": float("inf")}, "--base-lr inf: must be a finite number"),
    ({"base_lr": 0.0}, "--base-lr 0.0: must be positive"),
    ({"probe_lr": float("nan")}, "--probe-lr nan: must be a finite number"),
    ({"probe_subset": 10}, "--probe-subset 10: must be 0 .all. or from 43"),
    ({"momentum": 1.0}, r"--momentum 1.0: must lie in \[0, 1\)"),
    ({"seed": -1}, "--seed -1: must be 0 or more"),
    ({"epochs": "2"}, "--epochs takes a number, got '2'"),
    ({"width": 1.5}, "--width takes an integer, got 1.5"),
    ({"last_width": -8}, "--last-width -8: must be 0 or more"),
])
def test_bad_settings_raise_user_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        make_config(overrides)


def test_bad_config_json_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_run_config(tmp_path)


def test_parse_mlp():
    assert parse_mlp("2048-2048-2048") == [2048, 2048, 2048]
    assert parse_mlp("64") == [64]
    assert Config().mlp_dims() == [2048, 2048, 2048]


def test_abbreviated_flags_are_refused():
    with pytest.raises(UserError, match="unrecognized arguments: --epoch 2"):
        parse_train_args(["--epoch", "2"], "torch")


def test_every_setting_declares_its_help_and_role_next_to_it():
    from dataclasses import fields

    from shared.config import BACKBONE, PRETRAINING, PROBE, RUN
    for f in fields(Config):
        assert f.metadata["help"] and f.metadata["role"] in (BACKBONE, PRETRAINING, PROBE, RUN)


def test_a_config_json_with_a_bad_value_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"flip_p": 3}))
    with pytest.raises(UserError, match=r"config.json: --flip-p 3: must be a probability"):
        load_run_config(tmp_path)


def test_the_former_name_of_a_loss_variant_is_still_read(tmp_path):
    """The loss variant the seed course called homework is no-eps now; flags, a sweep's
    KEY=VALUE and the config.json of earlier runs still say homework."""
    from shared.cli import parse_train_args
    from shared.runio import load_run_config
    assert make_config({"loss_variant": "homework"}).loss_variant == "no-eps"
    cfg, _ = parse_train_args(["--loss-variant", "homework", "--out", str(tmp_path / "r")], "torch")
    assert cfg.loss_variant == "no-eps"
    stored = json.loads(make_config({}).to_json())
    (tmp_path / "config.json").write_text(json.dumps({**stored, "loss_variant": "homework"}))
    assert load_run_config(tmp_path).loss_variant == "no-eps"

"""shared.runio: atomic writes, metrics log roll-back, and run-folder protection."""
import json

import pytest

from shared.config import make_config
from shared.errors import UserError
from shared.runio import (MetricsLog, atomic_write_bytes, prepare_run_dir, probe_result_path,
                          read_metrics)


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_metrics_log_appends_and_truncates_to_a_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    log.write({"step": 1, "loss": 2.0})
    mark = log.size()
    log.write({"step": 2, "loss": float("nan")})
    assert read_metrics(tmp_path)[1]["loss"] is None  # valid JSON, not NaN
    log.truncate(mark)
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]


def test_prepare_run_dir_writes_config_and_refuses_to_overwrite(tmp_path):
    cfg = make_config({"out": str(tmp_path / "run")})
    run = prepare_run_dir(cfg, False, "checkpoint.pt")
    assert json.loads((run / "config.json").read_text())["out"] == str(tmp_path / "run")
    with pytest.raises(UserError, match="already holds a run"):
        prepare_run_dir(cfg, False, "checkpoint.pt")
    with pytest.raises(UserError, match="no checkpoint.pt"):
        prepare_run_dir(cfg, True, "checkpoint.pt")


def test_probe_result_names(tmp_path):
    assert probe_result_path(tmp_path, "gtsrb", False).name == "probe_gtsrb.json"
    assert probe_result_path(tmp_path, "cifar10", True).name == "probe_cifar10_random_init.json"

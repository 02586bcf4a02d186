"""--augment-on: both trainers train the same on views computed on the device as on the host, and
resume exactly either way (on the CPU)."""
import json

import pytest

from jax_impl import train as jax_train
from jax_impl.backend import Backend as JaxBackend
from parity_tests.tolerances import AUGMENTED_TRAINING
from shared.backend import augments_on_device
from shared.config import make_config
from torch_impl import train as torch_train
from torch_impl.backend import Backend as TorchBackend

TRAINERS = {"torch": torch_train, "jax": jax_train}
BACKENDS = {"torch": TorchBackend, "jax": JaxBackend}


def gentle(data_dir, out, *extra):
    """8 smoke steps with small Adam steps, so that two runs' losses part only slowly."""
    return ["--preset", "smoke", "--width", "4", "--data-dir", str(data_dir), "--out", str(out),
            "--epochs", "2", "--no-probe", "--optimizer", "adam", "--base-lr", "1e-4",
            "--no-lr-scaling", *extra]


def losses(run) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] in ("step", "epoch")]


@pytest.mark.parametrize("framework", TRAINERS)
def test_views_on_the_device_train_like_views_on_the_host(framework, tiny_data_dir, tmp_path):
    trainer = TRAINERS[framework]
    runs = {place: tmp_path / place for place in ("host", "device")}
    for place, run in runs.items():
        assert trainer.main(gentle(tiny_data_dir, run, "--augment-on", place)) == 0
    host, device = losses(runs["host"]), losses(runs["device"])
    assert len(host) == len(device) == 10  # 8 step lines and 2 epoch lines
    gaps = [abs(h - d) / abs(h) for h, d in zip(host, device)]
    assert gaps[0] <= 1e-5, gaps
    assert max(gaps) <= AUGMENTED_TRAINING, gaps


@pytest.mark.parametrize("framework", TRAINERS)
def test_a_run_on_device_views_resumes_exactly(framework, tiny_data_dir, tmp_path, monkeypatch):
    trainer = TRAINERS[framework]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert trainer.main(gentle(tiny_data_dir, straight, "--augment-on", "device")) == 0
    backend = BACKENDS[framework]
    real_step = backend.train_step

    def stop_in_epoch_two(self, state, batch, lr):
        if batch.epoch == 1:
            raise KeyboardInterrupt
        return real_step(self, state, batch, lr)

    monkeypatch.setattr(backend, "train_step", stop_in_epoch_two)
    assert trainer.main(gentle(tiny_data_dir, resumed, "--augment-on", "device")) == 130
    monkeypatch.setattr(backend, "train_step", real_step)
    assert trainer.main(["--resume", "--out", str(resumed)]) == 0
    assert losses(straight) == losses(resumed)


def test_auto_computes_the_views_on_a_gpu_only():
    assert augments_on_device(make_config({"augment_on": "auto"}), on_gpu=True)
    assert not augments_on_device(make_config({"augment_on": "auto"}), on_gpu=False)
    assert augments_on_device(make_config({"augment_on": "device"}), on_gpu=False)
    assert not augments_on_device(make_config({"augment_on": "host"}), on_gpu=True)

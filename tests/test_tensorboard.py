"""--tensorboard: both trainers write the curves and the probe results as TensorBoard events, read
back here with the tensorboard package's own reader; a resume shows each step once; without the
package the flag is a one-line error."""
import json
import sys
from pathlib import Path

import pytest

from jax_impl import train as jax_train
from shared.tensorboard import FOLDER, SCALARS
from torch_impl import train as torch_train
from torch_impl.backend import Backend as TorchBackend

TRAINERS = {"torch": torch_train, "jax": jax_train}


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows for RUN_DIR/tensorboard/: tag -> [(step, value)], read with the
    tensorboard package's own reader (orphaned steps of an interrupted attempt purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(Path(run_dir) / FOLDER), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def smoke(data_dir, out, *extra):
    return ["--preset", "smoke", "--width", "4", "--data-dir", str(data_dir), "--out", str(out),
            "--probe-epochs", "2", "--tensorboard", *extra]


def logged_steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "step"]


@pytest.mark.parametrize("framework", TRAINERS)
def test_the_curves_and_the_probes_are_written_as_events(framework, tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    assert TRAINERS[framework].main(smoke(tiny_data_dir, run, "--epochs", "2")) == 0
    scalars = read_scalars(run)
    assert set(SCALARS) | {"knn_top1", "probe/cifar10_top1", "probe/gtsrb_top1"} == set(scalars)
    for tag in SCALARS:
        assert [step for step, _ in scalars[tag]] == logged_steps(run) == list(range(1, 9))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "step"]
    assert [value for _, value in scalars["loss"]] == pytest.approx(losses, rel=1e-6)
    summary = json.loads((run / "summary.json").read_text())
    assert scalars["probe/cifar10_top1"] == [(8, pytest.approx(summary["probe"]["cifar10"]))]


def test_a_resumed_run_shows_each_step_once(tiny_data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save = TorchBackend.save_checkpoint

    def stop_late_in_epoch_two(self, path, state, progress):
        if progress["epoch"] == 2:  # epoch 2 has trained: it logs steps 5-8 to TensorBoard...
            raise KeyboardInterrupt  # ...and dies before epoch 2's checkpoint
        real_save(self, path, state, progress)

    monkeypatch.setattr(TorchBackend, "save_checkpoint", stop_late_in_epoch_two)
    assert torch_train.main(smoke(tiny_data_dir, run, "--epochs", "3", "--no-probe")) == 130
    monkeypatch.setattr(TorchBackend, "save_checkpoint", real_save)
    assert torch_train.main(["--resume", "--out", str(run)]) == 0
    scalars = read_scalars(run)
    assert [step for step, _ in scalars["loss"]] == list(range(1, 13)) == logged_steps(run)
    assert len(list((run / "tensorboard").iterdir())) == 2  # one event file per attempt


def test_without_the_package_the_flag_is_one_line(tiny_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    assert torch_train.main(smoke(tiny_data_dir, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.strip() == ('error: --tensorboard needs the tensorboard package: '
                           'pip install -e ".[tensorboard]"')
    assert not (tmp_path / "run").exists()

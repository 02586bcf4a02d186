"""bench/: every row of bench/throughput.py measures on a CPU, and the GPU check runs end to end
(in its quick form, on the CPU) and prints its table."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def gpu_check(data_dir, out, *flags) -> str:
    """bash bench/gpu_check.sh DATA_DIR --quick FLAGS (writing under `out`): its stdout."""
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(data_dir),
                             "--quick", *flags], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "GPU_CHECK_DIR": str(out)})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def throughput_rows(*groups: str) -> dict[str, float]:
    """bench/throughput.py's rows of `groups` at the smoke preset's size, one timed step each:
    row name -> pairs/s. A row that failed is an AssertionError naming it."""
    result = subprocess.run([sys.executable, str(REPO / "bench" / "throughput.py"), "--preset",
                             "smoke", "--steps", "1", "--rows", ",".join(groups)],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in result.stdout.splitlines()
             if line.startswith("| ") and not line.startswith("| path")]
    failed = [row[0] for row in cells if row[1].startswith("failed")]
    assert not failed, result.stdout
    return {row[0]: float(row[1]) for row in cells}


def test_every_row_of_the_throughput_bench_measures_on_a_cpu():
    rows = throughput_rows("steps", "jax", "trainers", "augment")
    expected = ["torch eager fp32 NCHW (baseline)", "torch channels_last bf16 autocast",
                "jax jit fp32, lax conv", "jax jit bf16 compute, im2col conv",
                *(f"{fw}_impl.train {path}" for fw in ("torch", "jax") for path in (
                    "step alone (its default path)", "end to end, views on the host",
                    "end to end, views on the device")),
                "augmentation alone: jax_impl.augment on the device"]
    assert all(rows.get(name, 0) > 0 for name in expected), rows
    assert len(rows) == 16


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_compile_rows_measure_on_a_cpu():
    assert len(throughput_rows("compile")) == 3


def test_the_step_parts_bench_times_each_part_in_both_frameworks():
    result = subprocess.run([sys.executable, str(REPO / "bench" / "step_parts.py"), "--preset",
                             "smoke", "--steps", "2"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {cells[0]: [float(c.rstrip("x%")) for c in cells[1:]] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in result.stdout.splitlines()
             if line.startswith("| ") and not line.startswith("| part"))}
    assert list(rows) == ["forward (two views)", "backward", "forward and backward", "whole step"]
    torch_step, jax_step = rows["whole step"][0], rows["whole step"][2]
    # a step runs the forward pass and more: longer than the forward pass alone in each framework
    assert torch_step > rows["forward (two views)"][0] > 0
    assert jax_step > rows["forward (two views)"][2] > 0
    assert rows["whole step"][4] == pytest.approx(jax_step / torch_step, rel=0.05)


@pytest.mark.parametrize("flag", ["--steps", "--batch-size"])
def test_the_step_parts_bench_refuses_a_count_below_one(flag):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "step_parts.py"), flag, "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"{flag} must be at least 1" in result.stderr.splitlines()[-1]


def run_rows(out: str) -> dict[str, list[str]]:
    """The report's training-run rows: run name -> its cells."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and line.count("|") == 8]
    return {cells[0]: cells for cells in rows if cells[0] != "run"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_gpu_check_speed_mode_runs_every_step_and_prints_one_table(tiny_data_dir, tmp_path):
    out = gpu_check(tiny_data_dir, tmp_path)
    for step in ("bench", "torch-3-epochs", "jax-3-epochs"):
        assert f"{step}: exit 0 after" in out, out
    for row in ("| torch_impl.train end to end, views on the device |",
                "| jax_impl.train end to end, views on the host |",
                "| augmentation alone: jax_impl.augment on the device |"):
        assert row in out, out
    assert set(run_rows(out)) == {"torch-3-epochs", "jax-3-epochs"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_gpu_check_train_mode_trains_to_a_budget_and_probes(tiny_data_dir, tmp_path):
    out = gpu_check(tiny_data_dir, tmp_path, "--mode", "train", "--framework", "jax")
    assert "jax-60s: exit 0 after" in out, out
    row = run_rows(out)["jax-60s"]
    assert row[5].endswith("%") and row[6].endswith("%"), row  # its kNN point and its probe


def test_the_gpu_check_refuses_an_unknown_mode_in_one_line(tmp_path):
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--mode", "fast"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "GPU_CHECK_DIR": str(tmp_path)})
    assert (result.returncode, result.stdout.strip()) == \
        (2, "error: --mode is speed or train, not 'fast'")


def test_the_jpeg_copy_of_cifar10_is_laid_out_as_the_pickles(tmp_path):
    import io

    from PIL import Image

    from bench.layout_cifar10 import layout

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 10), ("test", 5)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        blobs = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")  # lossless, so pixels can be compared
            blobs.append(np.frombuffer(buffer.getvalue(), np.uint8))
        arrays[f"{split}_jpeg"] = np.concatenate(blobs)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs])
        arrays[f"y_{split}"] = rng.integers(0, 10, n).astype(np.uint8)
        arrays[f"{split}_images"] = images
    source = tmp_path / "source"
    source.mkdir()
    np.savez(source / "cifar10_jpeg.npz", **{k: v for k, v in arrays.items() if "images" not in k})
    data = layout(source, tmp_path / "data")
    from shared.data import load_split
    for split in ("train", "test"):
        images, labels = load_split("cifar10", data, split)
        np.testing.assert_array_equal(images, arrays[f"{split}_images"])
        np.testing.assert_array_equal(labels, arrays[f"y_{split}"])
    assert layout(data, tmp_path / "elsewhere") == data  # pickles are used where they are
    with open(data / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        assert len(pickle.load(f)[b"labels"]) == 2

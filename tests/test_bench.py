"""bench/: the GPU check runs end to end (in its quick form, on the CPU) and prints its table."""
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_gpu_check_runs_every_step_and_prints_one_table(tiny_data_dir, tmp_path):
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tiny_data_dir),
                             "--quick"], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "GPU_CHECK_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for step in ("bench", "torch-3-epochs", "jax-3-epochs", "torch-probe"):
        assert f"{step}: exit 0 after" in out, out
    for row in ("| torch_impl.train end to end, views on the device |",
                "| jax_impl.train end to end, views on the host |",
                "| augmentation alone: jax_impl.augment on the device |"):
        assert row in out, out
    runs = {line.split("|")[1].strip(): line for line in out.splitlines()
            if line.startswith("| ") and ("-3-epochs" in line or "torch-probe" in line)}
    assert set(runs) == {"torch-3-epochs", "jax-3-epochs", "torch-probe"}
    assert runs["torch-probe"].rstrip(" |").endswith("%")  # its CIFAR-10 probe ran


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

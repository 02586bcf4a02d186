"""Fixtures that build tiny CIFAR-10 and GTSRB datasets in their real on-disk layouts, so tests run
offline.

    tiny_data / tiny_data_dir   a session-wide folder with cifar-10-batches-py/ and gtsrb/ (treat it
                                as read-only)
    make_images                 callable: class-structured random images
    write_cifar10, write_gtsrb  callables that write custom datasets in the standard layouts
    real_data_dir               $VICREG_DATA_DIR, or the test is skipped
    in_process_launcher         a shared.sweep launcher that runs commands in this process,
                                recording them
    smoke_sweep                 a finished shared.sweep folder of 3 smoke runs (read-only), and its
                                launcher

Images are structured by class (a class colour, stripes whose direction and period depend on the
class, plus noise), so a short self-supervised train followed by a linear probe beats chance.
"""
import colorsys
import csv
import importlib
import os
import pickle
import shlex
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# (width, height) of the tiny GTSRB images, cycled: smaller, larger and exactly 32x32 (no resize).
GTSRB_SIZES = ((30, 34), (40, 40), (32, 32))


@dataclass(frozen=True)
class TinyData:
    """A built tiny dataset folder and the arrays written into it, in the order a loader returns
    them."""

    root: Path
    cifar10: dict  # split -> (images uint8 [N, 32, 32, 3], labels int64 [N])
    # split -> (list of uint8 [h, w, 3] images at their written sizes, labels int64 [N])
    gtsrb: dict


def _make_images(labels, rng, size=(32, 32)) -> np.ndarray:
    """Images uint8 [N, height, width, 3] for int labels [N]; size is (width, height)."""
    width, height = size
    labels = np.asarray(labels)
    hue = (labels * 0.618034) % 1.0  # golden-ratio steps keep up to 43 class colours apart
    colour = np.array([colorsys.hsv_to_rgb(h, 0.7, 0.8) for h in hue]).reshape(-1, 1, 1, 3) * 255
    yy, xx = np.mgrid[0:height, 0:width]
    period = 2 + (labels // 2) % 6
    # Horizontal or vertical stripes only, so a horizontal flip keeps the class pattern.
    coord = np.where((labels % 2 == 0)[:, None, None], xx[None], yy[None])
    stripes = 40.0 * np.sign(np.sin(2 * np.pi * coord / period[:, None, None]))[..., None]
    noise = rng.normal(0.0, 25.0, (len(labels), height, width, 3))
    return np.clip(colour + stripes + noise, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """Many tests compile the same few jitted steps (the smoke preset's, in both frameworks'
    runs): XLA reloads each from one disk cache for the whole session, subprocesses included."""
    import jax

    folder = str(tmp_path_factory.getbasetemp() / "jax-cache")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield


def _write_cifar10_batch(path: Path, images: np.ndarray, labels, batch_label: str) -> None:
    # The CIFAR-10 python format: rows of 3072 uint8, the R plane then G then B, each 32x32
    # row-major.
    data = np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2).reshape(len(images), 3072))
    names = [f"img_{i:05d}.png".encode() for i in range(len(images))]
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": batch_label.encode(), b"labels": [int(y) for y in labels],
                     b"data": data, b"filenames": names}, f, protocol=2)


def _write_cifar10(root, images_train, labels_train, images_test, labels_test) -> Path:
    """Write root/cifar-10-batches-py/ (data_batch_1..5 splitting the train arrays, test_batch,
    batches.meta).

    images: uint8 [N, 32, 32, 3] NHWC RGB; labels: int [N]. Returns the cifar-10-batches-py folder.
    """
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(images_train)), 5)
    for b, idx in enumerate(chunks, start=1):
        _write_cifar10_batch(folder / f"data_batch_{b}", images_train[idx],
                             np.asarray(labels_train)[idx], f"training batch {b} of 5")
    _write_cifar10_batch(folder / "test_batch", images_test, labels_test, "testing batch 1 of 1")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                     "horse", "ship", "truck"],
                     "num_cases_per_batch": len(chunks[0]), "num_vis": 3072},
                    f, protocol=2)
    return folder


def _write_gtsrb(root, train, test) -> dict:
    """Write root/gtsrb/ in torchvision.datasets.GTSRB's layout.

    train, test: lists of (image uint8 [h, w, 3], class id). Train classes must be 0..K-1 with no
    gap, because torchvision numbers train classes by their sorted folder names. Returns split ->
    (images, labels int64 [N]) in the order torchvision lists them (train by class then file name,
    test in csv order).
    """
    base = Path(root) / "gtsrb"
    by_class = {}
    for image, label in train:
        by_class.setdefault(int(label), []).append(image)
    assert sorted(by_class) == list(range(len(by_class))), "train classes must be 0..K-1"
    header = ["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]
    ordered = []
    for label, images in sorted(by_class.items()):
        folder = base / "GTSRB" / "Training" / f"{label:05d}"
        rows = [_save_ppm(folder / f"{j // 30:05d}_{j % 30:05d}.ppm", image, label)
                for j, image in enumerate(images)]
        _write_csv(folder / f"GT-{label:05d}.csv", header, rows)
        ordered += [(image, label) for image in images]
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    rows = [_save_ppm(test_dir / f"{i:05d}.ppm", image, label)
            for i, (image, label) in enumerate(test)]
    _write_csv(base / "GT-final_test.csv", header, rows)
    return {split: ([im for im, _ in pairs], np.array([y for _, y in pairs], dtype=np.int64))
            for split, pairs in (("train", ordered), ("test", list(test)))}


def _save_ppm(path: Path, image: np.ndarray, label: int) -> list:
    """Save one image as .ppm; returns its GTSRB csv row (ROI = the whole image minus a 1-pixel
    margin)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    height, width = image.shape[:2]
    return [path.name, width, height, 1, 1, width - 2, height - 2, int(label)]


def _write_csv(path: Path, header: list, rows: list) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=";")
        writer.writerow(header)
        writer.writerows(rows)


def _balanced_labels(num_classes: int, per_class: int, rng) -> np.ndarray:
    """int64 [num_classes * per_class], each class per_class times, shuffled."""
    return rng.permutation(np.repeat(np.arange(num_classes, dtype=np.int64), per_class))


@pytest.fixture(scope="session")
def make_images():
    """Callable (labels int [N], rng, size=(width, height)) -> uint8 [N, height, width, 3],
    class-structured."""
    return _make_images


@pytest.fixture(scope="session")
def write_cifar10():
    """Callable (root, images_train, labels_train, images_test, labels_test)
    -> the cifar-10-batches-py folder."""
    return _write_cifar10


@pytest.fixture(scope="session")
def write_gtsrb():
    """Callable (root, train, test), each a list of (image uint8 [h, w, 3], class id) -> split
    -> (images, labels)."""
    return _write_gtsrb


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> TinyData:
    """CIFAR-10: 200 train (5 batches of 40) + 100 test, 10 balanced classes. GTSRB: 43 classes,
    2 train images each + 1 test image each, sizes 30x34, 40x40 and 32x32 (width x height). Treat
    as read-only (loading GTSRB writes its .npz cache there, which is harmless)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("tiny_data")
    cifar = {}
    for split, per_class in (("train", 20), ("test", 10)):
        labels = _balanced_labels(10, per_class, rng)
        cifar[split] = (_make_images(labels, rng), labels)
    _write_cifar10(root, *cifar["train"], *cifar["test"])
    gtsrb_pairs = {}
    for split, per_class in (("train", 2), ("test", 1)):
        labels = _balanced_labels(43, per_class, rng)
        gtsrb_pairs[split] = [(_make_images([y], rng, GTSRB_SIZES[i % len(GTSRB_SIZES)])[0], int(y))
                              for i, y in enumerate(labels)]
    gtsrb = _write_gtsrb(root, gtsrb_pairs["train"], gtsrb_pairs["test"])
    return TinyData(root=root, cifar10=cifar, gtsrb=gtsrb)


@pytest.fixture(scope="session")
def tiny_data_dir(tiny_data) -> Path:
    """The tiny_data folder: cifar-10-batches-py/ and gtsrb/ as described there."""
    return tiny_data.root


@pytest.fixture
def real_data_dir() -> Path:
    """The folder of real datasets named by $VICREG_DATA_DIR (e.g. prepare.py's output); skips if
    unset."""
    if not os.environ.get("VICREG_DATA_DIR"):
        pytest.skip("VICREG_DATA_DIR is unset")
    return Path(os.environ["VICREG_DATA_DIR"])


class InProcessLauncher:
    """A shared.sweep launcher: `python -m MODULE ARGS` runs as MODULE.main(ARGS) in this process
    (no interpreter start or torch import per command), its output appended to the log. Keeps the
    commands it ran."""

    def __init__(self):
        self.commands: list[tuple[str, ...]] = []

    def __call__(self, command, log_path: Path) -> int:
        self.commands.append(tuple(command))
        assert command[1] == "-m", command
        main = importlib.import_module(command[2]).main
        with open(log_path, "a") as log, redirect_stdout(log), redirect_stderr(log):
            print(f"$ {shlex.join(command)}")
            try:
                return main(list(command[3:]))
            except Exception:  # a crash, as a subprocess would have one: traceback, exit 1
                traceback.print_exc()
                return 1


@pytest.fixture
def in_process_launcher() -> InProcessLauncher:
    return InProcessLauncher()


@pytest.fixture(scope="session")
def smoke_sweep(tiny_data_dir, tmp_path_factory) -> tuple[Path, InProcessLauncher]:
    """(sweep folder, launcher) of `python -m shared.sweep --framework torch --preset smoke` over
    std_coeff=5,25,50 (3 runs of 2 steps: subset 32, batch 16) on tiny_data, run to the end
    in-process. Read-only."""
    from shared import sweep  # here, so the data fixtures never depend on the sweep module
    out = tmp_path_factory.mktemp("smoke_sweep") / "std"
    launcher = InProcessLauncher()
    args = ["--framework", "torch", "--preset", "smoke", "--out", str(out), "--data-dir",
            str(tiny_data_dir), "--grid", "std_coeff=5,25,50", "--grid", "subset=32",
            "--grid", "probe_epochs=2"]
    assert sweep.main(args, launch=launcher) == 0
    return out, launcher

"""shared.data against the arrays written by the conftest builders and against independent
computations."""
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared import gtsrb
from shared.data import (
    NUM_CLASSES,
    load_split,
    stratified_subset,
)
from shared.errors import UserError
from shared.machine import default_data_dir


def user_error(fn, *args, **kwargs) -> str:
    """Call fn, expect a UserError and return its message, which must fit on one line."""
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def cifar_copy(tiny_data_dir, tmp_path):
    """A private copy of the tiny cifar-10-batches-py/ that a test may break; returns the data
    dir."""
    shutil.copytree(tiny_data_dir / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    return tmp_path


@pytest.fixture
def small_gtsrb(tmp_path, make_images, write_gtsrb):
    """A fresh GTSRB folder (3 classes x 2 train images, 3 test images, mixed sizes);
    returns (data dir, written)."""
    rng = np.random.default_rng(1)
    sizes = [(30, 34), (40, 40), (32, 32)]
    train = [(make_images([y], rng, sizes[i % 3])[0], y) for i, y in enumerate([0, 0, 1, 1, 2, 2])]
    test = [(make_images([y], rng, sizes[i % 3])[0], y) for i, y in enumerate([2, 0, 1])]
    return tmp_path, write_gtsrb(tmp_path, train, test)


def pil_resized(image: np.ndarray) -> np.ndarray:
    """PIL's own bilinear resize to 32x32, or the image itself when it is already 32x32."""
    if image.shape[:2] == (32, 32):
        return image
    return np.asarray(Image.fromarray(image).resize((32, 32), Image.Resampling.BILINEAR))


# ---- names, splits, data dir ---------------------------------------------------------------------

@pytest.mark.parametrize("name, split, bad, expected", [
    ("imagenet", "train", "'imagenet'", "cifar10, cifar100, stl10, gtsrb or folder:PATH"),
    ("cifar10", "val", "'val'", "train, test"),
    ("gtsrb", "training", "'training'", "train, test"),
])
def test_unknown_dataset_or_split_lists_valid_ones(tmp_path, name, split, bad, expected):
    message = user_error(load_split, name, tmp_path, split)
    assert bad in message and expected in message


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VICREG_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("VICREG_DATA_DIR")
    assert default_data_dir() == Path("data")


def test_importing_shared_data_does_not_import_torch():
    code = ("import sys, shared.data; "
            "sys.exit('torch' in sys.modules or 'torchvision' in sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                   check=True)


# ---- CIFAR-10 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_returns_written_pixels_and_labels(tiny_data, split):
    images, labels = load_split("cifar10", tiny_data.root, split)
    want_images, want_labels = tiny_data.cifar10[split]
    assert images.dtype == np.uint8 and images.shape == (len(want_images), 32, 32, 3)
    assert images.flags.c_contiguous
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)
    assert np.bincount(labels).tolist() == [len(labels) // 10] * 10


def test_cifar10_row_layout_is_rgb_planes(tmp_path):
    """Pixel (r, c) channel ch is byte ch*1024 + r*32 + c of the row, whatever the batch sizes."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(2)
    rows_per_file = {"data_batch_1": 1, "data_batch_2": 3, "data_batch_3": 2, "data_batch_4": 1,
                     "data_batch_5": 2, "test_batch": 2}
    rows = {}
    for name, n in rows_per_file.items():
        rows[name] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows[name], b"labels": list(range(n))}, f)
    images, labels = load_split("cifar10", tmp_path, "train")
    all_rows = np.concatenate([rows[f"data_batch_{i}"] for i in range(1, 6)])
    assert images.shape == (9, 32, 32, 3)
    assert labels.tolist() == [0, 0, 1, 2, 0, 1, 0, 0, 1]
    for i, row in enumerate(all_rows):
        want = [[[row[ch * 1024 + r * 32 + c] for ch in range(3)] for c in range(32)]
                for r in range(32)]
        np.testing.assert_array_equal(images[i], np.array(want, dtype=np.uint8))


def test_cifar10_missing_folder(tmp_path):
    message = user_error(load_split, "cifar10", tmp_path, "train")
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "cifar-10-batches-py/data_batch_1..5, test_batch" in message and "--download" in message


def test_cifar10_missing_batch_file(cifar_copy):
    (cifar_copy / "cifar-10-batches-py" / "data_batch_3").unlink()
    message = user_error(load_split, "cifar10", cifar_copy, "train")
    assert (str(cifar_copy / "cifar-10-batches-py" / "data_batch_3") in message
            and "--download" in message)
    assert len(load_split("cifar10", cifar_copy, "test")[0]) == 100


def _pickled(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


class _RunsCode:
    """A pickle payload that would create a directory if unpickling ran arbitrary code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


BAD_BATCHES = {
    "truncated": lambda raw, _: raw[: len(raw) // 2],
    "garbage": lambda raw, _: np.random.default_rng(3).integers(0, 256, 5000,
                                                                dtype=np.uint8).tobytes(),
    "empty": lambda raw, _: b"",
    "not a dict": lambda raw, _: _pickled([1, 2, 3]),
    "missing labels": lambda raw, _: _pickled({b"data": np.zeros((40, 3072), np.uint8)}),
    "str keys": lambda raw, _: _pickled({"data": np.zeros((40, 3072), np.uint8),
                                         "labels": [0] * 40}),
    "wrong width": lambda raw, _: _pickled({b"data": np.zeros((40, 3000), np.uint8),
                                            b"labels": [0] * 40}),
    "wrong dtype": lambda raw, _: _pickled({b"data": np.zeros((40, 3072), np.float32),
                                            b"labels": [0] * 40}),
    "data not an array": lambda raw, _: _pickled({b"data": b"\0" * 3072, b"labels": [0]}),
    "label count": lambda raw, _: _pickled({b"data": np.zeros((40, 3072), np.uint8),
                                            b"labels": [0] * 39}),
    "label range": lambda raw, _: _pickled({b"data": np.zeros((2, 3072), np.uint8),
                                            b"labels": [0, 10]}),
    "runs code": lambda raw, marker: _pickled({b"data": _RunsCode(marker), b"labels": []}),
}


@pytest.mark.parametrize("kind", BAD_BATCHES)
def test_cifar10_corrupt_batch(cifar_copy, kind):
    path = cifar_copy / "cifar-10-batches-py" / "data_batch_2"
    marker = cifar_copy / "code_ran"
    path.write_bytes(BAD_BATCHES[kind](path.read_bytes(), marker))
    message = user_error(load_split, "cifar10", cifar_copy, "train")
    assert str(path) in message and "corrupt or truncated" in message and "--download" in message
    assert not marker.exists()


def test_cifar10_download_fetches_only_when_files_are_missing(monkeypatch, tmp_path, tiny_data,
                                                              write_cifar10):
    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write_cifar10(root, *tiny_data.cifar10["train"], *tiny_data.cifar10["test"])

    monkeypatch.setattr("torchvision.datasets.CIFAR10", FakeCIFAR10)
    images, _ = load_split("cifar10", tmp_path, "test", download=True)
    np.testing.assert_array_equal(images, tiny_data.cifar10["test"][0])
    assert calls == [(str(tmp_path), True, True)]
    load_split("cifar10", tmp_path, "train", download=True)
    assert len(calls) == 1


def test_cifar10_download_failure_is_a_user_error(monkeypatch, tmp_path):
    def offline(**kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.datasets.CIFAR10", offline)
    message = user_error(load_split, "cifar10", tmp_path, "train", download=True)
    assert ("downloading CIFAR-10" in message and str(tmp_path) in message
            and "name resolution" in message)


def test_an_offline_download_says_how_to_use_a_copy_and_leaves_nothing_behind(monkeypatch,
                                                                               tmp_path):
    data_dir = tmp_path / "data"
    (tmp_path / "keep").mkdir()

    def offline_after_a_partial_write(root, **kwargs):
        partial = Path(root) / "cifar-10-python.tar.gz"
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(b"half an archive")
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.datasets.CIFAR10", offline_after_a_partial_write)
    message = user_error(load_split, "cifar10", data_dir, "train", download=True)
    assert ("--data-dir" in message and "VICREG_DATA_DIR" in message
            and "cifar-10-batches-py" in message)
    assert not data_dir.exists()  # the folder the download made is gone with its partial file
    data_dir.mkdir()
    (data_dir / "mine.txt").write_text("a user's file")
    user_error(load_split, "cifar10", data_dir, "train", download=True)
    assert sorted(p.name for p in data_dir.iterdir()) == ["mine.txt"]


# ---- GTSRB ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "test"])
def test_gtsrb_equals_pil_resize_of_written_images(tiny_data, split):
    images, labels = load_split("gtsrb", tiny_data.root, split)
    written, want_labels = tiny_data.gtsrb[split]
    assert {im.shape[:2] for im in written} == {(34, 30), (40, 40), (32, 32)}
    assert (images.dtype == np.uint8 and images.shape == (len(written), 32, 32, 3)
            and images.flags.c_contiguous)
    np.testing.assert_array_equal(images, np.stack([pil_resized(im) for im in written]))
    np.testing.assert_array_equal(labels, want_labels)
    assert labels.dtype == np.int64 and set(labels.tolist()) == set(range(NUM_CLASSES["gtsrb"]))


def test_gtsrb_cache_is_used_and_invalidated(monkeypatch, small_gtsrb, make_images):
    root, written = small_gtsrb
    first = load_split("gtsrb", root, "train")
    assert (root / "vicreg_cache" / "gtsrb-train-32px.json").is_file()

    def no_torchvision(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr("torchvision.datasets.GTSRB", no_torchvision)
    second = load_split("gtsrb", root, "train")
    np.testing.assert_array_equal(second[0], first[0])
    np.testing.assert_array_equal(second[1], first[1])

    monkeypatch.undo()
    extra = make_images([1], np.random.default_rng(4), (50, 45))[0]
    Image.fromarray(extra).save(root / "gtsrb" / "GTSRB" / "Training" / "00001" / "00000_00002.ppm")
    images, labels = load_split("gtsrb", root, "train")
    assert labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    np.testing.assert_array_equal(images[4], pil_resized(extra))


def test_gtsrb_cache_notices_a_replaced_image(small_gtsrb, make_images):
    root, written = small_gtsrb
    load_split("gtsrb", root, "test")
    path = root / "gtsrb" / "GTSRB" / "Final_Test" / "Images" / "00001.ppm"
    new = make_images([0], np.random.default_rng(5), (40, 40))[0]
    Image.fromarray(new).save(path)  # same size on disk: only the mtime tells
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    images, _ = load_split("gtsrb", root, "test")
    np.testing.assert_array_equal(images[1], pil_resized(new))


def test_gtsrb_corrupt_cache_is_rebuilt(small_gtsrb):
    root, written = small_gtsrb
    load_split("gtsrb", root, "test")
    cache = root / "vicreg_cache" / "gtsrb-test-32px.images.npy"
    cache.write_bytes(b"not an npy file")
    images, labels = load_split("gtsrb", root, "test")
    np.testing.assert_array_equal(images, np.stack([pil_resized(im) for im in written["test"][0]]))
    np.testing.assert_array_equal(np.load(cache), images)
    np.testing.assert_array_equal(np.load(cache.with_name("gtsrb-test-32px.labels.npy")), labels)


def test_gtsrb_unwritable_cache_warns_and_loads(monkeypatch, capsys, small_gtsrb):
    root, written = small_gtsrb

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(np.lib.format, "open_memmap", read_only)
    images, labels = load_split("gtsrb", root, "train")
    np.testing.assert_array_equal(labels, written["train"][1])
    np.testing.assert_array_equal(images, np.stack([pil_resized(im)
                                                    for im in written["train"][0]]))
    err = capsys.readouterr().err
    assert ("warning: cannot write the image cache" in err and "gtsrb-train-32px.json" in err
            and "Permission denied" in err)
    assert sorted(p.name for p in (root / "gtsrb").iterdir()) == ["GT-final_test.csv", "GTSRB"]
    assert not any((root / "vicreg_cache").iterdir())  # nothing half-written is left


@pytest.mark.parametrize("split", ["train", "test"])
def test_gtsrb_corrupt_image(small_gtsrb, split):
    root, _ = small_gtsrb
    folder = "Training/00001" if split == "train" else "Final_Test/Images"
    path = sorted((root / "gtsrb" / "GTSRB" / folder).glob("*.ppm"))[0]
    path.write_bytes(path.read_bytes()[:20])
    message = user_error(load_split, "gtsrb", root, split)
    assert str(path) in message and "corrupt" in message


def test_gtsrb_missing_test_image(small_gtsrb):
    root, _ = small_gtsrb
    path = root / "gtsrb" / "GTSRB" / "Final_Test" / "Images" / "00002.ppm"
    path.unlink()
    assert str(path) in user_error(load_split, "gtsrb", root, "test")


@pytest.mark.parametrize("split, expected", [
    ("train", "gtsrb/GTSRB/Training/000NN/*.ppm"),
    ("test", "gtsrb/GTSRB/Final_Test/Images/*.ppm and gtsrb/GT-final_test.csv"),
])
def test_gtsrb_missing_layout(tmp_path, split, expected):
    message = user_error(load_split, "gtsrb", tmp_path, split)
    assert (str(tmp_path / "gtsrb" / "GTSRB") in message and expected in message
            and "--download" in message)


def test_gtsrb_missing_test_csv(small_gtsrb):
    root, _ = small_gtsrb
    (root / "gtsrb" / "GT-final_test.csv").unlink()
    assert (str(root / "gtsrb" / "GT-final_test.csv")
            in user_error(load_split, "gtsrb", root, "test"))


def test_gtsrb_empty_training_folder(tmp_path):
    (tmp_path / "gtsrb" / "GTSRB" / "Training").mkdir(parents=True)
    assert str(tmp_path) in user_error(load_split, "gtsrb", tmp_path, "train")


def test_gtsrb_download_failure_is_a_user_error(monkeypatch, tmp_path):
    def offline(**kwargs):
        assert kwargs["download"] is True
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.datasets.GTSRB", offline)
    message = user_error(load_split, "gtsrb", tmp_path, "test", download=True)
    assert "downloading GTSRB test" in message and "name resolution" in message


# ---- stratified_subset ---------------------------------------------------------------------------

def shuffled_labels(counts: dict, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(
        np.concatenate([[k] * n for k, n in counts.items()]))


def test_stratified_subset_largest_remainder_counts():
    labels = shuffled_labels({7: 50, 2: 30, 9: 20})
    # Quotas 3.5, 2.1, 1.4: floors 3, 2, 1 and the one left over goes to the largest
    # remainder (class 7).
    idx = stratified_subset(labels, 7, seed=0)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0) and idx[-1] < len(labels)
    assert {k: int(np.sum(labels[idx] == k)) for k in (7, 2, 9)} == {7: 4, 2: 2, 9: 1}
    idx = stratified_subset(labels, 20, seed=0)
    assert {k: int(np.sum(labels[idx] == k)) for k in (7, 2, 9)} == {7: 10, 2: 6, 9: 4}


def test_stratified_subset_ties_are_seeded():
    labels = shuffled_labels({k: 5 for k in range(10)})
    # Quota 1.5 for every class: five classes get 2, which five is up to the seed.
    extras = []
    for seed in range(5):
        counts = np.bincount(labels[stratified_subset(labels, 15, seed)], minlength=10)
        assert sorted(counts.tolist()) == [1] * 5 + [2] * 5
        extras.append(tuple(np.flatnonzero(counts == 2)))
    assert len(set(extras)) > 1


def test_stratified_subset_seeding():
    labels = shuffled_labels({0: 100, 1: 100, 2: 100})
    a = stratified_subset(labels, 30, seed=1)
    np.testing.assert_array_equal(a, stratified_subset(labels, 30, seed=1))
    assert not np.array_equal(a, stratified_subset(labels, 30, seed=2))


def test_stratified_subset_all_when_n_is_large():
    labels = shuffled_labels({0: 3, 1: 2})
    for n in (5, 6):
        np.testing.assert_array_equal(stratified_subset(labels, n, seed=0), np.arange(5))


@pytest.mark.parametrize("n, expected", [(0, "positive"), (-3, "positive"),
                                         (2, "number of classes (3)")])
def test_stratified_subset_bad_sizes(n, expected):
    assert expected in user_error(stratified_subset, shuffled_labels({0: 5, 1: 5, 2: 5}), n, 0)


# ---- real data (VICREG_DATA_DIR) -----------------------------------------------------------------

@pytest.fixture
def prepared_dir(real_data_dir):
    """real_data_dir when it is ../shared/data/prepare.py's output, whose pixel hashes its README
    publishes."""
    if not (real_data_dir / "PREPARED").exists():
        pytest.skip("not prepare.py's output: the published hashes do not apply")
    return real_data_dir


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def test_real_cifar10_counts(real_data_dir):
    for split, n in (("train", 50_000), ("test", 10_000)):
        images, labels = load_split("cifar10", real_data_dir, split)
        assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
        assert np.bincount(labels).tolist() == [n // 10] * 10


def test_real_gtsrb_counts_and_cached_reload(real_data_dir, monkeypatch):
    for split, n in (("train", 39_209), ("test", 12_630)):
        images, labels = load_split("gtsrb", real_data_dir, split)
        assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
        assert np.unique(labels).tolist() == list(range(43))
        with monkeypatch.context() as patched:  # a second load reads the cache, decodes nothing
            patched.setattr(gtsrb, "_samples", lambda *a: pytest.fail("decoded again"))
            again, _ = load_split("gtsrb", real_data_dir, split)
        assert sha256(again) == sha256(images)


@pytest.mark.parametrize("name, split, x_hash, y_hash", [
    ("cifar10", "train", "5aaf8a2cf2e577ff4dbb15e4f368840fab5aca1812bcc69682005f8dc661d466",
     "2b7cd2f24487317614016b72ffd53071c3062f592f0eb300c18a770d41ae1253"),
    ("cifar10", "test", "5a6aa8185204d80b65d3dfb540696dadd5f10d185ded226a96665d3e0fc6259f",
     "a054c239a40ee7f2a5745e7e4bc11a51e9cb40c98134b602c1068e6a207487c6"),
    ("gtsrb", "train", "6c1fdf259fb297099004b60b775706b0fc86e13b334cd29558bcd49c19675a20",
     "e22865b71d083b7aab0fcdbe0ddb5b18f911ac38b6eceaed367d14a869ad5d42"),
    ("gtsrb", "test", "b7134a5523f72e29f8eaaf17eb0691ac90dbf75d8117920e6062767ca85a1db8",
     "90dbce9392b7eec7db1b1f1f13ea73598b72822efaaf9f608c935064fad29db2"),
])
def test_real_pixels_match_published_hashes(prepared_dir, name, split, x_hash, y_hash):
    """shared/data/README.md publishes sha256 of the NHWC uint8 arrays and uint8 labels in this
    order."""
    images, labels = load_split(name, prepared_dir, split)
    assert sha256(images) == x_hash
    assert sha256(labels.astype(np.uint8)) == y_hash

"""CIFAR-100 and STL-10 (shared.data): each written here in its real on-disk format and read back
against torchvision's own readers; the resize cache; every bad dataset flag a user can give; and
short runs of both trainers on them. Folders of images are tests/test_folders.py's."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jax_impl import probe as jax_probe
from jax_impl import train as jax_train
from shared import data
from shared.archs import stem_for
from shared.config import make_config
from shared.data import dataset_key, load_split, num_classes, pretraining_split
from shared.errors import UserError
from tests.test_folders import save
from torch_impl import probe as torch_probe
from torch_impl import train as torch_train

TRAINERS = {"torch": torch_train, "jax": jax_train}
PROBES = {"torch": torch_probe, "jax": jax_probe}


def write_cifar100(root: Path, splits: dict) -> None:
    """root/cifar-100-python/{train,test,meta} as the python version of CIFAR-100 holds them;
    splits: name -> (images uint8 [N, 32, 32, 3], fine labels int [N])."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, (images, labels) in splits.items():
        rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))
        with open(folder / split, "wb") as f:
            pickle.dump({b"filenames": [f"{i}.png".encode() for i in range(len(images))],
                         b"batch_label": split.encode(), b"fine_labels": [int(y) for y in labels],
                         b"coarse_labels": [int(y) // 5 for y in labels], b"data": rows}, f,
                        protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)


def write_stl10(root: Path, parts: dict) -> None:
    """root/stl10_binary/ as STL-10's binary version holds it: X files of 3 planes of 96x96 stored
    column-major, y files of labels 1..10; parts: name -> (images uint8 [N, 96, 96, 3], labels
    int [N] in 0..9, or None for unlabeled)."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for part, (images, labels) in parts.items():
        images.transpose(0, 3, 2, 1).tofile(folder / f"{part}_X.bin")
        if labels is not None:
            (np.asarray(labels) + 1).astype(np.uint8).tofile(folder / f"{part}_y.bin")


def with_integrity(monkeypatch, cls):
    """torchvision's reader `cls`, its md5 check of the real release turned off."""
    monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    return cls


@pytest.fixture
def cifar100_dir(tmp_path, make_images):
    rng = np.random.default_rng(1)
    splits = {split: (make_images(labels, rng), labels)
              for split, labels in (("train", rng.permutation(np.arange(200) % 100)),
                                    ("test", rng.permutation(np.arange(100))))}
    write_cifar100(tmp_path, splits)
    return tmp_path, splits


@pytest.fixture
def stl10_dir(tmp_path, make_images):
    rng = np.random.default_rng(2)
    parts = {"train": np.arange(20) % 10, "test": np.arange(10), "unlabeled": None}
    write_stl10(tmp_path, {
        part: (make_images(labels if labels is not None else np.zeros(12, int), rng, (96, 96)),
               labels) for part, labels in parts.items()})
    return tmp_path


def test_cifar100_returns_the_written_pixels_and_fine_labels(cifar100_dir):
    root, written = cifar100_dir
    for split, (images, labels) in written.items():
        got_images, got_labels = load_split("cifar100", root, split)
        assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    assert num_classes("cifar100") == 100


def test_cifar100_labels_out_of_range_are_refused(tmp_path, make_images):
    rng = np.random.default_rng(0)
    write_cifar100(tmp_path, {"train": (make_images([0, 1], rng), [0, 100]),
                              "test": (make_images([0], rng), [0])})
    with pytest.raises(UserError, match=r"labels are not integers in 0\.\.99"):
        load_split("cifar100", tmp_path, "train")


def test_stl10_equals_torchvisions_reader(stl10_dir, monkeypatch):
    from torchvision.datasets import STL10

    reader = with_integrity(monkeypatch, STL10)
    for split in ("train", "test"):
        images, labels = load_split("stl10", stl10_dir, split)
        theirs = reader(str(stl10_dir), split=split)
        assert images.shape[1:] == (96, 96, 3)
        assert np.array_equal(images, theirs.data.transpose(0, 2, 3, 1))
        assert np.array_equal(labels, theirs.labels)
    images, labels = pretraining_split("stl10", stl10_dir)
    theirs = reader(str(stl10_dir), split="train+unlabeled")
    assert np.array_equal(images, theirs.data.transpose(0, 2, 3, 1))
    assert np.array_equal(labels, theirs.labels) and (labels[20:] == -1).all()
    assert isinstance(images, np.memmap)  # read from the cache, not held in memory


def test_stl10_at_32_pixels_is_pillows_bilinear_resize(stl10_dir):
    images, _ = load_split("stl10", stl10_dir, "test", image_size=32)
    full, _ = load_split("stl10", stl10_dir, "test")
    want = np.stack([np.asarray(Image.fromarray(np.asarray(x)).resize((32, 32),
                                                                      Image.Resampling.BILINEAR))
                     for x in full])
    assert np.array_equal(images, want)


def test_cifar10_resized_is_cached_and_cifar10_at_32_is_unchanged(tiny_data, tmp_path):
    images, labels = load_split("cifar10", tiny_data.root, "test")
    assert np.array_equal(images, tiny_data.cifar10["test"][0])  # no cache, no copy, no resize
    big, big_labels = load_split("cifar10", tiny_data.root, "test", image_size=40)
    want = np.stack([np.asarray(Image.fromarray(x).resize((40, 40), Image.Resampling.BILINEAR))
                     for x in tiny_data.cifar10["test"][0]])
    assert np.array_equal(big, want) and np.array_equal(big_labels, labels)
    assert (tiny_data.root / "vicreg_cache" / "cifar10-test-40px.json").is_file()




# ---- settings ------------------------------------------------------------------------------------

def test_image_size_and_stem_follow_the_dataset(tmp_path):
    assert make_config({}).image_size == 32 and make_config({}).stem() == "cifar"
    stl = make_config({"dataset": "stl10"})
    assert stl.image_size == 96 and stl.stem() == "imagenet"
    assert make_config({"dataset": "stl10", "image_size": 64}).stem() == "cifar"
    assert [stem_for(s) for s in (8, 32, 64, 65, 96, 224)] == ["cifar"] * 3 + ["imagenet"] * 3
    folder = make_config({"dataset": "folder:photos"})
    assert folder.image_size == 32 and folder.dataset == f"folder:{Path.cwd() / 'photos'}"


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("flags, says", [
    (["--dataset", "imagenet"], "--dataset imagenet: expected one of cifar10, cifar100, stl10"),
    (["--dataset", "folder:"], "--dataset folder:: expected one of"),
    (["--image-size", "0"], "--image-size 0: must lie in [8, 1024]"),
    (["--image-size", "8", "--blur-kernel", "17"], "--blur-kernel 17: must be smaller than twice"),
    (["--dataset", "folder:MISSING"], "does not exist"),
    (["--dataset", "folder:EMPTY"], "no images in"),
    (["--dataset", "folder:FLAT", "--monitor-every", "0", "--no-probe", "--bad-images",
      "error"], "cannot read"),
])
def test_bad_dataset_flags_are_one_line_and_write_nothing(framework, flags, says, tmp_path,
                                                          capsys):
    (tmp_path / "EMPTY").mkdir()
    save(tmp_path / "FLAT" / "a.png", Image.new("RGB", (32, 32)))
    (tmp_path / "FLAT" / "b.png").write_bytes(b"broken")
    flags = [f.replace("folder:", f"folder:{tmp_path}/") if f != "folder:" else f for f in flags]
    run = tmp_path / "run"
    code = TRAINERS[framework].main(["--preset", "smoke", "--data-dir", str(tmp_path / "data"),
                                     "--out", str(run), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and says in err[-1] and "Traceback" not in "\n".join(err)
    assert not run.exists()




@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_a_run_on_stl10_at_96_pixels_uses_the_imagenet_stem(framework, stl10_dir, tmp_path):
    run = tmp_path / "run"
    assert TRAINERS[framework].main([
        "--preset", "smoke", "--width", "4", "--subset", "0", "--dataset", "stl10",
        "--monitor-bank", "20", "--monitor-test", "10", "--monitor-k", "5",
        "--data-dir", str(stl10_dir), "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == "stl10" and config["image_size"] == 96
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_images"] == 32 and set(summary["probe"]) == {"stl10"}
    assert json.loads((run / "probe_stl10.json").read_text())["num_train"] == 20


def test_the_results_table_names_the_dataset_and_its_probe(tmp_path):
    import dataclasses

    from shared.results import RunResult, results_markdown_table

    def run(label, dataset, probes):
        config = dataclasses.asdict(make_config({"dataset": dataset}))
        return RunResult(label, tmp_path / label, "done", "torch", config, {"epochs": 1.0},
                         {key: {"top1": top1, "checkpoint_epoch": 1.0}
                          for key, top1 in probes.items()}, None)

    photos, pets = dataset_key("folder:photos"), dataset_key("folder:more/pets")
    table = results_markdown_table([run("a", "cifar10", {"cifar10": 0.5, "gtsrb": 0.25}),
                                    run("b", "folder:photos", {photos: 0.75}),
                                    run("c", "folder:more/pets", {pets: 0.5})])
    header, _, first, second, third = table.strip().splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:3] == ["run", "status", "dataset"] and "CIFAR-100 top-1" not in columns
    folders = columns.index("folder pets top-1")
    assert columns[folders:folders + 4] == ["folder pets top-1", "folder pets random init",
                                            "folder photos top-1", "folder photos random init"]
    cells = [c.strip() for c in second.strip("|").split("|")]
    assert cells[2] == f"folder:{Path.cwd() / 'photos'}"
    assert cells[columns.index("folder photos top-1")] == "75.00%"
    assert cells[columns.index("folder pets top-1")] == ""
    assert [c.strip() for c in third.strip("|").split("|")][columns.index("folder pets top-1")] \
        == "50.00%"
    assert [c.strip() for c in first.strip("|").split("|")][columns.index("folder photos top-1")] \
        == ""


def test_download_fetches_cifar100_and_stl10_only_when_files_are_missing(monkeypatch, tmp_path,
                                                                         make_images):
    rng = np.random.default_rng(5)
    calls = []

    class FakeCIFAR100:
        def __init__(self, root, train, download):
            calls.append(("cifar100", train, download))
            write_cifar100(Path(root), {"train": (make_images([3], rng), [3]),
                                        "test": (make_images([7], rng), [7])})

    class FakeSTL10:
        def __init__(self, root, split, download):
            calls.append(("stl10", split, download))
            write_stl10(Path(root), {part: (make_images([1], rng, (96, 96)), labels)
                                     for part, labels in (("train", [1]), ("test", [2]),
                                                          ("unlabeled", None))})

    monkeypatch.setattr("torchvision.datasets.CIFAR100", FakeCIFAR100)
    monkeypatch.setattr("torchvision.datasets.STL10", FakeSTL10)
    assert load_split("cifar100", tmp_path, "test", download=True)[1].tolist() == [7]
    assert load_split("cifar100", tmp_path, "train", download=True)[1].tolist() == [3]
    assert pretraining_split("stl10", tmp_path, download=True)[1].tolist() == [1, -1]
    assert load_split("stl10", tmp_path, "test", download=True)[1].tolist() == [2]
    assert calls == [("cifar100", True, True), ("stl10", "train+unlabeled", True)]
    with pytest.raises(UserError, match="STL-10 not found: .*test_X.bin does not exist"):
        load_split("stl10", tmp_path / "elsewhere", "test")


def test_the_smoke_preset_runs_on_cifar100_with_fewer_images_than_classes(cifar100_dir,
                                                                          tmp_path):
    """The smoke preset pretrains on 64 images: fewer than CIFAR-100's 100 classes, so a plain
    random subset (the probes keep their stratified one)."""
    root, splits = cifar100_dir
    run = tmp_path / "run"
    assert torch_train.main(["--preset", "smoke", "--dataset", "cifar100", "--data-dir",
                             str(root), "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_images"] == 64 and set(summary["probe"]) == {"cifar100"}
    probe = json.loads((run / "probe_cifar100.json").read_text())
    assert probe["num_classes"] == 100 and probe["num_train"] == 200


def test_a_pretraining_subset_smaller_than_the_classes_is_a_plain_random_one():
    labels = np.arange(200) % 100
    index = data.pretraining_subset(labels, 64, seed=3)
    expected = np.sort(np.random.default_rng(3).choice(200, size=64, replace=False))
    np.testing.assert_array_equal(index, expected)
    assert index.dtype == np.int64
    # with at least one image of each class it stays stratified
    stratified = data.pretraining_subset(labels, 200 - 1, seed=3)
    np.testing.assert_array_equal(stratified, data.stratified_subset(labels, 199, seed=3))
    assert len(np.unique(labels[data.pretraining_subset(labels, 100, seed=3)])) == 100

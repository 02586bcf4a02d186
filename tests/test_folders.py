"""Folders of images (shared.image_folder, shared.image_cache): laid out as a user would, read back
against Pillow; the cache; every bad input; and short runs of both trainers that pretrain on,
probe and monitor a folder."""
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jax_impl import probe as jax_probe
from jax_impl import train as jax_train
from shared import data, image_folder
from shared.data import dataset_key, load_split, num_classes, pretraining_split, probe_datasets
from shared.errors import UserError
from torch_impl import probe as torch_probe
from torch_impl import train as torch_train

TRAINERS = {"torch": torch_train, "jax": jax_train}
PROBES = {"torch": torch_probe, "jax": jax_probe}


def save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture
def photo_folder(tmp_path, make_images):
    """A folder laid out for a probe: train/ with classes "cat" and "dog" (dog's images partly in a
    nested folder), test/ with both; PNG and JPEG files, a 40x30 image, a grayscale, a palette and
    an RGBA image, and one file that is not an image at all."""
    rng = np.random.default_rng(3)
    root = tmp_path / "photos"
    pixels = make_images(np.arange(16) % 2, rng)
    for i in range(6):
        save(root / "train" / "cat" / f"{i}.png", Image.fromarray(pixels[i]))
        where = root / "train" / "dog" / ("deep/er" if i % 2 else "")
        save(where / f"{i}.jpg", Image.fromarray(pixels[6 + i]))
    for i in range(2):
        save(root / "test" / "cat" / f"t{i}.png", Image.fromarray(pixels[12 + i]))
        save(root / "test" / "dog" / f"t{i}.png", Image.fromarray(pixels[14 + i]))
    wide = make_images([0], rng, (40, 30))[0]
    save(root / "train" / "cat" / "wide.png", Image.fromarray(wide))
    save(root / "train" / "cat" / "gray.png", Image.fromarray(np.full((32, 32), 77, np.uint8)))
    save(root / "train" / "cat" / "palette.png",
         Image.fromarray(pixels[0]).convert("P", palette=Image.Palette.ADAPTIVE, colors=8))
    rgba = np.dstack([pixels[1], np.full((32, 32), 10, np.uint8)])
    save(root / "train" / "cat" / "rgba.png", Image.fromarray(rgba, "RGBA"))
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"this is not a JPEG")
    return root


def expected_pixels(path: Path, size: int = 32) -> np.ndarray:
    """Pillow's RGB decode of `path`, its centred square cropped (torchvision's center_crop) and
    resized bilinearly to size x size."""
    from torchvision.transforms.v2.functional import center_crop

    with Image.open(path) as im:
        rgb = im.convert("RGB")
    side = min(rgb.size)
    return np.asarray(center_crop(rgb, [side, side]).resize((size, size),
                                                            Image.Resampling.BILINEAR))


def test_a_folders_probe_splits_are_imagefolders(photo_folder, tmp_path, capsys):
    from torchvision.datasets import ImageFolder

    name = f"folder:{photo_folder}"
    images, labels = load_split(name, tmp_path / "data", "train")
    theirs = ImageFolder(str(photo_folder / "train"),
                         is_valid_file=lambda p: not p.endswith("broken.jpg"))
    assert theirs.classes == ["cat", "dog"] and num_classes(name) == 2
    assert labels.tolist() == [y for _, y in theirs.samples]
    for image, (path, _) in zip(images, theirs.samples):
        assert np.array_equal(image, expected_pixels(Path(path))), path
    assert "broken.jpg" in capsys.readouterr().err
    test_images, test_labels = load_split(name, tmp_path / "data", "test")
    assert test_labels.tolist() == [0, 0, 1, 1] and test_images.shape == (4, 32, 32, 3)


def test_grayscale_palette_and_rgba_images_become_rgb(photo_folder, tmp_path):
    images, _ = load_split(f"folder:{photo_folder}", tmp_path, "train")
    paths = image_folder.labelled_files(photo_folder, "train").paths
    at = {Path(p).name: i for i, p in enumerate(p for p in paths if "broken" not in p)}
    assert (images[at["gray.png"]] == 77).all()
    with Image.open(photo_folder / "train" / "cat" / "rgba.png") as im:
        assert np.array_equal(images[at["rgba.png"]], np.asarray(im)[..., :3])
    with Image.open(photo_folder / "train" / "cat" / "palette.png") as im:
        assert np.array_equal(images[at["palette.png"]], np.asarray(im.convert("RGB")))


def test_an_unreadable_file_is_named_or_refused(photo_folder, tmp_path, capsys):
    name = f"folder:{photo_folder}"
    with pytest.raises(UserError, match=r"cannot read .*broken\.jpg.*--bad-images skip"):
        pretraining_split(name, tmp_path, bad_images="error")
    images, labels = pretraining_split(name, tmp_path)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("warning: skipped 1 unreadable image(s)") and "broken.jpg" in line
    assert len(images) == 16 and (labels == 0).all()  # train/ only: cat 10 readable, dog 6
    meta = json.loads(next((tmp_path / "vicreg_cache").glob("*pretrain*.json")).read_text())
    assert meta["count"] == 16 and "broken.jpg" in meta["skipped"][0]
    # from the cache as without it: refused under "error", named under "skip"
    with pytest.raises(UserError, match=r"cannot read .*broken\.jpg.*--bad-images skip"):
        pretraining_split(name, tmp_path, bad_images="error")
    assert len(pretraining_split(name, tmp_path)[0]) == 16
    assert capsys.readouterr().err.strip().splitlines()[-1] == line


def test_a_plain_tree_pretrains_on_every_image_in_it(tmp_path, make_images):
    rng = np.random.default_rng(4)
    pixels = make_images(np.arange(5), rng)
    for i, where in enumerate(["a", "a/b", "a/b/c", "", "d"]):
        save(tmp_path / "tree" / where / f"{i}.PNG", Image.fromarray(pixels[i]))
    (tmp_path / "tree" / "notes.txt").write_text("not an image")
    images, _ = pretraining_split(f"folder:{tmp_path / 'tree'}", tmp_path / "data")
    order = [3, 0, 1, 2, 4]  # make_dataset's: folders sorted ("", a, a/b, a/b/c, d)
    assert np.array_equal(images, pixels[order])
    assert not data.is_labelled(f"folder:{tmp_path / 'tree'}")


def test_the_cache_is_read_until_the_folder_changes(photo_folder, tmp_path, monkeypatch):
    name = f"folder:{photo_folder}"
    first, _ = pretraining_split(name, tmp_path)
    with monkeypatch.context() as patched:
        patched.setattr(image_folder, "read_image", lambda *a: pytest.fail("decoded again"))
        again, _ = pretraining_split(name, tmp_path)
        assert np.array_equal(first, again)
    changed = photo_folder / "train" / "cat" / "0.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))
    images, _ = pretraining_split(name, tmp_path)
    assert len(images) == 16 and (images[0] == 0).all()
    save(photo_folder / "train" / "cat" / "new.png", Image.fromarray(np.full((32, 32, 3), 9,
                                                                             np.uint8)))
    assert len(pretraining_split(name, tmp_path)[0]) == 17


def test_a_folder_at_96_pixels(photo_folder, tmp_path):
    images, _ = load_split(f"folder:{photo_folder}", tmp_path, "test", image_size=96)
    assert np.array_equal(images[0], expected_pixels(photo_folder / "test" / "cat" / "t0.png", 96))


def test_what_a_run_probes(photo_folder, tiny_data_dir, tmp_path):
    assert probe_datasets("cifar10", tiny_data_dir, False) == ["cifar10", "gtsrb"]
    assert probe_datasets("gtsrb", tiny_data_dir, False) == ["gtsrb"]
    assert probe_datasets(f"folder:{photo_folder}", tmp_path, False) == [f"folder:{photo_folder}"]
    (tmp_path / "plain").mkdir()
    assert probe_datasets(f"folder:{tmp_path / 'plain'}", tiny_data_dir, False) == ["gtsrb"]
    shutil.rmtree(photo_folder / "train" / "dog")
    shutil.rmtree(photo_folder / "test" / "dog")
    one_class = f"folder:{photo_folder}"
    assert probe_datasets(one_class, tiny_data_dir, False) == ["gtsrb"]
    assert data.unlabelled_reason(one_class) == (
        f"{photo_folder / 'train'} has 1 class subfolder(s) with images (cat); a probe and the kNN "
        "monitor need 2 at least (PATH/train/<class>/... and PATH/test/<class>/... (or val/))")
    with pytest.raises(UserError, match=r"has 1 class subfolder\(s\) with images \(cat\)"):
        load_split(one_class, tmp_path, "test")


@pytest.mark.parametrize("make, says", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "no images in"),
    (lambda root: (root / "train" / "cat").mkdir(parents=True), "no images in"),
])
def test_a_missing_or_empty_folder_is_refused(tmp_path, make, says):
    make(tmp_path / "photos")
    with pytest.raises(UserError, match=says):
        pretraining_split(f"folder:{tmp_path / 'photos'}", tmp_path)


def test_a_probe_needs_class_folders(tmp_path, photo_folder):
    (tmp_path / "flat").mkdir()
    save(tmp_path / "flat" / "a.png", Image.new("RGB", (32, 32)))
    with pytest.raises(UserError, match="not laid out for a probe: it needs PATH/train/<class>"):
        load_split(f"folder:{tmp_path / 'flat'}", tmp_path, "train")
    save(photo_folder / "test" / "bird" / "b.png", Image.new("RGB", (32, 32)))
    with pytest.raises(UserError, match="has classes that .* lacks: bird"):
        load_split(f"folder:{photo_folder}", tmp_path, "test")


def test_val_stands_in_for_test(photo_folder, tmp_path):
    (photo_folder / "test").rename(photo_folder / "val")
    assert load_split(f"folder:{photo_folder}", tmp_path, "test")[1].tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_a_probe_of_a_folder_without_classes_is_refused(framework, tiny_data_dir, tmp_path,
                                                        capsys):
    run = tmp_path / "run"
    assert TRAINERS[framework].main(["--preset", "smoke", "--width", "4", "--no-probe",
                                     "--data-dir", str(tiny_data_dir), "--out", str(run)]) == 0
    (tmp_path / "flat").mkdir()
    save(tmp_path / "flat" / "a.png", Image.new("RGB", (32, 32)))
    before = sorted(p.name for p in run.iterdir())
    assert PROBES[framework].main(["--run", str(run), "--dataset",
                                   f"folder:{tmp_path / 'flat'}"]) == 2
    assert "not laid out for a probe" in capsys.readouterr().err.strip().splitlines()[-1]
    save(tmp_path / "one" / "train" / "cat" / "a.png", Image.new("RGB", (32, 32)))
    save(tmp_path / "one" / "test" / "cat" / "b.png", Image.new("RGB", (32, 32)))
    assert PROBES[framework].main(["--run", str(run), "--dataset",
                                   f"folder:{tmp_path / 'one'}"]) == 2
    assert "need 2 at least" in capsys.readouterr().err.strip().splitlines()[-1]
    assert sorted(p.name for p in run.iterdir()) == before
    assert PROBES[framework].main(["--run", str(run), "--dataset", "imagenet"]) == 2
    assert "--dataset 'imagenet': expected one of" in capsys.readouterr().err


# ---- runs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_a_run_on_a_folder_probes_and_monitors_it(framework, photo_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert TRAINERS[framework].main([
        "--preset", "smoke", "--width", "4", "--subset", "0", "--batch-size", "8",
        "--dataset", f"folder:{photo_folder}", "--monitor-bank", "16", "--monitor-test", "4",
        "--monitor-k", "3", "--probe-subset", "0", "--data-dir", str(tmp_path / "data"),
        "--out", str(run)]) == 0
    key = dataset_key(f"folder:{photo_folder}")
    assert re.fullmatch(r"folder-photos-[0-9a-f]{6}", key)
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["probe"]) == {key} and summary["train_images"] == 16
    own = (run / f"probe_{key}.json").read_text()
    probe = json.loads(own)
    assert probe["source"] == f"folder:{photo_folder}" and probe["num_classes"] == 2
    assert probe["num_test"] == 4 and 0 <= summary["knn_top1"] <= 1
    # a probe of another folder of the same name gets a file and a summary entry of its own
    other = shutil.copytree(photo_folder, tmp_path / "elsewhere" / "photos")
    shutil.rmtree(other / "test" / "dog")
    assert PROBES[framework].main(["--run", str(run), "--dataset", f"folder:{other}",
                                   "--data-dir", str(tmp_path / "data")]) == 0
    other_key = dataset_key(f"folder:{other}")
    assert other_key != key and (run / f"probe_{key}.json").read_text() == own
    assert json.loads((run / f"probe_{other_key}.json").read_text())["num_test"] == 2
    after = json.loads((run / "summary.json").read_text())["probe"]
    assert after[key] == summary["probe"][key] and set(after) == {key, other_key}


def test_a_run_on_a_one_class_folder_neither_probes_nor_monitors_it(photo_folder, tmp_path,
                                                                   capsys):
    shutil.rmtree(photo_folder / "train" / "dog")
    shutil.rmtree(photo_folder / "test" / "dog")
    run = tmp_path / "run"
    assert torch_train.main([
        "--preset", "smoke", "--width", "4", "--subset", "0", "--batch-size", "8",
        "--dataset", f"folder:{photo_folder}", "--data-dir", str(tmp_path / "data"),
        "--out", str(run)]) == 0
    said = capsys.readouterr()
    reason = f"{photo_folder / 'train'} has 1 class subfolder(s) with images (cat)"
    assert f"note: no kNN monitor: folder:{photo_folder}: {reason}" in said.out + said.err
    assert f"folder:{photo_folder} probe skipped: {reason}" in said.out
    assert json.loads((run / "summary.json").read_text())["probe"] == {}
    assert not list(run.glob("probe_*.json"))

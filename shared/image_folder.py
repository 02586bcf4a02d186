"""A folder of your own images as a dataset (`--dataset folder:PATH`).

Pretraining reads every image under PATH, in any tree, labels unused; when PATH has a `train/`
subfolder, it reads `train/` (and `unlabeled/` beside it, when there is one, as STL-10 is laid
out), so that a test split is never trained on. A probe, or the kNN monitor, needs the layout
torchvision's ImageFolder reads:

    PATH/train/<class>/**/*.jpg|png|...     one subfolder per class; nested folders belong to it
    PATH/test/<class>/...  (or PATH/val/)   the same classes (or some of them)

Classes are numbered in the sorted order of train/'s subfolder names, and files are listed in
ImageFolder's order, so a folder gives the same dataset on every machine, and as torchvision
reads it. The images are decoded once, at the size asked for, into the image cache under the data
directory (shared.image_cache), named by the folder's location.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from shared.config import FOLDER_PREFIX
from shared.errors import UserError
from shared.image_cache import (
    CACHE_DIR,
    CACHE_VERSION,
    IMAGE_EXTENSIONS,
    Source,
    cached,
    files_fingerprint,
    read_image,
)
from shared.reader import Arrays, Reader

TEST_FOLDERS = ("test", "val")
UNLABELED_FOLDER = "unlabeled"
LAYOUT = "PATH/train/<class>/... and PATH/test/<class>/... (or val/)"
# One class would be classified without error: a probe or kNN monitor of it says nothing.
MIN_CLASSES = 2


@dataclass(frozen=True)
class LabelledFiles:
    """Image files with their class: paths [N] (sorted), labels [N] (indices into classes)."""

    paths: list[str]
    labels: list[int]
    classes: tuple[str, ...]


def folder_root(dataset: str) -> Path:
    """PATH of "folder:PATH"."""
    return Path(dataset[len(FOLDER_PREFIX):])


def image_files(top: Path) -> list[str]:
    """Every image file under `top` (IMAGE_EXTENSIONS, any case) in torchvision's make_dataset
    order: folders in sorted order, each one's files sorted; links followed."""
    return [os.path.join(d, f) for d, _, names in sorted(os.walk(top, followlinks=True))
            for f in sorted(names) if _is_image(f)]


def _holds_images(top: Path) -> bool:
    """Whether there is an image file anywhere under `top`; stops at the first one."""
    return any(_is_image(f) for _, _, names in os.walk(top, followlinks=True) for f in names)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def check_folder(root: Path) -> None:
    """UserError unless `root` is an existing folder."""
    if not root.exists():
        raise UserError(f"folder {root} does not exist (--dataset folder:PATH takes a folder of "
                        "images)")
    if not root.is_dir():
        raise UserError(f"{root} is not a folder (--dataset folder:PATH takes a folder of images)")


def pretraining_files(root: Path) -> list[str]:
    """The images a folder pretrains on: train/ (and unlabeled/) when there is a train/, else every
    image under root; UserError when there is none."""
    check_folder(root)
    tops = ([root / "train", *([root / UNLABELED_FOLDER] if (root / UNLABELED_FOLDER).is_dir()
                               else [])] if (root / "train").is_dir() else [root])
    paths = [p for top in tops for p in image_files(top)]
    if not paths:
        where = " and ".join(str(t) for t in tops)
        raise UserError(f"no images in {where} (looked for {', '.join(IMAGE_EXTENSIONS)} files "
                        "in every subfolder)")
    return paths


def has_classes(root: Path) -> bool:
    """Whether `root` is laid out for a probe: a train/ and a test/ (or val/) folder."""
    return (root / "train").is_dir() and any((root / t).is_dir() for t in TEST_FOLDERS)


def split_dir(root: Path, split: str) -> Path:
    """The folder of a probe split ("train" or "test"; test is test/, else val/), UserError when
    the folder is not laid out for a probe."""
    check_folder(root)
    if not has_classes(root):
        raise UserError(f"{root} is not laid out for a probe: it needs {LAYOUT}, one subfolder "
                        "per class")
    if split == "train":
        return root / "train"
    return next(root / t for t in TEST_FOLDERS if (root / t).is_dir())


def _class_folders(train: Path) -> tuple[str, ...]:
    return tuple(sorted(d.name for d in train.iterdir() if d.is_dir() and _holds_images(d)))


def _too_few_classes(train: Path, names: tuple[str, ...]) -> str:
    held = f" ({', '.join(names)})" if names else ""
    return (f"{train} has {len(names)} class subfolder(s) with images{held}; a probe and the kNN "
            f"monitor need {MIN_CLASSES} at least ({LAYOUT})")


def unprobed_reason(root: Path) -> str:
    """Why folder `root` can be neither probed nor monitored, in a phrase: not laid out for it,
    or fewer than MIN_CLASSES classes; "" when it can be."""
    if not has_classes(root):
        return f"it has no labels (a probe needs {LAYOUT}, one subfolder per class)"
    names = _class_folders(root / "train")
    return _too_few_classes(root / "train", names) if len(names) < MIN_CLASSES else ""


def class_names(root: Path) -> tuple[str, ...]:
    """The classes of a labelled folder: the sorted names of train/'s subfolders that hold images
    (UserError when there are fewer than MIN_CLASSES)."""
    train = split_dir(root, "train")
    names = _class_folders(train)
    if len(names) < MIN_CLASSES:
        raise UserError(_too_few_classes(train, names))
    return names


def labelled_files(root: Path, split: str) -> LabelledFiles:
    """The images of a probe split with their classes (those of train/). A test class that train/
    lacks, or a split without images, is a UserError."""
    classes = class_names(root)
    top = split_dir(root, split)
    index = {name: i for i, name in enumerate(classes)}
    found = sorted(d.name for d in top.iterdir() if d.is_dir() and _holds_images(d))
    unknown = [name for name in found if name not in index]
    if unknown:
        raise UserError(f"{top} has classes that {root / 'train'} lacks: {', '.join(unknown[:5])}; "
                        "a probe's test classes must be among its training classes")
    paths, labels = [], []
    for name in found:
        files = image_files(top / name)
        paths += files
        labels += [index[name]] * len(files)
    if not paths:
        raise UserError(f"no images in the class subfolders of {top} (a probe needs {LAYOUT})")
    return LabelledFiles(paths, labels, classes)


def load_files(data_dir: Path, root: Path, part: str, paths: list[str], labels: list[int],
               size: int, bad_images: str) -> Arrays:
    """The images `paths` of folder `root` (with `labels`) decoded into the cache under
    DATA_DIR/vicreg_cache/, named by the folder's location, `part` and `size`."""
    root = root.resolve()
    where = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    fingerprint = files_fingerprint(paths, CACHE_VERSION, size,
                                    hashlib.sha256(repr(labels).encode()).hexdigest())

    def source() -> Source:
        return Source(len(paths), lambda i: read_image(paths[i], size), lambda i: labels[i],
                      lambda i: paths[i])

    return cached(Path(data_dir) / CACHE_DIR,
                  f"folder-{root.name or 'root'}-{where}-{part}-{size}px", fingerprint, source,
                  size, bad_images, f"{root} ({part})")


def reader(root: Path) -> Reader:
    """The Reader of folder `root`: labelled splits from train/ and test/ (labelled_files), the
    pretraining images labelled 0 (pretraining_files)."""
    def split(data_dir, name, size, download, bad_images):
        files = labelled_files(root, name)
        return load_files(data_dir, root, name, files.paths, files.labels, size, bad_images)

    def pretraining(data_dir, size, download, bad_images):
        paths = pretraining_files(root)
        return load_files(data_dir, root, "pretrain", paths, [0] * len(paths), size, bad_images)

    def probe_missing(data_dir) -> UserError | None:
        try:
            labelled_files(root, "test")
        except UserError as exc:
            return exc
        return None

    return Reader(split, pretraining, probe_missing)

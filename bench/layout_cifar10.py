"""Lay out CIFAR-10 for the trainers from what a machine has.

    python bench/layout_cifar10.py SRC DEST


SRC is a folder holding either cifar-10-batches-py/ (the standard python pickles: used where it
is, nothing is copied) or cifar10_jpeg.npz (the JPEG copy of CIFAR-10 this project's development
machines keep: train_jpeg/train_offsets/y_train and test_jpeg/test_offsets/y_test, image i's bytes
at jpeg[offsets[i]:offsets[i + 1]]), which is decoded into DEST/cifar-10-batches-py/. Prints the
folder to pass as --data-dir. For bench/gpu_check.sh, which needs nothing beside the repository.
"""
from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path

import numpy as np
from PIL import Image

BATCHES = 5
CIFAR10_DIR = "cifar-10-batches-py"
JPEG_FILE = "cifar10_jpeg.npz"


def decode(jpeg: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """uint8 [N, 32, 32, 3] RGB from N concatenated JPEG files."""
    return np.stack([np.asarray(Image.open(io.BytesIO(jpeg[a:b].tobytes())).convert("RGB"))
                     for a, b in zip(offsets[:-1], offsets[1:], strict=True)])


def write_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """One CIFAR-10 python batch: rows of 3072 uint8 (the R plane, then G, then B)."""
    rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))
    with open(path, "wb") as f:
        pickle.dump({b"data": rows, b"labels": [int(y) for y in labels]}, f, protocol=2)


def layout(source: Path, dest: Path) -> Path:
    """The data folder holding cifar-10-batches-py/ (source itself, or dest after decoding)."""
    if (source / CIFAR10_DIR).is_dir():
        return source
    if (dest / CIFAR10_DIR / "test_batch").is_file():
        return dest
    archive = source / JPEG_FILE
    if not archive.is_file():
        sys.exit(f"error: {source} holds neither {CIFAR10_DIR}/ nor {JPEG_FILE}")
    with np.load(archive) as z:
        splits = {split: (decode(z[f"{split}_jpeg"], z[f"{split}_offsets"]), z[f"y_{split}"])
                  for split in ("train", "test")}
    folder = dest / CIFAR10_DIR
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = splits["train"]
    for number, part in enumerate(np.array_split(np.arange(len(images)), BATCHES), start=1):
        write_batch(folder / f"data_batch_{number}", images[part], labels[part])
    write_batch(folder / "test_batch", *splits["test"])
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.splitlines()[0])
    print(layout(Path(sys.argv[1]), Path(sys.argv[2])))

"""STL-10 from the binaries torchvision's downloader writes:

    stl10_binary/{train,test}_{X,y}.bin, unlabeled_X.bin

96x96 images stored column-major, labels 1..10 (read as 0..9; the unlabelled images get -1).
Pretraining reads the 100,000 unlabelled and the 5,000 training images. Decoded once, at the size
asked for, into the image cache (shared.image_cache), memory-mapped after.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.download import cleaned_up_on_failure, corrupt
from shared.errors import UserError
from shared.image_cache import (
    CACHE_DIR,
    CACHE_VERSION,
    Source,
    cached,
    files_fingerprint,
    resize_array,
)
from shared.reader import Arrays, Reader

FOLDER = "stl10_binary"
FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
         "unlabeled": ("unlabeled_X.bin",)}
LAYOUT = "stl10_binary/{train,test}_{X,y}.bin and unlabeled_X.bin"
PRETRAINING_PARTS = ("train", "unlabeled")


def load_parts(data_dir: Path, parts: tuple[str, ...], size: int, download: bool) -> Arrays:
    """STL-10's `parts` ("train", "test", "unlabeled") one after the other, from the cache (made
    from the binaries on first use): uint8 [N, size, size, 3], int64 [N] (unlabeled: -1)."""
    data_dir = Path(data_dir)
    folder = data_dir / FOLDER
    needed = [folder / f for part in parts for f in FILES[part]]
    if download and not all(p.is_file() for p in needed):
        from torchvision.datasets import STL10  # lazy: torch is heavy, only to download

        with cleaned_up_on_failure(data_dir, "STL-10", LAYOUT):
            STL10(root=str(data_dir), split="train+unlabeled", download=True)
    missing = stl10_missing(data_dir, parts)
    if missing:
        raise missing
    fingerprint = files_fingerprint([str(folder / FILES[p][0]) for p in parts], CACHE_VERSION,
                                    size, parts)

    def source() -> Source:
        pixels, labels = [], []
        for part in parts:
            x_path = folder / FILES[part][0]
            if x_path.stat().st_size % (3 * 96 * 96):
                raise corrupt(x_path, "not a whole number of 3x96x96 images")
            # Stored column-major: each image is 3 planes of 96x96 with x before y.
            raw = np.memmap(x_path, np.uint8, "r").reshape(-1, 3, 96, 96)
            pixels.append(raw)
            labels.append(_labels(folder, part, len(raw)))
        offsets = np.cumsum([0, *(len(raw) for raw in pixels)])
        y = np.concatenate(labels)

        def read(i: int) -> np.ndarray:
            part = int(np.searchsorted(offsets, i, side="right")) - 1
            image = pixels[part][i - offsets[part]].transpose(2, 1, 0)
            return image if size == 96 else resize_array(image, size)

        return Source(len(y), read, lambda i: int(y[i]), lambda i: f"STL-10 image {i}")

    return cached(data_dir / CACHE_DIR, f"stl10-{'+'.join(parts)}-{size}px", fingerprint, source,
                  size, "error", f"STL-10 {'+'.join(parts)}")


def stl10_missing(data_dir: Path, parts: tuple[str, ...]) -> UserError | None:
    """The error for the first file of STL-10's `parts` that is not there, or None."""
    folder = Path(data_dir) / FOLDER
    missing = next((folder / f for part in parts for f in FILES[part]
                    if not (folder / f).is_file()), None)
    if missing is None:
        return None
    return UserError(f"STL-10 not found: {missing} does not exist (expected under {data_dir}: "
                     f"{LAYOUT}, the binary version of STL-10); pass --download to fetch it")


def _labels(folder: Path, part: str, count: int) -> np.ndarray:
    """Labels of an STL-10 part, int64 [count]: the file's 1..10 as 0..9; unlabeled: -1."""
    if part == "unlabeled":
        return np.full(count, -1, np.int64)
    path = folder / FILES[part][1]
    labels = np.fromfile(path, np.uint8).astype(np.int64) - 1
    if len(labels) != count or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise corrupt(path, f"expected {count} labels in 1..10")
    return labels


READER = Reader(
    split=lambda data_dir, split, size, download, bad_images: load_parts(
        data_dir, (split,), size, download),
    pretraining=lambda data_dir, size, download, bad_images: load_parts(
        data_dir, PRETRAINING_PARTS, size, download),
    probe_missing=lambda data_dir: stl10_missing(data_dir, ("test",)))

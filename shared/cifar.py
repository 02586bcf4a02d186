"""CIFAR-10 and CIFAR-100 from the python pickles torchvision's downloaders write:

    cifar10    cifar-10-batches-py/data_batch_1..5, test_batch
    cifar100   cifar-100-python/train, test                     (the fine labels)

Read directly at 32x32; at any other size resized once into the image cache (shared.image_cache).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from shared.download import cleaned_up_on_failure, corrupt, one_line
from shared.errors import UserError
from shared.image_cache import CACHE_DIR, CACHE_VERSION, files_fingerprint, resized
from shared.reader import Arrays, Reader


@dataclass(frozen=True)
class Layout:
    """Where a CIFAR dataset's pickles lie and what they hold."""

    folder: str
    files: dict[str, tuple[str, ...]]
    label_key: bytes
    title: str
    layout: str
    classes: int


LAYOUTS = {
    "cifar10": Layout("cifar-10-batches-py",
                      {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                       "test": ("test_batch",)},
                      b"labels", "CIFAR-10", "cifar-10-batches-py/data_batch_1..5, test_batch", 10),
    "cifar100": Layout("cifar-100-python", {"train": ("train",), "test": ("test",)},
                       b"fine_labels", "CIFAR-100", "cifar-100-python/train, test", 100),
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches hold (dicts, lists, bytes, numpy arrays), so a data file
    cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in the pickle")
        return super().find_class(module, name)


def reader(name: str) -> Reader:
    """The Reader of "cifar10" or "cifar100"."""
    return Reader(partial(load_split, name), partial(load_pretraining, name),
                  partial(cifar_missing, name, split="test"))


def load_split(name: str, data_dir: Path, split: str, size: int, download: bool,
               bad_images: str) -> Arrays:
    """A split at `size` pixels: the pickles' 32x32, or resized once into the cache."""
    images, labels = load_pickles(name, data_dir, split, download)
    if size == 32:
        return images, labels
    layout = LAYOUTS[name]
    fingerprint = files_fingerprint([str(data_dir / layout.folder / f)
                                     for f in layout.files[split]], CACHE_VERSION, size)
    return resized(data_dir / CACHE_DIR, f"{name}-{split}", images, labels, size, fingerprint,
                   f"{name} {split}")


def load_pretraining(name: str, data_dir: Path, size: int, download: bool,
                     bad_images: str) -> Arrays:
    """What a run pretrains on: the training split."""
    return load_split(name, data_dir, "train", size, download, bad_images)


def load_pickles(name: str, data_dir: Path, split: str, download: bool) -> Arrays:
    """A CIFAR-10 or CIFAR-100 split from its pickles: uint8 [N, 32, 32, 3], int64 [N]."""
    layout = LAYOUTS[name]
    paths = [data_dir / layout.folder / f for f in layout.files[split]]
    if download and not all(p.is_file() for p in paths):
        _download(name, data_dir)
    missing = cifar_missing(name, data_dir, split)
    if missing:
        raise missing
    batches = [_read_batch(name, p) for p in paths]
    data = np.concatenate([d for d, _ in batches])
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, np.concatenate([y for _, y in batches])


def cifar_missing(name: str, data_dir: Path, split: str) -> UserError | None:
    """The error for the first file of a CIFAR split that is not there, or None."""
    layout = LAYOUTS[name]
    folder = Path(data_dir) / layout.folder
    for path in (folder, *(folder / f for f in layout.files[split])):
        if not path.exists():
            return UserError(f"{layout.title} not found: {path} does not exist (expected under "
                             f"{data_dir}: {layout.layout}, the python version of "
                             f"{layout.title}); pass --download to fetch it")
    return None


def _download(name: str, data_dir: Path) -> None:
    """Fetch and md5-check a CIFAR archive into data_dir with torchvision."""
    from torchvision.datasets import CIFAR10, CIFAR100  # lazy: torch is heavy, only to download

    layout = LAYOUTS[name]
    with cleaned_up_on_failure(data_dir, layout.title, layout.layout):
        (CIFAR10 if name == "cifar10" else CIFAR100)(root=str(data_dir), train=True,
                                                     download=True)


def _read_batch(name: str, path: Path) -> Arrays:
    """One pickle batch: raw rows uint8 [n, 3072] (R, G, B planes of 32x32, row-major), labels
    int64 [n] (CIFAR-100's fine labels)."""
    layout = LAYOUTS[name]
    try:
        with open(path, "rb") as f:
            try:
                batch = _BatchUnpickler(f, encoding="bytes").load()
            # Garbage bytes can make unpickling fail in many ways (EOFError, KeyError, ValueError,
            # ...).
            except Exception as e:
                raise corrupt(path, f"cannot unpickle: {one_line(e)}") from e
    except OSError as e:
        raise UserError(f"cannot read {path}: {one_line(e)}") from e
    if not isinstance(batch, dict) or b"data" not in batch or layout.label_key not in batch:
        raise corrupt(path, f"not a dict with keys b'data' and {layout.label_key}")
    data, labels = batch[b"data"], np.asarray(batch[layout.label_key])
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise corrupt(path, f"b'data' should be uint8 [n, 3072], got {got}")
    if labels.ndim != 1 or len(labels) != len(data):
        raise corrupt(path, f"{labels.size} labels for {len(data)} images")
    if (labels.dtype.kind not in "iu" or labels.min(initial=0) < 0
            or labels.max(initial=0) >= layout.classes):
        raise corrupt(path, f"labels are not integers in 0..{layout.classes - 1}")
    return data, labels.astype(np.int64)

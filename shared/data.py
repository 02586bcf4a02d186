"""Framework-neutral loading of CIFAR-10 and GTSRB as numpy arrays.

Every split comes back as (images uint8 [N, 32, 32, 3] NHWC RGB C-contiguous, labels int64 [N]).
Layouts under a data directory:

    cifar-10-batches-py/data_batch_1..5, test_batch     CIFAR-10 python pickles, read here directly
    gtsrb/GTSRB/Training/000NN/*.ppm                    GTSRB train, as torchvision.datasets.GTSRB
                                                        reads it
    gtsrb/GTSRB/Final_Test/Images/*.ppm, gtsrb/GT-final_test.csv     GTSRB test

torch is never imported at module level; torchvision is imported only to download a dataset or to
list GTSRB's files, so a cached or CIFAR-10-only run needs just numpy.
"""
import contextlib
import hashlib
import os
import pickle
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from shared.config import IMAGE_SIZE
from shared.errors import UserError

DATASETS = ("cifar10", "gtsrb")
SPLITS = ("train", "test")
NUM_CLASSES = {"cifar10": 10, "gtsrb": 43}
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_CIFAR10_LAYOUT = "cifar-10-batches-py/data_batch_1..5, test_batch"
_GTSRB_LAYOUT = {
    "train": "gtsrb/GTSRB/Training/000NN/*.ppm",
    "test": "gtsrb/GTSRB/Final_Test/Images/*.ppm and gtsrb/GT-final_test.csv",
}
# Bump when the decoding or resizing of GTSRB changes, so that old caches are rebuilt.
_GTSRB_CACHE_VERSION = 1
# The 43 classes of GTSRB by class id, as the benchmark's signnames list them.
GTSRB_CLASS_NAMES = (
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)",
    "Speed limit (60km/h)", "Speed limit (70km/h)", "Speed limit (80km/h)",
    "End of speed limit (80km/h)", "Speed limit (100km/h)", "Speed limit (120km/h)",
    "No passing", "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 metric tons prohibited", "No entry", "General caution",
    "Dangerous curve to the left", "Dangerous curve to the right", "Double curve", "Bumpy road",
    "Slippery road", "Road narrows on the right", "Road work", "Traffic signals", "Pedestrians",
    "Children crossing", "Bicycles crossing", "Beware of ice/snow", "Wild animals crossing",
    "End of all speed and passing limits", "Turn right ahead", "Turn left ahead", "Ahead only",
    "Go straight or right", "Go straight or left", "Keep right", "Keep left",
    "Roundabout mandatory", "End of no passing",
    "End of no passing by vehicles over 3.5 metric tons")

# What a failed download can raise: network (URLError is an OSError), md5 mismatch (RuntimeError),
# bad archive.
_DOWNLOAD_ERRORS = (OSError, RuntimeError, ValueError, tarfile.TarError, zipfile.BadZipFile)


def load_split(name: str, data_dir, split: str,
               download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One split of a dataset: images uint8 [N, 32, 32, 3] (NHWC, RGB, C-contiguous), labels
    int64 [N].

    download=True fetches the dataset with torchvision when its files are missing (files already
    present are used as they are). Every problem with the data is raised as a one-line UserError.
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} for {name}; choose one of: {', '.join(SPLITS)}")
    if name == "cifar10":
        return _load_cifar10(Path(data_dir), split, download)
    return _load_gtsrb(Path(data_dir), split, download)


def dataset_summary(name: str, data_dir) -> str:
    """One line for logs: where the dataset is, how many images per split, how many classes."""
    labels = {split: load_split(name, data_dir, split)[1] for split in SPLITS}
    classes = len(np.union1d(labels["train"], labels["test"]))
    sizes = ", ".join(f"{split} {len(y)}" for split, y in labels.items())
    return (f"{name} in {data_dir}: {sizes} images of {IMAGE_SIZE}x{IMAGE_SIZE} RGB, "
            f"{classes} classes")


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices (int64 [n], sorted) of a seeded random subset of `labels` (int [N]) with stratified
    classes.

    Class c gets n * count_c / N samples rounded by largest remainder (Hamilton's method; equal
    remainders are ordered by the seed), drawn at random without replacement. n >= N gives all
    indices; n <= 0 or n < K (the number of classes present) is a UserError.
    """
    labels = np.asarray(labels)
    if n <= 0:
        raise UserError(f"subset size must be positive, got {n}")
    if n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if n < len(classes):
        raise UserError(f"subset size {n} is smaller than the number of classes ({len(classes)}); "
                        f"use at least {len(classes)}")
    rng = np.random.default_rng(seed)
    per_class = _largest_remainder(counts, n, rng)
    picks = [rng.choice(np.flatnonzero(inverse == c), size=k, replace=False)
             for c, k in enumerate(per_class)]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def _largest_remainder(weights: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Split `total` into int64 [K] shares proportional to `weights` (int [K], positive sum),
    Hamilton's method."""
    # Integer arithmetic keeps the remainders exact, so equal quotas tie exactly and the rng
    # decides.
    base, remainder = np.divmod(total * weights.astype(np.int64), weights.sum())
    order = np.lexsort((rng.permutation(len(weights)), -remainder))
    base[order[:total - base.sum()]] += 1
    return base


def _one_line(error: BaseException) -> str:
    """The exception's message with newlines collapsed, since CLIs print a UserError as one line."""
    return " ".join(str(error).split()) or type(error).__name__


# ---- CIFAR-10 ------------------------------------------------------------------------------------

class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10 batches hold (dicts, lists, bytes, numpy arrays), so a data file
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


def _load_cifar10(data_dir: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 split from the pickle batches: uint8 [N, 32, 32, 3], int64 [N]."""
    folder = data_dir / _CIFAR10_DIR
    paths = [folder / f for f in _CIFAR10_FILES[split]]
    if download and not all(p.is_file() for p in paths):
        _download_cifar10(data_dir)
    missing = _cifar10_missing(data_dir, split)
    if missing:
        raise missing
    batches = [_read_cifar10_batch(p) for p in paths]
    data = np.concatenate([d for d, _ in batches])
    images = np.ascontiguousarray(data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1))
    return images, np.concatenate([y for _, y in batches])


def _cifar10_missing(data_dir: Path, split: str) -> UserError | None:
    """The error for the first file of a CIFAR-10 split that is not there, or None."""
    folder = data_dir / _CIFAR10_DIR
    for path in (folder, *(folder / f for f in _CIFAR10_FILES[split])):
        if not path.exists():
            return UserError(f"CIFAR-10 not found: {path} does not exist (expected under "
                             f"{data_dir}: {_CIFAR10_LAYOUT}, "
                             "the python version of CIFAR-10); pass --download to fetch it")
    return None


def _download_cifar10(data_dir: Path) -> None:
    """Fetch and md5-check the CIFAR-10 archive into data_dir/cifar-10-batches-py/ with
    torchvision."""
    from torchvision.datasets import CIFAR10  # lazy: torch is heavy and only needed to download

    with _cleaned_up_on_failure(data_dir, "CIFAR-10", _CIFAR10_LAYOUT):
        CIFAR10(root=str(data_dir), train=True, download=True)


@contextlib.contextmanager
def _cleaned_up_on_failure(data_dir: Path, name: str, layout: str) -> Iterator[None]:
    """Run a download; when it fails, remove every file and folder it created (data_dir itself
    included when it did not exist) and raise a UserError that says how to use a local copy."""
    existed = data_dir.exists()
    before = set(data_dir.rglob("*")) if existed else set()
    try:
        yield
    except _DOWNLOAD_ERRORS as e:
        created = (set(data_dir.rglob("*")) if data_dir.exists() else set()) - before
        for path in sorted(created, key=lambda p: len(p.parts), reverse=True):
            if not (path.is_dir() and not path.is_symlink()):
                path.unlink(missing_ok=True)
            elif not any(path.iterdir()):  # its files were created here too, and are gone
                path.rmdir()
        if not existed and data_dir.exists() and not any(data_dir.iterdir()):
            data_dir.rmdir()
        raise UserError(f"downloading {name} into {data_dir} failed: {_one_line(e)}. If you "
                        f"have a copy ({layout}), point --data-dir or VICREG_DATA_DIR at the "
                        "folder holding it") from e


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch: raw rows uint8 [n, 3072] (R, G, B planes of 32x32, row-major), labels
    int64 [n]."""
    try:
        with open(path, "rb") as f:
            try:
                batch = _BatchUnpickler(f, encoding="bytes").load()
            # Garbage bytes can make unpickling fail in many ways (EOFError, KeyError, ValueError,
            # ...).
            except Exception as e:
                raise _corrupt_cifar10(path, f"cannot unpickle: {_one_line(e)}") from e
    except OSError as e:
        raise UserError(f"cannot read {path}: {_one_line(e)}") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise _corrupt_cifar10(path, "not a dict with keys b'data' and b'labels'")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * IMAGE_SIZE * IMAGE_SIZE):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _corrupt_cifar10(path, f"b'data' should be uint8 [n, 3072], got {got}")
    if labels.ndim != 1 or len(labels) != len(data):
        raise _corrupt_cifar10(path, f"{labels.size} labels for {len(data)} images")
    if (labels.dtype.kind not in "iu" or labels.min(initial=0) < 0
            or labels.max(initial=0) >= NUM_CLASSES["cifar10"]):
        raise _corrupt_cifar10(path, "labels are not integers in 0..9")
    return data, labels.astype(np.int64)


def _corrupt_cifar10(path: Path, reason: str) -> UserError:
    return UserError(f"{path} is corrupt or truncated ({reason}); delete {path.parent} "
                     "and re-run with --download to fetch a fresh copy")


# ---- GTSRB ---------------------------------------------------------------------------------------

def _load_gtsrb(data_dir: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """GTSRB split resized to 32x32: uint8 [N, 32, 32, 3], int64 [N]; cached as .npz
    next to the images."""
    base = data_dir / "gtsrb"
    if download and _gtsrb_missing(base, split):
        _download_gtsrb(data_dir, split)
    missing = _gtsrb_missing(base, split)
    if missing:
        raise UserError(f"GTSRB {split} split not found: {missing} does not exist (expected under "
                        f"{data_dir}: {_GTSRB_LAYOUT[split]}, as torchvision.datasets.GTSRB "
                        "lays it out); "
                        "pass --download to fetch it")
    cache = base / f"vicreg_cache_{split}_{IMAGE_SIZE}x{IMAGE_SIZE}.npz"
    key = _gtsrb_fingerprint(base, split)
    cached = _read_cache(cache, key)
    if cached is not None:
        return cached
    images, labels = _decode_gtsrb(_gtsrb_samples(data_dir, split))
    _write_cache(cache, key, images, labels)
    return images, labels


def gtsrb_available(data_dir, download: bool) -> bool:
    """Whether the probes that end a run include GTSRB: its folder is there, or --download
    fetches it."""
    return download or (Path(data_dir) / "gtsrb").is_dir()


def check_probe_data(data_dir, download: bool) -> None:
    """Before a run trains, what its probes will read: CIFAR-10's test split, and GTSRB's two
    splits when its folder is there (an empty or partial one is an error, not a surprise after
    training). With download, what is missing is fetched later."""
    if download:
        return
    data_dir = Path(data_dir)
    missing = _cifar10_missing(data_dir, "test")
    if missing:
        raise missing
    base = data_dir / "gtsrb"
    if not base.is_dir():
        return
    for split in SPLITS:
        absent = _gtsrb_missing(base, split)
        empty = next((p for p in _gtsrb_inputs(base, split) if p.is_dir()
                      and not any(p.iterdir())), None)
        if absent or empty:
            raise UserError(f"GTSRB in {base} is incomplete: {absent or empty} "
                            f"{'does not exist' if absent else 'is empty'} (expected: "
                            f"{_GTSRB_LAYOUT[split]}); complete it, pass --download, or move "
                            f"{base} away to probe CIFAR-10 only")


def _gtsrb_inputs(base: Path, split: str) -> list[Path]:
    """The folders and files torchvision.datasets.GTSRB needs for `split`."""
    if split == "train":
        return [base / "GTSRB" / "Training"]
    return [base / "GTSRB" / "Final_Test" / "Images", base / "GT-final_test.csv"]


def _gtsrb_missing(base: Path, split: str) -> Path | None:
    """The first required path for `split` that does not exist, or None."""
    return next((p for p in _gtsrb_inputs(base, split) if not p.exists()), None)


def _download_gtsrb(data_dir: Path, split: str) -> None:
    """Fetch and md5-check the GTSRB archives for `split` into data_dir/gtsrb/ with torchvision."""
    from torchvision.datasets import (
        GTSRB,  # lazy: torch is heavy and only needed to download or list
    )

    with _cleaned_up_on_failure(data_dir, f"GTSRB {split}", _GTSRB_LAYOUT[split]):
        GTSRB(root=str(data_dir), split=split, download=True)


def _gtsrb_samples(data_dir: Path, split: str) -> list[tuple[str, int]]:
    """(image path, class id) pairs in torchvision's order: train by class folder then name, test
    as in the csv."""
    from torchvision.datasets import (
        GTSRB,  # lazy: torch is heavy and only needed to download or list
    )

    try:
        # private, but holds the paths we need to name bad files
        samples = GTSRB(root=str(data_dir), split=split)._samples
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"cannot list GTSRB {split} images under {data_dir / 'gtsrb'}: "
                        f"{_one_line(e)}") from e
    if not samples:
        raise UserError(f"no GTSRB {split} images found under {data_dir / 'gtsrb'} "
                        f"(expected {_GTSRB_LAYOUT[split]}); pass --download to fetch them")
    return samples


def _decode_gtsrb(samples: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Read each image as RGB, resized to 32x32: uint8 [N, 32, 32, 3], int64 [N]."""
    images = np.empty((len(samples), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, (path, _) in enumerate(samples):
        images[i] = _read_image(path)
    return images, np.array([y for _, y in samples], dtype=np.int64)


def _read_image(path: str) -> np.ndarray:
    """One image file as uint8 [32, 32, 3] RGB; PIL's bilinear resize antialiases when it
    shrinks."""
    from PIL import Image  # lazy: only GTSRB needs Pillow

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read GTSRB image {path}: corrupt or missing ({_one_line(e)}); "
                        "replace it, or delete the gtsrb folder and re-run with --download") from e
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(rgb)


def _gtsrb_fingerprint(base: Path, split: str) -> str:
    """Hash of the name, size and mtime of every input file of `split`; changes whenever the file
    set does.

    It needs only os.walk and stat, not torchvision: about 0.4 s for 39,209 files. Plain strings
    rather than Path objects, which are several times slower at this count.
    """
    lines = [f"version {_GTSRB_CACHE_VERSION}"]
    prefix = len(str(base)) + 1
    for top in _gtsrb_inputs(base, split):
        for path in sorted([str(top)] if top.is_file() else _walk_ppm(str(top))):
            st = os.stat(path)
            lines.append(f"{path[prefix:]}\t{st.st_size}\t{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _walk_ppm(top: str) -> list[str]:
    """Every .ppm file under `top`, following links as torchvision's make_dataset does."""
    return [os.path.join(d, f) for d, _, names in os.walk(top, followlinks=True)
            for f in names if f.lower().endswith(".ppm")]


def _read_cache(path: Path, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Cached (images uint8 [N, 32, 32, 3], labels int64 [N]) if `path` holds them under `key`, else
    None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            images, labels = z["images"], z["labels"]
    # A missing, half-written or foreign cache is simply rebuilt.
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if (images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3)
            or labels.dtype != np.int64 or labels.shape != (len(images),)):
        return None
    return images, labels


def _write_cache(path: Path, key: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Store the arrays atomically (temp file, then os.replace); warn on stderr and go on if that
    fails."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            # Uncompressed: a 120 MB load is then a plain read, well under the 2 s budget.
            np.savez(f, key=np.array(key), images=images, labels=labels)
        # mkstemp makes it 0600; others sharing the data folder should read it too
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        print(f"warning: cannot write the GTSRB cache {path} ({_one_line(e)}); "
              "the next load will decode the images again", file=sys.stderr)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)

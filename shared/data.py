"""Framework-neutral loading of the datasets as numpy arrays, by name.

Every split comes back as (images uint8 [N, S, S, 3] NHWC RGB, labels int64 [N]), S the image size
asked for (by default the dataset's own: NATIVE_SIZE). Names and layouts under a data directory:

    cifar10    cifar-10-batches-py/data_batch_1..5, test_batch      python pickles, read directly
    cifar100   cifar-100-python/train, test                          python pickles, fine labels
    stl10      stl10_binary/{train,test}_{X,y}.bin, unlabeled_X.bin  STL-10's binaries
    gtsrb      gtsrb/GTSRB/Training/000NN/*.ppm                      as torchvision.datasets.GTSRB
               gtsrb/GTSRB/Final_Test/Images/*.ppm, gtsrb/GT-final_test.csv       reads them
    folder:PATH  any folder of images (shared.image_folder says how it is read)

These are the layouts torchvision's downloaders write (--download fetches all but a folder).
Pretraining reads pretraining_split: the training split, and for STL-10 its 100,000 unlabelled
images too (label -1). STL-10, folders and any dataset at a size other than its own are decoded
once into a memory-mapped cache under DATA_DIR/vicreg_cache/ (shared.image_cache); CIFAR at 32x32
is read from its pickles and GTSRB from its own .npz cache, as before.

torch is never imported at module level; torchvision is imported only to download a dataset or to
list GTSRB's files, so a cached or CIFAR-only run needs just numpy.
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

from shared.config import DATASET_NAMES, FOLDER_PREFIX, NATIVE_SIZE, dataset_name_ok, native_size
from shared.errors import UserError
from shared.image_cache import (
    CACHE_DIR,
    CACHE_VERSION,
    Source,
    cached,
    files_fingerprint,
    read_image,
    square,
)
from shared.image_folder import (
    class_names,
    folder_root,
    has_classes,
    labelled_files,
    pretraining_files,
)

DATASETS = DATASET_NAMES
SPLITS = ("train", "test")
TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10", "gtsrb": "GTSRB"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10, "gtsrb": 43}
# Every image is standardised with CIFAR-10's channel statistics, whatever the dataset: a fixed
# affine map of the input, the same in pretraining and in the probes.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_CIFAR = {
    "cifar10": ("cifar-10-batches-py",
                {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
                b"labels", "CIFAR-10", "cifar-10-batches-py/data_batch_1..5, test_batch"),
    "cifar100": ("cifar-100-python", {"train": ("train",), "test": ("test",)}, b"fine_labels",
                 "CIFAR-100", "cifar-100-python/train, test"),
}
_STL10_DIR = "stl10_binary"
_STL10_FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
                "unlabeled": ("unlabeled_X.bin",)}
_STL10_LAYOUT = "stl10_binary/{train,test}_{X,y}.bin and unlabeled_X.bin"
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


def is_folder(name: str) -> bool:
    """Whether a dataset name is "folder:PATH"."""
    return name.startswith(FOLDER_PREFIX)


def check_dataset(name: str) -> None:
    """UserError unless `name` is one of DATASETS or folder:PATH with a PATH."""
    if not dataset_name_ok(name):
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)} or "
                        "folder:PATH (a folder of images)")


def dataset_key(name: str) -> str:
    """How files and tables name a dataset: "folder" for any folder:PATH, else its name."""
    return "folder" if is_folder(name) else name


def dataset_title(name: str) -> str:
    """How messages name a dataset: "CIFAR-10", ..., or a folder's path."""
    return str(folder_root(name)) if is_folder(name) else TITLES[name]


def num_classes(name: str) -> int:
    """How many classes a dataset has (a folder's: the subfolders of its train/)."""
    return len(class_names(folder_root(name))) if is_folder(name) else NUM_CLASSES[name]


def is_labelled(name: str) -> bool:
    """Whether a dataset can be probed: every named one, and a folder laid out with train/ and
    test/ (or val/) class folders."""
    return has_classes(folder_root(name)) if is_folder(name) else True


def load_split(name: str, data_dir, split: str, download: bool = False,
               image_size: int | None = None,
               bad_images: str = "skip") -> tuple[np.ndarray, np.ndarray]:
    """One labelled split ("train" or "test") of a dataset: images uint8 [N, S, S, 3] (NHWC,
    RGB; S = image_size, by default native_size(name)), labels int64 [N].

    download=True fetches the dataset with torchvision when its files are missing (files already
    present are used as they are). bad_images: what an unreadable file of a folder does ("skip"
    or "error"). Every problem with the data is raised as a one-line UserError.
    """
    check_dataset(name)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} for {name}; choose one of: {', '.join(SPLITS)}")
    size = image_size or native_size(name)
    data_dir = Path(data_dir)
    if is_folder(name):
        files = labelled_files(folder_root(name), split)
        return _folder_cache(data_dir, name, split, files.paths, files.labels, size, bad_images)
    if name == "stl10":
        return _load_stl10(data_dir, (split,), size, download)
    if name == "gtsrb":
        return _load_gtsrb(data_dir, split, download, size)
    images, labels = _load_cifar(name, data_dir, split, download)
    if size == NATIVE_SIZE[name]:
        return images, labels
    return _resized(data_dir, f"{name}-{split}", images, labels, size,
                    _cifar_fingerprint(name, data_dir, split, size), f"{name} {split}")


def pretraining_split(name: str, data_dir, download: bool = False,
                      image_size: int | None = None,
                      bad_images: str = "skip") -> tuple[np.ndarray, np.ndarray]:
    """The images a run pretrains on, as load_split returns them: the training split; STL-10's
    train and unlabeled images (label -1); a folder's images (label 0; see shared.image_folder)."""
    check_dataset(name)
    size = image_size or native_size(name)
    if name == "stl10":
        return _load_stl10(Path(data_dir), ("train", "unlabeled"), size, download)
    if is_folder(name):
        paths = pretraining_files(folder_root(name))
        return _folder_cache(Path(data_dir), name, "pretrain", paths, [0] * len(paths), size,
                             bad_images)
    return load_split(name, data_dir, "train", download, size, bad_images)


def dataset_summary(name: str, data_dir, image_size: int | None = None) -> str:
    """One line for logs: where the dataset is, how many images per split, how many classes."""
    labels = {split: load_split(name, data_dir, split, image_size=image_size)[1]
              for split in SPLITS}
    classes = len(np.union1d(labels["train"], labels["test"]))
    sizes = ", ".join(f"{split} {len(y)}" for split, y in labels.items())
    size = image_size or native_size(name)
    return f"{name} in {data_dir}: {sizes} images of {size}x{size} RGB, {classes} classes"


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


# ---- CIFAR-10 and CIFAR-100 ----------------------------------------------------------------------

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


def _load_cifar(name: str, data_dir: Path, split: str,
                download: bool) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 or CIFAR-100 split from its pickles: uint8 [N, 32, 32, 3], int64 [N]."""
    folder_name, files, _, _, _ = _CIFAR[name]
    paths = [data_dir / folder_name / f for f in files[split]]
    if download and not all(p.is_file() for p in paths):
        _download_cifar(name, data_dir)
    missing = cifar_missing(name, data_dir, split)
    if missing:
        raise missing
    batches = [_read_cifar_batch(name, p) for p in paths]
    data = np.concatenate([d for d, _ in batches])
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, np.concatenate([y for _, y in batches])


def cifar_missing(name: str, data_dir: Path, split: str) -> UserError | None:
    """The error for the first file of a CIFAR split that is not there, or None."""
    folder_name, files, _, title, layout = _CIFAR[name]
    folder = data_dir / folder_name
    for path in (folder, *(folder / f for f in files[split])):
        if not path.exists():
            return UserError(f"{title} not found: {path} does not exist (expected under "
                             f"{data_dir}: {layout}, the python version of {title}); pass "
                             "--download to fetch it")
    return None


def _cifar_fingerprint(name: str, data_dir: Path, split: str, size: int) -> str:
    """What a resized copy of a CIFAR split is made from: its pickles, the size."""
    folder_name, files, _, _, _ = _CIFAR[name]
    return files_fingerprint([str(data_dir / folder_name / f) for f in files[split]],
                             CACHE_VERSION, size)


def _download_cifar(name: str, data_dir: Path) -> None:
    """Fetch and md5-check a CIFAR archive into data_dir with torchvision."""
    from torchvision.datasets import CIFAR10, CIFAR100  # lazy: torch is heavy, only to download

    _, _, _, title, layout = _CIFAR[name]
    with _cleaned_up_on_failure(data_dir, title, layout):
        (CIFAR10 if name == "cifar10" else CIFAR100)(root=str(data_dir), train=True,
                                                     download=True)


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


def _read_cifar_batch(name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch: raw rows uint8 [n, 3072] (R, G, B planes of 32x32, row-major), labels
    int64 [n] (CIFAR-100's fine labels)."""
    _, _, label_key, _, _ = _CIFAR[name]
    try:
        with open(path, "rb") as f:
            try:
                batch = _BatchUnpickler(f, encoding="bytes").load()
            # Garbage bytes can make unpickling fail in many ways (EOFError, KeyError, ValueError,
            # ...).
            except Exception as e:
                raise _corrupt(path, f"cannot unpickle: {_one_line(e)}") from e
    except OSError as e:
        raise UserError(f"cannot read {path}: {_one_line(e)}") from e
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise _corrupt(path, f"not a dict with keys b'data' and {label_key}")
    data, labels = batch[b"data"], np.asarray(batch[label_key])
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _corrupt(path, f"b'data' should be uint8 [n, 3072], got {got}")
    if labels.ndim != 1 or len(labels) != len(data):
        raise _corrupt(path, f"{labels.size} labels for {len(data)} images")
    if (labels.dtype.kind not in "iu" or labels.min(initial=0) < 0
            or labels.max(initial=0) >= NUM_CLASSES[name]):
        raise _corrupt(path, f"labels are not integers in 0..{NUM_CLASSES[name] - 1}")
    return data, labels.astype(np.int64)


def _corrupt(path: Path, reason: str) -> UserError:
    return UserError(f"{path} is corrupt or truncated ({reason}); delete {path.parent} "
                     "and re-run with --download to fetch a fresh copy")


# ---- STL-10 --------------------------------------------------------------------------------------

def _load_stl10(data_dir: Path, parts: tuple[str, ...], size: int,
                download: bool) -> tuple[np.ndarray, np.ndarray]:
    """STL-10's `parts` ("train", "test", "unlabeled") one after the other, from the cache (made
    from the binaries on first use): uint8 [N, size, size, 3], int64 [N] (unlabeled: -1)."""
    folder = data_dir / _STL10_DIR
    needed = [folder / f for part in parts for f in _STL10_FILES[part]]
    if download and not all(p.is_file() for p in needed):
        from torchvision.datasets import STL10  # lazy: torch is heavy, only to download

        with _cleaned_up_on_failure(data_dir, "STL-10", _STL10_LAYOUT):
            STL10(root=str(data_dir), split="train+unlabeled", download=True)
    missing = stl10_missing(data_dir, parts)
    if missing:
        raise missing
    pixels, labels = [], []
    for part in parts:
        x_path = folder / _STL10_FILES[part][0]
        if x_path.stat().st_size % (3 * 96 * 96):
            raise _corrupt(x_path, "not a whole number of 3x96x96 images")
        # Stored column-major: each image is 3 planes of 96x96 with x before y.
        raw = np.memmap(x_path, np.uint8, "r").reshape(-1, 3, 96, 96)
        pixels.append(raw)
        labels.append(_stl10_labels(folder, part, len(raw)))
    offsets = np.cumsum([0, *(len(raw) for raw in pixels)])
    y = np.concatenate(labels)

    def read(i: int) -> np.ndarray:
        part = int(np.searchsorted(offsets, i, side="right")) - 1
        image = pixels[part][i - offsets[part]].transpose(2, 1, 0)
        return image if size == 96 else _resize_array(image, size)

    source = Source(len(y), read, lambda i: int(y[i]), lambda i: f"STL-10 image {i}",
                    files_fingerprint([str(folder / _STL10_FILES[p][0]) for p in parts],
                                      CACHE_VERSION, size, parts))
    return cached(data_dir / CACHE_DIR, f"stl10-{'+'.join(parts)}-{size}px", source, size,
                  "error", f"STL-10 {'+'.join(parts)}")


def stl10_missing(data_dir: Path, parts: tuple[str, ...]) -> UserError | None:
    """The error for the first file of STL-10's `parts` that is not there, or None."""
    folder = data_dir / _STL10_DIR
    missing = next((folder / f for part in parts for f in _STL10_FILES[part]
                    if not (folder / f).is_file()), None)
    if missing is None:
        return None
    return UserError(f"STL-10 not found: {missing} does not exist (expected under {data_dir}: "
                     f"{_STL10_LAYOUT}, the binary version of STL-10); pass --download to fetch it")


def _stl10_labels(folder: Path, part: str, count: int) -> np.ndarray:
    """Labels of an STL-10 part, int64 [count]: the file's 1..10 as 0..9; unlabeled: -1."""
    if part == "unlabeled":
        return np.full(count, -1, np.int64)
    path = folder / _STL10_FILES[part][1]
    labels = np.fromfile(path, np.uint8).astype(np.int64) - 1
    if len(labels) != count or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise _corrupt(path, f"expected {count} labels in 1..10")
    return labels


# ---- any dataset resized, and folders ------------------------------------------------------------

def _resize_array(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3], as a folder's images are resized."""
    from PIL import Image

    return square(Image.fromarray(image), size)


def _resized(data_dir: Path, name: str, images: np.ndarray, labels: np.ndarray, size: int,
             fingerprint: str, description: str) -> tuple[np.ndarray, np.ndarray]:
    """`images` resized to size x size, cached under data_dir/vicreg_cache/ as `name`."""
    source = Source(len(images), lambda i: _resize_array(images[i], size),
                    lambda i: int(labels[i]), lambda i: f"{description} image {i}", fingerprint)
    return cached(data_dir / CACHE_DIR, f"{name}-{size}px", source, size, "error", description)


def _folder_cache(data_dir: Path, name: str, part: str, paths: list[str], labels: list[int],
                  size: int, bad_images: str) -> tuple[np.ndarray, np.ndarray]:
    """A folder's images `paths` (with `labels`) decoded into the cache under
    data_dir/vicreg_cache/, named by the folder's location, `part` and `size`."""
    root = folder_root(name).resolve()
    where = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    source = Source(len(paths), lambda i: read_image(paths[i], size), lambda i: labels[i],
                    lambda i: paths[i],
                    files_fingerprint(paths, CACHE_VERSION, size, hashlib.sha256(
                        repr(labels).encode()).hexdigest()))
    return cached(data_dir / CACHE_DIR, f"folder-{root.name or 'root'}-{where}-{part}-{size}px",
                  source, size, bad_images, f"{root} ({part})")


# ---- GTSRB ---------------------------------------------------------------------------------------

def _load_gtsrb(data_dir: Path, split: str, download: bool,
                size: int) -> tuple[np.ndarray, np.ndarray]:
    """GTSRB split resized to size x size: uint8 [N, size, size, 3], int64 [N]; cached as .npz
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
    cache = base / f"vicreg_cache_{split}_{size}x{size}.npz"
    key = _gtsrb_fingerprint(base, split)
    stored = _read_cache(cache, key, size)
    if stored is not None:
        return stored
    images, labels = _decode_gtsrb(_gtsrb_samples(data_dir, split), size)
    _write_cache(cache, key, images, labels)
    return images, labels


def gtsrb_available(data_dir, download: bool) -> bool:
    """Whether the probes that end a run include GTSRB: its folder is there, or --download
    fetches it."""
    return download or (Path(data_dir) / "gtsrb").is_dir()


def probe_datasets(name: str, data_dir, download: bool) -> list[str]:
    """The datasets the probes that end a run on `name` read: `name` when it is labelled (a
    folder may not be), then GTSRB when its data is there (gtsrb_available)."""
    datasets = [name] if is_labelled(name) else []
    if name != "gtsrb" and gtsrb_available(data_dir, download):
        datasets.append("gtsrb")
    return datasets


def check_probe_data(datasets: list[str], data_dir, download: bool) -> None:
    """Before a run trains, what its probes will read (probe_datasets): the test split of each,
    and both of GTSRB's splits (an empty or partial GTSRB folder is an error, not a surprise after
    training). With download, what is missing is fetched later."""
    if download:
        return
    data_dir = Path(data_dir)
    for name in datasets:
        if name in _CIFAR:
            missing = cifar_missing(name, data_dir, "test")
            if missing:
                raise missing
        elif name == "stl10":
            missing = stl10_missing(data_dir, ("test",))
            if missing:
                raise missing
        elif name == "gtsrb":
            _check_gtsrb_complete(data_dir / "gtsrb")
        else:
            labelled_files(folder_root(name), "test")


def _check_gtsrb_complete(base: Path) -> None:
    """UserError when GTSRB's folder lacks a split's files, or holds an empty one."""
    for split in SPLITS:
        absent = _gtsrb_missing(base, split)
        empty = next((p for p in _gtsrb_inputs(base, split) if p.is_dir()
                      and not any(p.iterdir())), None)
        if absent or empty:
            raise UserError(f"GTSRB in {base} is incomplete: {absent or empty} "
                            f"{'does not exist' if absent else 'is empty'} (expected: "
                            f"{_GTSRB_LAYOUT[split]}); complete it, pass --download, or move "
                            f"{base} away to probe without GTSRB")


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


def _decode_gtsrb(samples: list[tuple[str, int]], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Read each image as RGB, resized to size x size: uint8 [N, size, size, 3], int64 [N]."""
    images = np.empty((len(samples), size, size, 3), np.uint8)
    for i, (path, _) in enumerate(samples):
        images[i] = _read_gtsrb_image(path, size)
    return images, np.array([y for _, y in samples], dtype=np.int64)


def _read_gtsrb_image(path: str, size: int) -> np.ndarray:
    """One image file as uint8 [size, size, 3] RGB, the whole sign box resized (GTSRB's boxes are
    about square, and the benchmark resizes them whole); PIL's bilinear resize antialiases when it
    shrinks."""
    from PIL import Image  # lazy: only GTSRB needs Pillow

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read GTSRB image {path}: corrupt or missing ({_one_line(e)}); "
                        "replace it, or delete the gtsrb folder and re-run with --download") from e
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
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


def _read_cache(path: Path, key: str, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Cached (images uint8 [N, size, size, 3], labels int64 [N]) if `path` holds them under `key`,
    else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            images, labels = z["images"], z["labels"]
    # A missing, half-written or foreign cache is simply rebuilt.
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if (images.dtype != np.uint8 or images.shape[1:] != (size, size, 3)
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

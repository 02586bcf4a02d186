"""Framework-neutral loading of the datasets as numpy arrays, by name: the registry.

Every split comes back as (images uint8 [N, S, S, 3] NHWC RGB, labels int64 [N]), S the image size
asked for (by default the dataset's own: NATIVE_SIZE). Names, the layouts under a data directory
(those torchvision's downloaders write; --download fetches all but a folder) and the family module
that reads each:

    cifar10      cifar-10-batches-py/data_batch_1..5, test_batch       shared.cifar
    cifar100     cifar-100-python/train, test (fine labels)            shared.cifar
    stl10        stl10_binary/{train,test}_{X,y}.bin, unlabeled_X.bin  shared.stl10
    gtsrb        gtsrb/GTSRB/Training/000NN/*.ppm,                     shared.gtsrb
                 gtsrb/GTSRB/Final_Test/Images/*.ppm, gtsrb/GT-final_test.csv
    folder:PATH  any folder of images                                  shared.image_folder

Pretraining reads pretraining_split: the training split, and for STL-10 its 100,000 unlabelled
images too (label -1). What is decoded (GTSRB, STL-10, folders, any dataset at another size) is
decoded once into the memory-mapped cache under DATA_DIR/vicreg_cache/ (shared.image_cache); CIFAR
at 32x32 is read from its pickles.

torch is never imported at module level; torchvision is imported only to download a dataset or to
list GTSRB's files, so a cached or CIFAR-only run needs just numpy.
"""
import hashlib
import re
from pathlib import Path

import numpy as np

from shared import cifar, gtsrb, stl10
from shared.config import DATASET_NAMES, FOLDER_PREFIX, Config, dataset_name_ok, native_size
from shared.errors import UserError
from shared.image_folder import class_names, folder_root, unprobed_reason
from shared.image_folder import reader as folder_reader
from shared.reader import Reader

SPLITS = ("train", "test")
FOLDER_KEY = "folder"
TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10", "gtsrb": "GTSRB"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10, "gtsrb": 43}
# Every image is standardised with CIFAR-10's channel statistics, whatever the dataset: a fixed
# affine map of the input, the same in pretraining and in the probes.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
READERS = {"cifar10": cifar.reader("cifar10"), "cifar100": cifar.reader("cifar100"),
           "stl10": stl10.READER, "gtsrb": gtsrb.READER}


def is_folder(name: str) -> bool:
    """Whether a dataset name is "folder:PATH"."""
    return name.startswith(FOLDER_PREFIX)


def check_dataset(name: str) -> None:
    """UserError unless `name` is one of DATASET_NAMES or folder:PATH with a PATH."""
    if not dataset_name_ok(name):
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)} or "
                        "folder:PATH (a folder of images)")


def reader(name: str) -> Reader:
    """The Reader of dataset `name` (UserError for an unknown name)."""
    check_dataset(name)
    return folder_reader(folder_root(name)) if is_folder(name) else READERS[name]


def dataset_key(name: str) -> str:
    """How files and tables name a dataset: its name, or for folder:PATH
    "folder-<PATH's last part>-<6 hex digits of sha256(PATH made absolute)>", so that two folders'
    results never share a file (a key holds no "_": probe files are probe_<key>[_...].json)."""
    if not is_folder(name):
        return name
    root = folder_root(name).expanduser().absolute()
    slug = re.sub(r"[^a-z0-9]+", "-", root.name.lower()).strip("-") or "root"
    return f"{FOLDER_KEY}-{slug}-{hashlib.sha256(str(root).encode()).hexdigest()[:6]}"


def key_title(key: str) -> str:
    """How tables and figures name a dataset_key: "CIFAR-10", ..., or "folder <PATH's last
    part>" ("folder" for a run from before folder keys named their folder)."""
    if key in TITLES:
        return TITLES[key]
    if key.startswith(FOLDER_KEY + "-"):
        return f"{FOLDER_KEY} {key[len(FOLDER_KEY) + 1:].rsplit('-', 1)[0]}"
    return key


def dataset_title(name: str) -> str:
    """How messages name a dataset: "CIFAR-10", ..., or a folder's path."""
    return str(folder_root(name)) if is_folder(name) else TITLES[name]


def num_classes(name: str) -> int:
    """How many classes a dataset has (a folder's: the subfolders of its train/)."""
    return len(class_names(folder_root(name))) if is_folder(name) else NUM_CLASSES[name]


def unlabelled_reason(name: str) -> str:
    """Why a dataset can be neither probed nor monitored, in a phrase (a folder not laid out with
    train/ and test/ (or val/) class folders, or with one class); "" when it can be: every named
    one."""
    return unprobed_reason(folder_root(name)) if is_folder(name) else ""


def is_labelled(name: str) -> bool:
    """Whether a dataset can be probed and monitored (unlabelled_reason)."""
    return not unlabelled_reason(name)


def load_split(name: str, data_dir, split: str, download: bool = False,
               image_size: int | None = None,
               bad_images: str = "skip") -> tuple[np.ndarray, np.ndarray]:
    """One labelled split ("train" or "test") of a dataset: images uint8 [N, S, S, 3] (NHWC,
    RGB; S = image_size, by default native_size(name)), labels int64 [N].

    download=True fetches the dataset with torchvision when its files are missing (files already
    present are used as they are). bad_images: what an unreadable file of a folder does ("skip"
    or "error"). Every problem with the data is raised as a one-line UserError.
    """
    read = reader(name)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} for {name}; choose one of: {', '.join(SPLITS)}")
    return read.split(Path(data_dir), split, image_size or native_size(name), download,
                      bad_images)


def pretraining_split(name: str, data_dir, download: bool = False,
                      image_size: int | None = None,
                      bad_images: str = "skip") -> tuple[np.ndarray, np.ndarray]:
    """The images a run pretrains on, as load_split returns them: the training split; STL-10's
    train and unlabeled images (label -1); a folder's images (label 0; see shared.image_folder)."""
    return reader(name).pretraining(Path(data_dir), image_size or native_size(name), download,
                                    bad_images)


def pretraining_images(cfg: Config) -> np.ndarray:
    """The images a run trains on, uint8 [N, S, S, 3]: its dataset's pretraining_split, or a
    seeded subset of cfg.subset of them (pretraining_subset)."""
    images, labels = pretraining_split(cfg.dataset, cfg.data_dir, cfg.download, cfg.image_size,
                                       cfg.bad_images)
    if cfg.subset > len(images):
        raise UserError(f"--subset {cfg.subset} is larger than the {len(images)} "
                        f"{dataset_title(cfg.dataset)} training images; use at most that many (or "
                        "0 for all)")
    if cfg.subset:
        images = images[pretraining_subset(labels, cfg.subset, cfg.seed)]
    return np.ascontiguousarray(images)


def pretraining_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices (int64 [n], sorted) of a seeded subset of the pretraining images with `labels`
    (int [N]): stratified by class (stratified_subset) when n holds at least one image of each,
    else a plain random subset, since pretraining does not read the labels."""
    if 0 < n < len(np.unique(labels)):
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(len(labels), size=n, replace=False)).astype(np.int64)
    return stratified_subset(labels, n, seed)


def probe_datasets(name: str, data_dir, download: bool) -> list[str]:
    """The datasets the probes that end a run on `name` read: `name` when it is labelled (a
    folder may not be), then GTSRB when its data is there (gtsrb.gtsrb_available)."""
    datasets = [name] if is_labelled(name) else []
    if name != "gtsrb" and gtsrb.gtsrb_available(data_dir, download):
        datasets.append("gtsrb")
    return datasets


def check_probe_data(datasets: list[str], data_dir, download: bool) -> None:
    """Before a run trains, what its probes will read (probe_datasets): the test split of each,
    and both of GTSRB's splits (an empty or partial GTSRB folder is an error, not a surprise after
    training). With download, what is missing is fetched later."""
    if download:
        return
    for name in datasets:
        missing = reader(name).probe_missing(Path(data_dir))
        if missing:
            raise missing


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

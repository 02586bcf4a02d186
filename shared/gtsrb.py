"""GTSRB (the German Traffic Sign Recognition Benchmark) in torchvision.datasets.GTSRB's layout:

    gtsrb/GTSRB/Training/000NN/*.ppm                               one folder per class
    gtsrb/GTSRB/Final_Test/Images/*.ppm, gtsrb/GT-final_test.csv   the test images, their classes

Each sign box is resized whole to the size asked for (the boxes are about square) and decoded once
into the image cache (shared.image_cache). torchvision lists the files (its order: train by class
folder then name, test as in the csv), only when the images are decoded.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from shared.download import cleaned_up_on_failure, one_line
from shared.errors import UserError
from shared.image_cache import CACHE_DIR, CACHE_VERSION, Source, cached
from shared.reader import Arrays, Reader

SPLITS = ("train", "test")
LAYOUT = {
    "train": "gtsrb/GTSRB/Training/000NN/*.ppm",
    "test": "gtsrb/GTSRB/Final_Test/Images/*.ppm and gtsrb/GT-final_test.csv",
}
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



def load_split(data_dir: Path, split: str, size: int, download: bool, bad_images: str) -> Arrays:
    """A GTSRB split resized to size x size: uint8 [N, size, size, 3], int64 [N]. An image that
    cannot be read is always an error (the benchmark's files are complete)."""
    data_dir = Path(data_dir)
    base = data_dir / "gtsrb"
    if download and _missing(base, split):
        _download(data_dir, split)
    missing = _missing(base, split)
    if missing:
        raise UserError(f"GTSRB {split} split not found: {missing} does not exist (expected under "
                        f"{data_dir}: {LAYOUT[split]}, as torchvision.datasets.GTSRB lays it "
                        "out); pass --download to fetch it")

    def source() -> Source:
        samples = _samples(data_dir, split)
        return Source(len(samples), lambda i: _read_image(samples[i][0], size),
                      lambda i: samples[i][1], lambda i: samples[i][0])

    return cached(data_dir / CACHE_DIR, f"gtsrb-{split}-{size}px", _fingerprint(base, split),
                  source, size, "error", f"GTSRB {split}",
                  fix="replace it, or delete the gtsrb folder and re-run with --download")


def gtsrb_available(data_dir, download: bool) -> bool:
    """Whether the probes that end a run include GTSRB: its folder is there, or --download
    fetches it."""
    return download or (Path(data_dir) / "gtsrb").is_dir()


def incomplete(data_dir: Path) -> UserError | None:
    """The error when GTSRB's folder lacks a split's files, or holds an empty one (a probe reads
    both splits); None when both are there."""
    base = Path(data_dir) / "gtsrb"
    for split in SPLITS:
        absent = _missing(base, split)
        empty = next((p for p in _inputs(base, split) if p.is_dir()
                      and not any(p.iterdir())), None)
        if absent or empty:
            return UserError(f"GTSRB in {base} is incomplete: {absent or empty} "
                             f"{'does not exist' if absent else 'is empty'} (expected: "
                             f"{LAYOUT[split]}); complete it, pass --download, or move "
                             f"{base} away to probe without GTSRB")
    return None


def _inputs(base: Path, split: str) -> list[Path]:
    """The folders and files torchvision.datasets.GTSRB needs for `split`."""
    if split == "train":
        return [base / "GTSRB" / "Training"]
    return [base / "GTSRB" / "Final_Test" / "Images", base / "GT-final_test.csv"]


def _missing(base: Path, split: str) -> Path | None:
    """The first required path for `split` that does not exist, or None."""
    return next((p for p in _inputs(base, split) if not p.exists()), None)


def _download(data_dir: Path, split: str) -> None:
    """Fetch and md5-check the GTSRB archives for `split` into data_dir/gtsrb/ with torchvision."""
    from torchvision.datasets import GTSRB  # lazy: torch is heavy, only to download or list

    with cleaned_up_on_failure(data_dir, f"GTSRB {split}", LAYOUT[split]):
        GTSRB(root=str(data_dir), split=split, download=True)


def _samples(data_dir: Path, split: str) -> list[tuple[str, int]]:
    """(image path, class id) pairs in torchvision's order: train by class folder then name, test
    as in the csv."""
    from torchvision.datasets import GTSRB  # lazy: torch is heavy, only to download or list

    try:
        # private, but holds the paths we need to name bad files
        samples = GTSRB(root=str(data_dir), split=split)._samples
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"cannot list GTSRB {split} images under {data_dir / 'gtsrb'}: "
                        f"{one_line(e)}") from e
    if not samples:
        raise UserError(f"no GTSRB {split} images found under {data_dir / 'gtsrb'} "
                        f"(expected {LAYOUT[split]}); pass --download to fetch them")
    return samples


def _read_image(path: str, size: int) -> np.ndarray:
    """One image file as uint8 [size, size, 3] RGB, the whole sign box resized (GTSRB's boxes are
    about square, and the benchmark resizes them whole); PIL's bilinear resize antialiases when it
    shrinks. OSError or ValueError when it cannot be decoded."""
    from PIL import Image  # lazy: only decoding needs Pillow

    with Image.open(path) as im:
        rgb = im.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb)


def _fingerprint(base: Path, split: str) -> str:
    """Hash of the name, size and mtime of every input file of `split`; changes whenever the file
    set does.

    It needs only os.walk and stat, not torchvision: about 0.4 s for 39,209 files. Plain strings
    rather than Path objects, which are several times slower at this count.
    """
    lines = [f"version {CACHE_VERSION}"]
    prefix = len(str(base)) + 1
    for top in _inputs(base, split):
        for path in sorted([str(top)] if top.is_file() else _walk_ppm(str(top))):
            st = os.stat(path)
            lines.append(f"{path[prefix:]}\t{st.st_size}\t{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _walk_ppm(top: str) -> list[str]:
    """Every .ppm file under `top`, following links as torchvision's make_dataset does."""
    return [os.path.join(d, f) for d, _, names in os.walk(top, followlinks=True)
            for f in names if f.lower().endswith(".ppm")]


READER = Reader(
    split=load_split,
    pretraining=lambda data_dir, size, download, bad_images: load_split(
        data_dir, "train", size, download, bad_images),
    probe_missing=incomplete)

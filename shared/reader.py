"""What each dataset family supplies to shared.data's registry: how to read one dataset.

Every reader returns (images uint8 [N, S, S, 3] NHWC RGB, labels int64 [N]) at the image size S
asked for. A family module (shared.cifar, shared.stl10, shared.gtsrb, shared.image_folder) builds
its Reader; shared.data maps each --dataset name to one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import UserError

Arrays = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Reader:
    """How one dataset is read from a data directory:

    split(data_dir, split, size, download, bad_images)    a labelled split, "train" or "test"
    pretraining(data_dir, size, download, bad_images)     what a run pretrains on
    probe_missing(data_dir)                               the error for what a probe would lack
                                                          (None when its files are there)

    download: fetch what is missing first (torchvision's downloaders); bad_images: what an
    unreadable image file does ("skip" or "error"; only folders may skip)."""

    split: Callable[[Path, str, int, bool, str], Arrays]
    pretraining: Callable[[Path, int, bool, str], Arrays]
    probe_missing: Callable[[Path], UserError | None]

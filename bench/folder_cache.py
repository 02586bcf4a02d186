"""How fast a folder of images becomes training batches: decoding it into the cache, reading the
cache again, and the pretraining views made from the memory-mapped cache against the same images
held in memory (the array path every named dataset takes).

    python bench/folder_cache.py [--folder PATH] [--image-size 32] [--steps 200] [--rounds 3]

PATH defaults to GTSRB's training images ($VICREG_DATA_DIR/gtsrb/GTSRB/Training: 39,209 .ppm files
in 43 class folders). The views are the `cpu` preset's (batch 128, the loader's automatic thread
count); both sources are read in the same run, alternately, and the table gives their ratio.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.augment import view_params  # noqa: E402
from shared.config import make_config  # noqa: E402
from shared.data import pretraining_split  # noqa: E402
from shared.loader import epoch_batches  # noqa: E402
from shared.machine import default_data_dir  # noqa: E402


def views_per_second(images: np.ndarray, steps: int, epoch: int) -> float:
    """Pairs of views per second the loader makes from `images` (uint8 [N, S, S, 3]) over `steps`
    batches of the cpu preset, at S pixels."""
    cfg = make_config({"preset": "cpu", "image_size": images.shape[1]})
    started = time.perf_counter()
    batches = epoch_batches(images, view_params(cfg), batch_size=cfg.batch_size, seed=0,
                            epoch=epoch, end_step=steps, workers=cfg.loader_workers())
    count = sum(len(batch.view_a) for batch in batches)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=str(default_data_dir() / "gtsrb/GTSRB/Training"))
    parser.add_argument("--steps", type=int, default=200, help="batches per timing")
    parser.add_argument("--rounds", type=int, default=3, help="timings of each source")
    parser.add_argument("--image-size", type=int, default=32,
                        help="the side the images are resized to (and the views' size)")
    args = parser.parse_args()
    if not Path(args.folder).is_dir():
        sys.exit(f"error: no folder {args.folder} (pass --folder or set VICREG_DATA_DIR)")
    name = f"folder:{os.path.abspath(args.folder)}"
    with tempfile.TemporaryDirectory() as cache_home:
        started = time.perf_counter()
        images, _ = pretraining_split(name, cache_home, image_size=args.image_size)
        decode_s = time.perf_counter() - started
        started = time.perf_counter()
        images, _ = pretraining_split(name, cache_home, image_size=args.image_size)
        reload_s = time.perf_counter() - started
        in_memory = np.array(images)
        mapped = np.ascontiguousarray(images)  # as the trainer takes it: no copy
        rates = {"cache (memory-mapped)": [], "array in memory": []}
        for round_ in range(args.rounds):  # alternated, so that drift hits both alike
            rates["cache (memory-mapped)"].append(views_per_second(mapped, args.steps, round_))
            rates["array in memory"].append(views_per_second(in_memory, args.steps, round_))
    print(f"{len(images):,} images of {args.folder} at {args.image_size}x{args.image_size}, "
          f"{os.cpu_count()} CPU cores\n")
    print("| step | seconds |\n|---|---:|")
    print(f"| decode into the cache | {decode_s:.1f} |")
    print(f"| read the cache again | {reload_s:.2f} |\n")
    print("| views from | pairs/s (median of rounds) |\n|---|---:|")
    medians = {source: float(np.median(r)) for source, r in rates.items()}
    for source, rate in medians.items():
        print(f"| {source} | {rate:,.0f} |")
    ratio = medians["cache (memory-mapped)"] / medians["array in memory"]
    print(f"\ncache / array: {ratio:.3f}")


if __name__ == "__main__":
    main()

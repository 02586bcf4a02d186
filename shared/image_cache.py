"""Images decoded once into a uint8 cache that every later run memory-maps.

A cache is three files beside each other under a data directory's `vicreg_cache/`:

    NAME.images.npy   uint8 [N, S, S, 3] (NHWC, RGB), read with np.load(mmap_mode="r")
    NAME.labels.npy   int64 [N]
    NAME.json         the fingerprint of the source, the image size, the count and the files
                      skipped as unreadable; written last, so a cache without it is unfinished

A cache whose fingerprint differs from its source's (a file added, removed or touched) is decoded
again. Decoding writes one image at a time into the memory-mapped file, so a folder of 100,000
images is never held in memory whole, and only one file is open at a time. Where the cache cannot
be written (a read-only data directory), the images are decoded into memory instead, with a
warning, every time.

Every dataset that is decoded (GTSRB, STL-10, folders, any dataset at another size) goes through
`cached`: one format, one reader, one writer.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shared.errors import UserError

CACHE_DIR = "vicreg_cache"
# Bump when decoding or resizing changes, so that caches made before are decoded again.
CACHE_VERSION = 1
# What torchvision's ImageFolder reads (datasets.folder.IMG_EXTENSIONS).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Images decoded per task of the decoding threads (Pillow releases the GIL while it decodes).
_CHUNK = 256


@dataclass(frozen=True)
class Source:
    """What a cache is made from: `count` images, `read(i)` the i-th as uint8 [S, S, 3] (raising
    OSError or ValueError when it cannot be read), `label(i)` its class (int) and `name(i)` how an
    error names it."""

    count: int
    read: Callable[[int], np.ndarray]
    label: Callable[[int], int]
    name: Callable[[int], str]


def files_fingerprint(paths: Iterable[str], *extra: object) -> str:
    """sha256 of each file's path, size and modification time, and of `extra` (the image size,
    the cache version): it changes when a file is added, removed, replaced or touched."""
    digest = hashlib.sha256(repr(extra).encode())
    for path in paths:
        st = os.stat(path)
        digest.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def read_image(path: str, size: int) -> np.ndarray:
    """One image file as uint8 [size, size, 3] RGB: grayscale, palette and RGBA images converted,
    the largest centred square cropped and resized bilinearly (Pillow antialiases a shrink).
    OSError or ValueError when the file cannot be decoded."""
    from PIL import Image  # lazy: only folders and resized datasets need Pillow

    with Image.open(path) as im:
        rgb = im.convert("RGB")
    return square(rgb, size)


def square(image, size: int) -> np.ndarray:
    """A PIL image's largest centred square (offsets rounded as torchvision's center_crop rounds
    them) resized bilinearly to size x size: uint8 [size, size, 3]."""
    from PIL import Image

    width, height = image.size
    side = min(width, height)
    left, top = round((width - side) / 2), round((height - side) / 2)
    if (width, height) != (side, side):
        image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


# What an error for an unreadable image tells a user to do, unless the dataset says otherwise.
FIX_BAD_IMAGE = "fix or remove it, or pass --bad-images skip to leave such files out"


def cached(cache_dir: Path, name: str, fingerprint: str, source: Callable[[], Source], size: int,
           bad_images: str, description: str,
           fix: str = FIX_BAD_IMAGE) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of `source()` at `size` pixels: (uint8 [N, size, size, 3]
    memory-mapped, int64 [N]), decoded into cache_dir/name.* on the first call (with a progress
    bar) and read from there while `fingerprint` (which changes whenever the images do) holds;
    `source` is called only to decode.

    An unreadable image is skipped and named in one line on stderr (bad_images "skip"), or a
    UserError ("error") that says what to do (`fix`). No readable image at all is a UserError.
    """
    stored = _read_cache(cache_dir, name, fingerprint, size)
    if stored is None:
        images = source()
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            _decode(cache_dir, name, fingerprint, images, size, bad_images, description, fix)
        except OSError as e:
            print(f"warning: cannot write the image cache {_paths(cache_dir, name)['json']} "
                  f"({e.strerror or e}); decoding {description} into memory, again next time "
                  "(point --data-dir at a folder you can write to)", file=sys.stderr, flush=True)
            return _decode_in_memory(images, size, bad_images, description, fix)
        stored = _read_cache(cache_dir, name, fingerprint, size)
        assert stored is not None, "a cache just written reads back"
    images, labels, skipped = stored
    # a cache made under "skip" is refused under "error", as decoding it again would be
    if skipped and bad_images == "error":
        raise _unreadable(skipped[0], fix)
    _warn_skipped(skipped, description, f"all are listed in {_paths(cache_dir, name)['json']}; ")
    return images, labels


def resize_array(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3], as a folder's images are resized (square)."""
    from PIL import Image

    return square(Image.fromarray(image), size)


def resized(cache_dir: Path, name: str, images: np.ndarray, labels: np.ndarray, size: int,
            fingerprint: str, description: str) -> tuple[np.ndarray, np.ndarray]:
    """`images` (uint8 [N, H, W, 3], labels int [N]) resized to size x size (resize_array),
    cached as `name`."""
    def source() -> Source:
        return Source(len(images), lambda i: resize_array(images[i], size),
                      lambda i: int(labels[i]), lambda i: f"{description} image {i}")
    return cached(cache_dir, f"{name}-{size}px", fingerprint, source, size, "error", description)


def _paths(cache_dir: Path, name: str) -> dict[str, Path]:
    return {part: cache_dir / f"{name}.{part}" for part in ("images.npy", "labels.npy", "json")}


def _read_cache(cache_dir: Path, name: str, fingerprint: str,
                size: int) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """The cached arrays and the names of the images the decoding skipped, when
    cache_dir/name.json says they were made from `fingerprint` at `size`; None for a missing,
    stale, unfinished or damaged cache, which is then made again."""
    paths = _paths(cache_dir, name)
    try:
        meta = json.loads(paths["json"].read_text())
        if meta.get("fingerprint") != fingerprint or meta.get("size") != size:
            return None
        images = np.load(paths["images.npy"], mmap_mode="r")
        labels = np.load(paths["labels.npy"])
        skipped = [str(name) for name in meta.get("skipped", [])]
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    if (images.dtype != np.uint8 or images.shape != (meta.get("count"), size, size, 3)
            or labels.dtype != np.int64 or labels.shape != (len(images),)):
        return None
    return images, labels, skipped


def _decode(cache_dir: Path, name: str, fingerprint: str, source: Source, size: int,
            bad_images: str, description: str, fix: str) -> None:
    """Decode every image of `source` into the cache files (temporary names, then renamed, the
    json last, listing the images skipped)."""
    paths = _paths(cache_dir, name)
    tmp = {part: path.with_name(f".{path.name}.{os.getpid()}.tmp") for part, path in paths.items()}
    try:
        images = np.lib.format.open_memmap(tmp["images.npy"], mode="w+", dtype=np.uint8,
                                           shape=(source.count, size, size, 3))
        labels = np.empty(source.count, np.int64)
        kept, bad = _fill(images, labels, source, size, bad_images, description, fix)
        if kept < source.count:
            images = _truncated(images, kept, tmp["images.npy"])
        images.flush()
        del images
        with open(tmp["labels.npy"], "wb") as f:  # a path would get ".npy" appended
            np.save(f, labels[:kept])
        tmp["json"].write_text(json.dumps({
            "fingerprint": fingerprint, "size": size, "count": kept,
            "version": CACHE_VERSION, "skipped": bad}, indent=1))
        for part in ("images.npy", "labels.npy", "json"):
            os.replace(tmp[part], paths[part])
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)


def _decode_in_memory(source: Source, size: int, bad_images: str, description: str,
                      fix: str) -> tuple[np.ndarray, np.ndarray]:
    """The arrays _decode writes, decoded into memory (uint8 [N, size, size, 3], int64 [N])."""
    images = np.empty((source.count, size, size, 3), np.uint8)
    labels = np.empty(source.count, np.int64)
    kept, bad = _fill(images, labels, source, size, bad_images, description, fix)
    _warn_skipped(bad, description, "")
    return images[:kept], labels[:kept]


def _warn_skipped(bad: list[str], description: str, listed: str) -> None:
    if bad:
        print(f"warning: skipped {len(bad)} unreadable image(s) of {description}: "
              f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} ({listed}--bad-images "
              "error refuses them)", file=sys.stderr, flush=True)


def _unreadable(name: str, fix: str) -> UserError:
    return UserError(f"cannot read {name}: corrupt, missing or not an image; {fix}")


def _fill(images: np.ndarray, labels: np.ndarray, source: Source, size: int, bad_images: str,
          description: str, fix: str) -> tuple[int, list[str]]:
    """Write the readable images of `source` in order into images[:kept] (labels alike); returns
    kept and the names of the unreadable ones. No readable image at all is a UserError."""
    def read_chunk(start: int) -> list[np.ndarray | str]:
        out = []
        for i in range(start, min(start + _CHUNK, source.count)):
            try:
                out.append(source.read(i))
            except (OSError, ValueError, SyntaxError) as e:  # Pillow raises all three
                out.append(f"{source.name(i)} ({' '.join(str(e).split()) or type(e).__name__})")
        return out

    kept, bad = 0, []
    threads = max(1, min(8, os.cpu_count() or 1))
    with (ThreadPoolExecutor(threads) as pool,
          tqdm(total=source.count, desc=f"decoding {description}", unit="img",
               file=sys.stderr, leave=False) as bar):
        starts = range(0, source.count, _CHUNK)
        for start, chunk in zip(starts, pool.map(read_chunk, starts)):
            for i, image in enumerate(chunk, start):
                if isinstance(image, str):
                    if bad_images == "error":
                        raise _unreadable(image, fix)
                    bad.append(image)
                    continue
                images[kept] = image
                labels[kept] = source.label(i)
                kept += 1
            bar.update(len(chunk))
    if kept == 0:
        raise UserError(f"none of the {source.count} images of {description} could be read "
                        f"(first: {bad[0]})")
    return kept, bad


def _truncated(images: np.ndarray, kept: int, path: Path) -> np.ndarray:
    """The first `kept` rows of a memory-mapped .npy, rewritten as a file of its own at `path`."""
    part = path.with_name(path.name + ".part")
    try:
        out = np.lib.format.open_memmap(part, mode="w+", dtype=np.uint8,
                                        shape=(kept, *images.shape[1:]))
        for start in range(0, kept, 4096):
            out[start:start + 4096] = images[start:min(start + 4096, kept)]
        out.flush()
        del images
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return out

"""The numpy pixel operations of the VICReg views: batched, vectorised versions of the torchvision
v2 augmentations, each a pure function on float32 NHWC images in [0, 1] with explicit per-image
parameters, so that each is checked against `torchvision.transforms.v2.functional` (tests) and
its twins in torch_impl.augment and jax_impl.augment against it (parity_tests). shared.augment
draws the parameters and chains the ops into a view.

Memory layout: numpy is slow when an op broadcasts along, or gathers, the 3-wide channel axis of
an NHWC array. So `to_float01` and `resized_crop` return NHWC *views* of channel-planar memory
(one contiguous [H, W] or [W, H] plane per channel), every op accepts any strides and keeps the
layout it is given, and `normalize` writes the final C-contiguous NHWC array. Pixels only meet
elementwise IEEE float32 arithmetic (no BLAS, no exp or log), so a given numpy version gives
byte-identical outputs on any machine; exp and log only run in float64 on per-image parameters
(crop ratio, blur kernel), where a 1-ulp libm difference would matter only if it hit a rounding
tie.
"""

from __future__ import annotations

from functools import partial

import numpy as np

# images per block in resized_crop: its temporaries stay in cache, which beats whole batches
_CROP_BLOCK = 64
# ITU-R 601-2 luma, as torchvision; the twins' device ops use the same weights
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
_GRAY_WEIGHTS = tuple(np.float32(w) for w in GRAY_WEIGHTS)


def to_float01(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> float32 [N, H, W, C] in [0, 1], as a view of channel-planar memory.

    x / 255, correctly rounded like torchvision's ToTensor (v2's to_dtype multiplies by 1/255:
    up to 1 ulp off).
    """
    n, h, w, c = images.shape
    planes = np.empty((n, c, h, w), dtype=np.float32)
    np.divide(np.moveaxis(images, -1, 1), np.float32(255), out=planes)
    return np.moveaxis(planes, 1, -1)


def apply_where(images: np.ndarray, mask: np.ndarray, op, *per_image: np.ndarray) -> None:
    """images[mask] = op(images[mask], *per_image[mask]), in place; mask is bool [N]."""
    idx = np.flatnonzero(mask)
    if idx.size:
        images[idx] = op(images[idx], *(values[idx] for values in per_image))


def resized_crop(
    images: np.ndarray, top: np.ndarray, left: np.ndarray, height: np.ndarray, width: np.ndarray,
    size: int
) -> np.ndarray:
    """Crop a box per image and resize it bilinearly: float32 [N, H, W, C] -> float32
    [N, size, size, C].

    Same as torchvision's resized_crop(antialias=False) (align_corners=False); boxes are int
    arrays [N]. The result is a view of channel-planar memory; the input may have any
    layout (channel-planar is fastest).
    """
    n, h, w, c = images.shape
    y_taps = linear_taps(top, height, size)
    x_taps = linear_taps(left, width, size)
    planes = np.ascontiguousarray(np.moveaxis(images, -1, 1))  # [N, C, H, W]
    out = np.empty((n, c, size, size), dtype=np.float32)  # [N, C, x, y]
    for start in range(0, n, _CROP_BLOCK):
        block = slice(start, start + _CROP_BLOCK)
        out[block] = _resize_planes(planes[block], [t[block] for t in y_taps],
                                    [t[block] for t in x_taps])
    return out.transpose(0, 3, 2, 1)


def linear_taps(
    start: np.ndarray, length: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-D bilinear taps per image: source indices i0, i1 (int64 [N, size]), weight of
    i1 (float32 [N, size])."""
    # src = max((dst + 0.5) length / size - 0.5, 0), in float32 like PyTorch's upsample kernel;
    # i1 clamps at the edge
    scale = (length.astype(np.float32) / np.float32(size))[:, None]
    src = (np.arange(size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    np.maximum(src, np.float32(0), out=src)
    i0 = src.astype(np.int64)  # floor, since src >= 0
    i1 = np.minimum(i0 + 1, length[:, None] - 1)
    return start[:, None] + i0, start[:, None] + i1, src - i0.astype(np.float32)


def _resize_planes(planes: np.ndarray, y_taps, x_taps) -> np.ndarray:
    """Bilinear resize of planes [n, C, H, W] by per-image taps (i0, i1, w1) -> float32
    [n, C, size (x), size (y)].

    Both passes gather whole rows, so the column pass runs on the row pass's output transposed.
    """
    n, c, h, w = planes.shape
    by_rows = _lerp_rows(planes.reshape(n * c * h, w), h, *y_taps)  # [n, C, size, W]
    by_cols = np.ascontiguousarray(by_rows.transpose(0, 1, 3, 2))  # [n, C, W, size]
    return _lerp_rows(by_cols.reshape(n * c * w, -1), w, *x_taps)


def _lerp_rows(
    rows: np.ndarray, plane_rows: int, i0: np.ndarray, i1: np.ndarray, w1: np.ndarray
) -> np.ndarray:
    """rows [n * C * plane_rows, L] (n images of C planes), taps [n, size] -> [n, C, size, L].

    out = row i0 + w1 (row i1 - row i0), per image and output row.
    """
    n, size = i0.shape
    # first row of each plane
    first = (np.arange(rows.shape[0] // plane_rows) * plane_rows).reshape(n, -1, 1)
    out = np.take(rows, first + i0[:, None], axis=0)
    step = np.take(rows, first + i1[:, None], axis=0)
    step -= out
    step *= w1[:, None, :, None]
    out += step
    return out


def mirrored(images: np.ndarray) -> np.ndarray:
    """x'[i, j] = x[i, W - 1 - j], as a view."""
    return images[:, :, ::-1]


def _per_image(values: np.ndarray, ndim: int = 4) -> np.ndarray:
    """float [N] -> float32 [N, 1, ...] with ndim axes, to broadcast one value per image."""
    return np.asarray(values, dtype=np.float32).reshape((-1,) + (1,) * (ndim - 1))


def _luma(images: np.ndarray) -> np.ndarray:
    """float32 [N, H, W, 3] -> float32 [N, H, W]: 0.2989 R + 0.587 G + 0.114 B."""
    r, g, b = _GRAY_WEIGHTS
    out = images[..., 0] * r
    out += images[..., 1] * g
    out += images[..., 2] * b
    return out


def _blend(images: np.ndarray, other: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """clamp(f x + (1 - f) other, 0, 1) per image, like torchvision's _blend; other broadcasts
    against images."""
    f = _per_image(factors)
    out = images * f
    out += other * (np.float32(1) - f)
    return np.clip(out, 0, 1, out=out)


def rgb_to_grayscale(images: np.ndarray) -> np.ndarray:
    """Luma replicated to 3 channels: float32 [N, H, W, 3] -> same.
    gray = 0.2989 R + 0.587 G + 0.114 B."""
    out = np.empty_like(images)
    np.copyto(out, _luma(images)[..., None])
    return out


def adjust_brightness(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """x' = clamp(f x, 0, 1); images float32 [N, H, W, 3], factors [N] -> float32 [N, H, W, 3]."""
    out = images * _per_image(factors)
    return np.clip(out, 0, 1, out=out)


def adjust_contrast(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """x' = clamp(f x + (1 - f) mean(gray(x)), 0, 1); images float32 [N, H, W, 3], factors [N]
    -> same shape."""
    # mean(gray) = sum_k w_k mean(channel k): three plane means instead of a gray image first
    means = sum(w * images[..., k].mean(axis=(1, 2), dtype=np.float32)
                for k, w in enumerate(_GRAY_WEIGHTS))
    return _blend(images, _per_image(means), factors)


def adjust_saturation(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """x' = clamp(f x + (1 - f) gray(x), 0, 1); images float32 [N, H, W, 3], factors [N] -> same
    shape."""
    return _blend(images, _luma(images)[..., None], factors)


def adjust_hue(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """(h, s, v) = hsv(x); x' = rgb((h + f) mod 1, s, v); images float32 [N, H, W, 3],
    factors [N] in [-0.5, 0.5]."""
    # Few temporaries, reused through out=: on planes this small a fresh allocation costs as much
    # as the arithmetic.
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    maxc = np.maximum(r, g)
    np.maximum(maxc, b, out=maxc)
    minc = np.minimum(r, g)
    np.minimum(minc, b, out=minc)
    spread = maxc - minc
    h, scratch = _hue(r, g, b, maxc, spread)
    h += _per_image(factors, ndim=3)
    # mod 1 of h + f in [-2/3, 4/3) by two compares: cheaper than np.mod, and the same values
    h += h < 0
    h -= h >= 1
    h *= np.float32(6)
    # Back to RGB with torchvision's hexcone (v = max, s = spread / v):
    # channel = v (1 - s) + v s k = min + spread k,
    # k a clamped triangle wave of 6h: k_r = clamp(|6h - 3| - 1), k_g = clamp(2 - |6h - 2|),
    # k_b = clamp(2 - |6h - 4|)
    out = np.empty_like(images)
    for channel, (centre, sign, offset) in enumerate(((3, 1, -1), (2, -1, 2), (4, -1, 2))):
        k = np.subtract(h, np.float32(centre), out=scratch)
        np.abs(k, out=k)
        k *= np.float32(sign)
        k += np.float32(offset)
        np.clip(k, 0, 1, out=k)
        k *= spread
        np.add(k, minc, out=out[..., channel])
    return out


def _hue(
    r: np.ndarray, g: np.ndarray, b: np.ndarray, maxc: np.ndarray, spread: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Hexcone hue of float32 planes [N, H, W] in turns, in [-1/6, 5/6], 0 for grey pixels
    as in torchvision.

    Returns (hue, scratch): the scratch plane is maxc's memory, which this overwrites.
    """
    grey = spread == 0
    is_r = maxc == r
    g_is_max = maxc == g
    is_g = g_is_max & ~is_r  # ties go to red, then green, as in torchvision
    is_b = ~(is_r | g_is_max)
    # 6h = (g - b) / spread if max is R, 2 + (b - r) / spread if G, 4 + (r - g) / spread if B
    h = np.subtract(g, b)
    h *= is_r
    term = np.subtract(b, r, out=maxc)
    term *= is_g
    h += term
    np.subtract(r, g, out=term)
    term *= is_b
    h += term
    h /= np.add(spread, grey, out=term)  # grey pixels: 0 / 1 rather than 0 / 0
    h += np.multiply(is_g, np.float32(2), out=term)
    h += np.multiply(is_b, np.float32(4), out=term)
    h *= np.float32(1 / 6)
    return h, term


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


JITTER_IDENTITY = (1.0, 1.0, 1.0, 0.0)  # factor at which each jitter op leaves an image unchanged


def color_jitter(images: np.ndarray, schedule: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """ColorJitter with a per-image op order: float32 [N, H, W, 3] -> same, same layout.

    schedule: bool [N, 4 slots, 4 ops], whether op o runs in slot s on image n
    (shared.augment.jitter_schedule: images whose factor is the op's identity skip it, as
    ColorJitter skips an op of strength 0); factors: float32 [N, 4], in JITTER_OPS order. For each
    slot, each op runs once on the images that have it there, so there is no loop over images.
    """
    out = images.copy(order="K")
    color_jitter_in_place(out, schedule, factors)
    return out


def color_jitter_in_place(images: np.ndarray, schedule: np.ndarray, factors: np.ndarray) -> None:
    """color_jitter, updating images in place."""
    for slot in range(4):
        for op_id, op in enumerate(JITTER_OPS):
            apply_where(images, schedule[:, slot, op_id], op, factors[:, op_id])


def gaussian_blur(images: np.ndarray, sigmas: np.ndarray, kernel_size: int) -> np.ndarray:
    """Separable Gaussian blur, reflect padding, one sigma per image: float32 [N, H, W, C],
    sigmas [N] -> same.

    Kernel as torchvision: k[i] proportional to exp(-d_i^2 / (2 sigma^2)),
    d_i = i - (kernel_size - 1) / 2, sum 1.
    """
    radius = kernel_size // 2
    kernel = gaussian_kernels(sigmas, kernel_size)  # [N, k]
    planes = np.moveaxis(images, -1, 1)  # [N, C, H, W]
    padded = np.pad(planes, ((0, 0), (0, 0), (radius, radius), (radius, radius)), mode="reflect")
    h, w = planes.shape[2:]
    # out[y] = sum_i k[i] padded[y + i], down the rows then along the columns
    rows = padded[:, :, :h] * _per_image(kernel[:, 0])
    for i in range(1, kernel_size):
        rows += padded[:, :, i : i + h] * _per_image(kernel[:, i])
    out = rows[..., :w] * _per_image(kernel[:, 0])
    for i in range(1, kernel_size):
        out += rows[..., i : i + w] * _per_image(kernel[:, i])
    return np.moveaxis(out, 1, -1)


def gaussian_kernels(sigmas: np.ndarray, kernel_size: int) -> np.ndarray:
    """float32 [N, kernel_size]: k[i] proportional to exp(-d_i^2 / (2 sigma^2)), summing to 1
    (in float64)."""
    d = np.arange(kernel_size, dtype=np.float64) - kernel_size // 2
    kernel = np.exp(-(d**2) / (2 * np.asarray(sigmas, dtype=np.float64)[:, None] ** 2))
    return (kernel / kernel.sum(axis=1, keepdims=True)).astype(np.float32)


def solarize(images: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """x' = 1 - x where x >= threshold, for the images selected by bool mask [N]: float32
    [N, H, W, C] -> same."""
    out = images.copy(order="K")
    apply_where(out, mask, partial(solarized, threshold=threshold))
    return out


def solarized(images: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """x' = 1 - x where x >= threshold, else x."""
    return np.where(images >= np.float32(threshold), np.float32(1) - images, images)


def normalize(images_float01: np.ndarray, mean, std) -> np.ndarray:
    """x' = (x - mean) / std per channel: float32 [N, H, W, C] in [0, 1], any layout -> C-contiguous
    float32."""
    out = np.empty(images_float01.shape, dtype=np.float32)
    for channel, m in enumerate(np.asarray(mean, dtype=np.float32)):
        np.subtract(images_float01[..., channel], m, out=out[..., channel])
    # The division runs on [..., W * C] rows with std tiled W times: a contiguous inner loop.
    width, channels = out.shape[-2:]
    rows = out.reshape(*out.shape[:-2], width * channels)
    rows /= np.tile(np.asarray(std, dtype=np.float32), width)
    return out

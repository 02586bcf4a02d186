"""VICReg view pipeline: batched, vectorised numpy versions of the torchvision v2 augmentations.

Order of the ops in one view (torchvision-style VICReg / solo-learn):

    random resized crop -> colour jitter (p=jitter_p) -> grayscale (p=gray_p) -> gaussian blur (p=blur_p)
    -> solarize (p=solarize_p) -> horizontal flip (p=flip_p) -> normalize

The flip commutes with every other op, so its place in the chain only matters for reading the code.

Every op is a pure function on float32 NHWC images in [0, 1] that takes explicit per-image parameters, so it can be
checked against `torchvision.transforms.v2.functional` and reused by either framework. Randomness comes only from
`view_rng(seed, epoch, step, view_index)`, and `sample_view_params` draws every parameter for the whole batch in a
fixed order (crop, jitter, grayscale, blur, solarize, flip) whatever the probabilities are, so a view depends only
on the input batch and (seed, epoch, step). No torch here: this module feeds the PyTorch and the JAX trainers alike.

Memory layout: numpy is slow when an op broadcasts along, or gathers, the 3-wide channel axis of an NHWC array. So
`to_float01` and `resized_crop` return NHWC *views* of channel-planar memory (one contiguous [H, W] or [W, H] plane
per channel), every op accepts any strides and keeps the layout it is given, and `normalize` writes the final
C-contiguous NHWC array. Pixels only meet elementwise IEEE float32 arithmetic (no BLAS, no exp or log), so a given
numpy version gives byte-identical outputs on any machine; exp and log only run in float64 on per-image parameters
(crop ratio, blur kernel), where a 1-ulp libm difference would matter only if it hit a rounding tie.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace
from functools import partial

import numpy as np


@dataclass(frozen=True)
class AugmentParams:
    """Strengths and probabilities of the view pipeline (defaults: VICReg on CIFAR-10)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_kernel: int = 3
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.1
    mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
    size: int = 32

    def __post_init__(self) -> None:
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be a positive odd integer, got {self.blur_kernel}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        if min(self.brightness, self.contrast, self.saturation) < 0:
            raise ValueError("brightness, contrast and saturation must be non-negative")


# Colour-jitter op ids, as stored in JitterParams.order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)

_CROP_TRIES = 10  # torchvision RandomResizedCrop.get_params tries this many boxes before its fallback
_CROP_BLOCK = 64  # images per block in resized_crop: its temporaries stay in cache (~1.5x faster than whole batches)
_GRAY_WEIGHTS = (np.float32(0.2989), np.float32(0.587), np.float32(0.114))  # ITU-R 601-2 luma, as torchvision


@dataclass(frozen=True, eq=False)
class JitterParams:
    """Per-image colour-jitter draws for N images.

    apply: bool [N]; order: int64 [N, 4], per image a permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE),
    column 0 applied first; brightness, contrast, saturation, hue: float32 [N] factors.
    """

    apply: np.ndarray
    order: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray


@dataclass(frozen=True, eq=False)
class ViewParams:
    """Every random draw of one view for N images: crop box (int64 [N] each), jitter, and bool [N] op masks."""

    top: np.ndarray
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    jitter: JitterParams
    gray: np.ndarray
    blur: np.ndarray
    blur_sigma: np.ndarray  # float32 [N]
    solarize: np.ndarray
    flip: np.ndarray


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def make_views(
    images: np.ndarray, params: AugmentParams, seed: int, epoch: int, step: int,
    rows: slice = slice(None),
) -> tuple[np.ndarray, np.ndarray]:
    """Two augmented views of a batch: uint8 [N, H, W, 3] -> (float32 [N, size, size, 3], same), normalised.

    Fully determined by (seed, epoch, step): the same inputs give byte-identical, C-contiguous outputs.
    rows: only these rows of both views (a data-parallel process's part of the batch), augmenting
    only those images; the random draws are still made for all N images, since their order decides
    which image gets which draw, so the parts together equal the whole batch byte for byte.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    x = to_float01(images[rows])
    n, h, w, _ = images.shape

    def view(index: int) -> np.ndarray:
        draws = sample_view_params(view_rng(seed, epoch, step, index), n, h, w, params)
        return augment_view(x, rows_of(draws, rows), params)

    return view(0), view(1)


def rows_of(draws, rows: slice):
    """A ViewParams (or its nested dataclasses) with every per-image array cut to `rows`."""
    values = {f.name: getattr(draws, f.name) for f in fields(draws)}
    return replace(draws, **{name: rows_of(v, rows) if is_dataclass(v) else v[rows]
                             for name, v in values.items()})


def view_rng(seed: int, epoch: int, step: int, view_index: int) -> np.random.Generator:
    """The generator every draw of one view comes from."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, step, view_index]))


def to_float01(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> float32 [N, H, W, C] in [0, 1], as a view of channel-planar memory.

    x / 255, correctly rounded like torchvision's ToTensor (v2's to_dtype multiplies by 1/255: up to 1 ulp off).
    """
    n, h, w, c = images.shape
    planes = np.empty((n, c, h, w), dtype=np.float32)
    np.divide(np.moveaxis(images, -1, 1), np.float32(255), out=planes)
    return np.moveaxis(planes, 1, -1)


def sample_view_params(rng: np.random.Generator, n: int, h: int, w: int, params: AugmentParams) -> ViewParams:
    """Draw all random parameters of one view for n images of size h x w, in a fixed order."""
    top, left, height, width = sample_crop_boxes(rng, n, h, w, params.crop_scale, params.crop_ratio)
    jitter = sample_jitter_params(rng, n, params)
    gray = rng.random(n) < params.gray_p
    blur = rng.random(n) < params.blur_p
    blur_sigma = rng.uniform(params.blur_sigma[0], params.blur_sigma[1], n).astype(np.float32)
    solarize_mask = rng.random(n) < params.solarize_p
    flip = rng.random(n) < params.flip_p
    return ViewParams(top, left, height, width, jitter, gray, blur, blur_sigma, solarize_mask, flip)


def augment_view(images: np.ndarray, view: ViewParams, params: AugmentParams) -> np.ndarray:
    """Apply one view's ops: float32 [N, H, W, 3] in [0, 1] -> normalised float32 [N, size, size, 3], C-contiguous."""
    x = resized_crop(images, view.top, view.left, view.height, view.width, params.size)
    # x is a fresh array: the steps below update it in place rather than copy the batch once per op.
    _jitter_in_place(x, view.jitter)
    _apply_where(x, view.gray, rgb_to_grayscale)
    _apply_where(x, view.blur, partial(gaussian_blur, kernel_size=params.blur_kernel), view.blur_sigma)
    _apply_where(x, view.solarize, _solarized)  # threshold 0.5: PIL's 128 (solo-learn) on [0, 1] values
    _apply_where(x, view.flip, _mirrored)
    return normalize(x, params.mean, params.std)


@dataclass(frozen=True, eq=False)
class PixelParams:
    """One view's per-image parameters as a device applies them (torch_impl.augment, jax_impl.augment):
    derived on the host from a ViewParams, so the random streams and every index and weight are the
    numpy pipeline's own. Small: O(N x size) numbers, against the N x size x size x 3 pixels.

    rows0, rows1: int32 [N, size] the source rows each output row interpolates (crop offset included),
    row_weight: float32 [N, size] the weight of rows1; cols0, cols1, col_weight: the same along the width;
    jitter: bool [N, 4 slots, 4 ops] (jitter_schedule); factors: float32 [N, 4] (jitter_factors);
    gray, blur, solarize, flip: bool [N]; blur_kernel: float32 [N, blur_kernel] (gaussian_kernels).
    """

    rows0: np.ndarray
    rows1: np.ndarray
    row_weight: np.ndarray
    cols0: np.ndarray
    cols1: np.ndarray
    col_weight: np.ndarray
    jitter: np.ndarray
    factors: np.ndarray
    gray: np.ndarray
    blur: np.ndarray
    blur_kernel: np.ndarray
    solarize: np.ndarray
    flip: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        """The fields by name, to move to a device in one go."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def pixel_params(view: ViewParams, params: AugmentParams) -> PixelParams:
    """What a device needs to apply `view` (see PixelParams)."""
    rows0, rows1, row_weight = _linear_taps(view.top, view.height, params.size)
    cols0, cols1, col_weight = _linear_taps(view.left, view.width, params.size)
    return PixelParams(rows0.astype(np.int32), rows1.astype(np.int32), row_weight,
                       cols0.astype(np.int32), cols1.astype(np.int32), col_weight,
                       jitter_schedule(view.jitter), jitter_factors(view.jitter), view.gray,
                       view.blur, gaussian_kernels(view.blur_sigma, params.blur_kernel),
                       view.solarize, view.flip)


def draw_views(
    n: int, h: int, w: int, params: AugmentParams, seed: int, epoch: int, step: int, rows: slice = slice(None),
) -> tuple[PixelParams, PixelParams]:
    """The two views' PixelParams for a batch of n images of h x w, rows `rows` of it: the same draws as
    make_views (so a device applying them computes make_views' views), without touching a pixel."""
    def view(index: int) -> PixelParams:
        draws = sample_view_params(view_rng(seed, epoch, step, index), n, h, w, params)
        return pixel_params(rows_of(draws, rows), params)

    return view(0), view(1)


def _apply_where(images: np.ndarray, mask: np.ndarray, op, *per_image: np.ndarray) -> None:
    """images[mask] = op(images[mask], *per_image[mask]), in place; mask is bool [N]."""
    idx = np.flatnonzero(mask)
    if idx.size:
        images[idx] = op(images[idx], *(values[idx] for values in per_image))


# ---------------------------------------------------------------------------------------------------------------
# Geometry


def sample_crop_boxes(
    rng: np.random.Generator, n: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """RandomResizedCrop.get_params for n images at once -> (top, left, height, width), int64 [n] each.

    All 10 tries are drawn up front and the first valid one is kept; images with none get torchvision's fallback.
    """
    # area = U(scale) H W, ratio = exp(U(log ratio)); box w = round(sqrt(area ratio)), h = round(sqrt(area / ratio))
    area = (h * w) * rng.uniform(scale[0], scale[1], (n, _CROP_TRIES))
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, _CROP_TRIES)))
    cand_w = np.round(np.sqrt(area * aspect)).astype(np.int64)  # np.round halves to even, like Python's round
    cand_h = np.round(np.sqrt(area / aspect)).astype(np.int64)
    valid = (cand_w > 0) & (cand_w <= w) & (cand_h > 0) & (cand_h <= h)
    found = valid.any(axis=1)
    first = valid.argmax(axis=1)
    rows = np.arange(n)
    fall_h, fall_w = _fallback_crop_size(h, w, ratio)
    box_h = np.where(found, cand_h[rows, first], fall_h)
    box_w = np.where(found, cand_w[rows, first], fall_w)
    # top ~ U{0..H-h}, left ~ U{0..W-w}; the fallback box is centred instead
    top = np.where(found, rng.integers(0, h - box_h + 1), (h - box_h) // 2)
    left = np.where(found, rng.integers(0, w - box_w + 1), (w - box_w) // 2)
    return top, left, box_h, box_w


def _fallback_crop_size(h: int, w: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's fallback box (height, width): the whole image, clamped to the ratio range."""
    in_ratio = w / h
    if in_ratio < min(ratio):
        return int(round(w / min(ratio))), w
    if in_ratio > max(ratio):
        return h, int(round(h * max(ratio)))
    return h, w


def resized_crop(
    images: np.ndarray, top: np.ndarray, left: np.ndarray, height: np.ndarray, width: np.ndarray, size: int
) -> np.ndarray:
    """Crop a box per image and resize it bilinearly: float32 [N, H, W, C] -> float32 [N, size, size, C].

    Same as torchvision's resized_crop(antialias=False) (align_corners=False); boxes are int arrays [N]. The result
    is a view of channel-planar memory; the input may have any layout (channel-planar is fastest).
    """
    n, h, w, c = images.shape
    y_taps = _linear_taps(top, height, size)
    x_taps = _linear_taps(left, width, size)
    planes = np.ascontiguousarray(np.moveaxis(images, -1, 1))  # [N, C, H, W]
    out = np.empty((n, c, size, size), dtype=np.float32)  # [N, C, x, y]
    for start in range(0, n, _CROP_BLOCK):
        block = slice(start, start + _CROP_BLOCK)
        out[block] = _resize_planes(planes[block], [t[block] for t in y_taps], [t[block] for t in x_taps])
    return out.transpose(0, 3, 2, 1)


def _linear_taps(start: np.ndarray, length: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-D bilinear taps per image: source indices i0, i1 (int64 [N, size]), weight of i1 (float32 [N, size])."""
    # src = max((dst + 0.5) length / size - 0.5, 0), in float32 like PyTorch's upsample kernel; i1 clamps at the edge
    scale = (length.astype(np.float32) / np.float32(size))[:, None]
    src = (np.arange(size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    np.maximum(src, np.float32(0), out=src)
    i0 = src.astype(np.int64)  # floor, since src >= 0
    i1 = np.minimum(i0 + 1, length[:, None] - 1)
    return start[:, None] + i0, start[:, None] + i1, src - i0.astype(np.float32)


def _resize_planes(planes: np.ndarray, y_taps, x_taps) -> np.ndarray:
    """Bilinear resize of planes [n, C, H, W] by per-image taps (i0, i1, w1) -> float32 [n, C, size (x), size (y)].

    Both passes gather whole rows, so the column pass runs on the row pass's output transposed.
    """
    n, c, h, w = planes.shape
    by_rows = _lerp_rows(planes.reshape(n * c * h, w), h, *y_taps)  # [n, C, size, W]
    by_cols = np.ascontiguousarray(by_rows.transpose(0, 1, 3, 2))  # [n, C, W, size]
    return _lerp_rows(by_cols.reshape(n * c * w, -1), w, *x_taps)


def _lerp_rows(rows: np.ndarray, plane_rows: int, i0: np.ndarray, i1: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """rows [n * C * plane_rows, L] (n images of C planes), taps [n, size] -> [n, C, size, L].

    out = row i0 + w1 (row i1 - row i0), per image and output row.
    """
    n, size = i0.shape
    first = (np.arange(rows.shape[0] // plane_rows) * plane_rows).reshape(n, -1, 1)  # first row of each plane
    out = np.take(rows, first + i0[:, None], axis=0)
    step = np.take(rows, first + i1[:, None], axis=0)
    step -= out
    step *= w1[:, None, :, None]
    out += step
    return out


def hflip(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mirror the images selected by bool mask [N] left-right: float32 [N, H, W, C] -> same, same layout."""
    out = images.copy(order="K")
    _apply_where(out, mask, _mirrored)
    return out


def _mirrored(images: np.ndarray) -> np.ndarray:
    """x'[i, j] = x[i, W - 1 - j], as a view."""
    return images[:, :, ::-1]


# ---------------------------------------------------------------------------------------------------------------
# Colour: each op reads the channel planes images[..., k] and keeps the input's memory layout.


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
    """clamp(f x + (1 - f) other, 0, 1) per image, like torchvision's _blend; other broadcasts against images."""
    f = _per_image(factors)
    out = images * f
    out += other * (np.float32(1) - f)
    return np.clip(out, 0, 1, out=out)


def rgb_to_grayscale(images: np.ndarray) -> np.ndarray:
    """Luma replicated to 3 channels: float32 [N, H, W, 3] -> same. gray = 0.2989 R + 0.587 G + 0.114 B."""
    out = np.empty_like(images)
    np.copyto(out, _luma(images)[..., None])
    return out


def adjust_brightness(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """x' = clamp(f x, 0, 1); images float32 [N, H, W, 3], factors [N] -> float32 [N, H, W, 3]."""
    out = images * _per_image(factors)
    return np.clip(out, 0, 1, out=out)


def adjust_contrast(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """x' = clamp(f x + (1 - f) mean(gray(x)), 0, 1); images float32 [N, H, W, 3], factors [N] -> same shape."""
    # mean(gray) = sum_k w_k mean(channel k): three plane means instead of a gray image first
    means = sum(w * images[..., k].mean(axis=(1, 2), dtype=np.float32) for k, w in enumerate(_GRAY_WEIGHTS))
    return _blend(images, _per_image(means), factors)


def adjust_saturation(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """x' = clamp(f x + (1 - f) gray(x), 0, 1); images float32 [N, H, W, 3], factors [N] -> same shape."""
    return _blend(images, _luma(images)[..., None], factors)


def adjust_hue(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """(h, s, v) = hsv(x); x' = rgb((h + f) mod 1, s, v); images float32 [N, H, W, 3], factors [N] in [-0.5, 0.5]."""
    # Few temporaries, reused through out=: on planes this small a fresh allocation costs as much as the arithmetic.
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
    # Back to RGB with torchvision's hexcone (v = max, s = spread / v): channel = v (1 - s) + v s k = min + spread k,
    # k a clamped triangle wave of 6h: k_r = clamp(|6h - 3| - 1), k_g = clamp(2 - |6h - 2|), k_b = clamp(2 - |6h - 4|)
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
    """Hexcone hue of float32 planes [N, H, W] in turns, in [-1/6, 5/6], 0 for grey pixels as in torchvision.

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


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
_JITTER_IDENTITY = (1.0, 1.0, 1.0, 0.0)  # factor at which each jitter op leaves an image unchanged


def sample_jitter_params(rng: np.random.Generator, n: int, params: AugmentParams) -> JitterParams:
    """ColorJitter draws for n images, each with its own random op order.

    brightness, contrast, saturation ~ U[max(0, 1 - s), 1 + s], hue ~ U[-h, h]; applied with probability jitter_p.
    """
    apply = rng.random(n) < params.jitter_p

    def factor(low: float, high: float) -> np.ndarray:
        return rng.uniform(low, high, n).astype(np.float32)

    brightness = factor(max(0.0, 1 - params.brightness), 1 + params.brightness)
    contrast = factor(max(0.0, 1 - params.contrast), 1 + params.contrast)
    saturation = factor(max(0.0, 1 - params.saturation), 1 + params.saturation)
    hue = factor(-params.hue, params.hue)
    order = rng.permuted(np.tile(np.arange(4, dtype=np.int64), (n, 1)), axis=1)
    return JitterParams(apply, order, brightness, contrast, saturation, hue)


def color_jitter(images: np.ndarray, jitter: JitterParams) -> np.ndarray:
    """ColorJitter with a per-image op order: float32 [N, H, W, 3] -> same, same layout.

    For each of the 4 slots, each op runs once on the images that have it in that slot, so there is no loop over
    images. Images whose factor is the op's identity skip it, as ColorJitter skips an op of strength 0.
    """
    out = images.copy(order="K")
    _jitter_in_place(out, jitter)
    return out


def jitter_factors(jitter: JitterParams) -> np.ndarray:
    """float32 [N, 4]: each image's brightness, contrast, saturation and hue factor, in op-id order."""
    return np.stack([jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue], axis=1)


def jitter_schedule(jitter: JitterParams) -> np.ndarray:
    """bool [N, 4 slots, 4 ops]: whether op o runs in slot s on image n. An op runs where the image is
    jittered, the op sits in that slot of its order, and its factor is not the op's identity."""
    in_slot = jitter.order[:, :, None] == np.arange(4)[None, None, :]
    active = jitter_factors(jitter) != np.asarray(_JITTER_IDENTITY, np.float32)
    return jitter.apply[:, None, None] & in_slot & active[:, None, :]


def _jitter_in_place(images: np.ndarray, jitter: JitterParams) -> None:
    """color_jitter, updating images in place."""
    schedule, factors = jitter_schedule(jitter), jitter_factors(jitter)
    for slot in range(4):
        for op_id, op in enumerate(_JITTER_OPS):
            _apply_where(images, schedule[:, slot, op_id], op, factors[:, op_id])


# ---------------------------------------------------------------------------------------------------------------
# Filters and normalisation


def gaussian_blur(images: np.ndarray, sigmas: np.ndarray, kernel_size: int) -> np.ndarray:
    """Separable Gaussian blur, reflect padding, one sigma per image: float32 [N, H, W, C], sigmas [N] -> same.

    Kernel as torchvision: k[i] proportional to exp(-d_i^2 / (2 sigma^2)), d_i = i - (kernel_size - 1) / 2, sum 1.
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
    """float32 [N, kernel_size]: k[i] proportional to exp(-d_i^2 / (2 sigma^2)), summing to 1 (in float64)."""
    d = np.arange(kernel_size, dtype=np.float64) - kernel_size // 2
    kernel = np.exp(-(d**2) / (2 * np.asarray(sigmas, dtype=np.float64)[:, None] ** 2))
    return (kernel / kernel.sum(axis=1, keepdims=True)).astype(np.float32)


def solarize(images: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """x' = 1 - x where x >= threshold, for the images selected by bool mask [N]: float32 [N, H, W, C] -> same."""
    out = images.copy(order="K")
    _apply_where(out, mask, partial(_solarized, threshold=threshold))
    return out


def _solarized(images: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """x' = 1 - x where x >= threshold, else x."""
    return np.where(images >= np.float32(threshold), np.float32(1) - images, images)


def normalize(images_float01: np.ndarray, mean, std) -> np.ndarray:
    """x' = (x - mean) / std per channel: float32 [N, H, W, C] in [0, 1], any layout -> C-contiguous float32."""
    out = np.empty(images_float01.shape, dtype=np.float32)
    for channel, m in enumerate(np.asarray(mean, dtype=np.float32)):
        np.subtract(images_float01[..., channel], m, out=out[..., channel])
    # The division runs on [..., W * C] rows with std tiled W times: a contiguous inner loop.
    width, channels = out.shape[-2:]
    rows = out.reshape(*out.shape[:-2], width * channels)
    rows /= np.tile(np.asarray(std, dtype=np.float32), width)
    return out

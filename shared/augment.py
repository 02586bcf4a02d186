"""VICReg views: the random parameters of a batch's two views, and the numpy pipeline that applies
them (the reference the device versions in torch_impl.augment and jax_impl.augment follow).

Order of the ops in one view (torchvision-style VICReg / solo-learn; the ops: shared.augment_ops):

    random resized crop -> colour jitter (p=jitter_p) -> grayscale (p=gray_p) -> gaussian
    blur (p=blur_p) -> solarize (p=solarize_p) -> horizontal flip (p=flip_p) -> normalize

The flip commutes with every other op, so its place in the chain only matters for reading the code.

Randomness comes only from `view_rng(seed, epoch, step, view_index)`, and
`sample_view_params` draws every parameter for the whole batch in a fixed order (crop, jitter,
grayscale, blur, solarize, flip) whatever the probabilities are, so a view depends only on the input
batch and (seed, epoch, step). No torch here: this module feeds the PyTorch and the JAX trainers
alike.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace
from functools import partial

import numpy as np

from shared.augment_ops import (
    JITTER_IDENTITY,
    apply_where,
    color_jitter_in_place,
    gaussian_blur,
    gaussian_kernels,
    linear_taps,
    mirrored,
    normalize,
    resized_crop,
    rgb_to_grayscale,
    solarized,
    to_float01,
)
from shared.config import Config
from shared.data import CIFAR10_MEAN, CIFAR10_STD

# The recipe's augmentation settings: Config's defaults, which the flags override.
_RECIPE = {f.name: f.default for f in fields(Config)}


@dataclass(frozen=True)
class AugmentParams:
    """Strengths and probabilities of the view pipeline (defaults: VICReg on CIFAR-10)."""

    crop_scale: tuple[float, float] = (_RECIPE["crop_min_scale"], 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = _RECIPE["flip_p"]
    jitter_p: float = _RECIPE["jitter_p"]
    brightness: float = _RECIPE["brightness"]
    contrast: float = _RECIPE["contrast"]
    saturation: float = _RECIPE["saturation"]
    hue: float = _RECIPE["hue"]
    gray_p: float = _RECIPE["gray_p"]
    blur_p: float = _RECIPE["blur_p"]
    blur_kernel: int = _RECIPE["blur_kernel"]
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = _RECIPE["solarize_p"]
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    size: int = 32

    def __post_init__(self) -> None:
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be a positive odd integer, got {self.blur_kernel}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        if min(self.brightness, self.contrast, self.saturation) < 0:
            raise ValueError("brightness, contrast and saturation must be non-negative")


def view_params(cfg: Config, mean: tuple = CIFAR10_MEAN, std: tuple = CIFAR10_STD) -> AugmentParams:
    """The view pipeline's parameters for a run's settings, normalising with the pretraining
    data's mean and std; the crop outputs --image-size."""
    return AugmentParams(
        crop_scale=(cfg.crop_min_scale, 1.0), flip_p=cfg.flip_p, jitter_p=cfg.jitter_p,
        brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation,
        hue=cfg.hue, gray_p=cfg.gray_p, blur_p=cfg.blur_p, blur_kernel=cfg.blur_kernel,
        solarize_p=cfg.solarize_p, mean=tuple(mean), std=tuple(std), size=cfg.image_size)


# Colour-jitter op ids, as stored in JitterParams.order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)

# torchvision RandomResizedCrop.get_params tries this many boxes before its fallback
_CROP_TRIES = 10


@dataclass(frozen=True, eq=False)
class JitterParams:
    """Per-image colour-jitter draws for N images.

    apply: bool [N]; order: int64 [N, 4], per image a permutation of (BRIGHTNESS, CONTRAST,
    SATURATION, HUE), column 0 applied first; brightness, contrast, saturation, hue: float32 [N]
    factors.
    """

    apply: np.ndarray
    order: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray


@dataclass(frozen=True, eq=False)
class ViewParams:
    """Every random draw of one view for N images: crop box (int64 [N] each), jitter, and bool [N]
    op masks."""

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


# --------------------------------------------------------------------------------------------------
# Entry points


def make_views(
    images: np.ndarray, params: AugmentParams, seed: int, epoch: int, step: int,
    rows: slice = slice(None),
) -> tuple[np.ndarray, np.ndarray]:
    """Two augmented views of a batch: uint8 [N, H, W, 3] -> (float32 [N, size, size, 3], same),
    normalised.

    Fully determined by (seed, epoch, step): the same inputs give byte-identical, C-contiguous
    outputs.
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


def sample_view_params(
    rng: np.random.Generator, n: int, h: int, w: int, params: AugmentParams
) -> ViewParams:
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
    """Apply one view's ops: float32 [N, H, W, 3] in [0, 1] -> normalised float32
    [N, size, size, 3], C-contiguous."""
    x = resized_crop(images, view.top, view.left, view.height, view.width, params.size)
    # x is a fresh array: the steps below update it in place rather than copy the batch once per op.
    color_jitter_in_place(x, jitter_schedule(view.jitter), jitter_factors(view.jitter))
    apply_where(x, view.gray, rgb_to_grayscale)
    apply_where(x, view.blur, partial(gaussian_blur, kernel_size=params.blur_kernel),
                 view.blur_sigma)
    # threshold 0.5: PIL's 128 (solo-learn) on [0, 1] values
    apply_where(x, view.solarize, solarized)
    apply_where(x, view.flip, mirrored)
    return normalize(x, params.mean, params.std)


@dataclass(frozen=True, eq=False)
class PixelParams:
    """One view's per-image parameters as a device applies them (torch_impl.augment,
    jax_impl.augment): derived on the host from a ViewParams, so the random streams and every index
    and weight are the numpy pipeline's own. Small: O(N x size) numbers, against the N x size x size
    x 3 pixels.

    rows0, rows1: int32 [N, size] the source rows each output row interpolates (crop offset
    included), row_weight: float32 [N, size] the weight of rows1; cols0, cols1, col_weight: the same
    along the width; jitter: bool [N, 4 slots, 4 ops] (jitter_schedule); factors: float32 [N, 4]
    (jitter_factors); gray, blur, solarize, flip: bool [N]; blur_kernel: float32 [N, blur_kernel]
    (gaussian_kernels).
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
    rows0, rows1, row_weight = linear_taps(view.top, view.height, params.size)
    cols0, cols1, col_weight = linear_taps(view.left, view.width, params.size)
    return PixelParams(rows0.astype(np.int32), rows1.astype(np.int32), row_weight,
                       cols0.astype(np.int32), cols1.astype(np.int32), col_weight,
                       jitter_schedule(view.jitter), jitter_factors(view.jitter), view.gray,
                       view.blur, gaussian_kernels(view.blur_sigma, params.blur_kernel),
                       view.solarize, view.flip)


def draw_views(
    n: int, h: int, w: int, params: AugmentParams, seed: int, epoch: int, step: int,
    rows: slice = slice(None),
) -> tuple[PixelParams, PixelParams]:
    """The two views' PixelParams for a batch of n images of h x w, rows `rows` of it: the same
    draws as make_views (so a device applying them computes make_views' views), without
    touching a pixel."""
    def view(index: int) -> PixelParams:
        draws = sample_view_params(view_rng(seed, epoch, step, index), n, h, w, params)
        return pixel_params(rows_of(draws, rows), params)

    return view(0), view(1)


def sample_crop_boxes(
    rng: np.random.Generator, n: int, h: int, w: int, scale: tuple[float, float],
    ratio: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """RandomResizedCrop.get_params for n images at once -> (top, left, height, width), int64 [n]
    each.

    All 10 tries are drawn up front and the first valid one is kept; images with none get
    torchvision's fallback.
    """
    # area = U(scale) H W, ratio = exp(U(log ratio)); box w = round(sqrt(area ratio)),
    # h = round(sqrt(area / ratio))
    area = (h * w) * rng.uniform(scale[0], scale[1], (n, _CROP_TRIES))
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, _CROP_TRIES)))
    # np.round halves to even, like Python's round
    cand_w = np.round(np.sqrt(area * aspect)).astype(np.int64)
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


def sample_jitter_params(rng: np.random.Generator, n: int, params: AugmentParams) -> JitterParams:
    """ColorJitter draws for n images, each with its own random op order.

    brightness, contrast, saturation ~ U[max(0, 1 - s), 1 + s], hue ~ U[-h, h]; applied with
    probability jitter_p.
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


def jitter_factors(jitter: JitterParams) -> np.ndarray:
    """float32 [N, 4]: each image's brightness, contrast, saturation and hue factor, in op-id
    order."""
    return np.stack([jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue], axis=1)


def jitter_schedule(jitter: JitterParams) -> np.ndarray:
    """bool [N, 4 slots, 4 ops]: whether op o runs in slot s on image n. An op runs where the image
    is jittered, the op sits in that slot of its order, and its factor is not the op's identity."""
    in_slot = jitter.order[:, :, None] == np.arange(4)[None, None, :]
    active = jitter_factors(jitter) != np.asarray(JITTER_IDENTITY, np.float32)
    return jitter.apply[:, None, None] & in_slot & active[:, None, :]



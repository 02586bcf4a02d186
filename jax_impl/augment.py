"""The VICReg views computed on the device inside the jitted step, from parameters drawn on the
host.

The twin of torch_impl.augment, and the same arithmetic as shared.augment's numpy pipeline (the
reference; its ops are in shared.augment_ops): shared.augment.draw_views draws a batch's random
parameters and derives every index and weight (PixelParams); apply_view here turns uint8 pixels
into a normalised view with them, as pure jnp functions that trace into the train step. Per-image
choices select between an op's result and its input, so there is no loop over images.

Images are NHWC float32 in [0, 1] until the last step, as in numpy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from shared.augment import AugmentParams, PixelParams
from shared.augment_ops import GRAY_WEIGHTS


def device_params(p: PixelParams) -> dict[str, np.ndarray]:
    """A view's PixelParams as the dict of host arrays the jitted step takes (int32 indices)."""
    return p.arrays()


def _per_image(values: jax.Array) -> jax.Array:
    """[N] -> [N, 1, 1, 1], to broadcast one value per image over NHWC."""
    return values.reshape(-1, 1, 1, 1)


def _select(mask: jax.Array, done: jax.Array, images: jax.Array) -> jax.Array:
    """done where mask [N] holds, images elsewhere."""
    return jnp.where(_per_image(mask), done, images)


def resized_crop(images: jax.Array, p: dict) -> jax.Array:
    """Bilinear resize of each image's crop box: float32 [N, H, W, C] -> [N, size, size, C].

    out = a + w (b - a) along the rows (a, b: rows rows0 and rows1, w: row_weight), then the same
    along the columns, as shared.augment_ops.resized_crop.
    """
    def rows(index: jax.Array) -> jax.Array:
        return jnp.take_along_axis(images, index[:, :, None, None], axis=1)

    top = rows(p["rows0"])
    by_rows = top + (rows(p["rows1"]) - top) * p["row_weight"][:, :, None, None]

    def cols(index: jax.Array) -> jax.Array:
        return jnp.take_along_axis(by_rows, index[:, None, :, None], axis=2)

    left = cols(p["cols0"])
    return left + (cols(p["cols1"]) - left) * p["col_weight"][:, None, :, None]


def _luma(images: jax.Array) -> jax.Array:
    """float32 [N, H, W, 3] -> [N, H, W]: 0.2989 R + 0.587 G + 0.114 B."""
    r, g, b = (np.float32(w) for w in GRAY_WEIGHTS)
    return images[..., 0] * r + images[..., 1] * g + images[..., 2] * b


def _blend(images: jax.Array, other: jax.Array, factors: jax.Array) -> jax.Array:
    """clamp(f x + (1 - f) other, 0, 1) per image; other broadcasts against images."""
    f = _per_image(factors)
    return jnp.clip(images * f + other * (1 - f), 0, 1)


def rgb_to_grayscale(images: jax.Array) -> jax.Array:
    """Luma replicated to 3 channels: float32 [N, H, W, 3] -> same."""
    return jnp.broadcast_to(_luma(images)[..., None], images.shape)


def adjust_brightness(images: jax.Array, factors: jax.Array) -> jax.Array:
    """x' = clamp(f x, 0, 1); images float32 [N, H, W, 3], factors [N]."""
    return jnp.clip(images * _per_image(factors), 0, 1)


def adjust_contrast(images: jax.Array, factors: jax.Array) -> jax.Array:
    """x' = clamp(f x + (1 - f) mean(gray(x)), 0, 1); mean(gray) = sum_k w_k mean(channel k)."""
    means = images.mean(axis=(1, 2))  # [N, 3]
    r, g, b = (np.float32(w) for w in GRAY_WEIGHTS)
    gray_mean = means[:, 0] * r + means[:, 1] * g + means[:, 2] * b
    return _blend(images, _per_image(gray_mean), factors)


def adjust_saturation(images: jax.Array, factors: jax.Array) -> jax.Array:
    """x' = clamp(f x + (1 - f) gray(x), 0, 1)."""
    return _blend(images, _luma(images)[..., None], factors)


def adjust_hue(images: jax.Array, factors: jax.Array) -> jax.Array:
    """(h, s, v) = hsv(x); x' = rgb((h + f) mod 1, s, v); factors [N] in [-0.5, 0.5].

    Hue in turns from the hexcone: 6h = (g - b) / spread if max is R, 2 + (b - r) / spread if G,
    4 + (r - g) / spread if B (ties to R, then G), 0 for grey pixels; back to RGB as
    channel = min + spread k, k a clamped triangle wave of 6h (shared.augment_ops.adjust_hue).
    """
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    maxc = jnp.maximum(jnp.maximum(r, g), b)
    minc = jnp.minimum(jnp.minimum(r, g), b)
    spread = maxc - minc
    is_r = maxc == r
    g_is_max = maxc == g
    is_g = g_is_max & ~is_r
    is_b = ~(is_r | g_is_max)
    h = (g - b) * is_r + (b - r) * is_g + (r - g) * is_b
    h = h / (spread + (spread == 0))  # grey pixels: 0 / 1 rather than 0 / 0
    h = (h + is_g * np.float32(2) + is_b * np.float32(4)) * np.float32(1 / 6)
    h = h + factors.reshape(-1, 1, 1)
    h = h + (h < 0)
    h = h - (h >= 1)
    h = h * np.float32(6)
    channels = [jnp.clip(jnp.abs(h - centre) * sign + offset, 0, 1) * spread + minc
                for centre, sign, offset in ((3, 1, -1), (2, -1, 2), (4, -1, 2))]
    return jnp.stack(channels, axis=-1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(images: jax.Array, jitter: jax.Array, factors: jax.Array) -> jax.Array:
    """ColorJitter with a per-image op order: jitter bool [N, 4 slots, 4 ops], factors [N, 4]."""
    for slot in range(4):
        for op_id, op in enumerate(JITTER_OPS):
            images = _select(jitter[:, slot, op_id], op(images, factors[:, op_id]), images)
    return images


def gaussian_blur(images: jax.Array, kernels: jax.Array) -> jax.Array:
    """Separable blur with one kernel per image, reflect padding: [N, H, W, C], kernels [N, k].

    out[y] = sum_i k[i] padded[y + i], down the rows then along the columns, summed in order of i.
    """
    k = kernels.shape[1]
    radius = k // 2
    _, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="reflect")
    weights = [_per_image(kernels[:, i]) for i in range(k)]
    rows = padded[:, :h] * weights[0]
    for i in range(1, k):
        rows = rows + padded[:, i:i + h] * weights[i]
    out = rows[:, :, :w] * weights[0]
    for i in range(1, k):
        out = out + rows[:, :, i:i + w] * weights[i]
    return out


def solarize(images: jax.Array, threshold: float = 0.5) -> jax.Array:
    """x' = 1 - x where x >= threshold, else x."""
    return jnp.where(images >= threshold, 1 - images, images)


def normalize(images: jax.Array, mean, std) -> jax.Array:
    """x' = (x - mean) / std per channel: float32 [N, H, W, 3]."""
    return (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def apply_view(images: jax.Array, p: dict, params: AugmentParams) -> jax.Array:
    """One view of a batch: uint8 [N, H, W, 3] and its device_params -> normalised float32
    [N, size, size, 3] (what the model takes).

    crop -> colour jitter -> grayscale -> blur -> solarize -> flip -> normalize, as
    shared.augment.augment_view.
    """
    x = resized_crop(images.astype(jnp.float32) / np.float32(255), p)
    x = color_jitter(x, p["jitter"], p["factors"])
    x = _select(p["gray"], rgb_to_grayscale(x), x)
    x = _select(p["blur"], gaussian_blur(x, p["blur_kernel"]), x)
    x = _select(p["solarize"], solarize(x), x)
    x = _select(p["flip"], x[:, :, ::-1], x)
    return normalize(x, params.mean, params.std)

"""The VICReg views computed on the trainer's device, from parameters drawn on the host.

The twin of jax_impl.augment, and the same arithmetic as shared.augment's numpy pipeline (the
reference; its ops are in shared.augment_ops): shared.augment.draw_views draws a batch's random
parameters and derives every index and weight (PixelParams); apply_view here turns uint8 pixels
into a normalised view with them. Each op below computes what its numpy namesake computes, in the
same order of float32 operations, for the whole batch at once; per-image choices (which images are
jittered, greyed, blurred, ...) select between the op's result and its input, so there is no loop
over images.

Images are NHWC float32 in [0, 1] until the last step, as in numpy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.augment import AugmentParams, PixelParams
from shared.augment_ops import GRAY_WEIGHTS


def device_params(p: PixelParams, *, device: torch.device) -> dict[str, torch.Tensor]:
    """A view's PixelParams as tensors on `device` (indices int64, as torch's gathers want)."""
    tensors = {name: torch.from_numpy(value) for name, value in p.arrays().items()}
    for name in ("rows0", "rows1", "cols0", "cols1"):
        tensors[name] = tensors[name].long()
    return {name: t.to(device, non_blocking=True) for name, t in tensors.items()}


def _per_image(values: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, 1, 1, 1], to broadcast one value per image over NHWC."""
    return values.reshape(-1, 1, 1, 1)


def _select(mask: torch.Tensor, done: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """done where mask [N] holds, images elsewhere."""
    return torch.where(_per_image(mask), done, images)


def resized_crop(images: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Bilinear resize of each image's crop box: float32 [N, H, W, C] -> [N, size, size, C].

    out = a + w (b - a) along the rows (a, b: rows rows0 and rows1, w: row_weight), then the same
    along the columns, as shared.augment_ops.resized_crop.
    """
    n, _, w, c = images.shape
    size = p["rows0"].shape[1]

    def rows(index: torch.Tensor) -> torch.Tensor:
        return torch.gather(images, 1, index[:, :, None, None].expand(n, size, w, c))

    top = rows(p["rows0"])
    by_rows = top + (rows(p["rows1"]) - top) * p["row_weight"][:, :, None, None]

    def cols(index: torch.Tensor) -> torch.Tensor:
        return torch.gather(by_rows, 2, index[:, None, :, None].expand(n, size, size, c))

    left = cols(p["cols0"])
    return left + (cols(p["cols1"]) - left) * p["col_weight"][:, None, :, None]


def _luma(images: torch.Tensor) -> torch.Tensor:
    """float32 [N, H, W, 3] -> [N, H, W]: 0.2989 R + 0.587 G + 0.114 B."""
    r, g, b = GRAY_WEIGHTS
    return images[..., 0] * r + images[..., 1] * g + images[..., 2] * b


def _blend(images: torch.Tensor, other: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """clamp(f x + (1 - f) other, 0, 1) per image; other broadcasts against images."""
    f = _per_image(factors)
    return (images * f + other * (1 - f)).clamp(0, 1)


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma replicated to 3 channels: float32 [N, H, W, 3] -> same."""
    return _luma(images)[..., None].expand_as(images)


def adjust_brightness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """x' = clamp(f x, 0, 1); images float32 [N, H, W, 3], factors [N]."""
    return (images * _per_image(factors)).clamp(0, 1)


def adjust_contrast(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """x' = clamp(f x + (1 - f) mean(gray(x)), 0, 1); mean(gray) = sum_k w_k mean(channel k)."""
    means = images.mean(dim=(1, 2))  # [N, 3]
    r, g, b = GRAY_WEIGHTS
    gray_mean = means[:, 0] * r + means[:, 1] * g + means[:, 2] * b
    return _blend(images, _per_image(gray_mean), factors)


def adjust_saturation(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """x' = clamp(f x + (1 - f) gray(x), 0, 1)."""
    return _blend(images, _luma(images)[..., None], factors)


def adjust_hue(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """(h, s, v) = hsv(x); x' = rgb((h + f) mod 1, s, v); factors [N] in [-0.5, 0.5].

    Hue in turns from the hexcone: 6h = (g - b) / spread if max is R, 2 + (b - r) / spread if G,
    4 + (r - g) / spread if B (ties to R, then G), 0 for grey pixels; back to RGB as
    channel = min + spread k, k a clamped triangle wave of 6h (shared.augment_ops.adjust_hue).
    """
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    spread = maxc - minc

    def as_float(mask: torch.Tensor) -> torch.Tensor:
        return mask.to(images.dtype)

    r_max = maxc == r
    g_max = maxc == g
    is_r, is_g, is_b = as_float(r_max), as_float(g_max & ~r_max), as_float(~(r_max | g_max))
    h = (g - b) * is_r + (b - r) * is_g + (r - g) * is_b
    h = h / (spread + as_float(spread == 0))  # grey pixels: 0 / 1 rather than 0 / 0
    h = (h + is_g * 2 + is_b * 4) * (1 / 6)
    h = h + factors.reshape(-1, 1, 1)
    h = h + as_float(h < 0)
    h = h - as_float(h >= 1)
    h = h * 6
    channels = [((h - centre).abs() * sign + offset).clamp(0, 1) * spread + minc
                for centre, sign, offset in ((3, 1, -1), (2, -1, 2), (4, -1, 2))]
    return torch.stack(channels, dim=-1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(images: torch.Tensor, jitter: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """ColorJitter with a per-image op order: jitter bool [N, 4 slots, 4 ops], factors [N, 4]."""
    for slot in range(4):
        for op_id, op in enumerate(JITTER_OPS):
            images = _select(jitter[:, slot, op_id], op(images, factors[:, op_id]), images)
    return images


def gaussian_blur(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable blur with one kernel per image, reflect padding: [N, H, W, C], kernels [N, k].

    out[y] = sum_i k[i] padded[y + i], down the rows then along the columns, summed in order of i.
    """
    k = kernels.shape[1]
    radius = k // 2
    _, h, w, _ = images.shape
    padded = F.pad(images.permute(0, 3, 1, 2), (radius,) * 4, mode="reflect").permute(0, 2, 3, 1)
    weights = [_per_image(kernels[:, i]) for i in range(k)]
    rows = padded[:, :h] * weights[0]
    for i in range(1, k):
        rows = rows + padded[:, i:i + h] * weights[i]
    out = rows[:, :, :w] * weights[0]
    for i in range(1, k):
        out = out + rows[:, :, i:i + w] * weights[i]
    return out


def solarize(images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """x' = 1 - x where x >= threshold, else x."""
    return torch.where(images >= threshold, 1 - images, images)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """x' = (x - mean) / std per channel: float32 [N, H, W, 3]."""
    mean = torch.tensor(mean, dtype=torch.float32, device=images.device)
    std = torch.tensor(std, dtype=torch.float32, device=images.device)
    return (images - mean) / std


def apply_view(images: torch.Tensor, p: dict[str, torch.Tensor],
               params: AugmentParams) -> torch.Tensor:
    """One view of a batch: uint8 [N, H, W, 3] on the device and its device_params -> normalised
    float32 [N, 3, size, size] in channels_last layout (what the model takes).

    crop -> colour jitter -> grayscale -> blur -> solarize -> flip -> normalize, as
    shared.augment.augment_view.
    """
    x = resized_crop(images.to(torch.float32) / 255, p)
    x = color_jitter(x, p["jitter"], p["factors"])
    x = _select(p["gray"], rgb_to_grayscale(x), x)
    x = _select(p["blur"], gaussian_blur(x, p["blur_kernel"]), x)
    x = _select(p["solarize"], solarize(x), x)
    x = _select(p["flip"], x.flip(2), x)
    return normalize(x, params.mean, params.std).permute(0, 3, 1, 2)

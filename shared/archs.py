"""The ResNet architectures both frameworks build: block kind and depth of each of the 4 stages,
and the stem each image size gets."""
from __future__ import annotations

from shared.errors import UserError

BLOCKS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
          "resnet50": ("bottleneck", (3, 4, 6, 3))}
EXPANSION = {"basic": 1, "bottleneck": 4}


def check_arch(arch: str) -> None:
    """UserError for an architecture name that is not in BLOCKS."""
    if arch not in BLOCKS:
        raise UserError(f"unknown architecture {arch!r}; choose one of: {', '.join(BLOCKS)}")


def stage_planes(arch: str, width: int, last_width: int = 0) -> list[int]:
    """Channels of each stage's 3x3 convolutions: width x 2^stage (ResNet's doubling), except the
    last stage's when last_width is given (its feature maps are the smallest, so widening it
    enlarges the probes' feature for the least time)."""
    check_arch(arch)
    planes = [width * 2 ** stage for stage in range(len(BLOCKS[arch][1]))]
    if last_width:
        planes[-1] = last_width
    return planes


def feature_dim(arch: str, width: int, last_width: int = 0) -> int:
    """Pooled feature size of the backbone: the last stage's planes x expansion (512 / 2048 at
    width 64)."""
    return stage_planes(arch, width, last_width)[-1] * EXPANSION[BLOCKS[arch][0]]


STEMS = ("cifar", "imagenet")
# The largest image side the CIFAR stem takes; larger images get the ImageNet stem.
CIFAR_STEM_MAX_SIZE = 64


def check_stem(stem: str) -> None:
    """ValueError for a stem that is not in STEMS (a Config always derives a valid one)."""
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")


def stem_for(image_size: int) -> str:
    """The backbone's first layers for square images of `image_size` pixels, as solo-learn picks
    them: "cifar" (3x3 stride-1 convolution, no max-pool; the feature map keeps the input's size)
    up to CIFAR_STEM_MAX_SIZE, "imagenet" (7x7 stride-2 convolution, then 3x3 stride-2 max-pool: a
    quarter of the input's side) above it."""
    return "cifar" if image_size <= CIFAR_STEM_MAX_SIZE else "imagenet"

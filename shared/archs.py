"""The ResNet architectures both frameworks build: block kind and depth of each of the 4 stages."""
from __future__ import annotations

from shared.errors import UserError

BLOCKS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
          "resnet50": ("bottleneck", (3, 4, 6, 3))}
EXPANSION = {"basic": 1, "bottleneck": 4}


def check_arch(arch: str) -> None:
    """UserError for an architecture name that is not in BLOCKS."""
    if arch not in BLOCKS:
        raise UserError(f"unknown architecture {arch!r}; choose one of: {', '.join(BLOCKS)}")


def feature_dim(arch: str, width: int) -> int:
    """Pooled feature size of the backbone: 8 * width * expansion (512 / 2048 at width 64)."""
    check_arch(arch)
    return width * 8 * EXPANSION[BLOCKS[arch][0]]

"""Device, precision and memory layout for torch_impl: CUDA when present, bf16 where it is fast."""
from __future__ import annotations

import numpy as np
import torch

from shared.errors import UserError


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    """"cuda" or "cpu", as summary.json and the start-up line report it."""
    return device.type


def bf16_supported(device: torch.device) -> bool:
    """True where bf16 matmuls and convolutions run natively (CUDA bf16, or CPU with
    AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the model computes in for --precision: bfloat16 (through autocast; parameters
    stay float32) or float32."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    raise UserError(f"unknown precision {precision!r}; choose one of: auto, bf16, fp32")


def precision_name(dtype: torch.dtype) -> str:
    """"bf16" or "fp32", as summary.json and the start-up line report it."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Autocast to `dtype` on `device` where it is narrower than float32; off otherwise (float32,
    and the float64 the parity tests run)."""
    narrow = dtype in (torch.bfloat16, torch.float16)
    return torch.autocast(device.type, dtype=dtype if narrow else torch.float32, enabled=narrow)


def memory_format(width: int) -> torch.memory_format:
    """channels_last, except below width 8, where oneDNN's channels_last CPU kernels can corrupt
    the heap (docs/performance.md) and the layout buys nothing anyway."""
    return torch.channels_last if width >= 8 else torch.contiguous_format


def to_channels_last(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """float32 [N, H, W, C] numpy -> a [N, C, H, W] tensor in channels_last layout, no copy on
    CPU."""
    return torch.from_numpy(batch).permute(0, 3, 1, 2).to(device, non_blocking=True)

"""Runtime conventions shared by every layer: intensity ranges and bf16 autocast.

Slices are stored as uint8 in [0, 255]; the networks take and return float ``(B, 1, H, W)`` in
[-1, 1].
"""

from __future__ import annotations

import torch


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    """Slices in [0, 255] (uint8 or float), ``(B, H, W)`` or ``(B, 1, H, W)`` → float ``(B, 1, H, W)`` in [-1, 1]."""
    x = images_u8.float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return x / 127.5 - 1.0


def model_input(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Slices in [0, 255] → the tokenizer's input: ``(B, 1, H, W)`` in [-1, 1] on ``device``,
    ``channels_last`` (the fast layout for convolutions under bf16 on CPU)."""
    return to_model_range(images).to(device).contiguous(memory_format=torch.channels_last)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model-range images in [-1, 1] → uint8 (values clipped)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def autocast(device: torch.device | str, enabled: bool):
    """bf16 autocast on CPU or CUDA (a no-op context when disabled)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled)

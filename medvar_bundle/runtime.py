"""Runtime conventions shared by every layer: intensity ranges, bf16 autocast and where it pays.

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


def fast_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively, so that bf16 autocast speeds it up.

    CUDA: ``torch.cuda.is_bf16_supported()``. CPU: oneDNN's bf16 kernels (AVX-512 or AMX; measured
    ~2.5× and ~6× faster than fp32 matmuls). On CPUs without them (AVX2 only) bf16 is emulated:
    a tokenizer training step ran 8.7× and a DDPM UNet forward 18× slower than in fp32, so the
    configs' ``bf16`` default is this function and such machines train and sample in fp32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False

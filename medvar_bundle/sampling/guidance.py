"""Classifier-free guidance, shared by the next-scale sampler and the DDPM baseline's sampler."""

from __future__ import annotations

from torch import Tensor


def guided_logits(cond: Tensor, uncond: Tensor, t: float) -> Tensor:
    """Classifier-free guidance ``(1+t)·cond − t·uncond`` (exactly ``cond`` at ``t = 0``)."""
    return cond if t == 0 else (1 + t) * cond - t * uncond

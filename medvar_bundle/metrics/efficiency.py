"""The paper's quality–speed score (MedVAR eq. 4)."""

from __future__ import annotations

import math


def efficiency(q: float, seconds_per_image: float, gamma: float = 0.1) -> float:
    """``Efficiency = Q · (log10(1 + P))^gamma``; lower is better.

    ``Q`` is the FID and ``P`` the inference time in seconds per image under identical hardware,
    batch size and implementation. The paper writes ``log`` without a base; its Table 1 is
    reproduced (to ±0.02) by the base-10 logarithm and not by the natural one, e.g. MedVAR-d24:
    FID 10.11, 0.13 s → 10.11 · log10(1.13)^0.1 = 7.54. So ``P = 9 s`` leaves ``Q`` unchanged and
    faster models get a factor below 1.

    Args:
        q: FID (≥ 0).
        seconds_per_image: ``P`` in seconds (> 0).
        gamma: weight of speed against quality (0.1 in the paper).
    """
    if not seconds_per_image > 0:
        raise ValueError(f"seconds_per_image must be > 0, got {seconds_per_image}")
    return q * math.log10(1 + seconds_per_image) ** gamma

"""Metrics that need no pretrained network, so every evaluation computes them.

All take uint8 slice stacks ``(N, S, S)`` (8-bit intensity levels, as the slice store and the
sampler produce them).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from scipy.stats import wasserstein_distance
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

from .slices import as_slices

_LEVELS = np.arange(256)

MS_SSIM_MIN_SIDE = 2**4 * 11
"""Smallest slice side MS-SSIM accepts: after its 4 halvings the 11-pixel window must still fit
(torchmetrics needs side // 16 > 10), so 176 pixels."""


def _unit_batch(slices: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, H, W)`` → float32 ``(B, 1, H, W)`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(slices)).float().div_(255).unsqueeze(1)


def ms_ssim_diversity(images: ArrayLike, pairs: int = 1000, seed: int = 0, batch_size: int = 32) -> float:
    """Mean MS-SSIM over pairs of distinct slices of one set; lower = more diverse.

    The standard MS-SSIM (Wang et al. 2003, torchmetrics): 5 scales with weights
    (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), an 11×11 Gaussian window with σ = 1.5, data range 1,
    negative similarities clipped to 0. At 256² the coarsest scale is 16², which holds the window;
    slices under :data:`MS_SSIM_MIN_SIDE` pixels are refused (torchmetrics raises ValueError).

    Every unordered pair ``{i, j}``, ``i ≠ j``, counts once: a set of N slices has N(N−1)/2 of
    them, all used when that is at most ``pairs`` (16 samples: 120 pairs, the exact mean), else
    ``pairs`` of them drawn without replacement. MS-SSIM is symmetric, so no pair is scored twice.

    Args:
        images: uint8 ``(N, S, S)``, N ≥ 2.
        pairs: the most pairs scored.
        seed: seed of the draw when there are more pairs than ``pairs``.
        batch_size: pairs per MS-SSIM call.

    Returns:
        Mean MS-SSIM in [0, 1]: 1 for identical images, near 0 for independent noise.
    """
    x = as_slices(images)
    n = x.shape[0]
    if n < 2:
        raise ValueError("MS-SSIM diversity needs at least two slices")
    first, second = np.triu_indices(n, k=1)
    if len(first) > pairs:
        chosen = np.sort(np.random.default_rng(seed).choice(len(first), pairs, replace=False))
        first, second = first[chosen], second[chosen]
    # torchmetrics filters each one-channel map with the 11×11 window by conv2d, a shape for which
    # oneDNN's CPU kernel is slow: PyTorch's own took 0.39 instead of 0.93 s for 32 pairs on one
    # thread (0.39 against 0.63 on two), scores of real slices within 3e-5, of flat slices within
    # 7e-5 to 2.8e-4 (by CPU) of the exact value (docs/evaluation.md, "Where the time goes"); CUDA
    # is unaffected
    with torch.backends.mkldnn.flags(enabled=False):
        scores = [
            multiscale_structural_similarity_index_measure(
                _unit_batch(x[first[s : s + batch_size]]),
                _unit_batch(x[second[s : s + batch_size]]),
                data_range=1.0,
                reduction="none",
            )
            for s in range(0, len(first), batch_size)
        ]
    return float(torch.cat(scores).mean())


def histogram_distance(real: ArrayLike, fake: ArrayLike) -> float:
    """Wasserstein-1 distance between the pixel-intensity distributions of two sets, in 8-bit
    intensity levels: the mean shift needed to turn one histogram into the other (a set
    brightened by 10 levels, without clipping, is at distance 10). All pixels count, background
    included. Exact on uint8 data (one bin per level)."""
    hist_real = np.bincount(as_slices(real).ravel(), minlength=256)
    hist_fake = np.bincount(as_slices(fake).ravel(), minlength=256)
    return float(wasserstein_distance(_LEVELS, _LEVELS, hist_real, hist_fake))


def radial_power_spectrum(images: ArrayLike, chunk: int = 64) -> np.ndarray:
    """Radially averaged power spectrum of a set of square slices, log10, ``(S // 2,)``.

    Each slice is scaled to [0, 1] and its mean removed; ``|FFT2|² / S²`` is averaged over the
    set and over the rings of integer radius ``r = round(|k|)`` (cycles per slice), for
    ``r = 1 .. S/2`` (the DC term, 0 after mean removal, and the corners beyond Nyquist are left
    out). Power is floored at 1e-12 before the log (flat slices).
    """
    x = as_slices(images)
    n, size, width = x.shape
    if size != width:
        raise ValueError(f"power spectrum needs square slices, got {size}×{width}")
    power = np.zeros((size, size))
    for start in range(0, n, chunk):
        block = x[start : start + chunk].astype(np.float64) / 255
        block -= block.mean(axis=(1, 2), keepdims=True)
        power += (np.abs(np.fft.fft2(block)) ** 2).sum(axis=0)
    power /= n * size * size
    freq = np.fft.fftfreq(size) * size
    radius = np.rint(np.hypot(freq[:, None], freq[None, :])).astype(np.int64).ravel()
    rings = np.bincount(radius, weights=power.ravel()) / np.bincount(radius)
    return np.log10(np.maximum(rings[1 : size // 2 + 1], 1e-12))


def power_spectrum_distance(real: ArrayLike, fake: ArrayLike) -> float:
    """Mean absolute difference of the two sets' :func:`radial_power_spectrum` over the radii
    1..S/2, in decades (log10 units): 0 for equal spectra, 1 when one set has ten times the
    power of the other at every frequency. Blurring, over-smoothing or missing acquisition noise
    show up at high radii."""
    return spectrum_distance(radial_power_spectrum(real), radial_power_spectrum(fake))


def spectrum_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """:func:`power_spectrum_distance` of two spectra already computed by
    :func:`radial_power_spectrum` (``(S // 2,)`` each, log10): a set's spectrum can be computed once
    and compared with many."""
    return float(np.mean(np.abs(real - fake)))


def _points(data: ArrayLike, size: int) -> torch.Tensor:
    """Feature rows ``(N, D)`` as they are, or uint8 slices ``(N, S, S)`` area-resized to
    ``size²`` in [0, 1] and flattened; float64."""
    array = np.asarray(data)
    if array.ndim == 2:
        return torch.from_numpy(array.astype(np.float64))
    small = F.interpolate(_unit_batch(as_slices(array)), size=(size, size), mode="area")
    return small.flatten(1).double()


def nearest_neighbour_distance(queries: torch.Tensor, reference: torch.Tensor, chunk: int = 1024) -> np.ndarray:
    """L2 distance from each row of ``queries`` ``(N, D)`` to its nearest row of ``reference``
    ``(M, D)``, ``(N,)``."""
    return torch.cat(
        [torch.cdist(queries[s : s + chunk], reference).min(dim=1).values for s in range(0, queries.shape[0], chunk)]
    ).numpy()


def memorisation_ratio(fake: ArrayLike, train: ArrayLike, heldout: ArrayLike, size: int = 64) -> float:
    """How much closer generated slices sit to the training set than unseen real slices do.

    ``median_i d(fake_i, train) / median_j d(heldout_j, train)``, with ``d`` the L2 distance to
    the nearest training slice. ≈ 1: generated slices are as novel as new patients; ≪ 1: the
    model reproduces training slices (copying). Slices are compared as ``size²`` images in
    [0, 1] (area downsampling, so small shifts still count as close); pass features ``(N, D)``
    for all three sets instead to compare in a feature space.

    Args:
        fake: generated slices uint8 ``(N, S, S)`` or features ``(N, D)``.
        train: training slices (or features) of the same dataset.
        heldout: held-out real slices (or features), other volumes than ``train``.
        size: side of the downsampled images.
    """
    points = [_points(data, size) for data in (fake, train, heldout)]
    if len({p.shape[1] for p in points}) != 1:
        raise ValueError("fake, train and heldout must all be slices or all features of one dimension")
    fake_pts, train_pts, heldout_pts = points
    reference = float(np.median(nearest_neighbour_distance(heldout_pts, train_pts)))
    if reference == 0:
        raise ValueError("held-out slices coincide with training slices; the ratio is undefined")
    return float(np.median(nearest_neighbour_distance(fake_pts, train_pts))) / reference

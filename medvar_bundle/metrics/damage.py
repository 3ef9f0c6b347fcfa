"""Known damage to real slices, graded by severity: the yardstick a quality metric is checked with.

A metric that ranks what a radiologist ranks scores real held-out slices best and each kind of
damage worse as it grows: blur (lost fine detail), noise (false texture), shuffled patches
(right texture, wrong anatomy) and scrambled Fourier phase (right intensities and grain, less and
less anatomy: at full scramble the blobs of an undertrained diffusion model). All functions take
uint8 slices ``(N, S, S)`` and return new uint8 slices of the same shape; ``severity`` is the
kind's own unit.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from .slices import as_slices, from_tiles, to_tiles


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def blur(slices: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Gaussian blur in-plane with standard deviation ``sigma`` pixels (``seed`` unused)."""
    x = as_slices(slices).astype(np.float64)
    return _to_uint8(gaussian_filter(x, sigma=(0, sigma, sigma), mode="nearest"))


def noise(slices: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    """Additive Gaussian noise of standard deviation ``std`` 8-bit levels, clipped to [0, 255]."""
    x = as_slices(slices).astype(np.float64)
    return _to_uint8(x + np.random.default_rng(seed).normal(0.0, std, x.shape))


def shuffle_patches(slices: np.ndarray, fraction: float, seed: int = 0, patch: int | None = None) -> np.ndarray:
    """Permute a random ``fraction`` of each slice's ``patch × patch`` tiles among themselves.

    Texture and intensities stay exactly those of the slice; only the layout breaks. ``fraction``
    1 shuffles every tile. ``patch`` defaults to an eighth of the side (32 pixels on 256² slices);
    the side must be a multiple of it.
    """
    x = as_slices(slices)
    n, side = x.shape[0], x.shape[1]
    patch = patch or side // 8
    if side % patch or x.shape[2] != side:
        raise ValueError(f"slices of {x.shape[1]}×{x.shape[2]} do not tile into {patch}×{patch} patches")
    k = side // patch
    tiles = to_tiles(x, patch).copy()
    rng = np.random.default_rng(seed)
    chosen_count = int(round(fraction * k * k))
    for i in range(n):
        chosen = rng.choice(k * k, chosen_count, replace=False)
        tiles[i, chosen] = tiles[i, rng.permutation(chosen)]
    return from_tiles(tiles)


def scramble_phase(slices: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Add ``fraction`` × a random phase to each slice's Fourier phase, then give the result the
    slice's own intensities by rank (an amplitude-adjusted surrogate, Theiler et al., 1992).

    The power spectrum (grain, edge density) is kept up to the rank remap, the histogram exactly;
    what goes is where things are. ``fraction`` 1 randomises the phase completely: textured blobs
    with no anatomy. The random phase is that of white noise's transform, so the result is real.
    """
    levels = as_slices(slices)
    n = len(levels)
    random_phase = np.angle(np.fft.fft2(np.random.default_rng(seed).standard_normal(levels.shape)))
    surrogate = np.fft.ifft2(np.fft.fft2(levels.astype(np.float64)) * np.exp(1j * fraction * random_phase)).real
    # the surrogate's k-th lowest pixel takes the slice's k-th lowest level
    out = np.empty((n, levels[0].size), np.uint8)
    order = surrogate.reshape(n, -1).argsort(axis=1)
    np.put_along_axis(out, order, np.sort(levels.reshape(n, -1), axis=1), axis=1)
    return out.reshape(levels.shape)


DAMAGES = {
    "blur": (blur, (1.0, 2.0, 4.0)),
    "noise": (noise, (8.0, 20.0, 50.0)),
    "shuffled patches": (shuffle_patches, (0.25, 0.5, 1.0)),
    "scrambled phase": (scramble_phase, (0.25, 0.5, 1.0)),
}
"""Kind → (function, severities from mild to severe): sigma in pixels, std in 8-bit levels, the
fraction of tiles (32² on 256² slices) shuffled, the fraction of a random phase added."""

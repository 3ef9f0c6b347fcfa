"""Slice sets for the metrics: checked uint8 stacks, a store split, and the real-vs-real floor.

Every metric compares a generated set with real slices; the same metric between two *real*
sets of one dataset (training vs held-out volumes) is the floor a perfect generator would reach
at that sample size, so it is reported beside each score.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from numpy.typing import ArrayLike

from medvar_bundle.data.store import SliceStore

T = TypeVar("T")


def as_slices(images: ArrayLike | torch.Tensor) -> np.ndarray:
    """``images`` as a uint8 ``(N, H, W)`` NumPy array (8-bit intensity levels 0..255)."""
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[0] == 0:
        raise ValueError(f"expected uint8 slices (N, H, W), got {x.dtype} {x.shape}")
    return x


def to_tiles(slices: np.ndarray, patch: int) -> np.ndarray:
    """Square slices ``(N, S, S)`` -> their ``patch × patch`` tiles ``(N, (S/patch)², patch, patch)``,
    row-major over each slice (``S`` a multiple of ``patch``; any dtype)."""
    n, side = slices.shape[0], slices.shape[-1]
    k = side // patch
    return slices.reshape(n, k, patch, k, patch).transpose(0, 1, 3, 2, 4).reshape(n, k * k, patch, patch)


def from_tiles(tiles: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_tiles`: ``(N, k², patch, patch)`` -> ``(N, k·patch, k·patch)``."""
    n, count, patch = tiles.shape[0], tiles.shape[1], tiles.shape[-1]
    k = int(round(count**0.5))
    return tiles.reshape(n, k, k, patch, patch).transpose(0, 1, 3, 2, 4).reshape(n, k * patch, k * patch)


def store_slices(
    store: str | os.PathLike, split: str, dataset: str, max_slices: int | None = None, seed: int = 0
) -> np.ndarray:
    """The slices of one dataset and split of a slice store, uint8 ``(N, 256, 256)``.

    Args:
        store: the store folder.
        split: "training", "validation" or "test".
        dataset: the dataset name in ``datasets.json``.
        max_slices: keep a random subset of at most this many (in store order).
        seed: seed of that subset.

    Raises:
        ValueError: the store holds no slices of ``dataset`` in ``split``.
    """
    slices = split_slices(store, split, dataset, max_slices, seed)
    if slices is None:
        raise ValueError(f"{store}: dataset {dataset!r} has no {split} slices")
    return slices


def split_slices(
    store: str | os.PathLike, split: str, dataset: str, max_slices: int | None = None, seed: int = 0
) -> np.ndarray | None:
    """:func:`store_slices`, or None where the store holds no slices of ``dataset`` in ``split``
    (a store prepared without held-out volumes)."""
    ds = SliceStore(store, split=split, datasets=[dataset])
    if len(ds) == 0:
        return None
    index = np.arange(len(ds))
    if max_slices is not None and max_slices < len(ds):
        index = np.sort(np.random.default_rng(seed).choice(len(ds), max_slices, replace=False))
    return np.stack([ds[int(i)]["image"].numpy() for i in index])


def real_vs_real_floor(
    metric: Callable[[np.ndarray, np.ndarray], T],
    store: str | os.PathLike,
    dataset: str,
    heldout_split: str = "validation",
    max_slices: int | None = None,
    seed: int = 0,
) -> T:
    """``metric(training slices, held-out slices)`` of one dataset: the score of real data.

    The store's splits are by volume, so this compares different patients (slices of one volume
    are near-duplicates and would make the floor too optimistic).

    Args:
        metric: any two-set metric called as ``metric(real, fake)`` on uint8 ``(N, 256, 256)``
            stacks, e.g. :func:`~medvar_bundle.metrics.histogram_distance`, or a lambda that
            extracts features first for FID/KID/CMMD.
        store: the slice store.
        dataset: the dataset name.
        heldout_split: the split standing in for the generated set.
        max_slices: at most this many slices from each split.
        seed: seed of those subsets.
    """
    real = store_slices(store, "training", dataset, max_slices, seed)
    heldout = store_slices(store, heldout_split, dataset, max_slices, seed)
    return metric(real, heldout)

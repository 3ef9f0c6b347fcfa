"""Pictures people would rather look at than read: slice grids in radiological orientation."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def radiological(slice_xy: np.ndarray) -> np.ndarray:
    """An axial slice stored as RAS array axes ``(x, y)`` → display rows/columns.

    Radiological convention: anterior at the top, the patient's right on the viewer's left.
    """
    return np.asarray(slice_xy)[::-1, ::-1].T


def save_grid(
    rows: Sequence[Sequence[np.ndarray]],
    out: str | os.PathLike,
    row_titles: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Save a grid of uint8 ``(H, W)`` slices (RAS axes) as a PNG, one row per group.

    The PNG is written to a temporary name and renamed, so a reader never sees half a file.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ncols = max((len(r) for r in rows), default=1)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.6 * ncols, 1.7 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(row):
                ax.imshow(radiological(row[c]), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        if row_titles:
            axes[r, 0].set_title(row_titles[r], fontsize=8, loc="left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def store_preview(store, out: str | os.PathLike, per_dataset: int = 8, seed: int = 0) -> Path:
    """A grid with ``per_dataset`` random slices of each dataset of a :class:`SliceStore`."""
    rng = np.random.default_rng(seed)
    rows, titles = [], []
    for name, entry in sorted(store.datasets.items(), key=lambda kv: kv[1]["id"]):
        idx = np.flatnonzero(store.dataset_ids == entry["id"])
        if idx.size == 0:
            continue
        pick = np.sort(rng.choice(idx, size=min(per_dataset, idx.size), replace=False))
        rows.append([store[int(i)]["image"].numpy() for i in pick])
        titles.append(f"{name} (id {entry['id']}, {entry['modality']}, {idx.size} slices)")
    if not rows:
        raise ValueError("the store holds no slices")
    return save_grid(rows, out, titles)

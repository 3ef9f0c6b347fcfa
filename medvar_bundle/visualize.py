"""Pictures people would rather look at than read: slice grids in radiological orientation."""

from __future__ import annotations

import io
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .files import atomic_write_bytes  # noqa: E402


def radiological(slice_xy: np.ndarray) -> np.ndarray:
    """An axial slice stored as RAS array axes ``(x, y)`` → display rows/columns.

    Radiological convention: anterior at the top, the patient's right on the viewer's left.
    """
    return np.asarray(slice_xy)[::-1, ::-1].T


def save_figure(fig, out: str | os.PathLike, dpi: int = 100) -> Path:
    """Save and close a figure (the format from the suffix); written atomically, so no reader sees half a PNG."""
    out = Path(out)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)
    atomic_write_bytes(out, buffer.getvalue())
    return out


def pixel_aspect(spacing: Sequence[float] | None) -> float:
    """Height over width of a pixel of :func:`radiological` display, from the slice's in-plane
    spacing ``(x, y, ...)`` in mm (rows run along y, columns along x); 1 without a spacing."""
    return 1.0 if spacing is None else float(spacing[1]) / float(spacing[0])


def suptitle(fig, title: str | None, width_in: float) -> None:
    """A figure title wrapped to the figure's width (about 12 characters an inch at 10 pt), so a
    narrow grid does not cut it off."""
    if title:
        fig.suptitle(textwrap.fill(title, max(16, int(12 * width_in))), fontsize=10)


def save_grid(
    rows: Sequence[Sequence[np.ndarray | None]],
    out: str | os.PathLike,
    row_titles: Sequence[str] | None = None,
    title: str | None = None,
    aspect: float | Sequence[float] = 1.0,
) -> Path:
    """Save a grid of uint8 ``(H, W)`` slices (RAS axes) as a PNG, one row per group (a None cell
    stays empty); ``aspect`` is :func:`pixel_aspect` of the slices, or one per row (1: square pixels)."""
    ncols = max((len(r) for r in rows), default=1)
    aspects = [float(aspect)] * len(rows) if np.isscalar(aspect) else [float(a) for a in aspect]
    if len(aspects) != len(rows):
        raise ValueError(f"{len(aspects)} aspects for {len(rows)} rows")
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.6 * ncols, 1.7 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(row) and row[c] is not None:
                image = radiological(row[c])
                ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest", aspect=aspects[r])
        if row_titles:
            axes[r, 0].set_title(row_titles[r], fontsize=8, loc="left")
    suptitle(fig, title, 1.6 * ncols)
    return save_figure(fig, out)


def store_preview(
    store, out: str | os.PathLike, per_dataset: int = 8, seed: int = 0, aspects: dict[str, float] | None = None
) -> Path:
    """A grid with ``per_dataset`` random slices of each dataset of a :class:`SliceStore`, each row
    drawn at its dataset's :func:`pixel_aspect` in ``aspects`` (name → aspect; 1 where absent)."""
    rng = np.random.default_rng(seed)
    rows, titles, row_aspects = [], [], []
    for name, entry in sorted(store.datasets.items(), key=lambda kv: kv[1]["id"]):
        idx = np.flatnonzero(store.dataset_ids == entry["id"])
        if idx.size == 0:
            continue
        pick = np.sort(rng.choice(idx, size=min(per_dataset, idx.size), replace=False))
        rows.append([store[int(i)]["image"].numpy() for i in pick])
        titles.append(f"{name} (id {entry['id']}, {entry['modality']}, {idx.size} slices)")
        row_aspects.append((aspects or {}).get(name, 1.0))
    if not rows:
        raise ValueError("the store holds no slices")
    return save_grid(rows, out, titles, aspect=row_aspects)


def save_reconstructions(
    originals: np.ndarray, reconstructions: np.ndarray, out: str | os.PathLike, title: str | None = None
) -> Path:
    """Originals (top row) above their reconstructions (bottom row); uint8 ``(N, H, W)`` RAS slices."""
    return save_grid([list(originals), list(reconstructions)], out, ["original", "reconstruction"], title)


def save_usage_heatmap(counts: np.ndarray, out: str | os.PathLike, scale_names: Sequence[str] | None = None) -> Path:
    """Codebook usage heatmaps in the style of the paper's Fig. 4.

    Args:
        counts: ``(K, V)`` hits of each code at each scale (V a square number, 4096 → 64×64 grid).
        scale_names: titles of the K per-scale panels.

    The first panel shows all scales together; the others show each scale, so collapse at the
    coarse scales is visible. Colour is log10(1 + hits). Each title gives the codes used, the most
    that scale could use (its token count, when below V) and the fraction of the codebook.
    """
    counts = np.asarray(counts, dtype=np.float64)
    k, v = counts.shape
    side = int(round(v**0.5))
    if side * side != v:
        raise ValueError(f"codebook size {v} is not a square number")
    panels = [("all scales", counts.sum(0))] + [
        (scale_names[i] if scale_names else f"scale {i + 1}", counts[i]) for i in range(k)
    ]
    ncols = min(6, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 3.0 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, c) in zip(axes.flat, panels):
        ax.imshow(np.log10(1 + c).reshape(side, side), cmap="magma", interpolation="nearest")
        possible = int(min(v, c.sum()))  # a scale with n tokens per image can use at most n·images codes
        ax.set_title(
            f"{name}: {int((c > 0).sum())} codes used\nof {possible} possible ({100 * np.mean(c > 0):.0f}% of V)",
            fontsize=8,
        )
    fig.suptitle("codebook usage (log10 1+hits, 64×64 grid of codes)" if side == 64 else "codebook usage", fontsize=10)
    return save_figure(fig, out)

"""The generated-folder format: NIfTI slice stacks with real spacing, PNG grids and ``summary.json``,
written by generation and read back by evaluation.

Axis convention (the slice store's, see :mod:`medvar_bundle.data.store`): ``prepare`` orients every
volume to RAS with MONAI ``Orientationd("RAS")`` and takes axial slices along the last axis, so a
stored or generated image is a uint8 ``(S, S)`` array indexed ``[x, y]``: ``x`` grows towards the
patient's Right, ``y`` towards Anterior. A batch of ``N`` images ``(N, S, S)`` becomes a NIfTI volume
``(S, S, N)`` indexed ``[x, y, slice]`` whose affine has a positive diagonal, so
``nibabel.aff2axcodes`` reads ``('R', 'A', 'S')``.

Generated slices are independent samples, not neighbours in one body; the slice axis only lays
them out at the dataset's median slice spacing so that viewers show real millimetres.

Intensities: CT slices were windowed, ``u8 = round(clip((HU - (c - w/2)) / w, 0, 1) * 255)`` for the
dataset's window ``[c, w]``; :func:`to_intensity` inverts it to int16 Hounsfield units. MR slices
were percentile-normalised, which cannot be inverted, so they stay uint8.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .data.transforms import DEFAULT_CT_WINDOW, NormalizeByModalityd, QuantizeUint8d, resize_in_plane  # noqa: E402
from .files import atomic_write_json, one_line, write_nifti  # noqa: E402
from .visualize import pixel_aspect, radiological, save_figure, save_grid, suptitle  # noqa: E402

__all__ = [
    "check_entry",
    "check_writable",
    "entry_aspect",
    "output_geometry",
    "save_progression",
    "save_sample_grid",
    "slice_stack_affine",
    "to_intensity",
    "write_nifti",
    "write_slice_stack",
]

SYNTHETIC_DESCRIP = "MedVAR synthetic {modality} slices, not a real acquisition"


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------


def slice_stack_affine(spacing_xyz_mm: Sequence[float], shape_xy: Sequence[int]) -> np.ndarray:
    """RAS voxel → world affine, in millimetres, for a stack of axial slices ``(X, Y, N)``.

    The in-plane field of view is centred on the origin (the centre of the ``X × Y`` plane is at
    x = y = 0 mm); the first slice lies at z = 0 and slice ``k`` at ``z = k * spacing_z``.

    Args:
        spacing_xyz_mm: voxel size ``(sx, sy, sz)`` in mm along x (→ Right), y (→ Anterior) and
            the slice axis (→ Superior).
        shape_xy: in-plane matrix ``(X, Y)`` in voxels.

    Returns:
        float64 ``(4, 4)`` affine with diagonal ``(sx, sy, sz, 1)``.
    """
    spacing = np.asarray(spacing_xyz_mm, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"spacing must be 3 positive numbers (mm), got {list(spacing_xyz_mm)}")
    if len(shape_xy) != 2 or min(shape_xy) < 1:
        raise ValueError(f"shape_xy must be 2 positive sizes, got {tuple(shape_xy)}")
    affine = np.diag([*spacing, 1.0])
    affine[:2, 3] = -(np.asarray(shape_xy, dtype=np.float64) - 1.0) / 2.0 * spacing[:2]
    return affine


def _entry_geometry(entry: dict) -> tuple[np.ndarray, np.ndarray]:
    """A registry entry's median original spacing (mm) and matrix (voxels), validated."""
    spacing, matrix = entry.get("spacing"), entry.get("matrix")
    if not spacing or not matrix or len(spacing) != 3 or len(matrix) != 3:
        raise ValueError(f"dataset entry needs 3-element 'spacing' and 'matrix', got spacing={spacing} matrix={matrix}")
    spacing, matrix = np.asarray(spacing, dtype=np.float64), np.asarray(matrix, dtype=np.float64)
    if not (np.all(spacing > 0) and np.all(matrix > 0)):
        raise ValueError(f"dataset entry has non-positive spacing {spacing.tolist()} or matrix {matrix.tolist()}")
    return spacing, matrix


def output_geometry(entry: dict, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Spacing and matrix of generated ``size × size`` slices of a dataset.

    The store resizes each slice in-plane to ``size × size`` without cropping, so a generated slice
    covers the dataset's median field of view: in-plane spacing ``spacing[i] * matrix[i] / size``
    (i = x, y). The slice spacing is the median original ``spacing[2]``.

    Args:
        entry: a ``datasets.json`` entry (``spacing`` [sx, sy, sz] mm, ``matrix`` [nx, ny, nz]).
        size: the generated slice size S in pixels.

    Returns:
        ``spacing`` float64 ``(3,)`` in mm and ``matrix`` int64 ``(3,)`` = ``(size, size, nz)``.
    """
    spacing, matrix = _entry_geometry(entry)
    out_spacing = np.array([spacing[0] * matrix[0] / size, spacing[1] * matrix[1] / size, spacing[2]])
    return out_spacing, np.array([size, size, int(matrix[2])], dtype=np.int64)


def entry_aspect(entry: dict) -> float:
    """:func:`~medvar_bundle.visualize.pixel_aspect` of a dataset's stored (and generated) slices,
    from its ``datasets.json`` field of view, so grids show its anatomy in proportion (1 where the
    entry has no geometry)."""
    try:
        spacing, _ = output_geometry(entry)
    except ValueError:
        return 1.0
    return pixel_aspect(spacing)


# --------------------------------------------------------------------------------------------
# intensities
# --------------------------------------------------------------------------------------------


def _ct_window(entry: dict) -> tuple[float, float]:
    """The dataset's CT window ``(center, width)`` in HU (``prepare``'s default when unset)."""
    center, width = entry.get("ct_window") or DEFAULT_CT_WINDOW
    if width <= 0:
        raise ValueError(f"CT window width must be positive, got {width}")
    return float(center), float(width)


def _check_modality(entry: dict) -> str:
    modality = entry.get("modality")
    if modality not in ("CT", "MR"):
        raise ValueError(f"unknown modality {modality!r}: use CT or MR")
    return modality


def _to_intensity_float(values: np.ndarray, entry: dict) -> np.ndarray:
    """Float 8-bit values ``[0, 255]`` → CT Hounsfield units (float) or MR values (float, unchanged)."""
    if _check_modality(entry) == "MR":
        return values
    center, width = _ct_window(entry)
    return (center - width / 2.0) + values * (width / 255.0)


def _cast(values: np.ndarray, modality: str) -> np.ndarray:
    """Round float intensities to the stored type: int16 HU for CT, uint8 for MR."""
    if modality == "CT":
        info = np.iinfo(np.int16)
        return np.clip(np.rint(values), info.min, info.max).astype(np.int16)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def to_intensity(images_u8: np.ndarray, entry: dict) -> np.ndarray:
    """Generated uint8 slices → the intensities written to disk.

    CT: inverts the dataset window ``[center, width]``: u8 0 → ``center - width/2`` HU, 255 →
    ``center + width/2`` HU, linear in between, rounded to int16. Values inside the window come
    back within one quantisation step (``width / 255`` HU, plus 0.5 HU of integer rounding when the
    window is narrower than 255 HU); values the forward window clipped come back at its edges.
    MR: the percentile normalisation cannot be undone; the uint8 values are returned as a copy.

    Args:
        images_u8: uint8 ``(N, S, S)`` (any shape works).
        entry: a ``datasets.json`` entry (``modality``, ``ct_window``).

    Returns:
        int16 HU (CT) or uint8 (MR), same shape as ``images_u8``.
    """
    images = np.asarray(images_u8)
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    modality = _check_modality(entry)
    return _cast(_to_intensity_float(images.astype(np.float64), entry), modality)


# --------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------


def _check_stack(images_u8) -> np.ndarray:
    images = images_u8.detach().cpu().numpy() if isinstance(images_u8, torch.Tensor) else np.asarray(images_u8)
    if images.ndim != 3 or images.shape[0] < 1 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected images of shape (N, S, S) with N >= 1, got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    return images


def write_slice_stack(
    images_u8: np.ndarray, entry: dict, path: str | os.PathLike, resample_original: bool = False
) -> Path:
    """Write generated slices as one NIfTI volume ``(X, Y, N)`` in RAS, millimetres.

    Args:
        images_u8: uint8 ``(N, S, S)`` generated slices, array axes ``(x, y)`` in RAS (store layout).
        entry: the dataset's ``datasets.json`` entry (``modality``, ``spacing``, ``matrix``,
            ``ct_window``).
        path: output file ending in ``.nii.gz`` (or ``.nii``); its folder is created if needed.
        resample_original: resample in-plane to the dataset's matrix ``(nx, ny)`` (its median field
            of view over its median spacing) over the same field of view, so the spacing becomes
            the median original in-plane spacing.
            Otherwise the volume is ``S × S × N`` at :func:`output_geometry`'s spacing.

    The affine is :func:`slice_stack_affine` (in-plane FOV centred on the origin). CT is written as
    int16 Hounsfield units (:func:`to_intensity`) with no scaling when the window is wider than
    255 HU; a narrower window (e.g. brain 40/80) would merge neighbouring levels in integer HU, so
    there the int16 values are the 8-bit levels and ``scl_slope = width / 255``, ``scl_inter =
    center - width / 2`` turn them into HU (every reader applies it). MR is uint8, no scaling;
    ``cal_min``/``cal_max`` the CT window or 0..255, q/sform code 1, units mm, ``descrip`` marks the
    data as synthetic. The file is written to a temporary name in the same folder and renamed.

    Returns:
        The written path.
    """
    images = _check_stack(images_u8)
    path = Path(path)
    if not path.name.endswith((".nii.gz", ".nii")):
        raise ValueError(f"{path}: NIfTI output must end in .nii.gz or .nii")
    modality = _check_modality(entry)
    size = images.shape[1]
    spacing, _ = output_geometry(entry, size)
    values = images.astype(np.float64)
    if resample_original:
        orig_spacing, orig_matrix = _entry_geometry(entry)
        shape_xy = (int(round(orig_matrix[0])), int(round(orig_matrix[1])))
        values = resize_in_plane(torch.from_numpy(values), shape_xy).double().numpy()
        # same field of view (S * spacing) over the new matrix
        spacing = np.array([spacing[0] * size / shape_xy[0], spacing[1] * size / shape_xy[1], spacing[2]])
    slope, inter = 1.0, 0.0
    if modality == "CT" and _ct_window(entry)[1] <= 255:
        # integer HU would merge neighbouring levels: store the levels, the window is the scaling
        center, width = _ct_window(entry)
        slope, inter = width / 255.0, center - width / 2.0
        data = np.clip(np.rint(values), 0, 255).astype(np.int16)
    else:
        data = _cast(_to_intensity_float(values, entry), modality)
    volume = np.ascontiguousarray(np.moveaxis(data, 0, -1))  # (N, X, Y) → (X, Y, N)

    affine = slice_stack_affine(spacing, volume.shape[:2])
    img = nib.Nifti1Image(volume, affine)
    hdr = img.header
    hdr.set_data_dtype(volume.dtype)
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_slope_inter(slope, inter)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if modality == "CT":
        center, width = _ct_window(entry)
        hdr["cal_min"], hdr["cal_max"] = center - width / 2.0, center + width / 2.0
    else:
        hdr["cal_min"], hdr["cal_max"] = 0.0, 255.0
    hdr["descrip"] = SYNTHETIC_DESCRIP.format(modality=modality).encode()[:79]

    return write_nifti(img, path)


# --------------------------------------------------------------------------------------------
# folders
# --------------------------------------------------------------------------------------------


def check_entry(name: str, entry: dict) -> None:
    """Check that slices of dataset ``name`` can be written from its registry ``entry`` (modality,
    CT window, spacing and matrix), before anything is sampled.

    Raises:
        ValueError: one line naming the dataset and what its entry lacks.
    """
    try:
        if _check_modality(entry) == "CT":
            _ct_window(entry)
        output_geometry(entry)
    except ValueError as exc:
        raise ValueError(f"dataset {name!r} cannot be written: {exc}") from None


def check_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` if needed and prove it is writable by creating and deleting a file in it.

    Raises:
        PermissionError: ``"output folder <folder> is not writable: <reason>"``.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".medvar-write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise PermissionError(f"output folder {folder} is not writable: {reason}") from None


# --------------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------------


def save_sample_grid(
    images_u8: np.ndarray,
    path: str | os.PathLike,
    title: str | None = None,
    nrow: int | None = None,
    spacing: Sequence[float] | None = None,
) -> Path:
    """Save generated slices as a PNG grid, in radiological display (anterior up, right on the left).

    Args:
        images_u8: uint8 ``(N, S, S)`` slices, array axes ``(x, y)`` in RAS.
        path: the PNG file.
        title: optional figure title (wrapped to the figure's width).
        nrow: images per grid row (as in ``torchvision.utils.make_grid``); default ``ceil(sqrt(N))``.
        spacing: the slices' spacing ``(x, y, ...)`` in mm (:func:`output_geometry`), so they are
            drawn in their true proportions (a 500 × 203 mm lower-leg field is wide, not square);
            None draws square pixels.

    Returns:
        The written path. The figure is ``1.6 × columns`` by ``1.7 × rows`` inches at 100 dpi
        (see :func:`medvar_bundle.visualize.save_grid`).
    """
    images = _check_stack(images_u8)
    per_row = nrow or math.ceil(math.sqrt(len(images)))
    if per_row < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    rows = [list(images[i : i + per_row]) for i in range(0, len(images), per_row)]
    return save_grid(rows, path, title=title, aspect=pixel_aspect(spacing))


def save_progression(
    stages: Sequence[np.ndarray],
    path: str | os.PathLike,
    patch_nums: Sequence[int] | None = None,
    title: str | None = None,
    spacing: Sequence[float] | None = None,
) -> Path:
    """Save the coarse-to-fine progression of generated samples as a PNG.

    One row per sample, one column per scale, coarse on the left; radiological display.

    Args:
        stages: K uint8 arrays ``(N, h_k, w_k)``, one per scale, coarse to fine: the images decoded
            after each scale (any in-plane size; each panel is drawn at the same size).
        path: the PNG file.
        patch_nums: the K token-grid sides; column titles then read ``"scale k (n×n)"``, otherwise
            ``"scale k"`` (k counts from 1).
        title: optional figure title (wrapped to the figure's width).
        spacing: the finest stage's spacing ``(x, y, ...)`` in mm, for true proportions (as in
            :func:`save_sample_grid`).

    Returns:
        The written path; the figure is ``1.6 × K`` by ``1.7 × N`` inches at 100 dpi.
    """
    stages = [s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s) for s in stages]
    if not stages:
        raise ValueError("no stages to show")
    n = stages[0].shape[0] if stages[0].ndim == 3 else -1
    for k, s in enumerate(stages):
        if s.ndim != 3 or s.shape[0] != n or s.dtype != np.uint8:
            raise ValueError(f"stage {k}: expected uint8 (N, h, w) with N = {n}, got {s.dtype} {s.shape}")
    if patch_nums is not None and len(patch_nums) != len(stages):
        raise ValueError(f"{len(patch_nums)} patch_nums for {len(stages)} stages")
    k_scales, aspect = len(stages), pixel_aspect(spacing)
    fig, axes = plt.subplots(n, k_scales, figsize=(1.6 * k_scales, 1.7 * n), squeeze=False)
    for k, stage in enumerate(stages):
        for i in range(n):
            ax = axes[i, k]
            ax.axis("off")
            ax.imshow(radiological(stage[i]), cmap="gray", vmin=0, vmax=255, interpolation="nearest", aspect=aspect)
        name = f"scale {k + 1}" if patch_nums is None else f"scale {k + 1} ({patch_nums[k]}×{patch_nums[k]})"
        axes[0, k].set_title(name, fontsize=8)
    suptitle(fig, title, 1.6 * k_scales)
    return save_figure(fig, path)


SUMMARY_FILE = "summary.json"
"""A generated folder's record: options, parameter count, and per dataset ``seconds_per_image`` and files."""


def write_summary(folder: str | os.PathLike, summary: dict) -> Path:
    """Write ``folder/summary.json`` atomically (the last file generation writes); returns its path."""
    path = Path(folder) / SUMMARY_FILE
    atomic_write_json(path, summary)
    return path


def read_summary(folder: str | os.PathLike) -> dict:
    """``folder/summary.json`` ({} when absent: generation was killed before it finished, or the
    folder holds real slices)."""
    path = Path(folder) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


# --------------------------------------------------------------------------------------------
# generated folders: reading
# --------------------------------------------------------------------------------------------


def read_generated(path: str | os.PathLike, entry: dict) -> np.ndarray:
    """A ``NAME.nii.gz`` of ``medvar generate`` back to the sampler's uint8 slices ``(N, S, S)``.

    MR stacks hold the uint8 slices as they are. CT stacks hold Hounsfield units (after the
    header's scaling); the dataset's window ``entry["ct_window"]`` is applied again exactly as
    ``prepare`` did (clip to the window, scale to [0, 1], round to 255 levels), which returns every
    sampled level unchanged: integer HU move a level by less than half a step for windows wider
    than 255 HU, and narrower windows are stored as levels with the window as scaling.

    Args:
        path: the NIfTI stack ``(S, S, N)``.
        entry: the dataset's ``datasets.json`` entry (``modality``, ``ct_window``).

    Raises:
        ValueError: one line naming the file: unreadable, not ``(S, S, N)``, an MR stack that is not
            uint8, a CT stack of unscaled uint8 levels (not HU) or with NaN or infinite values.
    """
    try:
        data = np.asarray(nib.load(path).dataobj)
    except Exception as exc:  # not NIfTI, truncated, not gzip: one line naming the file
        raise ValueError(f"{path}: not a readable NIfTI stack ({type(exc).__name__}: {one_line(exc, 200)})") from None
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a stack (S, S, N) of generated slices, got shape {data.shape}")
    slices = np.ascontiguousarray(np.moveaxis(data, -1, 0))
    if entry.get("modality") == "MR":
        if slices.dtype != np.uint8:
            raise ValueError(f"{path}: MR stacks of `medvar generate` are uint8, got {slices.dtype}")
        return slices
    if not np.issubdtype(slices.dtype, np.integer) and not np.isfinite(slices).all():
        raise ValueError(f"{path}: CT stack holds NaN or infinite values")
    if slices.dtype == np.uint8:  # a scaled file reads as float: only unscaled 8-bit levels land here
        raise ValueError(
            f"{path}: CT stacks of `medvar generate` hold Hounsfield units (int16), got uint8 levels; "
            "write HU (medvar_bundle.io.write_slice_stack does)"
        )
    windowed = NormalizeByModalityd()({"image": slices.astype(np.float32), **entry})
    return QuantizeUint8d("image")(windowed)["image"]


@dataclass(frozen=True)
class GeneratedFolder:
    """One method's output folder.

    Attributes:
        label: the method's name in the tables (the folder name unless given).
        path: the folder.
        summary: its ``summary.json`` ({} when absent).
        datasets: names with a ``NAME.nii.gz``.
    """

    label: str
    path: Path
    summary: dict
    datasets: tuple[str, ...]

    @property
    def parameters(self) -> int | None:
        """Parameter count of the sampling network (``summary.json`` key ``parameters``)."""
        return self.summary.get("parameters")

    def seconds_per_image(self, dataset: str) -> float | None:
        return self.summary.get("datasets", {}).get(dataset, {}).get("seconds_per_image")


def read_generated_folder(path: str | os.PathLike, label: str | None = None) -> GeneratedFolder:
    """Find the stacks and the summary of one generated folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder of generated slices")
    datasets = tuple(sorted(p.name.removesuffix(".nii.gz") for p in path.glob("*.nii.gz")))
    if not datasets:
        raise ValueError(f"{path}: no NAME.nii.gz stacks (the output of `medvar generate`)")
    return GeneratedFolder(label or path.resolve().name, path, read_summary(path), datasets)

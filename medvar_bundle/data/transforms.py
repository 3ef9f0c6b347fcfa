"""MONAI dictionary transforms that turn a CT/MR volume into 256×256 uint8 axial slices (paper §3.2).

Every transform here works on channel-first volumes ``(1, X, Y, Z)`` oriented to RAS, so the last
axis is the axial (inferior → superior) axis. ``configs/prepare.yaml`` chains them, with MONAI's own
channel handling, orientation and resizing, into the ``preprocessing`` Compose that ``medvar
prepare`` runs.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    MapTransform,
    ScaleIntensityRange,
    Transform,
)
from scipy import ndimage

from .readers import VolumeError, VolumeFileError, load_volume

DEFAULT_CT_WINDOW: tuple[float, float] = (40.0, 400.0)
"""Soft-tissue window (level, width) in Hounsfield units."""

MODALITIES = ("CT", "MR")
SLICE_SIZE = 256


class NoSlicesError(VolumeError):
    """A valid volume with no slice to keep (its label is empty): reported as skipped."""


def _to_numpy(img) -> np.ndarray:
    return img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)


def _like(new: np.ndarray, img):
    """Return ``new`` as the same container type as ``img`` (keeps MetaTensor metadata), no copy."""
    if isinstance(img, MetaTensor):
        return MetaTensor(
            torch.from_numpy(np.ascontiguousarray(new)), meta=img.meta, applied_operations=img.applied_operations
        )
    if isinstance(img, torch.Tensor):
        return torch.from_numpy(np.ascontiguousarray(new))
    return new


def check_volume_shape(shape: tuple[int, ...]) -> None:
    """Raise :class:`VolumeError` unless a channel-first shape ``(C, X, Y, Z)`` is one 3D volume (C = 1)."""
    if len(shape) - 1 < 3:
        raise VolumeError(f"2D image of shape {shape[1:]}: a 3D volume is needed")
    if len(shape) - 1 > 3:
        raise VolumeError(f"{len(shape) - 1}D spatial image of shape {shape[1:]}: a 3D volume is needed")
    if shape[0] != 1:
        raise VolumeError(
            f"4D image with {shape[0]} volumes (shape {shape[1:]} x {shape[0]}): split it into single 3D volumes first"
        )


def _refusal(img, reason: str) -> VolumeError:
    """A :class:`VolumeFileError` naming the file ``img`` was read from (a MetaTensor), else a :class:`VolumeError`."""
    source = img.meta.get("filename_or_obj") if isinstance(img, MetaTensor) else None
    return VolumeFileError(source, reason) if source else VolumeError(reason)


class ValidateVolumed(MapTransform):
    """Reject volumes the pipeline cannot turn into slices, with a one-line reason.

    Checks on channel-first ``(C, X, Y, Z)`` data: exactly one channel (so 4D time series or
    multi-sequence files are refused), three spatial dimensions, finite voxels, a non-constant
    image, and labels with the image's spatial shape.

    Raises:
        VolumeError: naming what is wrong.
    """

    def __init__(self, keys: KeysCollection = "image", label_key: str | None = "label") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.label_key = label_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            try:
                check_volume_shape(tuple(img.shape))
            except VolumeError as err:
                raise _refusal(img, str(err)) from None
            arr = _to_numpy(img)
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            if bad:
                raise _refusal(img, f"{bad} NaN/Inf voxels")
            lo, hi = float(arr.min()), float(arr.max())
            if lo == hi:
                raise _refusal(img, f"constant volume (every voxel is {lo:g})")
        if self.label_key is not None and self.label_key in d:
            lbl_shape = tuple(d[self.label_key].shape[1:])
            img_shape = tuple(d[self.first_key(d)].shape[1:])
            if lbl_shape != img_shape:
                raise VolumeError(f"label shape {lbl_shape} differs from image shape {img_shape}")
        return d


class RecordGeometryd(MapTransform):
    """Store the volume's spacing (mm) and matrix (voxels) as ``{key}_geometry`` before resizing.

    ``spacing`` and ``matrix`` follow the array axes at the time of the call (RAS after
    :class:`~monai.transforms.Orientationd`).
    """

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            spacing = [float(s) for s in _to_numpy(img.pixdim)] if hasattr(img, "pixdim") else [1.0] * (img.ndim - 1)
            d[f"{key}_geometry"] = {"spacing": spacing, "matrix": [int(s) for s in img.shape[1:]]}
        return d


class ScaleIntensityNonZeroPercentiles(Transform):
    """Clip at percentiles of the *non-zero* voxels and scale that range to ``[b_min, b_max]``.

    MR background is mostly exact zeros; percentiles over all voxels would be dominated by it.
    ``lower``/``upper`` are percentiles in [0, 100] (paper: 0.5 and 99.5).
    """

    def __init__(self, lower: float = 0.5, upper: float = 99.5, b_min: float = 0.0, b_max: float = 1.0) -> None:
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"need 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper, self.b_min, self.b_max = lower, upper, b_min, b_max

    def input_range(self, img) -> tuple[float, float]:
        """The intensities ``(lo, hi)`` of ``img`` that map to ``b_min`` and ``b_max``."""
        arr = _to_numpy(img).astype(np.float32, copy=False)
        nonzero = arr[arr != 0]
        if nonzero.size == 0:
            raise VolumeError("all-zero volume")
        lo, hi = np.percentile(nonzero, [self.lower, self.upper])
        if hi <= lo:
            raise VolumeError(f"non-zero voxels have no intensity range ({lo:g}..{hi:g})")
        return float(lo), float(hi)

    def __call__(self, img):
        lo, hi = self.input_range(img)
        out = ScaleIntensityRange(lo, hi, self.b_min, self.b_max, clip=True)(_to_numpy(img).astype(np.float32))
        return _like(np.asarray(out, dtype=np.float32), img)


def ct_window(level: float, width: float) -> ScaleIntensityRange:
    """Map Hounsfield units ``[level - width/2, level + width/2]`` linearly onto [0, 1], clipped."""
    if width <= 0:
        raise ValueError(f"CT window width must be positive, got {width}")
    return ScaleIntensityRange(level - width / 2, level + width / 2, 0.0, 1.0, clip=True)


class NormalizeByModalityd(MapTransform):
    """Modality-specific intensity normalisation to [0, 1] (paper §3.2).

    CT: a fixed window in HU, ``data[window_key]`` = ``(level, width)`` or the default soft-tissue
    window (40, 400). MR: :class:`ScaleIntensityNonZeroPercentiles` (0.5th–99.5th).
    The modality is read from ``data[modality_key]`` ("CT" or "MR").
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        modality_key: str = "modality",
        window_key: str = "ct_window",
        default_window: Sequence[float] = DEFAULT_CT_WINDOW,
        mr_percentiles: Sequence[float] = (0.5, 99.5),
    ) -> None:
        super().__init__(keys)
        self.modality_key, self.window_key = modality_key, window_key
        self.default_window = tuple(default_window)
        self.mr = ScaleIntensityNonZeroPercentiles(*mr_percentiles)

    def _modality(self, data: Mapping[Hashable, object]) -> str:
        modality = data.get(self.modality_key)
        if modality not in MODALITIES:
            raise VolumeError(f"unknown modality {modality!r}: use one of {', '.join(MODALITIES)}")
        return modality

    def input_range(self, data: Mapping[Hashable, object], key: Hashable = "image") -> tuple[float, float]:
        """The intensities ``(lo, hi)`` of ``data[key]`` mapped to 0 and 1 (HU for CT), so that a
        normalised ``x`` reads back as ``lo + x · (hi − lo)`` inside that range."""
        if self._modality(data) == "CT":
            level, width = data.get(self.window_key) or self.default_window
            return float(level) - float(width) / 2, float(level) + float(width) / 2
        return self.mr.input_range(data[key])

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        modality = self._modality(d)
        for key in self.key_iterator(d):
            if modality == "CT":
                level, width = d.get(self.window_key) or self.default_window
                d[key] = ct_window(float(level), float(width))(d[key])
            else:
                d[key] = self.mr(d[key])
        return d


IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE[:, :, 1] = ndimage.generate_binary_structure(2, 1)
"""Connectivity within an axial slice only: labels every slice's 2D components in one call."""


def body_mask(
    volume: np.ndarray, threshold: float = 0.05, min_fraction: float = 0.1, min_volume_fraction: float = 0.5
) -> np.ndarray:
    """Foreground of a normalised ``(X, Y, Z)`` volume with spurious background removed.

    1. threshold ``volume > threshold``;
    2. keep the 3D connected components (face-connected) of at least ``min_volume_fraction`` of
       the largest one's voxels: the body, or both legs or arms, not the table, cables or
       detached blobs;
    3. in each axial slice, drop 2D components smaller than ``min_fraction`` of that slice's
       largest component (a blob joined in 3D through another slice but detached in this one);
    4. fill holes per slice so that air inside the body (lungs, bowel gas) stays foreground.
    """
    mask = np.asarray(volume > threshold)
    if not mask.any():
        return mask
    labels, n = ndimage.label(mask, output=np.int32)  # face connectivity; int32 halves the memory of int64
    if n > 1:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        sizes[0] = 0
        mask = (sizes >= min_volume_fraction * sizes.max())[labels]
    del labels
    labels, n = ndimage.label(mask, structure=IN_PLANE, output=np.int32)
    if n > 1:
        areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        z_of = np.array([sl[2].start for sl in ndimage.find_objects(labels)])
        largest = np.zeros(mask.shape[-1], dtype=areas.dtype)
        np.maximum.at(largest, z_of, areas)
        keep = np.concatenate([[False], areas >= min_fraction * largest[z_of]])
        mask = keep[labels]
    # pad z with full slices so that the first and last slices are not "border" for hole filling
    padded = np.pad(mask, ((0, 0), (0, 0), (1, 1)), constant_values=True)
    return ndimage.binary_fill_holes(padded, structure=IN_PLANE)[..., 1:-1]


class RemoveBackgroundd(MapTransform):
    """Zero everything outside :func:`body_mask` and store the mask under ``mask_key``.

    Works on normalised ``(1, X, Y, Z)`` images in [0, 1].
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str = "foreground",
        threshold: float = 0.05,
        min_fraction: float = 0.1,
        min_volume_fraction: float = 0.5,
    ) -> None:
        super().__init__(keys)
        self.mask_key, self.threshold, self.min_fraction = mask_key, threshold, min_fraction
        self.min_volume_fraction = min_volume_fraction

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            arr = _to_numpy(d[key])
            mask = body_mask(arr[0], self.threshold, self.min_fraction, self.min_volume_fraction)
            if not mask.any():
                raise VolumeError(f"no body found above intensity {self.threshold} after normalisation")
            d[key] = _like(arr * mask[None], d[key])
            d[self.mask_key] = mask
        return d


class SelectAxialSlicesd(MapTransform):
    """Keep only the axial slices (last axis) that hold annotation, else those that hold body.

    With a label, a slice is kept when it has any voxel > 0 (strictly the annotated slices, as in
    the paper). Without one, a slice is kept when the body mask covers at least
    ``min_body_fraction`` of it. The kept indices (into the RAS-oriented volume) are stored under
    ``"slice_indices"``; ``"has_label"`` tells which rule was used.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        label_key: str = "label",
        mask_key: str = "foreground",
        min_body_fraction: float = 0.01,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.label_key, self.mask_key, self.min_body_fraction = label_key, mask_key, min_body_fraction

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        has_label = self.label_key in d and d[self.label_key] is not None
        if has_label:
            lbl = _to_numpy(d[self.label_key])
            keep = np.flatnonzero((lbl > 0).reshape(-1, lbl.shape[-1]).any(axis=0))
        else:
            mask = np.asarray(d[self.mask_key])
            keep = np.flatnonzero(mask.reshape(-1, mask.shape[-1]).mean(axis=0) >= self.min_body_fraction)
        if keep.size == 0:
            raise NoSlicesError("no axial slice holds annotation" if has_label else "no axial slice holds body")
        for key in self.key_iterator(d):
            d[key] = d[key][..., keep]
        if self.mask_key in d:
            d[self.mask_key] = np.asarray(d[self.mask_key])[..., keep]
        d["slice_indices"] = [int(i) for i in keep]
        d["has_label"] = bool(has_label)
        return d


def resize_in_plane(slices: torch.Tensor, shape_xy: Sequence[int]) -> torch.Tensor:
    """Resize float slices ``(N, X, Y)`` to ``(N, *shape_xy)`` over the same field of view.

    Pixel-centre aligned (``align_corners=False``). Area averaging when no axis grows (a box filter
    for whole-number factors, e.g. 512 → 256; adaptive average pooling otherwise); else bilinear
    after a Gaussian anti-aliasing filter along each axis that shrinks (σ = (factor − 1) / 2
    pixels, none along an axis that grows), so a 768 × 200 slice does not alias along x. The filter
    reflects at the borders (MONAI's ``Resized`` pads with zeros and dims the outer rows), so a
    constant slice stays constant to its edges.
    """
    shape_xy = tuple(int(n) for n in shape_xy)
    if tuple(slices.shape[1:]) == shape_xy:
        return slices
    if all(o <= i for o, i in zip(shape_xy, slices.shape[1:])):
        return F.interpolate(slices.float()[:, None], size=shape_xy, mode="area")[:, 0]
    x = slices.float().numpy()
    for axis, (o, i) in enumerate(zip(shape_xy, slices.shape[1:]), start=1):
        if o < i:
            x = ndimage.gaussian_filter1d(x, sigma=(i / o - 1) / 2, axis=axis, mode="reflect")
    return F.interpolate(torch.from_numpy(x)[:, None], size=shape_xy, mode="bilinear", align_corners=False)[:, 0]


class ResizeSlicesd(MapTransform):
    """Resize ``(1, X, Y, Z)`` images in-plane to ``size × size``, leaving z untouched
    (:func:`resize_in_plane` on each axial slice)."""

    def __init__(self, keys: KeysCollection = "image", size: int = SLICE_SIZE) -> None:
        super().__init__(keys)
        self.size = size

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            volume = torch.as_tensor(np.asarray(d[key]))
            slices = resize_in_plane(volume[0].permute(2, 0, 1), (self.size, self.size))  # (Z, size, size)
            d[key] = slices.permute(1, 2, 0)[None].contiguous()
        return d


class QuantizeUint8d(MapTransform):
    """Map [0, 1] intensities to uint8 with rounding: ``round(clip(x, 0, 1) * 255)``."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            arr = _to_numpy(d[key])
            d[key] = np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
        return d


class CastLabeld(MapTransform):
    """Cast a label map to uint8, refusing label values that do not fit."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            arr = np.rint(_to_numpy(d[key]))
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise VolumeError(f"label values {arr.min():g}..{arr.max():g} do not fit in 0..255")
            d[key] = arr.astype(np.uint8)
        return d


class LoadVolumed(MapTransform):
    """Load image (and label) with :func:`~medvar_bundle.data.readers.load_volume`: the header is
    checked (malformed claims, more than ``max_voxels`` voxels) before any pixel data is read, then
    MONAI's reader for the file type reads it as float32.

    Args:
        keys: the items' keys holding paths; a key whose value is None is dropped.
        max_voxels: the most voxels (× components) a header may claim (``max_voxels`` of
            ``configs/prepare.yaml``).

    Raises:
        VolumeFileError: one line naming the file and the reason.
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), *, max_voxels: int) -> None:
        super().__init__(keys, allow_missing_keys=True)
        if max_voxels < 1:
            raise ValueError(f"max_voxels must be >= 1, got {max_voxels}")
        self.max_voxels = int(max_voxels)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key] is None:
                d.pop(key)
                continue
            d[key] = load_volume(d[key], self.max_voxels)
        return d

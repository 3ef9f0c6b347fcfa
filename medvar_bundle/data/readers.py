"""Reading a volume safely: what its header claims is checked before any pixel data is read.

A volume reaches the pipeline through :func:`load_volume` (``LoadVolumed`` in ``configs/prepare.yaml``):

1. :func:`read_header` reads the header alone — nibabel's lazy image for NIfTI, ITK's
   ``ImageIOBase.ReadImageInformation`` for NRRD/MHA/MHD, pydicom (pixel data deferred) for every
   file of a DICOM series folder — and refuses malformed claims: sizes of zero or below,
   non-finite or non-positive spacing, complex or RGB voxels, data shorter than the header says,
   DICOM series that are mixed, unordered (no ``ImagePositionPatient``), contradictory
   (two slices at one position, uneven spacing) or without pixel data;
2. :func:`check_header` (part of :func:`read_header`) refuses a claim of more voxels than
   ``max_voxels`` before anything is allocated;
3. MONAI's reader for the format (never a fallback to another reader) reads the data, and the
   result's spacing and slice count are checked again.

Every refusal is a :class:`VolumeFileError`: one line naming the file and the reason. What ITK's C++
code prints on stderr while reading (MetaIO, teem) is captured and becomes part of that line.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monai.data import ITKReader, MetaTensor, NibabelReader
from monai.transforms import LoadImage

from ..files import one_line

MAX_REASON_CHARS = 240
SLICE_SPACING_TOLERANCE = 0.05
"""Largest relative difference between the gaps of consecutive DICOM slices of one series."""
SUPPORTED_KINDS = "biuf"
"""numpy kinds of voxel values the pipeline reads: bool, signed and unsigned integers, floats."""
ITK_PIXEL_TYPES = ("scalar", "vector")
"""ITK pixel types read (a vector is a 4D series of volumes, refused later with its own reason)."""


class VolumeError(ValueError):
    """A volume that cannot enter the store; the message is the one-line reason shown to users."""


class VolumeFileError(VolumeError):
    """A volume file (or DICOM series folder) that cannot be read; ``str()`` is ``"PATH: reason"``, one line.

    Attributes:
        path: the file or folder at fault.
        reason: why, without the path.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = one_line(reason, MAX_REASON_CHARS)
        super().__init__(f"{self.path}: {self.reason}")


def _describe(err: BaseException) -> str:
    """``Type: message`` of a library's exception, on one line (ITK's source locations left out)."""
    text = one_line(_itk_reason(str(err)), MAX_REASON_CHARS)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _itk_reason(text: str) -> str:
    """The informative part of an ITK exception or of what ITK printed: the deepest teem (NRRD)
    line, else the message without source locations and object addresses."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    teem = [line for line in lines if line.startswith("[nrrd]")]
    if teem:
        return re.sub(r"^\[nrrd\] \w+: ", "", teem[-1])
    lines = [line for line in lines if not re.search(r"\.(cxx|hxx|h|txx):\d+:?$", line)]
    return re.sub(r"(ITK ERROR|itk::ERROR): \w+\(0x[0-9a-fA-F]+\): ", "", " ".join(lines))


@contextmanager
def captured_native_stderr() -> Iterator[list[str]]:
    """Collect what C/C++ code writes to file descriptor 2 (ITK's MetaIO, GDCM, teem) while the block
    runs, instead of letting several lines reach the terminal; the text is in the yielded list afterwards."""
    sink: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield sink
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode(errors="replace"))


@dataclass(frozen=True)
class VolumeHeader:
    """What a volume file claims, read from its header alone.

    Attributes:
        shape: voxels along each axis as stored, spatial axes first (x, y, z, then any others).
        spacing: millimetres between voxel centres along each spatial axis (at most 3).
        components: values per voxel (1 for a scalar volume).
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    components: int = 1

    @property
    def values(self) -> int:
        """How many values the data holds: voxels × components (what reading it allocates, per byte width)."""
        return math.prod(self.shape) * max(self.components, 1)


def check_header(path: str | os.PathLike, header: VolumeHeader, max_voxels: int) -> None:
    """Refuse (:class:`VolumeFileError`) sizes below 1, spacing that is not finite and positive, and
    a claim of more than ``max_voxels`` values (voxels × components): all before any of them is read."""
    if any(s < 1 for s in header.shape):
        raise VolumeFileError(path, f"the header claims a shape {header.shape} with a size below 1")
    if not all(math.isfinite(s) and s > 0 for s in header.spacing):
        shown = ", ".join(f"{s:g}" for s in header.spacing)
        raise VolumeFileError(path, f"the header claims spacing ({shown}) mm: each must be finite and positive")
    if header.values > max_voxels:
        dims = " x ".join(str(s) for s in header.shape)
        per = f" x {header.components} components" if header.components > 1 else ""
        raise VolumeFileError(
            path,
            f"the header claims {header.values} voxels ({dims}{per}), above the limit max_voxels = {max_voxels} "
            "(raise it with `medvar prepare --max-voxels N` where the memory allows)",
        )


# ----------------------------------------------------------------------------------------------
# NIfTI (nibabel)
# ----------------------------------------------------------------------------------------------


def is_nifti(path: str | os.PathLike) -> bool:
    """A ``.nii`` or ``.nii.gz`` path (read with nibabel; everything else with ITK)."""
    return str(path).lower().endswith((".nii", ".nii.gz"))


def _nifti_header(path: str, max_voxels: int) -> VolumeHeader:
    import nibabel as nib

    try:
        img = nib.load(path)  # the header only: the data stays on disk behind a lazy proxy
        hdr = img.header
        shape = tuple(int(s) for s in hdr.get_data_shape())
        dtype = np.dtype(hdr.get_data_dtype())
        affine = np.asarray(img.affine, dtype=np.float64)
        offset = getattr(img.dataobj, "offset", None)
        with nib.openers.ImageOpener(path) as fh:  # as written: nibabel's checks turn a zero pixdim into 1 mm
            raw = type(hdr).from_fileobj(fh, check=False)
        pixdim = tuple(float(v) for v in raw["pixdim"][1 : 1 + min(len(shape), 3)])
    except Exception as err:  # nibabel's many errors for a damaged header: one line
        raise VolumeFileError(path, f"unreadable NIfTI file ({_describe(err)})") from None
    if dtype.fields is not None or dtype.kind not in SUPPORTED_KINDS:
        what = "RGB/structured" if dtype.fields is not None else ("complex" if dtype.kind == "c" else "unsupported")
        raise VolumeFileError(path, f"{what} voxels ({dtype}): a volume of real numbers is needed")
    # a negative pixdim is read as its magnitude (nibabel); zero, NaN and infinity are refused
    header = VolumeHeader(shape, tuple(abs(v) for v in pixdim))
    check_header(path, header, max_voxels)
    sizes = np.sqrt((affine[:3, : min(len(shape), 3)] ** 2).sum(axis=0))
    if not np.isfinite(affine).all() or not (sizes > 0).all():
        raise VolumeFileError(path, "the header's affine (qform/sform) is not finite or has a zero column")
    if offset is not None and not path.lower().endswith(".gz"):
        need = int(offset) + math.prod(shape) * dtype.itemsize
        have = os.path.getsize(path)
        if have < need:
            raise VolumeFileError(path, f"truncated: the header claims {need} bytes, the file holds {have}")
    return header


# ----------------------------------------------------------------------------------------------
# NRRD, MetaImage (ITK)
# ----------------------------------------------------------------------------------------------


METAIMAGE_AXIS_FIELDS = ("DimSize", "ElementSpacing", "ElementSize", "Offset", "Origin", "Position", "CenterOfRotation")
METAIMAGE_MATRIX_FIELDS = ("TransformMatrix", "Rotation", "Orientation")
METAIMAGE_MAX_DIMS = 10
"""MetaIO's ``MET_MAX_NUMBER_OF_DIMENSIONS``."""


def _check_metaimage_counts(path: str) -> None:
    """Refuse a MetaImage header whose ``NDims`` is not 1..10 or whose per-axis fields hold another
    number of values: ITK's MetaIO reads them unchecked (``NDims = -2`` with ``ElementSpacing``
    crashes the process), so these counts are checked before ITK sees the file."""
    fields = {}
    with open(path, "rb") as fh:
        for line in fh.read(1 << 16).decode("latin-1").splitlines():
            key, sep, value = line.partition("=")
            if sep:
                fields[key.strip()] = value.split()
            if key.strip() == "ElementDataFile":
                break
    ndims = fields.get("NDims", [""])
    if len(ndims) != 1 or not ndims[0].isdigit() or not 1 <= int(ndims[0]) <= METAIMAGE_MAX_DIMS:
        raise VolumeFileError(path, f"unreadable header: NDims {' '.join(ndims)!r} is not 1..{METAIMAGE_MAX_DIMS}")
    n = int(ndims[0])
    for key, count in [(k, n) for k in METAIMAGE_AXIS_FIELDS] + [(k, n * n) for k in METAIMAGE_MATRIX_FIELDS]:
        if key in fields and len(fields[key]) != count:
            raise VolumeFileError(
                path, f"unreadable header: {key} holds {len(fields[key])} values, NDims {n} needs {count}"
            )


def _itk_header(path: str, max_voxels: int) -> VolumeHeader:
    import itk

    if path.lower().endswith((".mha", ".mhd")):
        _check_metaimage_counts(path)
    io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise VolumeFileError(
            path, "unreadable: no image reader recognises it (not a NIfTI, NRRD, MHA/MHD file or DICOM folder)"
        )
    with captured_native_stderr() as printed:
        try:
            io.SetFileName(path)
            io.ReadImageInformation()  # the header only: no pixel buffer is allocated
            n = io.GetNumberOfDimensions()
            shape = tuple(int(io.GetDimensions(i)) for i in range(n))
            spacing = tuple(float(io.GetSpacing(i)) for i in range(min(n, 3)))
            components = int(io.GetNumberOfComponents())
            component = str(io.GetComponentTypeAsString(io.GetComponentType()))
            pixel = str(io.GetPixelTypeAsString(io.GetPixelType()))
            failure = None
        except Exception as err:  # ITK raises RuntimeError with a multi-line C++ message
            failure = err
    if failure is not None:
        reason = _itk_reason("".join(printed)) or _itk_reason(str(failure))
        raise VolumeFileError(path, f"unreadable header: {reason}")
    if component == "unknown" or pixel not in ITK_PIXEL_TYPES:
        raise VolumeFileError(
            path, f"unsupported voxel type ({pixel} of {component}): a volume of real numbers is needed"
        )
    header = VolumeHeader(shape, spacing, components)
    check_header(path, header, max_voxels)
    return header


# ----------------------------------------------------------------------------------------------
# DICOM series folders (pydicom for the headers, ITK/GDCM for the data)
# ----------------------------------------------------------------------------------------------


def is_dicom_file(p: Path) -> bool:
    """A ``.dcm`` file, or any file with the DICOM preamble's ``DICM`` marker."""
    if not p.is_file():
        return False
    if p.suffix.lower() == ".dcm":
        return True
    try:
        with open(p, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _numbers(ds, keyword: str, count: int) -> list[float] | None:
    """A numeric tag as ``count`` finite floats, None when absent.

    Raises:
        ValueError: the tag holds something else.
    """
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    items = [value] if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") else list(value)
    try:
        values = [float(v) for v in items]
    except (TypeError, ValueError):
        values = []
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{keyword} {value!r} is not {count} finite numbers")
    return values


@dataclass(frozen=True)
class _Slice:
    path: Path
    series: str
    rows: int
    columns: int
    frames: int
    position: list[float] | None
    orientation: list[float] | None
    spacing: list[float] | None
    short_by: str
    """Why the pixel data is too short for the matrix, "" when it is not."""
    frame_spacing: float | None = None
    """An enhanced multi-frame file's spacing between its frames (mm), None when it does not say."""


def _pixel_measures(ds):
    """An enhanced (multi-frame) file's ``PixelMeasuresSequence`` item, shared or of its first
    frame, or None: such files keep ``PixelSpacing`` and the slice spacing there, not at the top level."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = ds.get(groups)
        measures = items[0].get("PixelMeasuresSequence") if items else None
        if measures:
            return measures[0]
    return None


def _dicom_slice(path: Path) -> _Slice:
    import pydicom

    try:
        ds = pydicom.dcmread(path, defer_size=1024)  # large values (the pixel data) stay on disk
    except Exception as err:
        raise VolumeFileError(path, f"unreadable DICOM file ({_describe(err)})") from None
    for keyword in ("SeriesInstanceUID", "Rows", "Columns", "BitsAllocated"):
        if ds.get(keyword) in (None, ""):
            raise VolumeFileError(path, f"no {keyword}")
    pixel = next((ds.get_item(k) for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
    if pixel is None:
        raise VolumeFileError(path, "no pixel data")
    try:
        rows, columns, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
        frames, samples = int(ds.get("NumberOfFrames") or 1), int(ds.get("SamplesPerPixel") or 1)
        position = _numbers(ds, "ImagePositionPatient", 3)
        orientation = _numbers(ds, "ImageOrientationPatient", 6)
        spacing = _numbers(ds, "PixelSpacing", 2)
        measures, frame_spacing = _pixel_measures(ds), None
        if measures is not None:
            spacing = spacing or _numbers(measures, "PixelSpacing", 2)
            gap = _numbers(measures, "SpacingBetweenSlices", 1) or _numbers(measures, "SliceThickness", 1)
            frame_spacing = gap[0] if gap else None
    except (TypeError, ValueError) as err:
        raise VolumeFileError(path, f"malformed tag: {one_line(err, MAX_REASON_CHARS)}") from None
    if min(rows, columns, frames, bits) < 1:
        raise VolumeFileError(path, f"{rows} x {columns} pixels, {frames} frames of {bits} bits: each must be >= 1")
    if samples != 1:
        raise VolumeFileError(path, f"{samples} samples per pixel (colour): a greyscale series is needed")
    if spacing is not None and min(spacing) <= 0:
        raise VolumeFileError(path, f"PixelSpacing {spacing} mm: each must be positive")
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    length = pixel.length if hasattr(pixel, "length") else len(pixel.value or b"")
    need = rows * columns * frames * ((bits + 7) // 8)
    # compressed (encapsulated) frames hold fewer bytes than the matrix; pydicom gives their undefined
    # length (0xFFFFFFFF) only below the defer size and reads larger ones in full: only native pixel data
    # can be too short
    encapsulated = length == 0xFFFFFFFF or (syntax is not None and syntax.is_compressed)
    short = not encapsulated and length < need
    short_by = (
        f"pixel data holds {length} bytes, {rows} x {columns} x {frames} of {bits} bits need {need}" if short else ""
    )
    return _Slice(
        path, str(ds.SeriesInstanceUID), rows, columns, frames, position, orientation, spacing, short_by, frame_spacing
    )


def _slice_spacing(folder: str, slices: list[_Slice]) -> float:
    """Distance (mm) between consecutive slices along the normal, refusing missing, duplicate or uneven positions."""
    for s in slices:
        if s.position is None or s.orientation is None:
            tag = "ImagePositionPatient" if s.position is None else "ImageOrientationPatient"
            raise VolumeFileError(s.path, f"no {tag}: the slices of the series cannot be ordered")
    first = np.asarray(slices[0].orientation)
    for s in slices[1:]:
        if not np.allclose(s.orientation, first, atol=1e-4):
            raise VolumeFileError(folder, f"{slices[0].path.name} and {s.path.name} differ in ImageOrientationPatient")
    normal = np.cross(first[:3], first[3:])
    if not np.linalg.norm(normal) > 0.5:
        raise VolumeFileError(slices[0].path, f"ImageOrientationPatient {list(first)} has no valid normal")
    along = sorted((float(np.dot(s.position, normal)), s.path.name) for s in slices)
    gaps = np.diff([z for z, _ in along])
    k = int(np.argmin(gaps))
    if gaps[k] < 1e-3:
        raise VolumeFileError(
            folder,
            f"{along[k][1]} and {along[k + 1][1]} are at the same position ({along[k][0]:g} mm along the normal)",
        )
    if gaps.max() > gaps.min() * (1 + SLICE_SPACING_TOLERANCE):
        raise VolumeFileError(
            folder,
            f"uneven slice spacing ({gaps.min():g} to {gaps.max():g} mm): a slice is missing or the folder "
            "mixes acquisitions",
        )
    return float(gaps.mean())


def _dicom_header(folder: str, max_voxels: int) -> tuple[VolumeHeader, int]:
    """The series' header and its number of slices (frames of all files)."""
    files = sorted(p for p in Path(folder).iterdir() if is_dicom_file(p))
    if not files:
        raise VolumeFileError(folder, "no DICOM files in the folder")
    slices = [_dicom_slice(p) for p in files]
    series = Counter(s.series for s in slices)
    if len(series) > 1:
        listed = ", ".join(f"{uid} ({n} files)" for uid, n in series.most_common(3))
        raise VolumeFileError(
            folder,
            f"holds {len(series)} DICOM series ({listed}{', ...' if len(series) > 3 else ''}): "
            "none is chosen; put each series in its own folder",
        )
    matrices = Counter((s.rows, s.columns) for s in slices)
    if len(matrices) > 1:
        (a, _), (b, _) = matrices.most_common(2)
        odd = next(s for s in slices if (s.rows, s.columns) == b)
        raise VolumeFileError(odd.path, f"{b[0]} x {b[1]} pixels where the rest of the series has {a[0]} x {a[1]}")
    depth = sum(s.frames for s in slices)
    in_plane = slices[0].spacing or [1.0, 1.0]  # (between rows, between columns); GDCM reads 1 mm when absent
    shape = (slices[0].columns, slices[0].rows, depth) if depth > 1 else (slices[0].columns, slices[0].rows)
    check_header(folder, VolumeHeader(shape, (in_plane[1], in_plane[0])), max_voxels)
    short = next((s for s in slices if s.short_by), None)
    if short is not None:
        raise VolumeFileError(short.path, short.short_by)
    dz = _slice_spacing(folder, slices) if len(slices) > 1 else (slices[0].frame_spacing or 1.0)
    return VolumeHeader(shape, (in_plane[1], in_plane[0], dz)[: len(shape)]), depth


# ----------------------------------------------------------------------------------------------
# the entry points
# ----------------------------------------------------------------------------------------------


def read_header(path: str | os.PathLike, max_voxels: int) -> VolumeHeader:
    """What the volume at ``path`` (NIfTI, NRRD/MHA/MHD file or DICOM series folder) claims, read
    and checked (:func:`check_header`) without reading its pixel data.

    Raises:
        VolumeFileError: a missing file, a damaged header, a malformed claim (see the module
            docstring) or more than ``max_voxels`` voxels.
    """
    path = str(path)
    if not os.path.exists(path):
        raise VolumeFileError(path, "no such file or folder")
    if os.path.isdir(path):
        return _dicom_header(path, max_voxels)[0]
    return _nifti_header(path, max_voxels) if is_nifti(path) else _itk_header(path, max_voxels)


def reader_for(path: str | os.PathLike):
    """ITK for DICOM series folders, NRRD and MHA/MHD; nibabel for NIfTI."""
    return NibabelReader() if is_nifti(path) else ITKReader()


def load_volume(path: str | os.PathLike, max_voxels: int, dtype: np.dtype | type | None = np.float32) -> MetaTensor:
    """Read a volume with its header checked first (see the module docstring).

    Args:
        path: NIfTI, NRRD/MHA/MHD file or DICOM series folder.
        max_voxels: the most values (voxels × components) a header may claim; checked before any
            pixel data is read.
        dtype: the array's dtype (None: as stored).

    Returns:
        The volume as MONAI's ``LoadImage`` gives it (no channel axis for a scalar volume), with
        its RAS affine in millimetres.

    Raises:
        VolumeFileError: one line naming the file and the reason.
    """
    path = str(path)
    depth = None  # slices a DICOM series should give
    if os.path.isdir(path):
        depth = _dicom_header(path, max_voxels)[1]
    else:
        read_header(path, max_voxels)
    with captured_native_stderr() as printed:
        try:
            img = LoadImage(image_only=True, dtype=dtype)(path, reader=reader_for(path))
            failure = None
        except Exception as err:  # truncated or corrupt data, a library's refusal: one line
            failure = err
    if failure is not None:
        reason = _itk_reason("".join(printed)) or _describe(failure)
        raise VolumeFileError(path, f"unreadable data: {reason}")
    spacing = np.asarray(img.pixdim, dtype=np.float64)
    if not np.isfinite(np.asarray(img.affine)).all() or not (np.isfinite(spacing) & (spacing > 0)).all():
        raise VolumeFileError(path, f"spacing {spacing.tolist()} mm after reading: each must be finite and positive")
    if depth is not None and depth > 1 and (img.ndim < 3 or img.shape[-1] != depth):
        raise VolumeFileError(
            path,
            f"ITK read {img.shape[-1] if img.ndim >= 3 else 1} of the {depth} slices: the files differ in series "
            "number, date, sequence or slice thickness; put each acquisition in its own folder",
        )
    return img

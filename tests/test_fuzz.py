"""Property-based fuzzing of the volume readers with hostile and malformed files (hypothesis).

Property, for every generated NIfTI, NRRD, MetaImage file or DICOM series folder: reading it as
``medvar prepare`` does (``LoadVolumed`` → ``EnsureChannelFirstd`` → ``ValidateVolumed``) either gives
one finite volume with finite positive spacing and at most ``LIMIT`` voxels, or raises a
:class:`VolumeError` whose message is one line naming the file — never another exception, never a
pixel read of a header claiming more than ``LIMIT`` voxels (a spy on the reader counts the reads),
and within the hypothesis ``deadline``. Runs are derandomised, so CI sees the same examples.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import struct
import tempfile
from datetime import timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from medvar_bundle.bundle_config import config_component
from medvar_bundle.cli import main
from medvar_bundle.data import SliceStore, readers
from medvar_bundle.data.readers import VolumeError, VolumeFileError

LIMIT = 4096
"""``max_voxels`` of the fuzzed reads: small, so that random sizes often cross it."""
FUZZ = settings(
    derandomize=True,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)
READ = config_component("prepare", "preprocessing", {"max_voxels": LIMIT}).transforms[:3]
"""prepare's first three steps: LoadVolumed, EnsureChannelFirstd, ValidateVolumed."""


@pytest.fixture
def pixel_reads(monkeypatch) -> list[str]:
    """Paths handed to MONAI's ``LoadImage`` by the readers: the only place pixel data is read."""
    calls: list[str] = []
    real = readers.LoadImage

    class Spy(real):
        def __call__(self, filename, reader=None):
            calls.append(str(filename))
            return super().__call__(filename, reader=reader)

    monkeypatch.setattr(readers, "LoadImage", Spy)
    return calls


def read_or_refuse(path: Path, reads: list[str]):
    """Read ``path`` as prepare does; check the property; return the volume or the refusal."""
    before = len(reads)
    try:
        d = {"image": str(path)}
        for transform in READ:
            d = transform(d)
    except VolumeError as err:
        message = str(err)
        assert "\n" not in message and str(path) in message, message
        if "above the limit" in message:
            assert len(reads) == before, "a header over the limit reached the pixel read"
        if currently_in_test_context():  # the outcome's first words, for --hypothesis-show-statistics
            event("refused: " + " ".join(re.sub(r"[^a-zA-Z ]+", " ", message.replace(str(path), "")).split()[:4]))
        return err
    img = d["image"]
    values = img.numpy()
    spacing = np.asarray(img.pixdim, dtype=np.float64)
    assert img.ndim == 4 and img.shape[0] == 1 and values.size <= LIMIT
    assert np.isfinite(values).all() and np.isfinite(spacing).all() and (spacing > 0).all()
    if currently_in_test_context():
        event("read")
    return img


@pytest.fixture(scope="module", autouse=True)
def warm_itk(tmp_path_factory):
    """Import ITK and read once before the timed examples (the first import takes seconds)."""
    path = tmp_path_factory.mktemp("warm") / "warm.nrrd"
    path.write_bytes(nrrd_bytes({"type": "float", "dimension": "3", "sizes": "2 2 2", "encoding": "raw",
                                 "endian": "little"}, np.arange(8, dtype="<f4").tobytes()))  # fmt: skip
    assert readers.load_volume(path, LIMIT).shape == (2, 2, 2)


# ----------------------------------------------------------------------------------------------
# NIfTI: nibabel-written files, then header fields overwritten byte by byte, truncation, corruption
# ----------------------------------------------------------------------------------------------

NIFTI_DTYPES = [np.uint8, np.int16, np.int32, np.float32, np.float64, np.complex64, "rgb"]
ODD_FLOATS = [0.0, -1.0, math.nan, math.inf, -math.inf, 1e-30, 1e30, 2.5]
ODD_INTS = [0, -1, -32768, 32767, 1, 2, 3, 7, 8, 9, 100]
# (offset, struct format) of NIfTI-1 header fields
DIM, DATATYPE, BITPIX, PIXDIM, VOX_OFFSET, SCL_SLOPE = 40, 70, 72, 76, 108, 112
QFORM_CODE, SFORM_CODE, SROW_X = 252, 254, 280


@st.composite
def nifti_files(draw) -> tuple[bytes, bool]:
    """The bytes of a (often malformed) NIfTI-1 file and whether to gzip them."""
    ndim = draw(st.sampled_from([3, 3, 3, 2, 4]))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    kind = draw(st.sampled_from(NIFTI_DTYPES))
    fill = draw(st.sampled_from(["random", "nan", "inf", "constant"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = rng.normal(0, 100, shape)
    values = {"nan": np.full(shape, np.nan), "inf": np.full(shape, np.inf), "constant": np.full(shape, 7.0)}.get(
        fill, values
    )
    if kind == "rgb":
        arr = np.zeros(shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    elif np.issubdtype(kind, np.integer):
        arr = np.nan_to_num(values, nan=0, posinf=100, neginf=-100).astype(kind)
    else:
        arr = values.astype(kind)
    img = nib.Nifti1Image(arr, np.diag([0.8, 0.9, 2.0, 1.0]) if draw(st.booleans()) else None)
    raw = bytearray(img.to_bytes())
    fields = [
        (DIM + 2 * draw(st.integers(0, 7)), "<h", st.sampled_from(ODD_INTS + [10**4])),
        (DATATYPE, "<h", st.sampled_from([2, 4, 8, 16, 32, 64, 128, 256, 1234, -1])),
        (BITPIX, "<h", st.sampled_from([0, 8, 16, 32, 64, -8])),
        (PIXDIM + 4 * draw(st.integers(0, 3)), "<f", st.sampled_from(ODD_FLOATS)),
        (VOX_OFFSET, "<f", st.sampled_from([0.0, 352.0, 348.0, 1e9, -4.0, math.nan])),
        (SCL_SLOPE, "<f", st.sampled_from([0.0, math.nan, math.inf, 1.0, -2.0])),
        (QFORM_CODE, "<h", st.sampled_from([0, 1, 2, 5, -1])),
        (SFORM_CODE, "<h", st.sampled_from([0, 1, 2, 5, -1])),
        (SROW_X + 4 * draw(st.integers(0, 11)), "<f", st.sampled_from(ODD_FLOATS)),
    ]
    for offset, fmt, values_of in draw(st.lists(st.sampled_from(fields), max_size=3)):
        struct.pack_into(fmt, raw, offset, draw(values_of))
    for _ in range(draw(st.integers(0, 2))):  # flipped bytes anywhere
        raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
    compress = draw(st.booleans())
    payload = gzip.compress(bytes(raw), mtime=0) if compress else bytes(raw)
    if draw(st.booleans()):
        payload = payload[: draw(st.integers(0, len(payload)))]
    return payload, compress


@settings(FUZZ, max_examples=400)
@given(case=nifti_files())
def test_fuzzed_nifti_is_read_or_refused_in_one_line(case, pixel_reads):
    payload, compress = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("vol.nii.gz" if compress else "vol.nii")
        path.write_bytes(payload)
        read_or_refuse(path, pixel_reads)


# ----------------------------------------------------------------------------------------------
# NRRD and MetaImage: text headers written by hand with random fields
# ----------------------------------------------------------------------------------------------


def nrrd_bytes(fields: dict[str, str], data: bytes) -> bytes:
    return ("NRRD0004\n" + "".join(f"{k}: {v}\n" for k, v in fields.items()) + "\n").encode() + data


SIZES = st.one_of(st.integers(1, 6), st.sampled_from([0, -3, 10**6, 2**31, 2**63]))
SPACINGS = st.one_of(st.floats(0.1, 5.0), st.sampled_from(["nan", "inf", "0", "-1", "abc", "1e400"]))
WIDTHS = {"float": 4, "short": 2, "uchar": 1, "double": 8, "MET_FLOAT": 4, "MET_SHORT": 2, "MET_UCHAR": 1}


@st.composite
def spoilt(draw, fields: dict[str, str], hostile: dict[str, st.SearchStrategy]) -> dict[str, str]:
    """``fields`` of a valid header with up to three of them left out or replaced by hostile values."""
    fields = dict(fields)
    for key in draw(st.lists(st.sampled_from(sorted(hostile)), max_size=3, unique=True)):
        if draw(st.integers(0, 3)) == 0:
            fields.pop(key, None)
        else:
            fields[key] = str(draw(hostile[key]))
    return fields


def _data(draw, sizes: list[int], kind: str) -> bytes:
    """Random bytes for the in-range sizes, often cut short."""
    count = math.prod(s for s in sizes if 0 < s <= 6) * WIDTHS.get(kind, 4)
    data = bytes(np.random.default_rng(count).integers(0, 256, count, dtype=np.uint8))
    return data[: draw(st.integers(0, count))] if draw(st.booleans()) else data


@st.composite
def nrrd_files(draw) -> bytes:
    """A valid attached-header NRRD file with some fields left out or spoilt."""
    sizes = draw(st.lists(st.integers(1, 6), min_size=3, max_size=3))
    valid = {
        "type": "float",
        "dimension": "3",
        "space": "left-posterior-superior",
        "sizes": " ".join(map(str, sizes)),
        "space directions": "(0.8,0,0) (0,0.9,0) (0,0,2)",
        "endian": "little",
        "encoding": "raw",
        "space origin": "(1,2,3)",
    }
    direction = st.builds(lambda a, b, c: f"({a},{b},{c})", SPACINGS, SPACINGS, SPACINGS)
    hostile = {
        "type": st.sampled_from(["short", "uchar", "double", "block", "quaternion", "int64"]),
        "dimension": st.sampled_from([2, 4, 0, -1, 17]),
        "space": st.sampled_from(["right-anterior-superior", "sideways", "3D-right-handed"]),
        "sizes": st.builds(lambda xs: " ".join(map(str, xs)), st.lists(SIZES, min_size=1, max_size=5)),
        "space directions": st.builds(lambda xs: " ".join(xs), st.lists(direction, min_size=1, max_size=4)),
        "endian": st.sampled_from(["big", "middle"]),
        "encoding": st.sampled_from(["gzip", "ascii", "hex", "bzip2", "zstd"]),
        "space origin": direction,
        "spacings": st.builds(lambda xs: " ".join(map(str, xs)), st.lists(SPACINGS, min_size=1, max_size=4)),
        "kinds": st.sampled_from(["domain domain domain", "RGB-color domain domain", "list"]),
    }
    fields = draw(spoilt(valid, hostile))
    claimed = [int(v) for v in fields.get("sizes", "").split() if v.lstrip("-").isdigit()]
    return nrrd_bytes(fields, _data(draw, claimed, fields.get("type", "float")))


@st.composite
def metaimage_files(draw) -> bytes:
    """A valid MetaImage ``.mha`` file (data attached: ElementDataFile = LOCAL) with some fields left out or spoilt."""
    sizes = draw(st.lists(st.integers(1, 6), min_size=3, max_size=3))
    valid = {
        "ObjectType": "Image",
        "NDims": "3",
        "BinaryData": "True",
        "BinaryDataByteOrderMSB": "False",
        "CompressedData": "False",
        "ElementSpacing": "0.8 0.9 2",
        "DimSize": " ".join(map(str, sizes)),
        "ElementType": "MET_FLOAT",
    }
    numbers = st.builds(lambda xs: " ".join(map(str, xs)), st.lists(SPACINGS, min_size=0, max_size=5))
    hostile = {
        "ObjectType": st.sampled_from(["Mesh", "Tube"]),
        "NDims": st.sampled_from([2, 4, 0, -2, 11, "x"]),
        "BinaryData": st.sampled_from(["False", "maybe"]),
        "BinaryDataByteOrderMSB": st.just("True"),
        "CompressedData": st.just("True"),
        "ElementSpacing": numbers,
        "DimSize": st.builds(lambda xs: " ".join(map(str, xs)), st.lists(SIZES, min_size=0, max_size=5)),
        "ElementType": st.sampled_from(["MET_SHORT", "MET_UCHAR", "MET_DOUBLE", "MET_QUATERNION", "MET_RGB", "x"]),
        "ElementNumberOfChannels": st.sampled_from([0, 3, -1]),
        "Offset": numbers,
        "TransformMatrix": numbers,
    }
    fields = draw(spoilt(valid, hostile))
    text = "".join(f"{k} = {v}\n" for k, v in fields.items()) + "ElementDataFile = LOCAL\n"
    claimed = [int(v) for v in fields.get("DimSize", "").split() if v.lstrip("-").isdigit()]
    return text.encode() + _data(draw, claimed, fields.get("ElementType", "MET_FLOAT"))


@settings(FUZZ, max_examples=200)
@given(payload=nrrd_files())
def test_fuzzed_nrrd_is_read_or_refused_in_one_line(payload, pixel_reads):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vol.nrrd"
        path.write_bytes(payload)
        read_or_refuse(path, pixel_reads)


@settings(FUZZ, max_examples=200)
@given(payload=metaimage_files())
def test_fuzzed_metaimage_is_read_or_refused_in_one_line(payload, pixel_reads):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vol.mha"
        path.write_bytes(payload)
        read_or_refuse(path, pixel_reads)


# ----------------------------------------------------------------------------------------------
# DICOM series: pydicom-written folders with tags left out, contradicted or mixed
# ----------------------------------------------------------------------------------------------

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DICOM_FAULTS = [
    "no_position", "same_position", "other_series", "no_pixels", "short_pixels", "other_rows", "bad_spacing",
    "no_orientation", "bad_orientation", "colour", "no_rows", "garbage", "huge_rows", "uneven",
]  # fmt: skip


def write_dicom_series(folder: Path, slices: int, rows: int, cols: int, faults: dict[int, str]) -> None:
    """One CT file per slice, 2 mm apart; ``faults[k]`` spoils slice k's file (see ``DICOM_FAULTS``)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    series = generate_uid()
    rng = np.random.default_rng(slices * 100 + rows * 10 + cols)
    for k in range(slices):
        fault = faults.get(k)
        path = folder / f"IM{k:03d}.dcm"
        if fault == "garbage":
            path.write_bytes(b"\0" * 128 + b"DICM" + bytes(rng.integers(0, 256, 64, dtype=np.uint8)))
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = "1.2.3", "1.2.3.4"
        ds.SeriesInstanceUID = generate_uid() if fault == "other_series" else series
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        z = {"same_position": 0.0, "uneven": 2.0 * k + 0.7}.get(fault, 2.0 * k)
        ds.ImagePositionPatient = [-10.0, -12.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, 0] if fault == "bad_orientation" else [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = ["0", "0.5"] if fault == "bad_spacing" else [0.6, 0.8]
        ds.Rows = rows + 1 if fault == "other_rows" else 60000 if fault == "huge_rows" else rows
        ds.Columns = cols
        ds.SamplesPerPixel = 3 if fault == "colour" else 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        pixels = rng.integers(0, 2000, (int(ds.Rows), cols) if fault != "huge_rows" else (1, 1)).astype("<i2")
        ds.PixelData = pixels.tobytes()[: 6 if fault == "short_pixels" else None]
        for tag, name in (("no_position", "ImagePositionPatient"), ("no_pixels", "PixelData"),
                          ("no_orientation", "ImageOrientationPatient"), ("no_rows", "Rows")):  # fmt: skip
            if fault == tag:
                delattr(ds, name)
        ds.save_as(str(path), write_like_original=False)


@settings(FUZZ, max_examples=100)
@given(
    slices=st.integers(1, 4),
    rows=st.integers(2, 6),
    cols=st.integers(2, 6),
    faults=st.dictionaries(st.integers(0, 3), st.sampled_from(DICOM_FAULTS), max_size=2),
)
def test_fuzzed_dicom_series_is_read_or_refused_in_one_line(slices, rows, cols, faults, pixel_reads):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "series"
        write_dicom_series(folder, slices, rows, cols, {k: f for k, f in faults.items() if k < slices})
        out = read_or_refuse(folder, pixel_reads)
        if not isinstance(out, VolumeError):  # one 3D volume of every slice, in-plane spacing as written
            one_taller = slices == 1 and faults.get(0) == "other_rows"  # no other slice to contradict it
            assert tuple(out.shape) == (1, cols, rows + one_taller, slices)
            np.testing.assert_allclose(out.pixdim[:2], [0.8, 0.6], rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# known answers: each malformed case gives its own reason; a 10^12-voxel claim never reaches a read
# ----------------------------------------------------------------------------------------------


def _nifti(path: Path, shape=(6, 5, 4), **fields) -> Path:
    raw = bytearray(nib.Nifti1Image(np.arange(math.prod(shape), dtype=np.float32).reshape(shape), np.eye(4)).to_bytes())
    for offset, (fmt, value) in fields.items():
        struct.pack_into(fmt, raw, int(offset), *np.atleast_1d(value))
    path.write_bytes(bytes(raw))
    return path


TERA = 10**12


def _nrrd(path: Path, data: bytes = b"", **fields: str) -> Path:
    path = path.with_suffix(".nrrd")
    path.write_bytes(nrrd_bytes({k.replace("_", " "): v for k, v in fields.items()}, data))
    return path


def _mha(path: Path, header: str, data: bytes = b"") -> Path:
    path = path.with_suffix(".mha")
    path.write_bytes(header.encode() + data)
    return path


def _truncated(path: Path) -> Path:
    path.write_bytes(_nifti(path).read_bytes()[:-40])
    return path


TERA_NRRD = dict(type="short", dimension="3", sizes="10000 10000 10000", encoding="raw", endian="little")
MALFORMED = {  # name: (write the file into the given path, a phrase of its one-line reason)
    "nifti-1e12": (lambda p: _nifti(p, **{str(DIM): ("<4h", [3, 10**4, 10**4, 10**4])}), f"claims {TERA} voxels"),
    "nrrd-1e12": (lambda p: _nrrd(p, b"\0" * 64, **TERA_NRRD), f"claims {TERA} voxels"),
    "mha-1e12": (lambda p: _mha(p, "NDims = 3\nDimSize = 10000 10000 10000\nElementType = MET_SHORT\n"
                                "ElementDataFile = LOCAL\n", b"\0\0"), f"claims {TERA} voxels"),
    "nifti-dim-0": (lambda p: _nifti(p, **{str(DIM + 4): ("<h", 0)}), "with a size below 1"),
    "nifti-dim-negative": (lambda p: _nifti(p, **{str(DIM + 4): ("<h", -5)}), "with a size below 1"),
    "nifti-pixdim-nan": (lambda p: _nifti(p, **{str(PIXDIM + 4): ("<f", math.nan)}), "spacing (nan, 1, 1) mm"),
    "nifti-pixdim-0": (lambda p: _nifti(p, **{str(PIXDIM + 8): ("<f", 0.0)}), "spacing (1, 0, 1) mm"),
    "nifti-pixdim-inf": (lambda p: _nifti(p, **{str(PIXDIM + 12): ("<f", math.inf)}), "spacing (1, 1, inf) mm"),
    "nifti-complex": (lambda p: _nifti(p, **{str(DATATYPE): ("<h", 32), str(BITPIX): ("<h", 64)}), "complex voxels"),
    "nifti-rgb": (lambda p: _nifti(p, **{str(DATATYPE): ("<h", 128), str(BITPIX): ("<h", 24)}), "RGB/structured"),
    "nifti-datatype": (lambda p: _nifti(p, **{str(DATATYPE): ("<h", 1234)}), "data code 1234 not recognized"),
    "nifti-truncated": (_truncated, "truncated: the header claims 832 bytes, the file holds 792"),
    "nifti-all-nan": (lambda p: _nifti(p, **{"352": ("<120f", [math.nan] * 120)}), "120 NaN/Inf voxels"),
    "nrrd-encoding": (lambda p: _nrrd(p, type="float", dimension="3", sizes="2 2 2", encoding="zstd"),
                      'parse encoding "zstd"'),
    "nrrd-no-sizes": (lambda p: _nrrd(p, type="float", dimension="3", encoding="raw"), "required field: sizes"),
    "nrrd-truncated": (lambda p: _nrrd(p, b"\0" * 12, type="float", dimension="3", sizes="2 2 2", encoding="raw",
                                       endian="little"), "fread got only 3 4-sized things, not 8"),
    "mha-truncated": (lambda p: _mha(p, "NDims = 3\nDimSize = 2 2 2\nElementType = MET_FLOAT\n"
                                     "ElementDataFile = LOCAL\n", b"\0" * 12), "data not read completely"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_each_malformed_file_has_its_own_reason(name, tmp_path, pixel_reads):
    make, reason = MALFORMED[name]
    path = make(tmp_path / "vol.nii")
    err = read_or_refuse(path, pixel_reads)
    assert isinstance(err, VolumeFileError) and reason in str(err), str(err)
    if "above the limit" in str(err):
        assert pixel_reads == [] and "--max-voxels" in str(err)


@pytest.mark.parametrize(
    "faults, reason",
    [
        ({}, None),
        ({1: "other_series"}, "holds 2 DICOM series"),
        ({2: "no_position"}, "IM002.dcm: no ImagePositionPatient: the slices of the series cannot be ordered"),
        ({1: "same_position"}, "IM000.dcm and IM001.dcm are at the same position"),
        ({2: "uneven"}, "uneven slice spacing (2 to 2.7 mm)"),
        ({1: "no_pixels"}, "IM001.dcm: no pixel data"),
        ({1: "short_pixels"}, "IM001.dcm: pixel data holds 6 bytes"),
        ({1: "other_rows"}, "IM001.dcm: 6 x 4 pixels where the rest of the series has 5 x 4"),
        ({0: "bad_spacing"}, "IM000.dcm: PixelSpacing [0.0, 0.5] mm: each must be positive"),
        ({0: "huge_rows", 1: "huge_rows", 2: "huge_rows"}, "claims 720000 voxels (4 x 60000 x 3)"),
        ({0: "garbage"}, "IM000.dcm: no SeriesInstanceUID"),
    ],
)
def test_each_malformed_dicom_series_has_its_own_reason(faults, reason, tmp_path, pixel_reads):
    folder = tmp_path / "series"
    write_dicom_series(folder, 3, 5, 4, faults)
    if reason is None:
        out = readers.load_volume(folder, 10**5)
        assert tuple(out.shape) == (4, 5, 3) and np.allclose(out.pixdim, [0.8, 0.6, 2.0]) and len(pixel_reads) == 1
        return
    with pytest.raises(VolumeFileError) as err:
        readers.load_volume(folder, 10**5)
    assert reason in str(err.value) and str(folder) in str(err.value), str(err.value)
    assert pixel_reads == []  # every refusal here comes from the headers


def test_a_compressed_dicom_series_is_decoded_not_refused_as_short(tmp_path):
    """Encapsulated pixel data (here RLE) holds fewer bytes than rows x columns x 2: it is decoded, not
    refused as "pixel data holds N bytes" (pydicom's JPEG 2000 head CT slice was, before 0.8.1). The
    frames are larger than the reader's 1 KiB defer size, as in real files, where pydicom reads them in
    full on access and no longer gives the undefined length."""
    import pydicom
    from pydicom.uid import RLELossless

    rows, cols = 96, 80
    folder = tmp_path / "series"
    write_dicom_series(folder, 2, rows, cols, {})
    r, c = np.mgrid[:rows, :cols]
    image = ((r * 7 + (c // 4) * 13) % 2000).astype("<i2")  # runs of 4 equal pixels along each row
    for k, path in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless, image + k)
        assert 1024 < len(ds.PixelData) < rows * cols * 2
        ds.save_as(path)
    out = np.asarray(readers.load_volume(folder, 10**5))
    expected = np.stack([image.T + k - 1024 for k in range(2)], axis=-1)  # (columns, rows, slices), HU
    np.testing.assert_array_equal(out, expected)


def test_a_real_jpeg2000_head_ct_slice_reads_as_pydicom_decodes_it(tmp_path):
    """pydicom's own JPEG 2000 test slice of a head CT (512², 0.431 mm; its codestream's signedness
    contradicts PixelRepresentation): ITK's decoding equals pydicom's, in HU."""
    import pydicom

    src = Path(pydicom.__file__).parent / "data" / "test_files" / "J2K_pixelrep_mismatch.dcm"
    folder = tmp_path / "head"
    folder.mkdir()
    (folder / src.name).write_bytes(src.read_bytes())
    out = readers.load_volume(folder, 2**20)
    ds = pydicom.dcmread(src)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert hu.min() < -1000 and hu.max() > 1000  # air and bone, both signs survive
    np.testing.assert_array_equal(np.asarray(out)[..., 0], hu.T)
    np.testing.assert_allclose(out.pixdim[:2], [0.431, 0.431])


# ----------------------------------------------------------------------------------------------
# end to end: `medvar prepare` over one good and one hostile volume
# ----------------------------------------------------------------------------------------------


def test_prepare_reports_the_hostile_volume_in_one_line_and_stores_the_good_one(tmp_path, capsys):
    body = np.full((24, 24, 6), -1000.0, np.float32)
    body[4:20, 4:20] = 40.0
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(body, np.diag([0.8, 0.8, 2.0, 1.0])), str(good))
    bad = _nifti(tmp_path / "bad.nii", **{str(DIM): ("<4h", [3, 10**4, 10**4, 10**4])})
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [
        {"image": name, "dataset": "ct", "modality": "CT"} for name in ("good.nii.gz", "bad.nii")]}))  # fmt: skip
    store = tmp_path / "store"

    assert main(["prepare", "--datalist", str(datalist), "--out", str(store), "--size", "32", "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"medvar prepare: failed: {bad}: the header claims {TERA} voxels (10000 x 10000 x 10000), above the "
        "limit max_voxels = 536870912 (raise it with `medvar prepare --max-voxels N` where the memory allows)"
    ]
    report = {Path(e["image"]).name: e for e in json.loads((store / "report.json").read_text())["volumes"]}
    assert report["good.nii.gz"]["status"] == "ok" and report["good.nii.gz"]["slices"] == 6
    assert report["bad.nii"]["status"] == "failed" and report["bad.nii"]["error"].startswith("the header claims")
    assert len(SliceStore(store)) == 6

    # --max-voxels reaches the loader: below the good volume's 3456 voxels both are refused
    again = tmp_path / "store2"
    assert main(["prepare", "--datalist", str(datalist), "--out", str(again), "--max-voxels", "3000", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert f"medvar prepare: failed: {good}: the header claims 3456 voxels (24 x 24 x 6)" in err[0]
    assert err[-1] == "medvar prepare: no volume succeeded"

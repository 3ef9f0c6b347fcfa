"""Where volumes come from: MONAI-style datalists and discovery of common folder layouts.

Every source yields *datalist items*::

    {"image": abs path, "label": abs path | None, "dataset": str, "modality": "CT"|"MR"|other,
     "anatomy": str, "split": "training"|"validation"|"test", "ct_window": [level, width] | None}

Items are never validated here beyond what discovery needs; the pipeline reports bad ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .readers import is_dicom_file
from .store import SPLITS

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_PATTERN = re.compile(r"(_seg|_label|_labels|_mask)$", re.IGNORECASE)
MR_NAMES = {
    "MR",
    "MRI",
    "T1",
    "T1W",
    "T1GD",
    "T1C",
    "T2",
    "T2W",
    "FLAIR",
    "ADC",
    "DWI",
    "PD",
    "HBV",
    "NONCONTRAST",
    "CINE",
}


class DatalistError(ValueError):
    """A datalist or data root that cannot be read at all (one line naming the file and why)."""


def normalise_modality(value) -> str | None:
    """Map free-text modality names ("CT", "MRI", "T2", "FLAIR", ...) to "CT" or "MR"; keep others."""
    if value is None:
        return None
    text = str(value).strip().upper().replace("-", "").replace(" ", "")
    if text == "CT":
        return "CT"
    if text in MR_NAMES or text.startswith("MR"):
        return "MR"
    return str(value)


def _item(image, dataset, modality, split="training", label=None, anatomy="", ct_window=None) -> dict:
    return {
        "image": str(image),
        "label": str(label) if label else None,
        "dataset": str(dataset),
        "modality": normalise_modality(modality),
        "anatomy": anatomy or "",
        "split": split,
        "ct_window": list(ct_window) if ct_window else None,
    }


def load_datalist(path: str | os.PathLike) -> list[dict]:
    """Read a MONAI-style datalist; image/label paths are resolved relative to the file.

    Keys ``training``, ``validation`` and ``test`` are read, each entry becoming an item of that
    split. Entries may set ``dataset``, ``modality``, ``anatomy`` and ``ct_window``.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatalistError(f"{path}: datalist not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatalistError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or not any(k in raw for k in SPLITS):
        raise DatalistError(f"{path}: a datalist needs a 'training' (or 'validation'/'test') list")
    base = path.resolve().parent
    items = []
    for split in SPLITS:
        for entry in raw.get(split, []):
            if isinstance(entry, str):
                entry = {"image": entry}
            image = entry.get("image")
            items.append(
                _item(
                    base / image if image else "",
                    entry.get("dataset", path.stem),
                    entry.get("modality"),
                    split,
                    base / entry["label"] if entry.get("label") else None,
                    entry.get("anatomy", ""),
                    entry.get("ct_window"),
                )
            )
    return items


def _split_for(key: str, val_fraction: float) -> str:
    """Deterministic by-volume split: a hash of the volume's name decides."""
    if val_fraction <= 0:
        return "training"
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "validation" if h < val_fraction else "training"


def _is_volume(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)


def volume_stem(path: str | os.PathLike) -> str:
    """A volume's file (or DICOM folder) name without its image extension, any case:
    ``CT.nii.gz`` → ``CT``, ``slice.DCM`` → ``slice``, ``series/`` → ``series``."""
    name = Path(path).name
    for suffix in sorted((*VOLUME_SUFFIXES, ".dcm"), key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _dicom_modality(folder: Path) -> str | None:
    import pydicom

    for f in sorted(folder.iterdir()):
        if is_dicom_file(f):
            try:
                return pydicom.dcmread(f, stop_before_pixels=True).get("Modality")
            except Exception:  # an unreadable file is reported later, when the series is loaded
                return None
    return None


def _msd(root: Path, meta: dict, modality: str | None, val_fraction: float) -> list[dict]:
    """Medical Segmentation Decathlon: dataset.json with 'training' pairs and a 'modality' map."""
    name = meta.get("name") or root.name
    mods = meta.get("modality") or {}
    mod = modality or (mods.get("0") if isinstance(mods, dict) else None)
    anatomy = ""
    items = []
    for entry in meta.get("training", []):
        img = root / entry["image"]
        items.append(_item(img, name, mod, _split_for(img.name, val_fraction), root / entry["label"], anatomy))
    for entry in meta.get("test", []):
        img = root / (entry if isinstance(entry, str) else entry["image"])
        items.append(_item(img, name, mod, "test", None, anatomy))
    return items


def _nnunet(root: Path, meta: dict, modality: str | None, val_fraction: float) -> list[dict]:
    """nnU-Net raw: imagesTr/<case>_<cccc><ending>, labelsTr/<case><ending>; one dataset per channel."""
    name = root.name
    channels = meta.get("channel_names") or meta.get("modality") or {"0": modality}
    ending = meta.get("file_ending", ".nii.gz")
    items = []
    for folder, split in (("imagesTr", "training"), ("imagesTs", "test")):
        for img in sorted((root / folder).glob(f"*_[0-9][0-9][0-9][0-9]{ending}")):
            case, chan = img.name[: -len(ending)].rsplit("_", 1)
            ch_name = channels.get(str(int(chan)), channels.get(chan))
            ds = name if len(channels) == 1 else f"{name}_{ch_name}"
            label = root / "labelsTr" / f"{case}{ending}" if split == "training" else None
            sp = _split_for(case, val_fraction) if split == "training" else split
            items.append(_item(img, ds, modality or ch_name, sp, label if label and label.exists() else None))
    return items


def _plain(root: Path, dataset: str, modality: str | None, val_fraction: float) -> list[dict]:
    """A plain folder tree: NIfTI/NRRD/MHA files (``<stem>_seg`` beside one is its label) and
    DICOM series, one series per folder."""
    items = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        folder = Path(folder)
        paths = [folder / f for f in sorted(files)]
        if any(is_dicom_file(p) for p in paths):
            mod = modality or _dicom_modality(folder)
            items.append(_item(folder, dataset, mod, _split_for(str(folder.relative_to(root)), val_fraction)))
        vols = [p for p in paths if _is_volume(p)]
        labels = {LABEL_PATTERN.sub("", volume_stem(p)): p for p in vols if LABEL_PATTERN.search(volume_stem(p))}
        for p in vols:
            if LABEL_PATTERN.search(volume_stem(p)):
                continue
            sp = _split_for(str(p.relative_to(root)), val_fraction)
            items.append(_item(p, dataset, modality, sp, labels.get(volume_stem(p))))
    return items


def discover(root: str | os.PathLike, modality: str | None = None, val_fraction: float = 0.0) -> list[dict]:
    """Find volumes under ``root``.

    - a folder with ``dataset.json`` holding ``training`` pairs is an MSD task;
    - a folder with ``imagesTr/`` (and ``dataset.json`` with ``channel_names``) is an nnU-Net raw dataset;
    - any other sub-folder of ``root`` is a plain dataset named after it (``root`` itself if it
      holds the files directly).

    Args:
        modality: "CT" or "MR" for plain folders of NIfTI/NRRD/MHA (DICOM series read their tag);
            overrides MSD/nnU-Net metadata when given.
        val_fraction: fraction of volumes put in the ``validation`` split, by a hash of each
            volume's name (stable across runs and machines).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatalistError(f"{root}: data root is not a folder")
    items: list[dict] = []

    def visit(folder: Path, dataset: str) -> None:
        meta_file = folder / "dataset.json"
        meta = {}
        if meta_file.exists():
            try:
                meta = json.loads(meta_file.read_text())
            except json.JSONDecodeError as exc:
                raise DatalistError(f"{meta_file}: not valid JSON ({exc})") from None
        if (folder / "imagesTr").is_dir() and ("channel_names" in meta or "training" not in meta):
            items.extend(_nnunet(folder, meta, modality, val_fraction))
        elif "training" in meta:
            items.extend(_msd(folder, meta, modality, val_fraction))
        else:
            subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
            direct = [p for p in folder.iterdir() if _is_volume(p) or is_dicom_file(p)]
            if direct or folder != root:
                items.extend(_plain(folder, dataset, modality, val_fraction))
            else:
                for sub in subdirs:
                    visit(sub, sub.name)

    visit(root, root.name)
    if not items:
        raise DatalistError(f"{root}: no NIfTI/NRRD/MHA volumes, DICOM series, MSD or nnU-Net datasets found")
    return items

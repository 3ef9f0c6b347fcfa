"""In-painting, out-painting and editing of real volumes: a volume and a mask in, a volume out.

:class:`VolumeInpainter` is what ``configs/inpaint.yaml`` (an overlay on ``configs/prepare.yaml``)
builds and ``medvar inpaint`` runs:

1. the image and the mask are read on the same grid (NIfTI, NRRD/MHA or a DICOM series folder);
2. ``prepare``'s own ``preprocessing`` Compose turns the image into the model's ``S × S`` uint8
   axial slices (RAS orientation, CT window or MR non-zero percentile clip, background removal),
   keeping the axial slices the mask touches;
3. in each slice the mask's region (the mask, or everything outside it with ``outpaint``) is
   re-drawn by masked next-scale sampling (:mod:`medvar_bundle.sampling.inpaint`);
4. the re-drawn slices are resized back to the volume's in-plane matrix, mapped back to its
   intensities (HU through the inverse CT window; MR through the inverse percentile range) and
   pasted *inside the region only*, blended over ``feather`` pixels at its border, so every voxel
   outside the region keeps the input's value exactly;
5. the volume is turned back from RAS to the input's own orientation (MONAI's inverse of the same
   ``Orientationd``) and written as NIfTI with the input's affine, shape and dtype, beside a
   before / mask / after PNG and ``inpaint.json``.

Intensities the forward normalisation clipped cannot be re-created: re-drawn CT voxels lie inside
the window (air re-drawn at the window's floor, e.g. −160 HU for the 40/400 soft-tissue window).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirst, Orientationd
from scipy import ndimage
from tqdm import tqdm

from medvar_bundle.bundle_config import device_expression, run_config
from medvar_bundle.data.prepare import root_cause
from medvar_bundle.data.readers import VolumeFileError, load_volume
from medvar_bundle.data.sources import volume_stem
from medvar_bundle.data.transforms import (
    LoadVolumed,
    NormalizeByModalityd,
    ValidateVolumed,
    VolumeError,
    check_volume_shape,
    resize_in_plane,
)
from medvar_bundle.files import atomic_write_json
from medvar_bundle.io import check_writable, write_nifti
from medvar_bundle.model_file import MedVARModel
from medvar_bundle.runtime import to_model_range
from medvar_bundle.sampling.inpaint import MaskedNextScaleInferer
from medvar_bundle.visualize import pixel_aspect, save_grid

logger = logging.getLogger(__name__)

SUMMARY = "inpaint.json"


class InpaintError(ValueError):
    """Input that cannot be in-painted; the message is one line naming the file and the reason."""


def _naming(path: str, err: VolumeError) -> str:
    """``err`` as one line that names ``path`` once."""
    return str(err) if isinstance(err, VolumeFileError) else f"{path}: {err}"


def read_volume(path: str | os.PathLike, max_voxels: int, check_values: bool = True) -> MetaTensor:
    """A volume as stored: channel-first ``(1, X, Y, Z)`` in its own dtype, with its RAS affine (mm).

    Args:
        path: NIfTI, NRRD/MHA file or DICOM series folder.
        max_voxels: the most voxels its header may claim (checked before reading, as in ``prepare``).
        check_values: also refuse NaN/Inf and constant volumes (``prepare``'s checks); masks are
            only checked for their shape.

    Raises:
        InpaintError: unreadable file, or not one 3D volume.
    """
    path = str(path)
    try:
        img = EnsureChannelFirst()(load_volume(path, max_voxels, dtype=None))
        check_volume_shape(tuple(img.shape))
        if check_values:
            ValidateVolumed("image", label_key=None)({"image": img})
    except VolumeError as err:
        raise InpaintError(_naming(path, err)) from None
    return img


def feather_weights(region: np.ndarray, feather: int) -> np.ndarray:
    """Per-pixel weight of the re-drawn image in an axial slice's region ``(X, Y)`` bool.

    0 outside the region, ``min(1, d / feather)`` inside it, where ``d`` (≥ 1) is the distance in
    pixels to the nearest pixel outside; ``feather = 0`` pastes the region as it is.
    """
    if feather <= 0:
        return region.astype(np.float64)
    return np.clip(ndimage.distance_transform_edt(region) / feather, 0.0, 1.0)


def _cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float values → ``dtype``, rounded and clipped to its range for integer types."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def _display(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Intensities → uint8 for figures, ``lo`` black and ``hi`` white."""
    return np.rint(np.clip((values - lo) / (hi - lo), 0.0, 1.0) * 255).astype(np.uint8)


class VolumeInpainter:
    """Re-draw the masked region of a real volume with a MedVAR model (see the module docstring).

    Args:
        model: the loaded model file (tokenizer, transformer, dataset registry).
        preprocessing: ``prepare``'s Compose (one item → uint8 slices); it must contain the
            ``Orientationd`` and ``NormalizeByModalityd`` it uses, which are inverted here.
        inferer: the masked next-scale inferer (sampling options, mask dilation, bf16).
        dataset: the image's dataset in the model's registry (its modality and CT window).
        edit_dataset: condition the region on this dataset instead (editing); None: ``dataset``.
        outpaint: re-draw everything outside the mask (in the slices the mask touches) instead.
        feather: blend width in pixels at the region's border (inside the region).
        seed: seed of the sampling generator; the same seed and batch size give the same volume.
        batch_size: slices per batch.
        device: where the networks run.
        model_file: the model's path, for messages and the summary.
        progress: show a progress bar.
    """

    def __init__(
        self,
        model: MedVARModel,
        preprocessing: Compose,
        inferer: MaskedNextScaleInferer,
        dataset: str,
        edit_dataset: str | None = None,
        outpaint: bool = False,
        feather: int = 3,
        seed: int = 0,
        batch_size: int = 16,
        device: torch.device | str = "cpu",
        model_file: str = "model",
        progress: bool = True,
    ) -> None:
        if batch_size < 1 or feather < 0:
            raise ValueError(f"batch_size must be >= 1 and feather >= 0, got {batch_size} and {feather}")
        for name in (dataset, edit_dataset):
            if name is not None and name not in model.datasets:
                raise InpaintError(f"{model_file}: unknown dataset {name!r}; this model knows: "
                                   f"{', '.join(sorted(model.datasets))}")  # fmt: skip
        self.max_voxels = self._find(preprocessing, LoadVolumed).max_voxels
        self.orientation = self._find(preprocessing, Orientationd)
        self.normalize = self._find(preprocessing, NormalizeByModalityd)
        self.model, self.preprocessing, self.inferer = model, preprocessing, inferer
        self.dataset, self.edit_dataset, self.outpaint = dataset, edit_dataset or dataset, outpaint
        self.feather, self.seed, self.batch_size = feather, seed, batch_size
        self.device, self.model_file, self.progress = torch.device(device), model_file, progress

    @staticmethod
    def _find(preprocessing: Compose, kind: type):
        found = [t for t in preprocessing.flatten().transforms if isinstance(t, kind)]
        if len(found) != 1:
            raise ValueError(f"the preprocessing must hold exactly one {kind.__name__}, found {len(found)}")
        return found[0]

    def item(self, image: str, mask: str) -> dict:
        """The datalist item ``prepare``'s preprocessing reads: the mask stands in for the label, so
        the axial slices it touches are the ones kept."""
        entry = self.model.datasets[self.dataset]
        return {"image": image, "label": mask, "modality": entry["modality"], "ct_window": entry.get("ct_window")}

    def check_inputs(self, image: str, mask: str) -> tuple[MetaTensor, MetaTensor]:
        """Read and check the image and the mask (same grid, a region to re-draw and context left).

        Returns:
            The image ``(1, X, Y, Z)`` in its dtype and the mask as bool, both with their affines.
        """
        img, msk = read_volume(image, self.max_voxels), read_volume(mask, self.max_voxels, check_values=False)
        if msk.shape != img.shape:
            grids = f"{tuple(msk.shape[1:])} vs the image's {tuple(img.shape[1:])}"
            raise InpaintError(f"{mask}: the mask is not on the image's grid (shape {grids})")
        if not np.allclose(msk.affine.numpy(), img.affine.numpy(), atol=1e-3):
            raise InpaintError(f"{mask}: the mask is not on the image's grid (its affine differs)")
        values = msk.as_tensor()
        if values.min() < 0 or values.max() > 255:
            raise InpaintError(
                f"{mask}: mask values {float(values.min()):g}..{float(values.max()):g}: a mask holds 0 "
                "(keep) and 1..255 (re-draw)"
            )
        region = values > 0
        if not region.any():
            what = "keep" if self.outpaint else "re-draw"
            raise InpaintError(f"{mask}: empty mask (no voxel > 0): nothing to {what}")
        if region.all():
            raise InpaintError(
                f"{mask}: the mask covers the whole volume: "
                + ("nothing is left to out-paint" if self.outpaint else "no context is left (use --outpaint?)")
            )
        return img, MetaTensor(region, meta=msk.meta)

    @torch.no_grad()
    def __call__(self, image: str | os.PathLike, mask: str | os.PathLike, output_dir: str | os.PathLike) -> dict:
        """In-paint ``image`` where ``mask`` > 0 and write ``output_dir/<image name>_inpainted.nii.gz``,
        ``..._inpainted.png`` and ``inpaint.json``. Returns the summary written to ``inpaint.json``.

        Raises:
            InpaintError: bad input (one line naming the file); nothing is written then.
        """
        image, mask, out = str(image), str(mask), Path(output_dir)
        started = time.perf_counter()
        img, region = self.check_inputs(image, mask)
        item = self.item(image, mask)
        try:
            slices = self.preprocessing(item)
        except Exception as err:  # MONAI's Compose wraps a transform's error in its own RuntimeError
            cause = root_cause(err)
            if isinstance(cause, VolumeError):
                raise InpaintError(_naming(image, cause)) from None
            raise
        check_writable(out)
        oriented = self.orientation({"image": img, "label": region})
        ras, ras_region = oriented["image"], oriented["label"].as_tensor()[0].numpy()
        zs = [int(z) for z in slices["slice_indices"]]
        if self.outpaint:  # everything outside the mask, in the axial slices the mask touches
            touched = np.zeros(ras_region.shape[-1], dtype=bool)
            touched[zs] = True
            ras_region = ~ras_region & touched
        lo, hi = self.normalize.input_range({**item, "image": img})
        redrawn = self._redraw(np.asarray(slices["image"])[0], ras_region[..., zs])  # (X, Y, Zk) in [0, 1]
        before = ras.as_tensor()[0].numpy()
        result = before.copy()  # only voxels of the region are written below: the rest stays the input, exactly
        for j, z in enumerate(zs):
            w = feather_weights(ras_region[..., z], self.feather)
            inside = w > 0
            old = before[..., z][inside].astype(np.float64)
            new = lo + redrawn[..., j][inside] * (hi - lo)
            result[..., z][inside] = _cast_like(old + w[inside] * (new - old), before.dtype)
        redone = MetaTensor(torch.from_numpy(result)[None], meta=ras.meta, applied_operations=ras.applied_operations)
        back = self.orientation.inverse({"image": redone})["image"]
        name = volume_stem(image)
        volume_path, written = self._save_volume(
            image, img, back.as_tensor()[0].numpy(), out / f"{name}_inpainted.nii.gz"
        )
        figure = self._save_figure(
            name, before, result, ras_region, zs, (lo, hi), out / f"{name}_inpainted.png", pixel_aspect(ras.pixdim)
        )
        changed = int(np.count_nonzero(written != img.as_tensor()[0].numpy()))  # as written: a change may round away
        summary = {
            "image": image, "mask": mask, "model": self.model_file, "dataset": self.dataset,
            "edit_dataset": self.edit_dataset, "outpaint": self.outpaint, "feather": self.feather, "seed": self.seed,
            "options": asdict(self.inferer.options) | {"dilation": self.inferer.dilation, "bf16": self.inferer.bf16},
            "slices": len(zs), "region_voxels": int(ras_region.sum()), "changed_voxels": changed,
            "intensity_range": [lo, hi], "seconds": time.perf_counter() - started,
            "files": {"volume": str(volume_path), "figure": str(figure)},
        }  # fmt: skip
        atomic_write_json(out / SUMMARY, summary)
        logger.info("%s: %d slices re-drawn, %d voxels changed -> %s", image, len(zs), changed, volume_path)
        return summary

    def _redraw(self, slices_u8: np.ndarray, region: np.ndarray) -> np.ndarray:
        """Re-draw ``region`` ``(X, Y, Zk)`` bool of the preprocessed slices ``(S, S, Zk)`` uint8;
        returns the re-drawn slices resized back to ``(X, Y, Zk)``, float in [0, 1]."""
        S = slices_u8.shape[0]
        edit_id = self.model.dataset_id(self.edit_dataset)
        generator = torch.Generator(self.device).manual_seed(self.seed)
        masks = F.interpolate(torch.from_numpy(region).permute(2, 0, 1)[:, None].float(), size=(S, S), mode="area")
        images = torch.from_numpy(np.ascontiguousarray(slices_u8.transpose(2, 0, 1)))
        out = np.empty(region.shape, dtype=np.float64)
        batches = range(0, len(images), self.batch_size)
        for first in tqdm(batches, desc="in-painting", unit="batch", disable=not self.progress):
            batch = images[first : first + self.batch_size]
            ids = torch.full((len(batch),), edit_id, dtype=torch.long, device=self.device)
            drawn = self.inferer(to_model_range(batch).to(self.device), self.model.transformer,
                                 mask=(masks[first : first + self.batch_size, 0] > 0).to(self.device),
                                 dataset_id=ids, generator=generator)  # fmt: skip
            resized = resize_in_plane(drawn.cpu().float() / 255.0, region.shape[:2])  # (B, X, Y)
            out[..., first : first + len(batch)] = resized.permute(1, 2, 0).double().numpy()
        return out

    def _save_volume(self, image: str, img: MetaTensor, volume: np.ndarray, path: Path) -> tuple[Path, np.ndarray]:
        """The result ``(X, Y, Z)`` in the input's axes and dtype as NIfTI, with the input's affine (and
        header, for a NIfTI input). A scaled integer NIfTI (e.g. uint16 with ``scl_inter`` −1024)
        is written as its stored integers and scaling: the voxels left alone come back exactly and
        the re-drawn ones on its grid. Another input (DICOM series, NRRD) gets qform and sform code 1
        (scanner) and millimetres as its unit. Returns the file and the values a reader gets from it."""
        header, slope, inter = None, 1.0, 0.0
        if image.endswith((".nii", ".nii.gz")):
            source = nib.load(image)
            header, slope, inter = source.header.copy(), float(source.dataobj.slope), float(source.dataobj.inter)
        disk = None if header is None else header.get_data_dtype()
        if disk is not None and (slope, inter) != (1.0, 0.0) and np.issubdtype(disk, np.integer):
            stored = _cast_like((volume - inter) / slope, disk)
            nii = nib.Nifti1Image(stored, img.affine.numpy(), header=header)
            nii.header.set_slope_inter(slope, inter)
            volume = stored * slope + inter
        else:
            nii = nib.Nifti1Image(volume, img.affine.numpy(), header=header)
            nii.header.set_data_dtype(volume.dtype)
        if header is None:  # a DICOM series or NRRD: the affine is in scanner millimetres, say so in both forms
            nii.set_qform(img.affine.numpy(), code=1)
            nii.set_sform(img.affine.numpy(), code=1)
            nii.header.set_xyzt_units("mm")
        nii.header["descrip"] = f"MedVAR {'out' if self.outpaint else 'in'}-painted {self.edit_dataset}".encode()[:79]
        return write_nifti(nii, path), volume

    def _save_figure(self, name, before, result, region, zs, window, path: Path, aspect: float = 1.0) -> Path:
        """Before | region | after for up to four of the re-drawn axial slices (RAS volumes, ``window`` =
        (lo, hi)), drawn with the volume's pixel ``aspect`` (:func:`~medvar_bundle.visualize.pixel_aspect`)."""
        show = zs if len(zs) <= 4 else [zs[i] for i in np.linspace(0, len(zs) - 1, 4).round().astype(int)]
        rows = [[_display(before[..., z], *window), region[..., z].astype(np.uint8) * 255,
                 _display(result[..., z], *window)] for z in show]  # fmt: skip
        title = f"{name}: {'out' if self.outpaint else 'in'}-painted as {self.edit_dataset}"
        titles = [f"axial slice {z} (RAS): before | region | after" for z in show]
        return save_grid(rows, path, titles, title=title, aspect=aspect)


def inpaint(
    model: str | os.PathLike,
    image: str | os.PathLike,
    mask: str | os.PathLike,
    dataset: str,
    out_dir: str | os.PathLike,
    **overrides,
) -> dict:
    """Run ``configs/prepare.yaml`` + ``configs/inpaint.yaml``: re-draw ``image`` where ``mask`` > 0
    with the model file ``model`` into ``out_dir``.

    ``overrides`` are other ids of the configs (``outpaint``, ``edit_dataset``, ``cfg``, ``top_k``,
    ``top_p``, ``temperature``, ``final_temperature``, ``seed``, ``batch_size``, ``feather``,
    ``dilation``, ``device``, ``bf16``, ``progress``), whose defaults live in the YAML. Returns the summary written to
    ``inpaint.json`` (see :class:`VolumeInpainter`).
    """
    if "device" in overrides:
        overrides["device"] = device_expression(str(overrides["device"]))
    settings = {"model_file": str(model), "image": str(image), "mask": str(mask), "dataset": dataset,
                "output_dir": str(out_dir), **overrides}  # fmt: skip
    (summary,) = run_config("prepare", None, settings, ["inpaint"])
    return summary

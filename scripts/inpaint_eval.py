"""In-painting of real anatomy on a held-out volume: MedVAR against two naive fills, inside the mask.

A box of real anatomy (``--box-fraction`` of the in-plane matrix, ``--slices`` axial slices, centred
on the body) is removed and re-drawn by ``medvar inpaint`` (one run per seed), by the mean intensity
of the body around it, and by a smooth (cubic, scipy ``griddata``) interpolation from the ring of
pixels around it. Inside the box every fill is compared with the truth: mean absolute error in the
volume's units (HU for CT), PSNR on the normalisation range (CT window / MR percentiles, 1 = full
range), the histogram distance (W1, 8-bit levels) and the power-spectrum distance (decades) of the
box's pixels. Prints a Markdown table, writes ``OUT/inpaint_eval.json`` and a figure (input with the
box removed | box | MedVAR | mean fill | smooth fill | truth).

    python scripts/inpaint_eval.py --model runs/demo/transformer/model.pt --dataset brain_t1 \\
        --image runs/demo/data/raw/mni152_t1.nii.gz --out runs/demo/inpaint_brain_t1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation
from scipy import ndimage
from scipy.interpolate import griddata

from medvar_bundle.bundle_config import config_component
from medvar_bundle.inpaint import InpaintError, inpaint, read_volume
from medvar_bundle.metrics.weight_free import histogram_distance, power_spectrum_distance
from medvar_bundle.model_file import load_model
from medvar_bundle.visualize import save_grid

RAS = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))


def box_mask(volume: np.ndarray, fraction: float, slices: int) -> np.ndarray:
    """A box in the RAS volume ``(X, Y, Z)``: ``fraction`` of the in-plane matrix, ``slices`` thick,
    centred on the centre of mass of the voxels above the volume's median and moved inside the
    volume where it would cross an edge (so it always has the size asked for)."""
    body = volume > np.median(volume)
    centre = [int(round(c)) for c in ndimage.center_of_mass(body)]
    sides = [max(1, int(volume.shape[0] * fraction)), max(1, int(volume.shape[1] * fraction)), slices]
    mask = np.zeros(volume.shape, bool)
    start = [min(max(c - s // 2, 0), n - s) for c, s, n in zip(centre, sides, volume.shape)]
    mask[tuple(slice(a, a + s) for a, s in zip(start, sides))] = True
    return mask


def naive_fills(volume: np.ndarray, mask: np.ndarray, ring: int = 3) -> dict[str, np.ndarray]:
    """Mean-intensity and smooth (cubic) fills of ``mask`` from a ``ring``-pixel band around it, per slice."""
    mean_fill, smooth_fill = volume.astype(np.float64), volume.astype(np.float64)
    for z in np.flatnonzero(mask.any(axis=(0, 1))):
        inside = mask[..., z]
        band = ndimage.binary_dilation(inside, iterations=ring) & ~inside
        known, values = np.argwhere(band), volume[..., z][band].astype(np.float64)
        mean_fill[..., z][inside] = values.mean()
        smooth = griddata(known, values, np.argwhere(inside), method="cubic")
        nearest = griddata(known, values, np.argwhere(inside), method="nearest")
        smooth_fill[..., z][inside] = np.where(np.isnan(smooth), nearest, smooth)
    return {"mean fill": mean_fill, "smooth fill": smooth_fill}


def to_u8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.rint(np.clip((values - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def scores(fill: np.ndarray, truth: np.ndarray, mask: np.ndarray, lo: float, hi: float) -> dict[str, float]:
    """Inside-the-mask error of ``fill`` against ``truth`` (RAS volumes)."""
    a, b = fill[mask].astype(np.float64), truth[mask].astype(np.float64)
    mse = np.mean(((np.clip(a, lo, hi) - np.clip(b, lo, hi)) / (hi - lo)) ** 2)
    zs = np.flatnonzero(mask.any(axis=(0, 1)))
    xs, ys = np.flatnonzero(mask.any(axis=(1, 2))), np.flatnonzero(mask.any(axis=(0, 2)))
    side = min(len(xs), len(ys))
    crop = (slice(xs[0], xs[0] + side), slice(ys[0], ys[0] + side))

    def boxes(volume: np.ndarray) -> np.ndarray:
        return np.stack([to_u8(volume[crop[0], crop[1], z], lo, hi) for z in zs])

    return {
        "mae": float(np.mean(np.abs(a - b))),
        "psnr_db": float(10 * np.log10(1 / mse)) if mse > 0 else float("inf"),
        "histogram_w1": histogram_distance(boxes(truth), boxes(fill)),
        "power_spectrum": power_spectrum_distance(boxes(truth), boxes(fill)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model.pt")
    parser.add_argument("--image", required=True, help="a held-out volume (NIfTI, NRRD or DICOM folder)")
    parser.add_argument("--dataset", required=True, help="its dataset in the model's registry")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--box-fraction", type=float, default=0.25, help="box side / in-plane matrix (default 0.25)")
    parser.add_argument("--slices", type=int, default=6, help="axial slices of the box (default 6)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="MedVAR seeds (default 0 1 2)")
    parser.add_argument("--figure", help="also save the figure here (e.g. docs/figures/...png)")
    args = parser.parse_args()
    if not 0 < args.box_fraction < 1 or args.slices < 1:
        parser.error(f"--box-fraction must be in (0, 1) and --slices >= 1, got {args.box_fraction} and {args.slices}")
    out = Path(args.out)

    max_voxels = config_component("prepare", "max_voxels")  # prepare's limit, as `medvar inpaint` reads it
    try:
        image = read_volume(args.image, max_voxels)
    except InpaintError as err:
        parser.exit(2, f"inpaint_eval: {err}\n")
    if args.slices >= image.shape[-1]:
        depth = image.shape[-1]
        message = f"{args.image}: --slices {args.slices} leaves none of its {depth} slices as context"
        parser.exit(2, f"inpaint_eval: {message}\n")
    out.mkdir(parents=True, exist_ok=True)
    ras = RAS(image)
    truth = ras.as_tensor()[0].numpy()
    mask_ras = box_mask(truth.astype(np.float64), args.box_fraction, args.slices)
    mask = RAS.inverse(
        MetaTensor(torch.from_numpy(mask_ras)[None], meta=ras.meta, applied_operations=ras.applied_operations)
    )
    mask_path = out / "box_mask.nii.gz"
    nib.save(nib.Nifti1Image(mask.as_tensor()[0].numpy().astype(np.uint8), image.affine.numpy()), mask_path)

    fills, seconds = {}, []
    for seed in args.seeds:
        summary = inpaint(args.model, args.image, mask_path, args.dataset, out / f"seed{seed}", seed=seed,
                          progress=False)  # fmt: skip
        seconds.append(summary["seconds"])
        result = RAS(read_volume(summary["files"]["volume"], max_voxels)).as_tensor()[0].numpy()
        fills[f"MedVAR seed {seed}"] = result
    lo, hi = summary["intensity_range"]
    fills.update(naive_fills(truth, mask_ras))
    table = {name: scores(fill, truth, mask_ras, lo, hi) for name, fill in fills.items()}
    medvar = [v for k, v in table.items() if k.startswith("MedVAR")]
    table["MedVAR (mean over seeds)"] = {k: float(np.mean([m[k] for m in medvar])) for k in medvar[0]}
    unit = "HU" if load_model(args.model).datasets[args.dataset]["modality"] == "CT" else "intensity units"
    print(f"| {args.dataset}: inside the box ({int(mask_ras.sum())} voxels) | MAE ({unit}) | PSNR (dB) | "
          "histogram W1 | power spectrum |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['mae']:.1f} | {row['psnr_db']:.2f} | {row['histogram_w1']:.2f} | "
              f"{row['power_spectrum']:.3f} |")  # fmt: skip
    (out / "inpaint_eval.json").write_text(json.dumps(
        {"image": args.image, "dataset": args.dataset, "box_voxels": int(mask_ras.sum()), "range": [lo, hi],
         "seconds_per_run": seconds, "scores": table}, indent=1))  # fmt: skip

    box_slices = np.flatnonzero(mask_ras.any(axis=(0, 1)))
    z = int(box_slices[len(box_slices) // 2])
    removed = np.where(mask_ras[..., z], lo, truth[..., z])
    row = [to_u8(removed, lo, hi), mask_ras[..., z].astype(np.uint8) * 255,
           to_u8(fills[f"MedVAR seed {args.seeds[0]}"][..., z], lo, hi), to_u8(fills["mean fill"][..., z], lo, hi),
           to_u8(fills["smooth fill"][..., z], lo, hi), to_u8(truth[..., z], lo, hi)]  # fmt: skip
    title = f"{args.dataset}, held out: input | box | MedVAR | mean fill | smooth fill | truth"
    for path in filter(None, [out / "inpaint_eval.png", args.figure]):
        save_grid([row], path, title=title)


if __name__ == "__main__":
    main()

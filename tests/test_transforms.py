"""Known-answer tests for :mod:`medvar_bundle.data.transforms` on synthetic volumes.

Every expected value is derived here from first principles (the CT window formula, percentiles
over the non-zero voxels, the RAS convention of NIfTI/DICOM, nearest-neighbour sampling at pixel
centres) rather than copied from a previous run. Volumes are small so the whole file runs fast.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medvar_bundle.bundle_config import config_component
from medvar_bundle.data.transforms import (
    DEFAULT_CT_WINDOW,
    CastLabeld,
    LoadVolumed,
    NormalizeByModalityd,
    NoSlicesError,
    QuantizeUint8d,
    RemoveBackgroundd,
    ResizeSlicesd,
    ScaleIntensityNonZeroPercentiles,
    SelectAxialSlicesd,
    ValidateVolumed,
    VolumeError,
    body_mask,
    ct_window,
)

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def preprocessing(**overrides):
    """The ``preprocessing`` Compose of configs/prepare.yaml, with config-id overrides (``size=40``)."""
    return config_component("prepare", "preprocessing", overrides)


AIR_HU = -1000.0
BODY_HU = 20.0  # (20 + 160) / 400 * 255 = 114.75 -> 115, far from a .5 rounding tie


def window01(hu, level: float = 40.0, width: float = 400.0) -> np.ndarray:
    """The CT window in float64: clip((HU - (L - W/2)) / W, 0, 1)."""
    return np.clip((np.asarray(hu, dtype=np.float64) - (level - width / 2.0)) / width, 0.0, 1.0)


def window_q(hu, level: float = 40.0, width: float = 400.0) -> np.ndarray:
    """Windowed quantisation round(clip((HU - L + W/2) / W, 0, 1) * 255) as uint8."""
    return np.rint(window01(hu, level, width) * 255.0).astype(np.uint8)


def assert_no_rounding_tie(hu_values, level=40.0, width=400.0):
    """Guard: the test's own HU choices must not sit on a .5 tie where float32 could round either way."""
    x = window01(np.asarray(hu_values, dtype=np.float64), level, width) * 255.0
    assert np.all(np.abs(x - np.floor(x) - 0.5) > 1e-3), "test set-up: pick HU values away from ties"


def save_nifti(path: Path, arr: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4) if affine is None else affine), str(path))
    return str(path)


def as_np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def interior_out_pixels(lo: int, hi: int, n_in: int, n_out: int) -> np.ndarray:
    """Output pixels of an in-plane resize ``n_in -> n_out`` whose sample point lies at least one
    input voxel inside the inclusive voxel range ``[lo, hi]``.

    Linear interpolation at such a point only mixes voxels of ``[lo, hi]``, whatever the
    ``align_corners`` convention, so a homogeneous region keeps its value exactly there.
    """
    o = np.arange(n_out)
    centres = (o + 0.5) * n_in / n_out - 0.5  # align_corners=False
    corners = o * (n_in - 1) / (n_out - 1)  # align_corners=True
    ok = (np.minimum(centres, corners) >= lo + 1) & (np.maximum(centres, corners) <= hi - 1)
    idx = o[ok]
    assert idx.size > 0, "test set-up: region too small to have interior output pixels"
    return idx


def nearest_exact_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel for nearest-neighbour sampling at pixel centres."""
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(int), n_in - 1)


def ct_item(image: str, label: str | None = None, **extra) -> dict:
    item = {"image": image, "modality": "CT", **extra}
    if label is not None:
        item["label"] = label
    return item


def pipeline_error(item: dict, **kwargs) -> BaseException:
    """Run :func:`preprocessing` expecting failure; return the root cause.

    MONAI's ``Compose`` wraps a transform's exception in ``RuntimeError("applying transform ...")``
    chained with ``from``; ``medvar prepare`` walks ``__cause__`` the same way to classify it.
    """
    with pytest.raises(Exception) as err:
        preprocessing(**kwargs)(item)
    exc = err.value
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


# --------------------------------------------------------------------------------------------
# 1. CT window
# --------------------------------------------------------------------------------------------


def test_ct_window_maps_hu_exactly_and_clips():
    level, width = 40.0, 400.0
    lo, hi = level - width / 2, level + width / 2  # -160, 240
    hu = np.array([-3000, -1000, lo - 1, lo, -60, level, 140, hi, hi + 1, 1000, 3000], dtype=np.float32)
    out = as_np(ct_window(level, width)(hu)).astype(np.float64)

    expected = np.clip((hu.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    # the anchor points spelled out
    assert out[hu == lo][0] == pytest.approx(0.0, abs=1e-7)
    assert out[hu == hi][0] == pytest.approx(1.0, abs=1e-7)
    assert out[hu == level][0] == pytest.approx(0.5, abs=1e-7)
    assert out[hu == -60][0] == pytest.approx(0.25, abs=1e-7)
    assert out[hu == 140][0] == pytest.approx(0.75, abs=1e-7)
    # beyond the window: clipped, not extrapolated
    assert np.all(out[hu < lo] == 0.0)
    assert np.all(out[hu > hi] == 1.0)


@pytest.mark.parametrize("width", [0.0, -10.0])
def test_ct_window_rejects_non_positive_width(width):
    with pytest.raises(ValueError):
        ct_window(40.0, width)


def _hu_ramp() -> np.ndarray:
    return np.linspace(-1500.0, 1500.0, 1 * 6 * 5 * 4, dtype=np.float32).reshape(1, 6, 5, 4)


@pytest.mark.parametrize("window", [[-600, 1500], (400.0, 1800.0), [50, 350]])
def test_normalize_ct_uses_per_item_window(window):
    hu = _hu_ramp()
    out = NormalizeByModalityd("image")({"image": torch.from_numpy(hu.copy()), "modality": "CT", "ct_window": window})
    got = as_np(out["image"]).astype(np.float64)
    np.testing.assert_allclose(got, window01(hu, *window), rtol=0, atol=1e-6)
    # and it differs from the default window, so the per-item window really was used
    assert not np.allclose(got, window01(hu, *DEFAULT_CT_WINDOW), atol=1e-3)


@pytest.mark.parametrize("extra", [{}, {"ct_window": None}])
def test_normalize_ct_default_window_is_soft_tissue(extra):
    assert tuple(DEFAULT_CT_WINDOW) == (40.0, 400.0)
    hu = _hu_ramp()
    out = NormalizeByModalityd("image")({"image": torch.from_numpy(hu.copy()), "modality": "CT", **extra})
    np.testing.assert_allclose(as_np(out["image"]), window01(hu, 40.0, 400.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("modality", ["PET", "ct", None])
def test_normalize_unknown_modality_raises(modality):
    data = {"image": torch.from_numpy(_hu_ramp()), "modality": modality}
    with pytest.raises(VolumeError):
        NormalizeByModalityd("image")(data)


# --------------------------------------------------------------------------------------------
# 2. MR percentiles over non-zero voxels only
# --------------------------------------------------------------------------------------------


def _mr_volume(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = np.zeros((40, 40, 12), dtype=np.float32)
    nonzero = rng.random(vol.shape) < 0.25  # 75 % exact-zero background
    vol[nonzero] = rng.uniform(50.0, 1200.0, int(nonzero.sum())).astype(np.float32)
    return vol


@pytest.mark.parametrize("lower,upper", [(0.5, 99.5), (2.0, 98.0)])
def test_mr_percentiles_use_non_zero_voxels_only(lower, upper):
    vol = _mr_volume()
    nz = vol[vol != 0].astype(np.float64)
    p_lo, p_hi = np.percentile(nz, [lower, upper])
    all_lo, all_hi = np.percentile(vol.astype(np.float64), [lower, upper])
    # the test can tell the two implementations apart
    assert all_lo == 0.0 and p_lo > 40.0
    assert abs(all_hi - p_hi) > 5.0

    out = as_np(ScaleIntensityNonZeroPercentiles(lower, upper)(torch.from_numpy(vol[None].copy())))[0]
    expected = np.clip((vol.astype(np.float64) - p_lo) / (p_hi - p_lo), 0.0, 1.0)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)

    wrong = np.clip((vol.astype(np.float64) - all_lo) / (all_hi - all_lo), 0.0, 1.0)
    assert np.abs(out - wrong).max() > 0.01
    # both clipping ends are exercised among the non-zero voxels
    assert np.any(out[vol != 0] == 0.0) and np.any(out[vol != 0] == 1.0)
    assert np.all(out[vol == 0] == 0.0)


def test_normalize_mr_uses_non_zero_percentiles_and_ignores_ct_window():
    vol = _mr_volume(seed=1)
    nz = vol[vol != 0].astype(np.float64)
    p_lo, p_hi = np.percentile(nz, [0.5, 99.5])
    data = {"image": torch.from_numpy(vol[None].copy()), "modality": "MR", "ct_window": [40, 400]}
    out = as_np(NormalizeByModalityd("image")(data)["image"])[0]
    np.testing.assert_allclose(out, np.clip((vol - p_lo) / (p_hi - p_lo), 0.0, 1.0), rtol=0, atol=1e-5)


def test_mr_all_zero_or_flat_volume_raises():
    with pytest.raises(VolumeError):
        ScaleIntensityNonZeroPercentiles()(np.zeros((1, 8, 8, 4), np.float32))
    flat = np.zeros((1, 8, 8, 4), np.float32)
    flat[0, 2:6, 2:6, :] = 7.0  # non-zero voxels have no range
    with pytest.raises(VolumeError):
        ScaleIntensityNonZeroPercentiles()(flat)


@pytest.mark.parametrize("lower,upper", [(50, 50), (60, 40), (-1, 99), (1, 101)])
def test_mr_percentile_arguments_validated(lower, upper):
    with pytest.raises(ValueError):
        ScaleIntensityNonZeroPercentiles(lower, upper)


# --------------------------------------------------------------------------------------------
# 3. Background removal
# --------------------------------------------------------------------------------------------


def test_detached_blob_removed_in_3d():
    vol = np.zeros((40, 40, 12), dtype=np.float32)
    vol[5:30, 5:30, 1:11] = 0.8  # body: 25 x 25 x 10
    # detached blob, big in-plane (72 px >= 10 % of the body's 625 px slice) so only the 3D
    # largest-component step can remove it; >= 3 voxels away from the body in every direction
    vol[26:38, 33:39, 4:6] = 0.9
    vol[5:30, 30:33, 1:11] = 0.03  # faint rim touching the body, below the 0.05 threshold

    body = np.zeros(vol.shape, bool)
    body[5:30, 5:30, 1:11] = True
    np.testing.assert_array_equal(body_mask(vol), body)

    out = RemoveBackgroundd("image")({"image": torch.from_numpy(vol[None].copy())})
    img = as_np(out["image"])
    assert img.shape == (1, 40, 40, 12)
    assert np.all(img[0, 26:38, 33:39, 4:6] == 0.0)  # blob gone
    assert np.all(img[0, 5:30, 30:33, :] == 0.0)  # sub-threshold rim gone
    np.testing.assert_array_equal(img[0][body], vol[body])  # body untouched
    np.testing.assert_array_equal(np.asarray(out["foreground"]), body)


def test_both_legs_are_kept_and_the_table_is_not():
    """Two separate legs of equal size (two 3D components) and a table under them: the old rule
    (the largest 3D component only) dropped one leg."""
    vol = np.zeros((48, 40, 10), dtype=np.float32)
    vol[4:20, 8:24, :] = 0.8  # right leg: 16 x 16 x 10
    vol[26:42, 9:24, :] = 0.7  # left leg: 16 x 15 x 10, 94 % of the right one
    vol[2:46, 30:32, :] = 0.6  # table: 44 x 2 x 10, 34 % of the right leg, 3 px below the legs
    expected = np.zeros(vol.shape, bool)
    expected[4:20, 8:24, :] = expected[26:42, 9:24, :] = True
    np.testing.assert_array_equal(body_mask(vol), expected)
    np.testing.assert_array_equal(body_mask(vol, min_volume_fraction=0.3), expected | (vol == np.float32(0.6)))


def _bridged_phantom():
    """Body with lungs, a small and a large blob each joined to the body only in slice 6."""
    vol = np.zeros((40, 40, 12), dtype=np.float32)
    vol[8:28, 8:28, :] = 0.7  # body: 20 x 20 = 400 px per slice
    vol[11:17, 12:24, :] = 0.0  # left "lung": air, enclosed in-plane, open in the first/last slice
    vol[19:25, 12:24, 2:10] = 0.02  # right "lung": faint, below threshold
    vol[31:34, 14:18, :] = 0.9  # small blob: 12 px < 10 % of 400 (gap x = 28..30)
    vol[28:31, 15:17, 6] = 0.9  # bridge to the small blob, slice 6 only
    vol[10:18, 31:38, :] = 0.6  # large blob: 56 px >= 10 % of 400 (gap y = 28..30)
    vol[12:14, 28:31, 6] = 0.6  # bridge to the large blob, slice 6 only
    return vol


def test_blob_detached_in_plane_removed_per_slice_and_lungs_kept():
    vol = _bridged_phantom()
    # sanity: everything above threshold is one 3D component (joined through slice 6)
    from scipy import ndimage

    _, n3d = ndimage.label(vol > 0.05, structure=np.ones((3, 3, 3)))
    assert n3d == 1

    expected = np.zeros(vol.shape, bool)
    expected[8:28, 8:28, :] = True  # body incl. both lungs (holes filled)
    expected[10:18, 31:38, :] = True  # large blob kept in every slice
    expected[12:14, 28:31, 6] = True
    expected[31:34, 14:18, 6] = True  # small blob kept only where it is joined in-plane
    expected[28:31, 15:17, 6] = True

    mask = body_mask(vol)
    np.testing.assert_array_equal(mask, expected)

    out = RemoveBackgroundd("image")({"image": torch.from_numpy(vol[None].copy())})
    img = as_np(out["image"])[0]
    for z in range(12):
        if z != 6:
            assert np.all(img[31:34, 14:18, z] == 0.0), f"small blob survived in slice {z}"
    np.testing.assert_array_equal(img[31:34, 14:18, 6], vol[31:34, 14:18, 6])
    np.testing.assert_array_equal(img[10:18, 31:38, :], vol[10:18, 31:38, :])
    # lungs stay foreground: the faint lung keeps its value instead of being zeroed
    np.testing.assert_array_equal(img[19:25, 12:24, 2:10], vol[19:25, 12:24, 2:10])
    assert mask[11:17, 12:24, :].all()  # also in the first and last slice
    assert np.all(img[19:25, 12:24, 2:10] == np.float32(0.02))
    np.testing.assert_array_equal(np.asarray(out["foreground"]), expected)


def test_min_fraction_controls_which_in_plane_components_survive():
    vol = _bridged_phantom()
    # largest in-plane component: 400 - 72 = 328 px, or 256 px where both lungs are open;
    # 56 px large blob < 0.25 * 256 = 64 px: now it is dropped outside slice 6 as well
    mask = body_mask(vol, min_fraction=0.25)
    for z in range(12):
        assert mask[10:18, 31:38, z].all() == (z == 6)
    assert mask[8:28, 8:28, :].all()


def test_remove_background_without_body_raises():
    vol = np.full((1, 10, 10, 4), 0.01, dtype=np.float32)
    with pytest.raises(VolumeError):
        RemoveBackgroundd("image")({"image": torch.from_numpy(vol)})


# --------------------------------------------------------------------------------------------
# 4. Axial slice selection
# --------------------------------------------------------------------------------------------


def _slice_tagged_image(shape=(1, 40, 40, 12)) -> np.ndarray:
    img = np.zeros(shape, dtype=np.float32)
    for z in range(shape[-1]):
        img[..., z] = z + 1.0  # each slice identifiable by its value
    return img


@pytest.mark.parametrize("as_tensor", [False, True])
def test_select_keeps_exactly_the_annotated_slices(as_tensor):
    img = _slice_tagged_image()
    lbl = np.zeros_like(img)
    annotated = [1, 4, 5, 9]
    for z in annotated:
        lbl[0, 10:14, 10:14, z] = (z % 3) + 1
    lbl[0, 39, 0, 9] = 2  # a single voxel is enough
    fg = np.ones(img.shape[1:], bool)
    fg[..., 3] = False  # body presence must not matter when a label exists

    wrap = (lambda a: torch.from_numpy(a.copy())) if as_tensor else (lambda a: a.copy())
    out = SelectAxialSlicesd(("image", "label"))({"image": wrap(img), "label": wrap(lbl), "foreground": fg})

    assert out["slice_indices"] == annotated
    assert out["has_label"] is True
    got = as_np(out["image"])
    assert got.shape == (1, 40, 40, len(annotated))
    assert [float(v) for v in got[0, 0, 0, :]] == [z + 1.0 for z in annotated]
    np.testing.assert_array_equal(as_np(out["label"]), lbl[..., annotated])
    np.testing.assert_array_equal(np.asarray(out["foreground"]), fg[..., annotated])


def test_select_without_label_keeps_body_slices():
    img = _slice_tagged_image()
    fg = np.zeros(img.shape[1:], bool)  # 40 x 40 = 1600 px per slice; 1 % = 16 px
    fg[5:30, 5:30, 2] = True
    fg[0:4, 0:4, 3] = True  # exactly 16 px = 1 %: kept (>=)
    fg[10:20, 10:20, 7] = True
    fg[0:3, 0:5, 8] = True  # 15 px < 1 %: dropped
    out = SelectAxialSlicesd(("image", "label"))({"image": img, "foreground": fg})
    assert out["slice_indices"] == [2, 3, 7]
    assert out["has_label"] is False
    assert [float(v) for v in as_np(out["image"])[0, 0, 0, :]] == [3.0, 4.0, 8.0]
    np.testing.assert_array_equal(out["foreground"], fg[..., [2, 3, 7]])


def test_select_empty_label_raises_no_slices():
    img = _slice_tagged_image()
    data = {"image": img, "label": np.zeros_like(img), "foreground": np.ones(img.shape[1:], bool)}
    with pytest.raises(NoSlicesError):
        SelectAxialSlicesd(("image", "label"))(data)
    with pytest.raises(NoSlicesError):
        SelectAxialSlicesd(("image", "label"))({"image": img, "foreground": np.zeros(img.shape[1:], bool)})


def _ct_phantom(shape=(40, 40, 12), slice_hu=None) -> np.ndarray:
    """Air with a body box whose HU differs per slice (so slices can be told apart)."""
    X, Y, Z = shape
    vol = np.full(shape, AIR_HU, dtype=np.float32)
    for z in range(Z):
        vol[3 : X - 3, 4 : Y - 4, z] = BODY_HU + 12.0 * z if slice_hu is None else slice_hu[z]
    return vol


def test_preprocessing_crops_to_annotated_slices(tmp_path):
    vol = _ct_phantom()
    assert_no_rounding_tie(np.unique(vol))
    lbl = np.zeros(vol.shape, np.uint8)
    annotated = [0, 3, 4, 8, 11]
    for z in annotated:
        lbl[15:20, 15:22, z] = 1 + z % 2
    out = preprocessing(size=40)(
        ct_item(save_nifti(tmp_path / "img.nii.gz", vol), save_nifti(tmp_path / "lbl.nii.gz", lbl))
    )
    assert out["slice_indices"] == annotated
    assert out["has_label"] is True
    img = np.asarray(out["image"])
    assert img.dtype == np.uint8 and img.shape == (1, 40, 40, len(annotated))
    # identity affine is already RAS and size 40 means no resize: an exact voxel-wise answer
    np.testing.assert_array_equal(img[0], window_q(vol[..., annotated]))
    np.testing.assert_array_equal(np.asarray(out["label"])[0], lbl[..., annotated])


def test_preprocessing_without_label_keeps_body_slices(tmp_path):
    hu = [AIR_HU, AIR_HU, BODY_HU, BODY_HU + 24, 100.0, 100.0, AIR_HU, AIR_HU]
    vol = _ct_phantom((40, 40, 8), slice_hu=hu)
    # the shape `medvar prepare` passes: absent label and window given as None
    item = {"image": save_nifti(tmp_path / "img.nii.gz", vol), "label": None, "modality": "CT", "ct_window": None}
    out = preprocessing(size=40)(item)
    assert out["has_label"] is False
    assert out["slice_indices"] == [2, 3, 4, 5]
    assert "label" not in out
    np.testing.assert_array_equal(np.asarray(out["image"])[0], window_q(vol[..., [2, 3, 4, 5]]))


def test_preprocessing_empty_label_raises_no_slices(tmp_path):
    vol = _ct_phantom()
    item = ct_item(
        save_nifti(tmp_path / "img.nii.gz", vol), save_nifti(tmp_path / "lbl.nii.gz", np.zeros(vol.shape, np.uint8))
    )
    assert isinstance(pipeline_error(item), NoSlicesError)


# --------------------------------------------------------------------------------------------
# 5. Nearest-neighbour label resizing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("xy", [(100, 120), (300, 280)])
def test_label_resize_keeps_label_set(tmp_path, xy):
    X, Y = xy
    Z = 5
    vol = np.full((X, Y, Z), AIR_HU, np.float32)
    vol[5 : X - 5, 5 : Y - 5, :] = 40.0
    lbl = np.zeros((X, Y, Z), np.uint8)
    annotated = [0, 2, 3]
    for z in annotated:
        lbl[X // 5 : X // 2, Y // 5 : Y // 2, z] = 1  # large organ
        lbl[X // 2 + 5 : X // 2 + 25, Y // 2 : Y // 2 + 20, z] = 2  # medium
        lbl[X // 5 : X // 5 + 6, Y - 20 : Y - 14, z] = 3  # small: 6 x 6 px
    out = preprocessing()(ct_item(save_nifti(tmp_path / "img.nii.gz", vol), save_nifti(tmp_path / "lbl.nii.gz", lbl)))
    got = np.asarray(out["label"])
    assert got.dtype == np.uint8
    assert got.shape == (1, 256, 256, len(annotated))
    assert set(np.unique(got).tolist()) == set(np.unique(lbl).tolist()) == {0, 1, 2, 3}
    for k, z in enumerate(annotated):
        assert set(np.unique(got[0, ..., k]).tolist()) == set(np.unique(lbl[..., z]).tolist())
    # nearest neighbour sampled at pixel centres: out[o] = in[floor((o + 0.5) * n_in / n_out)]
    ix, iy = nearest_exact_index(X, 256), nearest_exact_index(Y, 256)
    np.testing.assert_array_equal(got[0], lbl[np.ix_(ix, iy, annotated)])
    img = np.asarray(out["image"])
    assert img.dtype == np.uint8 and img.shape == (1, 256, 256, len(annotated))


def test_resize_anti_aliases_an_axis_that_shrinks_while_the_other_grows():
    """Stripes at the Nyquist frequency along x (0, 1, 0, 1, ...), x shrinking 768 → 256 while y
    grows 64 → 256: 256 pixels cannot hold the stripes, so an anti-aliased resize leaves their mean,
    0.5; plain bilinear samples every third column and keeps full-contrast false stripes."""
    stripes = (np.arange(768) % 2).astype(np.float32)
    image = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(stripes[:, None, None], (768, 64, 2))))[None]
    out = np.asarray(ResizeSlicesd("image", size=256)({"image": image})["image"])[0]
    assert out.shape == (256, 256, 2)
    assert abs(out.mean() - 0.5) < 0.01 and out.std() < 0.02


# --------------------------------------------------------------------------------------------
# 6. Orientation and geometry end to end
# --------------------------------------------------------------------------------------------


def test_preprocessing_reorients_lps_nifti_to_ras(tmp_path):
    """LPS affine: array index i grows towards the patient's Left, j towards Posterior, k Superior."""
    X, Y, Z = 40, 36, 10
    spacing = (0.8, 0.9, 2.5)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [30.0, 20.0, -50.0]
    assert nib.aff2axcodes(affine) == ("L", "P", "S")

    hu_r, hu_a, hu_s = 180.0, 130.0, -50.0
    assert_no_rounding_tie([BODY_HU, hu_r, hu_a, hu_s])
    vol = np.full((X, Y, Z), AIR_HU, np.float32)
    vol[4:36, 4:32, :] = BODY_HU
    vol[6:12, 15:21, :] = hu_r  # low i = patient's Right
    vol[17:23, 6:12, :] = hu_a  # low j = Anterior
    vol[17:23, 20:28, 7:10] = hu_s  # high k = Superior
    out = preprocessing()(ct_item(save_nifti(tmp_path / "lps.nii.gz", vol, affine)))

    img = np.asarray(out["image"])
    assert img.dtype == np.uint8 and img.shape == (1, 256, 256, Z)
    assert out["slice_indices"] == list(range(Z))
    geo = out["image_geometry"]
    assert geo["spacing"] == pytest.approx(list(spacing), rel=1e-6)
    assert geo["matrix"] == [X, Y, Z]

    # RAS index i' = X-1-i, j' = Y-1-j, k' = k
    def region(i0, i1, j0, j1):  # original half-open ranges -> output pixel grid
        oi = interior_out_pixels(X - i1, X - 1 - i0, X, 256)
        oj = interior_out_pixels(Y - j1, Y - 1 - j0, Y, 256)
        return np.ix_(oi, oj)

    r = img[0][region(6, 12, 15, 21)]
    a = img[0][region(17, 23, 6, 12)]
    s = img[0][region(17, 23, 20, 28)]
    assert np.all(r == window_q(hu_r))
    assert np.all(a == window_q(hu_a))
    assert np.all(s[..., 7:10] == window_q(hu_s)) and np.all(s[..., :7] == window_q(BODY_HU))
    # where the markers would be without the flips there is plain body
    assert np.all(
        img[0][np.ix_(interior_out_pixels(6, 11, X, 256), interior_out_pixels(15, 20, Y, 256))] == window_q(BODY_HU)
    )
    not_a = img[0][np.ix_(interior_out_pixels(17, 22, X, 256), interior_out_pixels(6, 11, Y, 256))]
    assert np.all(not_a[..., :7] == window_q(BODY_HU))
    # homogeneous body region far from the markers, and air outside the body
    body = img[0][region(26, 34, 24, 31)]
    assert np.all(body == window_q(BODY_HU))
    assert np.all(img[0, :8, :, :] == 0) and np.all(img[0, :, :8, :] == 0)


def test_preprocessing_permuted_flipped_nifti(tmp_path):
    """Axes stored as (P, L, I): RAS needs a permutation and three flips; spacing follows."""
    N0, N1, Z = 32, 32, 8
    affine = np.array(
        [
            [0.0, -0.9, 0.0, 10.0],  # array axis 1 -> towards Left, 0.9 mm
            [-0.7, 0.0, 0.0, 5.0],  # array axis 0 -> towards Posterior, 0.7 mm
            [0.0, 0.0, -3.0, 40.0],  # array axis 2 -> towards Inferior, 3.0 mm
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    assert nib.aff2axcodes(affine) == ("P", "L", "I")
    hu_m = 180.0
    vol = np.full((N0, N1, Z), AIR_HU, np.float32)
    vol[1:31, 1:31, :] = BODY_HU
    vol[2:6, 3:7, 1:3] = hu_m  # Anterior (low axis 0), Right (low axis 1), Superior (low axis 2)
    lbl = np.zeros(vol.shape, np.uint8)
    for z in (1, 2, 5):
        lbl[10:20, 8:12, z] = 1
    out = preprocessing(size=32)(
        ct_item(save_nifti(tmp_path / "img.nii.gz", vol, affine), save_nifti(tmp_path / "lbl.nii.gz", lbl, affine))
    )
    # RAS axes: R = flipped axis 1, A = flipped axis 0, S = flipped axis 2 (k' = Z-1-k)
    assert out["slice_indices"] == sorted(Z - 1 - z for z in (1, 2, 5)) == [2, 5, 6]
    geo = out["image_geometry"]
    assert geo["spacing"] == pytest.approx([0.9, 0.7, 3.0], rel=1e-6)
    assert geo["matrix"] == [N1, N0, Z]

    ras = vol.transpose(1, 0, 2)[::-1, ::-1, ::-1]
    ras_lbl = lbl.transpose(1, 0, 2)[::-1, ::-1, ::-1]
    # cross-check the hand-derived reorientation against nibabel's canonical (RAS+) view
    canon = nib.as_closest_canonical(nib.Nifti1Image(vol, affine))
    np.testing.assert_array_equal(np.asarray(canon.dataobj), ras)

    img = np.asarray(out["image"])
    assert img.dtype == np.uint8 and img.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(img[0], window_q(ras[..., [2, 5, 6]]))
    np.testing.assert_array_equal(np.asarray(out["label"])[0], ras_lbl[..., [2, 5, 6]])
    # marker: patient's right/anterior/superior -> high end of every RAS axis
    mi, mj, mk = np.nonzero(img[0] == window_q(hu_m))
    assert set(mi.tolist()) == {N1 - 1 - j for j in range(3, 7)}
    assert set(mj.tolist()) == {N0 - 1 - i for i in range(2, 6)}
    assert set(mk.tolist()) == {1, 2}  # kept slices 5 and 6 (= original 2 and 1)


# --------------------------------------------------------------------------------------------
# 7. NRRD (ITK) and DICOM series
# --------------------------------------------------------------------------------------------


def _lps_zyx_phantom(Z=6, Y=32, X=32) -> np.ndarray:
    """A (z, y, x) array in ITK/DICOM (LPS) order: x grows to the Left, y to Posterior, z Superior."""
    arr = np.full((Z, Y, X), AIR_HU, np.float32)
    for z in range(Z):
        arr[z, 2:30, 2:30] = BODY_HU + 12.0 * z
    arr[:, 12:20, 3:8] = 180.0  # low x: patient's Right
    arr[:, 3:7, 12:20] = 130.0  # low y: Anterior
    return arr


def _zyx_lps_to_ras(arr_zyx: np.ndarray) -> np.ndarray:
    """ras[i, j, k] = arr[k, Y-1-j, X-1-i]."""
    return arr_zyx.transpose(2, 1, 0)[::-1, ::-1, :]


def test_nrrd_loads_through_itk(tmp_path):
    import itk

    arr = _lps_zyx_phantom()
    Z, Y, X = arr.shape
    assert_no_rounding_tie(np.unique(arr))
    image = itk.image_from_array(arr)
    image.SetSpacing([0.7, 0.8, 2.0])  # x, y, z
    path = str(tmp_path / "vol.nrrd")
    itk.imwrite(image, path)

    out = preprocessing(size=32)(ct_item(path))
    assert out["slice_indices"] == list(range(Z))
    assert out["image_geometry"]["spacing"] == pytest.approx([0.7, 0.8, 2.0], rel=1e-6)
    assert out["image_geometry"]["matrix"] == [X, Y, Z]
    img = np.asarray(out["image"])
    assert img.dtype == np.uint8 and img.shape == (1, 32, 32, Z)
    np.testing.assert_array_equal(img[0], window_q(_zyx_lps_to_ras(arr)))
    # the right-side marker is at the high end of axis 0
    assert np.flatnonzero((img[0] == window_q(180.0)).any(axis=(1, 2))).min() > 16

    full = preprocessing()(ct_item(path))
    assert np.asarray(full["image"]).shape == (1, 256, 256, Z)


CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _write_ct_series(folder: Path, arr_zyx: np.ndarray, pixel_spacing=(0.6, 0.8), dz=2.5, slope=2.0, intercept=-1024.0):
    """One CT file per slice. ``arr_zyx[k]`` is slice k (rows = y, cols = x) in HU."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    Z, rows, cols = arr_zyx.shape
    order = np.random.default_rng(3).permutation(Z)  # file names unrelated to slice order
    today = datetime.date(2024, 1, 2).strftime("%Y%m%d")
    for k in range(Z):
        stored = (arr_zyx[k].astype(np.float64) - intercept) / slope
        assert np.array_equal(stored, np.round(stored)), "test set-up: HU must be representable"
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = generate_uid()
        path = folder / f"IM{int(order[k]):04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.Modality = "CT"
        ds.PatientName = "Phantom^Test"
        ds.PatientID = "PHANTOM1"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-100.0, -80.0, -30.0 + dz * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = list(pixel_spacing)  # [between rows (y), between columns (x)]
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.RescaleType = "HU"
        ds.PixelData = stored.astype("<i2").tobytes()
        ds.save_as(str(path), write_like_original=False)  # a valid DICOM file: preamble and file meta written
    return str(folder)


def test_dicom_series_folder_loads_as_3d_volume(tmp_path):
    arr = _lps_zyx_phantom(Z=5)
    Z, Y, X = arr.shape
    folder = _write_ct_series(tmp_path / "series", arr)

    loaded = LoadVolumed(("image", "label"), max_voxels=10**6)({"image": folder, "label": None})
    assert "label" not in loaded
    vol = as_np(loaded["image"])
    assert vol.shape == (X, Y, Z)  # one volume, slices stacked along the last axis
    np.testing.assert_allclose(vol, arr.transpose(2, 1, 0), rtol=0, atol=1e-3)  # HU via slope/intercept

    out = preprocessing(size=32)(ct_item(folder, ct_window=[50, 350]))
    assert out["slice_indices"] == list(range(Z))
    assert out["image_geometry"]["spacing"] == pytest.approx([0.8, 0.6, 2.5], rel=1e-5)
    assert out["image_geometry"]["matrix"] == [X, Y, Z]
    img = np.asarray(out["image"])
    assert img.dtype == np.uint8 and img.shape == (1, 32, 32, Z)
    assert_no_rounding_tie(np.unique(arr), 50, 350)
    np.testing.assert_array_equal(img[0], window_q(_zyx_lps_to_ras(arr), 50, 350))


# --------------------------------------------------------------------------------------------
# 8. Validation
# --------------------------------------------------------------------------------------------


def _good(shape=(1, 10, 10, 4)) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)


@pytest.mark.parametrize(
    "image,match",
    [
        (_good((1, 10, 10)), "2D"),
        (_good((3, 10, 10, 4)), "3 volumes"),
        (_good((1, 10, 10, 4, 2)), "4D"),
        (np.where(_good() == 5, np.nan, _good()).astype(np.float32), "NaN/Inf"),
        (np.where(_good() == 5, np.inf, _good()).astype(np.float32), "NaN/Inf"),
        (np.where(_good() == 5, -np.inf, _good()).astype(np.float32), "NaN/Inf"),
        (np.full((1, 10, 10, 4), -1000.0, np.float32), "constant"),
    ],
)
def test_validate_rejects(image, match):
    with pytest.raises(VolumeError, match=match) as err:
        ValidateVolumed("image", label_key="label")({"image": torch.from_numpy(image.copy())})
    assert not isinstance(err.value, NoSlicesError)


def test_validate_label_shape_mismatch_and_valid_pass():
    image = torch.from_numpy(_good())
    with pytest.raises(VolumeError, match="label shape"):
        ValidateVolumed("image", label_key="label")({"image": image, "label": torch.zeros(1, 10, 10, 5)})
    ok = ValidateVolumed("image", label_key="label")({"image": image, "label": torch.zeros(1, 10, 10, 4)})
    assert ok["image"] is image


def _body_volume(shape=(20, 20, 6)) -> np.ndarray:
    vol = np.full(shape, AIR_HU, np.float32)
    vol[3:17, 3:17, ...] = BODY_HU
    return vol


@pytest.mark.parametrize(
    "case",
    ["2d", "4d_three_volumes", "nan", "inf", "constant", "label_mismatch"],
)
def test_preprocessing_rejects_invalid_files(tmp_path, case):
    label = None
    if case == "2d":
        image = _body_volume()[..., 0]
    elif case == "4d_three_volumes":
        image = np.stack([_body_volume()] * 3, axis=-1)
    elif case in ("nan", "inf"):
        image = _body_volume()
        image[5, 5, 2] = np.nan if case == "nan" else np.inf
    elif case == "constant":
        image = np.full((20, 20, 6), 35.0, np.float32)
    else:
        image = _body_volume()
        label = save_nifti(tmp_path / "lbl.nii.gz", np.ones((20, 20, 5), np.uint8))
    item = ct_item(save_nifti(tmp_path / "img.nii.gz", image), label)
    cause = pipeline_error(item)
    assert isinstance(cause, VolumeError) and not isinstance(cause, NoSlicesError), repr(cause)


def test_preprocessing_accepts_trailing_singleton_dimension(tmp_path):
    vol = _body_volume((20, 20, 6))
    assert_no_rounding_tie([BODY_HU])
    out = preprocessing()(ct_item(save_nifti(tmp_path / "img.nii.gz", vol[..., None])))
    img = np.asarray(out["image"])
    assert img.dtype == np.uint8 and img.shape == (1, 256, 256, 6)
    assert out["image_geometry"]["matrix"] == [20, 20, 6]
    oi = interior_out_pixels(3, 16, 20, 256)
    assert np.all(img[0][np.ix_(oi, oi)] == window_q(BODY_HU))


# --------------------------------------------------------------------------------------------
# small pieces: quantisation and label casting
# --------------------------------------------------------------------------------------------


def test_quantize_uint8_rounds_and_clips():
    x = np.array([-0.5, 0.0, 0.4 / 255, 0.6 / 255, 100.4 / 255, 0.5, 254.6 / 255, 1.0, 3.0], np.float32)
    out = QuantizeUint8d("image")({"image": torch.from_numpy(x)})["image"]
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 0, 1, 100, 128, 255, 255, 255]


def test_cast_label_rounds_and_refuses_out_of_range():
    out = CastLabeld("label")({"label": torch.tensor([0.0, 1.0, 2.9999, 255.0])})["label"]
    assert out.dtype == np.uint8 and out.tolist() == [0, 1, 3, 255]
    for bad in ([0.0, 256.0], [-1.0, 2.0]):
        with pytest.raises(VolumeError):
            CastLabeld("label")({"label": torch.tensor(bad)})


@pytest.mark.parametrize("shape", [(768, 200), (1024, 128), (512, 200), (300, 256), (512, 512), (96, 128)])
def test_resize_keeps_a_constant_slice_constant_to_its_borders(shape):
    """Anatomy can touch the field of view's edge: no border row may darken (MONAI's Gaussian
    anti-aliasing padded with zeros and dimmed the outer rows of a 768 × 200 slice to 0.93)."""
    image = torch.full((1, *shape, 2), 0.8)
    out = np.asarray(ResizeSlicesd("image", size=256)({"image": image})["image"])
    assert out.shape == (1, 256, 256, 2)
    np.testing.assert_allclose(out, 0.8, atol=1e-5)

"""Known-answer tests for :mod:`medvar_bundle.io`: NIfTI geometry, HU inverse window, PNG writers.

Expected values come from first principles (field of view = spacing × matrix, the CT window
formula applied by the real forward transforms of :mod:`medvar_bundle.data.transforms`, exact
2×2 area averages) on small synthetic arrays built here.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import medvar_bundle.visualize as visualize
from medvar_bundle.data.transforms import NormalizeByModalityd, QuantizeUint8d
from medvar_bundle.io import (
    check_writable,
    output_geometry,
    save_progression,
    save_sample_grid,
    slice_stack_affine,
    to_intensity,
    write_slice_stack,
)

CT_ENTRY = {"id": 0, "modality": "CT", "spacing": [0.8, 0.9, 5.0], "matrix": [512, 400, 30], "ct_window": [40.0, 400.0]}
MR_ENTRY = {"id": 1, "modality": "MR", "spacing": [1.0, 1.2, 3.0], "matrix": [48, 40, 20], "ct_window": None}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def forward_u8(hu: np.ndarray, window) -> np.ndarray:
    """HU → uint8 with the pipeline's own transforms (CT window, then rounding to 8 bits)."""
    item = {"image": np.asarray(hu, np.float32)[None], "modality": "CT", "ct_window": window}
    d = NormalizeByModalityd("image")(item)
    return QuantizeUint8d("image")(d)["image"][0]


def fov_corners(img: nib.Nifti1Image) -> np.ndarray:
    """World (mm) coordinates of the outer voxel edges of the in-plane field of view, ``(2, 2)``."""
    x, y = img.shape[:2]
    corners = np.array([[-0.5, -0.5, 0.0, 1.0], [x - 0.5, y - 0.5, 0.0, 1.0]])
    return (img.affine @ corners.T).T[:, :2]


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------


def test_slice_stack_affine_centres_the_plane_and_starts_at_z0():
    aff = slice_stack_affine([0.5, 0.6, 2.0], (4, 6))
    np.testing.assert_allclose(np.diag(aff), [0.5, 0.6, 2.0, 1.0])
    np.testing.assert_allclose(aff[:3, 3], [-0.75, -1.5, 0.0])  # -(n-1)/2 * spacing
    np.testing.assert_allclose(aff @ [1.5, 2.5, 3.0, 1.0], [0.0, 0.0, 6.0, 1.0])  # plane centre, slice 3
    assert nib.aff2axcodes(aff) == ("R", "A", "S")
    with pytest.raises(ValueError, match="spacing"):
        slice_stack_affine([1.0, 0.0, 1.0], (4, 4))


def test_output_geometry_keeps_the_median_field_of_view():
    spacing, matrix = output_geometry(CT_ENTRY, size=256)
    np.testing.assert_allclose(spacing, [0.8 * 512 / 256, 0.9 * 400 / 256, 5.0])  # 1.6, 1.40625, 5
    assert matrix.tolist() == [256, 256, 30]
    with pytest.raises(ValueError, match="spacing"):
        output_geometry({**CT_ENTRY, "spacing": None})


# --------------------------------------------------------------------------------------------
# intensities
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [(40.0, 400.0), (-600.0, 1500.0), (40.0, 80.0)])
def test_hu_inverse_window_round_trips_the_forward_transform(window):
    center, width = window
    lo, hi = center - width / 2, center + width / 2
    hu = np.linspace(lo, hi, 1001).reshape(1, 7, 143)  # inside the window, every 8-bit level hit
    u8 = forward_u8(hu, list(window))
    assert u8.dtype == np.uint8 and u8.min() == 0 and u8.max() == 255
    back = to_intensity(u8, {"modality": "CT", "ct_window": list(window)})
    assert back.dtype == np.int16 and back.shape == hu.shape
    step = width / 255.0
    # half a quantisation step from the 8-bit rounding, half a HU from rounding to int16
    # half a quantisation step from the 8-bit rounding plus half a HU from rounding to int16:
    # within one step whenever the window is at least 255 HU wide
    assert np.abs(back - hu).max() <= step / 2 + 0.5 + 1e-6
    if width >= 255:
        assert np.abs(back - hu).max() <= step
    # the end points are exact, and clipped values come back at the window edges
    ends = to_intensity(np.array([0, 255], np.uint8), {"modality": "CT", "ct_window": list(window)})
    assert ends.tolist() == [round(lo), round(hi)]
    outside = forward_u8(np.array([[[lo - 500.0, hi + 500.0]]]), list(window))
    clipped = to_intensity(outside, {"modality": "CT", "ct_window": list(window)})
    assert clipped.ravel().tolist() == [round(lo), round(hi)]


def test_to_intensity_mr_keeps_uint8_and_refuses_other_types():
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    out = to_intensity(u8, MR_ENTRY)
    assert out.dtype == np.uint8 and np.array_equal(out, u8) and out is not u8
    with pytest.raises(ValueError, match="uint8"):
        to_intensity(u8.astype(np.float32), MR_ENTRY)
    with pytest.raises(ValueError, match="modality"):
        to_intensity(u8, {"modality": "PET"})


# --------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------


def test_ct_stack_geometry_orientation_and_header(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 32, 32), dtype=np.uint8)
    images[0, 2, 5] = 255  # a marker near the patient's left (low x), posterior (low y)
    path = write_slice_stack(images, CT_ENTRY, tmp_path / "out" / "ct.nii.gz")
    assert path == tmp_path / "out" / "ct.nii.gz" and not list(path.parent.glob(".*"))  # no temp file left
    img = nib.load(path)
    assert img.shape == (32, 32, 3)
    np.testing.assert_allclose(img.header.get_zooms(), [0.8 * 512 / 32, 0.9 * 400 / 32, 5.0])
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert img.get_data_dtype() == np.int16
    data = np.asanyarray(img.dataobj)
    assert data.dtype == np.int16
    np.testing.assert_array_equal(data, np.moveaxis(to_intensity(images, CT_ENTRY), 0, -1))
    assert data[2, 5, 0] == 240  # 255 → centre + width/2
    x_mm, y_mm, z_mm = (img.affine @ [2, 5, 0, 1])[:3]
    assert x_mm < 0 and y_mm < 0 and z_mm == 0  # left of and behind the centred origin, first slice
    np.testing.assert_allclose(fov_corners(img), [[-0.8 * 512 / 2, -0.9 * 400 / 2], [0.8 * 512 / 2, 0.9 * 400 / 2]])
    hdr = img.header
    assert hdr.get_xyzt_units()[0] == "mm"
    assert int(hdr["qform_code"]) == 1 and int(hdr["sform_code"]) == 1
    assert (float(hdr["cal_min"]), float(hdr["cal_max"])) == (-160.0, 240.0)
    assert b"synthetic" in hdr["descrip"].tobytes()


def test_mr_stack_is_uint8_and_unchanged(tmp_path):
    images = np.arange(2 * 16 * 16, dtype=np.int64).reshape(2, 16, 16).astype(np.uint8)
    img = nib.load(write_slice_stack(images, MR_ENTRY, tmp_path / "mr.nii.gz"))
    assert img.shape == (16, 16, 2) and img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.header.get_zooms(), [1.0 * 48 / 16, 1.2 * 40 / 16, 3.0])
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.moveaxis(images, 0, -1))


def test_resample_original_restores_matrix_and_spacing_over_the_same_fov(tmp_path):
    # upsampling 32×32 → 48×40 (bilinear): a constant slice stays exactly constant
    images = np.stack([np.full((32, 32), v, np.uint8) for v in (0, 100, 255)])
    entry = {**CT_ENTRY, "spacing": [0.7, 0.8, 3.0], "matrix": [48, 40, 20]}
    plain = nib.load(write_slice_stack(images, entry, tmp_path / "plain.nii.gz"))
    orig = nib.load(write_slice_stack(images, entry, tmp_path / "orig.nii.gz", resample_original=True))
    assert orig.shape == (48, 40, 3) and orig.get_data_dtype() == np.int16
    np.testing.assert_allclose(orig.header.get_zooms(), [0.7, 0.8, 3.0])
    np.testing.assert_allclose(fov_corners(orig), fov_corners(plain))
    np.testing.assert_allclose(fov_corners(orig), [[-0.7 * 24, -0.8 * 20], [0.7 * 24, 0.8 * 20]])
    assert nib.aff2axcodes(orig.affine) == ("R", "A", "S")
    data = np.asanyarray(orig.dataobj)
    for k, v in enumerate((0, 100, 255)):
        assert np.all(data[..., k] == round(-160 + v * 400 / 255))

    # downsampling 32×32 → 16×16 (area): exact 2×2 block means
    rng = np.random.default_rng(1)
    mr = rng.integers(0, 256, size=(2, 32, 32), dtype=np.uint8)
    small_entry = {**MR_ENTRY, "matrix": [16, 16, 20]}
    small = nib.load(write_slice_stack(mr, small_entry, tmp_path / "small.nii.gz", resample_original=True))
    assert small.shape == (16, 16, 2) and small.get_data_dtype() == np.uint8
    np.testing.assert_allclose(small.header.get_zooms(), [1.0, 1.2, 3.0])
    expected = np.rint(mr.astype(np.float64).reshape(2, 16, 2, 16, 2).mean(axis=(2, 4))).astype(np.uint8)
    np.testing.assert_array_equal(np.asanyarray(small.dataobj), np.moveaxis(expected, 0, -1))

    # mixed 32×32 → 16×48 (one axis shrinks, one grows): constants stay constant, edges included
    mixed_entry = {**MR_ENTRY, "matrix": [16, 48, 20]}
    mixed = nib.load(write_slice_stack(images, mixed_entry, tmp_path / "mixed.nii.gz", resample_original=True))
    assert mixed.shape == (16, 48, 3)
    np.testing.assert_allclose(mixed.header.get_zooms(), [1.0, 1.2, 3.0])
    for k, v in enumerate((0, 100, 255)):
        assert np.all(np.asanyarray(mixed.dataobj)[..., k] == v)


def test_write_slice_stack_refuses_bad_input(tmp_path):
    good = np.zeros((2, 16, 16), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        write_slice_stack(good.astype(np.float32), CT_ENTRY, tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match=r"\(N, S, S\)"):
        write_slice_stack(np.zeros((2, 16, 8), np.uint8), CT_ENTRY, tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match=".nii.gz"):
        write_slice_stack(good, CT_ENTRY, tmp_path / "a.png")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# folders
# --------------------------------------------------------------------------------------------


def test_check_writable_creates_folders_and_names_unwritable_ones(tmp_path):
    target = tmp_path / "new" / "nested"
    check_writable(target)
    assert target.is_dir() and not list(target.iterdir())  # the probe file is gone

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    bad = blocker / "out"
    with pytest.raises(PermissionError) as exc:
        check_writable(bad)
    message = str(exc.value)
    assert message.startswith(f"output folder {bad} is not writable: ") and "\n" not in message

    # a read-only folder; root ignores the mode bits, so there it is writable and must pass
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.geteuid() == 0:
            check_writable(locked)
        else:
            with pytest.raises(PermissionError, match=f"output folder {locked} is not writable"):
                check_writable(locked / "sub")
    finally:
        locked.chmod(0o700)


# --------------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------------


@pytest.fixture
def captured_figures(monkeypatch):
    """Record each figure's panels (displayed arrays and titles) before it is saved."""
    figures: list[list[tuple[np.ndarray | None, str]]] = []
    original = visualize.save_figure

    def spy(fig, out, dpi=100):
        figures.append([(ax.images[0].get_array().data if ax.images else None, ax.get_title()) for ax in fig.axes])
        return original(fig, out, dpi)

    monkeypatch.setattr(visualize, "save_figure", spy)
    monkeypatch.setattr("medvar_bundle.io.save_figure", spy)
    return figures


def png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size  # (width, height)


def test_save_sample_grid_layout_and_radiological_display(tmp_path, captured_figures):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(6, 16, 16), dtype=np.uint8)
    path = save_sample_grid(images, tmp_path / "grid.png", title="head_ct", nrow=3)
    assert path == tmp_path / "grid.png"
    assert png_size(path) == (480, 340)  # 3 columns × 1.6 in, 2 rows × 1.7 in, 100 dpi
    panels = captured_figures[-1]
    # anterior (high y) at the top, the patient's right (high x) on the viewer's left
    np.testing.assert_array_equal(panels[0][0], images[0][::-1, ::-1].T)
    assert panels[0][0][0, 0] == images[0][15, 15]
    # default: ceil(sqrt(5)) = 3 per row → 2 rows
    assert png_size(save_sample_grid(images[:5], tmp_path / "grid5.png")) == (480, 340)


def test_sample_grids_show_true_proportions_and_their_whole_title(tmp_path, monkeypatch):
    """A lower-leg field of 500 × 203 mm on a square 256² grid was drawn square (2.46 times too
    tall), and a title wider than a grid of one to three columns was cut off at both sides."""
    shown = []
    original = visualize.save_figure

    def spy(fig, out, dpi=100):
        fig.canvas.draw()
        (title,) = fig.texts  # the suptitle
        shown.append(([ax.get_aspect() for ax in fig.axes if ax.images], title.get_window_extent(), fig.bbox))
        return original(fig, out, dpi)

    monkeypatch.setattr("medvar_bundle.io.save_figure", spy)
    monkeypatch.setattr(visualize, "save_figure", spy)
    images = np.zeros((2, 16, 16), np.uint8)
    spacing = (500 / 16, 203 / 16, 2.0)  # x, y in mm
    title = "leg_mr: MedVAR samples (cfg 1, temperature 0.6, final temperature 0.2, seed 0)"
    save_sample_grid(images, tmp_path / "grid.png", title=title, spacing=spacing)
    save_progression([images[:, :4, :4], images], tmp_path / "progression.png", title=title, spacing=spacing)
    save_sample_grid(images, tmp_path / "square.png", title="t")
    for aspects, title_box, figure_box in shown[:2]:
        assert aspects == pytest.approx([203 / 500] * len(aspects))  # display rows run along y
        assert figure_box.x0 <= title_box.x0 and title_box.x1 <= figure_box.x1
        assert figure_box.y0 <= title_box.y0 and title_box.y1 <= figure_box.y1
    assert shown[2][0] == [1.0, 1.0]


def test_save_progression_one_row_per_sample_one_column_per_scale(tmp_path, captured_figures):
    rng = np.random.default_rng(3)
    patch_nums = (1, 2, 4, 16)
    stages = [rng.integers(0, 256, size=(2, 16, 16), dtype=np.uint8) for _ in patch_nums]
    path = save_progression(stages, tmp_path / "progression.png", patch_nums=patch_nums)
    width, height = png_size(path)
    assert (width, height) == (640, 340)  # 4 scales × 1.6 in, 2 samples × 1.7 in
    panels = captured_figures[-1]
    titles = [t for _, t in panels if t]
    assert titles == ["scale 1 (1×1)", "scale 2 (2×2)", "scale 3 (4×4)", "scale 4 (16×16)"]
    # axes are created row-major: panel (sample i, scale k) is index i * K + k
    np.testing.assert_array_equal(panels[1 * 4 + 2][0], stages[2][1][::-1, ::-1].T)

    plain = save_progression(stages[:3], tmp_path / "plain.png")
    assert png_size(plain) == (480, 340)
    assert [t for _, t in captured_figures[-1] if t] == ["scale 1", "scale 2", "scale 3"]
    with pytest.raises(ValueError, match="patch_nums"):
        save_progression(stages, tmp_path / "bad.png", patch_nums=(1, 2))

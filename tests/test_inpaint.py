"""`medvar inpaint`: volumes in, volumes out — the input's grid and dtype, exact voxels outside the region."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medvar_bundle.cli import main
from medvar_bundle.inpaint import feather_weights

# an LPI-like grid with permuted axes: array axes are (y, x, z) with x and z flipped, so the RAS
# reorientation inside the pipeline permutes and flips, and its inverse must undo both exactly
AFFINE = np.array([[0.0, -0.9, 0.0, 40.0], [0.8, 0.0, 0.0, -30.0], [0.0, 0.0, -2.5, 12.0], [0.0, 0.0, 0.0, 1.0]])
SHAPE = (40, 36, 8)


def ct_phantom(rng: np.random.Generator) -> np.ndarray:
    """int16 HU: air −1000 around an ellipse of soft tissue (40 HU) holding a bright blob (300 HU), with noise."""
    a, b = np.meshgrid(np.linspace(-1, 1, SHAPE[0]), np.linspace(-1, 1, SHAPE[1]), indexing="ij")
    body = (a / 0.8) ** 2 + (b / 0.7) ** 2 < 1
    blob = (a - 0.2) ** 2 + (b + 0.1) ** 2 < 0.08
    sl = np.where(body, 40.0, -1000.0) + np.where(blob & body, 260.0, 0.0)
    vol = np.repeat(sl[..., None], SHAPE[2], axis=2) + rng.normal(0, 15, SHAPE) * body[..., None]
    return np.rint(vol).astype(np.int16)


@pytest.fixture
def ct_case(tmp_path):
    """A CT volume and a box mask in array slices 3..4 (both on AFFINE), as NIfTI files."""
    rng = np.random.default_rng(0)
    image, mask = tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(ct_phantom(rng), AFFINE), image)
    m = np.zeros(SHAPE, np.uint8)
    m[12:26, 10:22, 3:5] = 1
    nib.save(nib.Nifti1Image(m, AFFINE), mask)
    return image, mask, m.astype(bool)


def run_inpaint(model_path, image, mask, out, *extra) -> int:
    argv = ["inpaint", "--model", str(model_path), "--image", str(image), "--mask", str(mask),
            "--dataset", "abdomen_ct", "--out", str(out), "--quiet", "--feather", "0", *extra]  # fmt: skip
    return main(argv)


def test_inpainted_volume_keeps_grid_dtype_and_every_voxel_outside(model_path, ct_case, tmp_path):
    image, mask, region = ct_case
    assert run_inpaint(model_path, image, mask, tmp_path / "out") == 0
    src, out = nib.load(image), nib.load(tmp_path / "out" / "ct_inpainted.nii.gz")
    assert out.shape == src.shape and np.array_equal(out.affine, src.affine)
    assert out.get_data_dtype() == src.get_data_dtype() == np.int16
    before, after = np.asarray(src.dataobj), np.asarray(out.dataobj)
    assert np.array_equal(after[~region], before[~region])
    inside = after[region]
    assert np.count_nonzero(inside != before[region]) > 0.5 * region.sum()
    # re-drawn CT comes back through the inverse of the soft-tissue window (40, 400): [-160, 240] HU
    assert inside.min() >= -160 and inside.max() <= 240
    summary = json.loads((tmp_path / "out" / "inpaint.json").read_text())
    assert summary["slices"] == 2 and summary["region_voxels"] == region.sum()
    assert summary["intensity_range"] == [-160.0, 240.0]
    assert (tmp_path / "out" / "ct_inpainted.png").stat().st_size > 0


def test_a_scaled_integer_ct_keeps_its_dtype_scaling_and_every_voxel_outside(model_path, tmp_path):
    """uint16 stored values with scl_inter −1024 (common for CT): the result is the same kind of file,
    every voxel outside the mask comes back exactly, and the re-drawn ones are whole HU."""
    rng = np.random.default_rng(0)
    stored = np.rint(ct_phantom(rng) + 1024).astype(np.uint16)
    image = tmp_path / "scaled.nii.gz"
    nii = nib.Nifti1Image(stored, AFFINE)
    nii.header.set_slope_inter(1.0, -1024.0)
    nib.save(nii, image)
    region = np.zeros(SHAPE, bool)
    region[12:26, 10:22, 3:5] = True
    mask = _save(tmp_path / "mask.nii.gz", region.astype(np.uint8))
    assert run_inpaint(model_path, image, mask, tmp_path / "out") == 0
    src, out = nib.load(image), nib.load(tmp_path / "out" / "scaled_inpainted.nii.gz")
    assert out.get_data_dtype() == np.uint16 and (out.dataobj.slope, out.dataobj.inter) == (1.0, -1024.0)
    before, after = src.get_fdata(), out.get_fdata()
    assert np.array_equal(after[~region], before[~region])
    assert np.count_nonzero(after[region] != before[region]) > 0.5 * region.sum()
    assert np.array_equal(after, np.rint(after)) and after[region].min() >= -160 and after[region].max() <= 240
    # the summary counts the voxels that differ in the file, not re-drawn values the uint16 grid rounds back
    summary = json.loads((tmp_path / "out" / "inpaint.json").read_text())
    assert summary["changed_voxels"] == np.count_nonzero(after != before)


def test_an_nrrd_input_comes_back_as_nifti_in_scanner_millimetres(model_path, tmp_path):
    """A volume without a NIfTI header (NRRD here, a DICOM series alike) was written with qform code 0
    and no spatial unit: the result must say millimetres and scanner space, on the input's grid."""
    import nrrd  # pynrrd, installed with the test extras (monailabel needs it)

    rng = np.random.default_rng(0)
    header = {"space": "left-posterior-superior", "space directions": np.diag([0.8, 0.9, 2.5]),
              "space origin": np.array([10.0, 20.0, 30.0])}  # fmt: skip
    image, mask = tmp_path / "ct.nrrd", tmp_path / "mask.nrrd"
    nrrd.write(str(image), ct_phantom(rng), header)
    region = np.zeros(SHAPE, np.uint8)
    region[12:26, 10:22, 3:5] = 1
    nrrd.write(str(mask), region, header)
    assert run_inpaint(model_path, image, mask, tmp_path / "out") == 0
    out = nib.load(tmp_path / "out" / "ct_inpainted.nii.gz")
    assert out.shape == SHAPE and int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 1
    assert out.header.get_xyzt_units()[0] == "mm"
    ras = np.diag([-0.8, -0.9, 2.5, 1.0])  # LPS directions and origin in RAS
    ras[:3, 3] = [-10.0, -20.0, 30.0]
    np.testing.assert_allclose(out.get_qform(), ras, atol=1e-5)
    np.testing.assert_allclose(out.get_sform(), ras, atol=1e-5)
    before = ct_phantom(np.random.default_rng(0))
    assert np.array_equal(out.get_fdata()[region == 0], before[region == 0])


def test_same_seed_same_volume_other_seed_other_volume(model_path, ct_case, tmp_path):
    image, mask, region = ct_case
    volumes = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert run_inpaint(model_path, image, mask, tmp_path / name, "--seed", str(seed)) == 0
        volumes.append(np.asarray(nib.load(tmp_path / name / "ct_inpainted.nii.gz").dataobj))
    assert np.array_equal(volumes[0], volumes[1])
    assert not np.array_equal(volumes[0][region], volumes[2][region])


def test_outpaint_keeps_the_mask_and_redraws_around_it(model_path, ct_case, tmp_path):
    image, mask, region = ct_case
    assert run_inpaint(model_path, image, mask, tmp_path / "out", "--outpaint", "--edit-dataset", "brain_mr") == 0
    before = np.asarray(nib.load(image).dataobj)
    after = np.asarray(nib.load(tmp_path / "out" / "ct_inpainted.nii.gz").dataobj)
    assert np.array_equal(after[region], before[region])
    assert np.array_equal(after[..., [0, 1, 2, 5, 6, 7]], before[..., [0, 1, 2, 5, 6, 7]])  # slices the mask misses
    around = ~region[..., 3:5]
    assert np.count_nonzero(after[..., 3:5][around] != before[..., 3:5][around]) > 0.5 * around.sum()
    summary = json.loads((tmp_path / "out" / "inpaint.json").read_text())
    assert summary["outpaint"] and summary["edit_dataset"] == "brain_mr"


def test_mr_float_volume_comes_back_in_its_own_range_and_dtype(model_path, tmp_path):
    rng = np.random.default_rng(1)
    vol = (ct_phantom(rng).astype(np.float32) + 1000.0) * 1.7  # MR-like: zero background, positive tissue
    image, mask = tmp_path / "mr.nii.gz", tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.0, 1.0])), image)
    m = np.zeros(SHAPE, np.uint8)
    m[15:25, 12:20, 2] = 1
    nib.save(nib.Nifti1Image(m, np.diag([1.0, 1.0, 2.0, 1.0])), mask)
    argv = ["inpaint", "--model", str(model_path), "--image", str(image), "--mask", str(mask), "--dataset", "brain_mr",
            "--out", str(tmp_path / "out"), "--quiet", "--feather", "0"]  # fmt: skip
    assert main(argv) == 0
    after = np.asarray(nib.load(tmp_path / "out" / "mr_inpainted.nii.gz").dataobj)
    assert after.dtype == np.float32
    region = m.astype(bool)
    assert np.array_equal(after[~region], vol[~region])
    lo, hi = np.percentile(vol[vol != 0], [0.5, 99.5])
    assert after[region].min() >= lo - 1e-3 and after[region].max() <= hi + 1e-3
    assert not np.array_equal(after[region], vol[region])


def test_feather_weights_known_answer():
    region = np.zeros((9, 9), bool)
    region[1:8, 1:8] = True  # a 7×7 square: border pixels are 1 px from outside, the centre 4 px
    w = feather_weights(region, 3)
    assert w[0, 0] == 0 and w[1, 4] == pytest.approx(1 / 3) and w[2, 4] == pytest.approx(2 / 3)
    assert w[3, 4] == 1 and w[4, 4] == 1
    assert np.array_equal(feather_weights(region, 0), region.astype(float))


def _save(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("shape", "not on the image's grid (shape"),
        ("affine", "not on the image's grid (its affine differs)"),
        ("empty", "empty mask"),
        ("full", "covers the whole volume"),
        ("dataset", "unknown dataset 'liver_ct'"),
        ("2d", "2D image"),
        ("4d", "4D image with 2 volumes"),
        ("mask values", "mask values 0..1000: a mask holds 0 (keep) and 1..255 (re-draw)"),
        ("air", "no body"),
    ],
)
def test_bad_input_is_one_line_naming_the_file_and_nothing_is_written(
    model_path, ct_case, tmp_path, capsys, case, message
):
    image, mask, region = ct_case
    named = mask
    dataset = "abdomen_ct"
    if case == "shape":
        mask = _save(tmp_path / "m.nii.gz", np.ones((40, 36, 7), np.uint8))
        named = mask
    elif case == "affine":
        mask = _save(tmp_path / "m.nii.gz", region.astype(np.uint8), AFFINE * [[1], [1], [1.01], [1]])
        named = mask
    elif case == "empty":
        mask = _save(tmp_path / "m.nii.gz", np.zeros(SHAPE, np.uint8))
        named = mask
    elif case == "full":
        mask = _save(tmp_path / "m.nii.gz", np.ones(SHAPE, np.uint8))
        named = mask
    elif case == "dataset":
        dataset, named = "liver_ct", model_path
    elif case == "2d":
        image = named = _save(tmp_path / "flat.nii.gz", np.zeros((40, 36), np.int16) + np.arange(36, dtype=np.int16))
    elif case == "4d":
        image = named = _save(tmp_path / "series.nii.gz", np.stack([ct_phantom(np.random.default_rng(2))] * 2, -1))
    elif case == "mask values":
        mask = named = _save(tmp_path / "m.nii.gz", region.astype(np.int16) * 1000)
    elif case == "air":  # no body for prepare's background removal: MONAI's Compose wrapped this one
        air = np.full(SHAPE, -1000, np.int16)
        air[0, 0, 0] = -999  # not constant
        image = named = _save(tmp_path / "air.nii.gz", air)
    out = tmp_path / "out"
    argv = ["inpaint", "--model", str(model_path), "--image", str(image), "--mask", str(mask), "--dataset", dataset,
            "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(named) in err and message in err, err
    assert not out.exists()


def test_the_figure_draws_the_volume_in_its_proportions(model_path, ct_case, tmp_path, monkeypatch):
    """RAS x runs along array axis 1 (0.9 mm) and y along axis 0 (0.8 mm): rows of the radiological
    display are y, so a pixel is 0.8 / 0.9 as tall as wide (the figure drew square pixels)."""
    import medvar_bundle.inpaint as inpaint_module

    aspects, original = [], inpaint_module.save_grid

    def spy(*args, aspect=1.0, **kwargs):
        aspects.append(aspect)
        return original(*args, aspect=aspect, **kwargs)

    monkeypatch.setattr(inpaint_module, "save_grid", spy)
    image, mask, _ = ct_case
    assert run_inpaint(model_path, image, mask, tmp_path / "out") == 0
    assert aspects == [pytest.approx(0.8 / 0.9)]

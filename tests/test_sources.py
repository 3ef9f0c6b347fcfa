"""Tests of where volumes come from: datalists and discovery of MSD / nnU-Net / plain / DICOM folders.

Discovery only looks at names and metadata, so most layouts below are built from empty files;
the DICOM series and the plain folder that are prepared end to end hold real (small) volumes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medvar_bundle.cli import main
from medvar_bundle.data import DatalistError, SliceStore, discover, load_datalist, prepare_store

SIZE = 64


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def touch(path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def ct_volume(shape=(48, 48, 10), hu: float = 40.0) -> np.ndarray:
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    body = ((x - (shape[0] - 1) / 2) / (0.38 * shape[0])) ** 2 + ((y - (shape[1] - 1) / 2) / (0.3 * shape[1])) ** 2 <= 1
    vol = np.full(shape, -1000.0, np.float32)
    vol[body] = hu
    return vol


def save_nifti(path, arr, spacing=(1.0, 1.0, 2.0)) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([*spacing, 1.0])), str(path))
    return path


def write_dicom_series(folder, n_slices=6, rows=40, cols=36, pixel_spacing=(0.8, 0.7), dz=2.5, modality="CT", hu=40.0):
    """A CT (or MR) series: one file per slice, air -1000 HU with an elliptic body of ``hu`` HU,
    stored as unsigned ``HU + 1024`` with RescaleSlope 1 / RescaleIntercept -1024."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    body = ((r - (rows - 1) / 2) / (0.38 * rows)) ** 2 + ((c - (cols - 1) / 2) / (0.3 * cols)) ** 2 <= 1
    hu_img = np.where(body, hu, -1000.0)
    stored = (hu_img + 1024).astype(np.uint16)
    for k in range(n_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice_{k:03d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = modality
        ds.PatientName, ds.PatientID = "Phantom^Test", "PHANTOM1"
        ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20240101", 1, k + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(k * dz)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = stored.tobytes()
        ds.save_as(str(path), write_like_original=False)  # a valid DICOM file: preamble and file meta written
    return folder


def by_image(items, root) -> dict:
    return {str(Path(it["image"]).relative_to(root)): it for it in items}


# ----------------------------------------------------------------------------------------------
# load_datalist
# ----------------------------------------------------------------------------------------------


def test_load_datalist_resolves_paths_relative_to_the_file(tmp_path, monkeypatch):
    sub = tmp_path / "lists"
    sub.mkdir()
    (sub / "corpus.json").write_text(
        json.dumps(
            {
                "training": [
                    {
                        "image": "imgs/a.nii.gz",
                        "label": "labs/a.nii.gz",
                        "dataset": "liver",
                        "modality": "CT",
                        "anatomy": "abdomen",
                        "ct_window": [50, 350],
                    },
                    "imgs/b.nii.gz",
                ],
                "validation": [{"image": "imgs/c.nii.gz", "modality": "MRI", "dataset": "brain"}],
                "test": [{"image": "../elsewhere/d.nii.gz", "modality": "T2", "dataset": "brain"}],
                "numTraining": 2,
            }
        )
    )
    other = tmp_path / "cwd"
    other.mkdir()
    monkeypatch.chdir(other)  # a relative datalist path; entries resolve against the file, not the cwd
    items = load_datalist(Path("..") / "lists" / "corpus.json")
    base = sub.resolve()
    assert [it["split"] for it in items] == ["training", "training", "validation", "test"]
    a, b, c, d = items
    assert a["image"] == str(base / "imgs" / "a.nii.gz")
    assert a["label"] == str(base / "labs" / "a.nii.gz")
    assert Path(a["image"]).is_absolute() and Path(b["image"]).is_absolute()
    assert (a["dataset"], a["modality"], a["anatomy"], a["ct_window"]) == ("liver", "CT", "abdomen", [50, 350])
    assert b["image"] == str(base / "imgs" / "b.nii.gz")
    assert b["label"] is None and b["dataset"] == "corpus"  # dataset defaults to the file's stem
    assert b["ct_window"] is None and b["anatomy"] == ""
    assert (c["dataset"], c["modality"], c["label"]) == ("brain", "MR", None)  # "MRI" -> "MR"
    assert d["modality"] == "MR"  # "T2" -> "MR"
    assert Path(d["image"]).resolve() == (tmp_path / "elsewhere" / "d.nii.gz").resolve()
    for it in items:
        assert set(it) == {"image", "label", "dataset", "modality", "anatomy", "split", "ct_window"}


def test_load_datalist_keeps_unknown_modality_for_the_report(tmp_path):
    (tmp_path / "dl.json").write_text(json.dumps({"training": [{"image": "x.nii.gz", "modality": "PET"}]}))
    assert load_datalist(tmp_path / "dl.json")[0]["modality"] == "PET"


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        (json.dumps({"images": ["a.nii.gz"]}), "training"),
        (json.dumps(["a.nii.gz"]), "training"),
    ],
)
def test_load_datalist_errors_name_the_file(tmp_path, content, words):
    path = tmp_path / "dl.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DatalistError) as info:
        load_datalist(path)
    assert str(path) in str(info.value) and words in str(info.value)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# discover: MSD
# ----------------------------------------------------------------------------------------------


def make_msd(root, name="Task03_Liver", modality="CT", cases=("liver_0", "liver_1", "liver_2"), tests=("liver_9",)):
    task = root / name
    for c in cases:
        touch(task / "imagesTr" / f"{c}.nii.gz")
        touch(task / "labelsTr" / f"{c}.nii.gz")
    for c in tests:
        touch(task / "imagesTs" / f"{c}.nii.gz")
    meta = {
        "name": name.split("_", 1)[1],
        "modality": {"0": modality},
        "labels": {"0": "background", "1": "liver"},
        "numTraining": len(cases),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
        "test": [f"./imagesTs/{c}.nii.gz" for c in tests],
    }
    (task / "dataset.json").write_text(json.dumps(meta))
    return task


def test_discover_msd(tmp_path):
    task = make_msd(tmp_path)
    for root in (tmp_path, task):  # a folder of tasks, or the task itself
        items = discover(root)
        got = by_image(items, task)
        assert set(got) == {
            "imagesTr/liver_0.nii.gz",
            "imagesTr/liver_1.nii.gz",
            "imagesTr/liver_2.nii.gz",
            "imagesTs/liver_9.nii.gz",
        }
        for c in ("liver_0", "liver_1", "liver_2"):
            it = got[f"imagesTr/{c}.nii.gz"]
            assert it["label"] == str(task / "labelsTr" / f"{c}.nii.gz")
            assert (it["dataset"], it["modality"], it["split"]) == ("Liver", "CT", "training")
        test = got["imagesTs/liver_9.nii.gz"]
        assert (test["label"], test["split"], test["modality"]) == (None, "test", "CT")
        assert all(Path(it["image"]).exists() for it in items)
    # an explicit modality overrides the metadata
    assert {it["modality"] for it in discover(task, modality="MR")} == {"MR"}


def test_discover_msd_mr_names_are_normalised(tmp_path):
    task = make_msd(tmp_path, name="Task01_BrainTumour", modality="FLAIR", cases=("BRATS_001",), tests=())
    (item,) = discover(task)
    assert item["modality"] == "MR" and item["dataset"] == "BrainTumour"


def test_discover_several_tasks_under_one_root(tmp_path):
    make_msd(tmp_path, "Task03_Liver", "CT", ("liver_0",), ())
    make_msd(tmp_path, "Task04_Hippocampus", "MRI", ("hippo_0", "hippo_1"), ())
    items = discover(tmp_path)
    assert sorted((it["dataset"], it["modality"]) for it in items) == [
        ("Hippocampus", "MR"),
        ("Hippocampus", "MR"),
        ("Liver", "CT"),
    ]


# ----------------------------------------------------------------------------------------------
# discover: nnU-Net raw
# ----------------------------------------------------------------------------------------------


def make_nnunet(
    root, name="Dataset002_Heart", channels=None, cases=("la_003", "la_004"), tests=("la_010",), unlabeled=()
):
    ds = root / name
    channels = channels or {"0": "MR"}
    for c in list(cases) + list(unlabeled):
        for ch in channels:
            touch(ds / "imagesTr" / f"{c}_{int(ch):04d}.nii.gz")
    for c in cases:
        touch(ds / "labelsTr" / f"{c}.nii.gz")
    for c in tests:
        for ch in channels:
            touch(ds / "imagesTs" / f"{c}_{int(ch):04d}.nii.gz")
    meta = {
        "channel_names": channels,
        "labels": {"background": 0, "heart": 1},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    (ds / "dataset.json").write_text(json.dumps(meta))
    return ds


def test_discover_nnunet(tmp_path):
    ds = make_nnunet(tmp_path)
    items = discover(tmp_path)
    got = by_image(items, ds)
    assert set(got) == {"imagesTr/la_003_0000.nii.gz", "imagesTr/la_004_0000.nii.gz", "imagesTs/la_010_0000.nii.gz"}
    for c in ("la_003", "la_004"):
        it = got[f"imagesTr/{c}_0000.nii.gz"]
        assert it["label"] == str(ds / "labelsTr" / f"{c}.nii.gz")  # case names may contain "_"
        assert (it["dataset"], it["modality"], it["split"]) == ("Dataset002_Heart", "MR", "training")
    test = got["imagesTs/la_010_0000.nii.gz"]
    assert (test["label"], test["split"]) == (None, "test")
    assert discover(ds) == items  # pointing at the dataset itself finds the same


def test_discover_nnunet_multichannel_and_missing_labels(tmp_path):
    ds = make_nnunet(tmp_path, "Dataset005_Prostate", {"0": "T2", "1": "ADC"}, ("prostate_00",), (), ("prostate_07",))
    items = discover(ds)
    got = by_image(items, ds)
    assert set(got) == {f"imagesTr/prostate_0{i}_000{ch}.nii.gz" for i in (0, 7) for ch in (0, 1)}
    assert got["imagesTr/prostate_00_0000.nii.gz"]["dataset"] == "Dataset005_Prostate_T2"
    assert got["imagesTr/prostate_00_0001.nii.gz"]["dataset"] == "Dataset005_Prostate_ADC"
    assert {it["modality"] for it in items} == {"MR"}
    label = str(ds / "labelsTr" / "prostate_00.nii.gz")
    assert got["imagesTr/prostate_00_0000.nii.gz"]["label"] == label
    assert got["imagesTr/prostate_00_0001.nii.gz"]["label"] == label
    assert got["imagesTr/prostate_07_0000.nii.gz"]["label"] is None  # no labelsTr file: no label


def test_discover_nnunet_ct(tmp_path):
    make_nnunet(tmp_path, "Dataset003_Liver", {"0": "CT"}, ("liver_1",), ())
    (item,) = discover(tmp_path)
    assert item["modality"] == "CT" and item["dataset"] == "Dataset003_Liver"


# ----------------------------------------------------------------------------------------------
# discover: plain folders
# ----------------------------------------------------------------------------------------------


def test_discover_plain_folder_pairs_seg_labels(tmp_path):
    root = tmp_path / "scans"
    for name in ("a.nii.gz", "a_seg.nii.gz", "b.nii.gz", "c.nii", "c_label.nii", "d.mha", "notes.txt", "e_seg.nii.gz"):
        touch(root / name)
    items = discover(root, modality="CT")
    got = by_image(items, root)
    # e_seg has no image: it is a label, not a volume
    assert set(got) == {"a.nii.gz", "b.nii.gz", "c.nii", "d.mha"}
    assert got["a.nii.gz"]["label"] == str(root / "a_seg.nii.gz")
    assert got["c.nii"]["label"] == str(root / "c_label.nii")
    assert got["b.nii.gz"]["label"] is None and got["d.mha"]["label"] is None
    assert {it["dataset"] for it in items} == {"scans"}
    assert {it["modality"] for it in items} == {"CT"}
    assert {it["split"] for it in items} == {"training"}
    # without a modality the items carry none (the pipeline reports them)
    assert {it["modality"] for it in discover(root)} == {None}


def test_discover_plain_subfolders_are_datasets(tmp_path):
    for ds, name in (("ds_a", "x"), ("ds_b", "y")):
        touch(tmp_path / ds / f"{name}.nii.gz")
        touch(tmp_path / ds / f"{name}_mask.nii.gz")
    touch(tmp_path / "ds_b" / "nested" / "z.nrrd")
    items = discover(tmp_path, modality="MR")
    got = by_image(items, tmp_path)
    assert set(got) == {"ds_a/x.nii.gz", "ds_b/y.nii.gz", "ds_b/nested/z.nrrd"}
    assert got["ds_a/x.nii.gz"]["dataset"] == "ds_a" and got["ds_b/y.nii.gz"]["dataset"] == "ds_b"
    assert got["ds_b/nested/z.nrrd"]["dataset"] == "ds_b"
    assert got["ds_a/x.nii.gz"]["label"] == str(tmp_path / "ds_a" / "x_mask.nii.gz")


def test_discover_errors(tmp_path):
    with pytest.raises(DatalistError, match="not a folder"):
        discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatalistError, match="no NIfTI"):
        discover(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "dataset.json").write_text("{oops")
    with pytest.raises(DatalistError, match="dataset.json"):
        discover(tmp_path / "broken")


def test_prepare_plain_folder_from_the_cli(tmp_path, capsys):
    root = tmp_path / "plain"
    save_nifti(root / "p1.nii.gz", ct_volume())
    lab = np.zeros((48, 48, 10), np.uint8)
    lab[20:28, 20:28, 4:6] = 2
    save_nifti(root / "p2.nii.gz", ct_volume())
    save_nifti(root / "p2_seg.nii.gz", lab)
    out = tmp_path / "store"
    rc = main(
        ["prepare", "--data-root", str(root), "--modality", "CT", "--out", str(out), "--size", str(SIZE), "--quiet"]
    )
    assert rc == 0, capsys.readouterr().err
    store = SliceStore(out)
    assert len(store) == 10 + 2  # p1: every body slice; p2: its two annotated slices
    assert int(store[10]["label"][SIZE // 2, SIZE // 2]) == 2
    registry = json.loads((out / "datasets.json").read_text())
    assert registry == {
        "plain": {
            "id": 0,
            "modality": "CT",
            "anatomy": "",
            "num_slices": 12,
            "num_volumes": 2,
            "spacing": [1.0, 1.0, 2.0],
            "matrix": [48, 48, 10],
            "ct_window": [40.0, 400.0],
        },
    }


# ----------------------------------------------------------------------------------------------
# discover: DICOM series
# ----------------------------------------------------------------------------------------------


def test_discover_dicom_series_reads_modality_tag(tmp_path):
    ct = write_dicom_series(tmp_path / "dicom" / "ct_series", n_slices=3)
    mr = write_dicom_series(tmp_path / "dicom" / "mr_series", n_slices=3, modality="MR")
    items = discover(tmp_path / "dicom")
    got = {Path(it["image"]).name: it for it in items}
    assert set(got) == {"ct_series", "mr_series"}  # one item per series folder, not per file
    assert got["ct_series"]["image"] == str(ct) and got["ct_series"]["modality"] == "CT"
    assert got["mr_series"]["image"] == str(mr) and got["mr_series"]["modality"] == "MR"
    assert all(it["label"] is None for it in items)
    # the series folder itself as the root
    (item,) = discover(ct)
    assert (item["image"], item["modality"], item["dataset"]) == (str(ct), "CT", "ct_series")


def test_prepare_dicom_series(tmp_path):
    series = write_dicom_series(tmp_path / "series", n_slices=6, rows=40, cols=36, pixel_spacing=(0.8, 0.7), dz=2.5)
    items = discover(series)
    result = prepare_store(items, tmp_path / "store", size=SIZE, progress=False)
    assert [(e["status"], e["slices"]) for e in result.report] == [("ok", 6)], result.report
    store = SliceStore(tmp_path / "store")
    assert len(store) == 6
    entry = result.registry["series"]
    assert entry["modality"] == "CT" and entry["num_slices"] == 6
    # PixelSpacing is (row spacing = along y, column spacing = along x)
    assert entry["spacing"] == pytest.approx([0.7, 0.8, 2.5], rel=1e-5)
    assert entry["matrix"] == [36, 40, 6]
    # the rescale intercept was applied: 40 HU in the default window (40, 400) is 127.5 -> 127/128
    centres = [int(store[i]["image"][SIZE // 2, SIZE // 2]) for i in range(6)]
    assert all(abs(v - 128) <= 1 for v in centres), centres
    assert all(int(store[i]["image"][0, 0]) == 0 for i in range(6))


# ----------------------------------------------------------------------------------------------
# val_fraction
# ----------------------------------------------------------------------------------------------


def test_val_fraction_split_is_deterministic_and_by_volume(tmp_path):
    root = tmp_path / "many"
    for i in range(40):
        touch(root / f"case{i:03d}.nii.gz")
        touch(root / f"case{i:03d}_seg.nii.gz")
    first = discover(root, "CT", val_fraction=0.3)
    second = discover(root, "CT", val_fraction=0.3)
    assert first == second
    splits = {Path(it["image"]).name: it["split"] for it in first}
    assert len(splits) == 40
    n_val = sum(s == "validation" for s in splits.values())
    assert 3 <= n_val <= 25 and set(splits.values()) == {"training", "validation"}
    # labels travel with their image
    assert all(it["label"] == it["image"].replace(".nii.gz", "_seg.nii.gz") for it in first)
    # stable across machines: the same tree elsewhere (another root name) splits the same way
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "renamed")
    assert {Path(it["image"]).name: it["split"] for it in discover(moved, "CT", val_fraction=0.3)} == splits
    # a larger fraction only moves more volumes to validation
    bigger = {Path(it["image"]).name: it["split"] for it in discover(root, "CT", val_fraction=0.6)}
    assert {k for k, s in splits.items() if s == "validation"} <= {k for k, s in bigger.items() if s == "validation"}
    assert {it["split"] for it in discover(root, "CT")} == {"training"}
    assert {it["split"] for it in discover(root, "CT", val_fraction=0.0)} == {"training"}


def test_val_fraction_keeps_channels_of_a_case_together(tmp_path):
    cases = [f"pros_{i:02d}" for i in range(30)]
    ds = make_nnunet(tmp_path, "Dataset005_Prostate", {"0": "T2", "1": "ADC"}, cases, ("pros_99",))
    items = discover(ds, val_fraction=0.5)
    per_case = {}
    for it in items:
        case = Path(it["image"]).name.rsplit("_", 1)[0]
        per_case.setdefault(case, set()).add(it["split"])
    assert all(len(s) == 1 for s in per_case.values()), per_case
    assert per_case["pros_99"] == {"test"}  # imagesTs stays test whatever the fraction
    train_val = {c: s.pop() for c, s in per_case.items() if c != "pros_99"}
    assert set(train_val.values()) == {"training", "validation"}


def test_val_fraction_msd_is_by_case(tmp_path):
    task = make_msd(tmp_path, cases=tuple(f"liver_{i}" for i in range(30)), tests=("liver_99",))
    a = discover(task, val_fraction=0.4)
    b = discover(tmp_path, val_fraction=0.4)
    assert [(it["image"], it["split"]) for it in a] == [(it["image"], it["split"]) for it in b]
    splits = {it["split"] for it in a if "imagesTr" in it["image"]}
    assert splits == {"training", "validation"}
    assert [it["split"] for it in a if "imagesTs" in it["image"]] == ["test"]


def test_prepared_store_split_by_volume(tmp_path):
    """With a validation split, every slice of a volume lands in the same split of the store."""
    root = tmp_path / "vols"
    for i in range(6):
        save_nifti(root / f"v{i}.nii.gz", ct_volume(hu=20.0 * i))
    items = discover(root, "CT", val_fraction=0.5)
    n_val = sum(it["split"] == "validation" for it in items)
    assert 0 < n_val < 6, [it["split"] for it in items]
    out = tmp_path / "store"
    prepare_store(items, out, size=SIZE, progress=False)
    assert len(SliceStore(out, split="validation")) == 10 * n_val
    assert len(SliceStore(out, split="training")) == 10 * (6 - n_val)
    import csv

    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    split_of = {}
    for r in rows:
        split_of.setdefault(r["source"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    assert {next(iter(s)) for s in split_of.values()} == {"training", "validation"}


def test_header_of_an_enhanced_multi_frame_dicom_reads_its_functional_groups(tmp_path):
    """Enhanced files (e.g. the demo's Dixon leg MR) keep PixelSpacing and the frame spacing in the
    shared functional groups: the header reported 1 x 1 x 1 mm for them."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid

    from medvar_bundle.data.readers import read_header

    folder = tmp_path / "enhanced"
    folder.mkdir()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = EnhancedMRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(folder / "volume.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = EnhancedMRImageStorage, generate_uid(), generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames = 24, 20, 5
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness, measures.SpacingBetweenSlices = [1.95, 1.9], 2.5, 2.0
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PixelData = np.zeros((5, 24, 20), np.uint16).tobytes()
    ds.save_as(str(folder / "volume.dcm"), write_like_original=False)
    header = read_header(folder, 10**6)
    assert header.shape == (20, 24, 5) and header.spacing == pytest.approx((1.9, 1.95, 2.0))
    # the same measures given per frame (as the demo's Dixon files do) instead of shared
    del ds.SharedFunctionalGroupsSequence
    frame = Dataset()
    frame.PixelMeasuresSequence = Sequence([measures])
    ds.PerFrameFunctionalGroupsSequence = Sequence([frame] * 5)
    ds.save_as(str(folder / "volume.dcm"), write_like_original=False)
    assert read_header(folder, 10**6).spacing == pytest.approx((1.9, 1.95, 2.0))


def test_volume_stem_strips_every_image_extension_in_any_case():
    """`medvar inpaint` names its result after it: a single DICOM file kept its `.dcm` before
    (`leg_mr_in.dcm_inpainted.nii.gz`), and so did `.nhdr` and upper-case extensions."""
    from medvar_bundle.data.sources import volume_stem

    names = ["a/CT.nii.gz", "leg_mr_in.dcm", "X.NRRD", "s.nhdr", "b.MHA", "c.mhd", "d.nii", "series/", "e.v2.nii.gz"]
    assert [volume_stem(n) for n in names] == ["CT", "leg_mr_in", "X", "s", "b", "c", "d", "series", "e.v2"]

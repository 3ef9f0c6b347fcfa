"""End-to-end tests of `medvar prepare` / `prepare_store` and the slice store it writes.

Every volume is synthetic (written with nibabel into tmp_path) and small (48x48x10, stored at
64x64), so each expected number below is known in advance:

* a CT phantom is air (-1000 HU) with an elliptic-cylinder "body" of constant HU on a known range
  of axial slices; without a label every body slice is kept, with a label exactly the annotated
  slices are kept;
* an MR phantom has an exact-zero background and positive intensities inside the body.

A constant body of ``hu`` HU under the window (level, width) is stored as
``round((hu - level + width / 2) / width * 255)``; those values are checked at the slice centre.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from medvar_bundle.cli import main
from medvar_bundle.data import SliceStore, prepare_store
from medvar_bundle.data import store as store_mod
from medvar_bundle.data.store import read_shard_manifests

SHAPE = (48, 48, 10)
SIZE = 64
CENTRE = SIZE // 2


# ----------------------------------------------------------------------------------------------
# helpers: synthetic volumes, datalists, store readers
# ----------------------------------------------------------------------------------------------


def body_mask(shape=SHAPE, z_range=None) -> np.ndarray:
    """Elliptic cylinder centred in-plane, on axial slices ``z_range`` (half-open) or all."""
    x, y, z = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    cx, cy = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    mask = ((x - cx) / (0.38 * shape[0])) ** 2 + ((y - cy) / (0.30 * shape[1])) ** 2 <= 1.0
    if z_range is not None:
        mask &= (z >= z_range[0]) & (z < z_range[1])
    return mask


def ct_phantom(shape=SHAPE, z_range=None, hu: float = 40.0) -> np.ndarray:
    vol = np.full(shape, -1000.0, np.float32)
    vol[body_mask(shape, z_range)] = hu
    return vol


def mr_phantom(shape=SHAPE, z_range=None) -> np.ndarray:
    """Zero background; inside the body a smooth positive ramp (100..300) so percentiles differ."""
    x = np.arange(shape[0], dtype=np.float32)[:, None, None]
    ramp = 100.0 + 200.0 * x / (shape[0] - 1)
    vol = np.zeros(shape, np.float32)
    mask = body_mask(shape, z_range)
    vol[mask] = np.broadcast_to(ramp, shape)[mask]
    return vol


def label_blob(shape=SHAPE, slices=(3, 4, 5), value: int = 1) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    cx, cy = shape[0] // 2, shape[1] // 2
    for z in slices:
        lab[cx - 6 : cx + 6, cy - 6 : cy + 6, z] = value
    return lab


def save_nifti(path, arr, spacing=(1.0, 1.0, 2.0)) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.eye(4)
    affine[[0, 1, 2], [0, 1, 2]] = spacing[:3] if arr.ndim >= 3 else list(spacing[:2]) + [1.0]
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return str(path)


def make_item(image, dataset, modality, label=None, ct_window=None, split="training", anatomy="") -> dict:
    """A datalist item as the sources module produces it (every key present)."""
    return {
        "image": str(image),
        "label": str(label) if label else None,
        "dataset": dataset,
        "modality": modality,
        "anatomy": anatomy,
        "split": split,
        "ct_window": list(ct_window) if ct_window else None,
    }


def write_datalist(path, entries, split="training") -> str:
    path = Path(path)
    path.write_text(json.dumps({split: entries}))
    return str(path)


def window_value(hu: float, level: float = 40.0, width: float = 400.0) -> int:
    return int(np.rint(np.clip((hu - (level - width / 2)) / width, 0, 1) * 255))


def read_json(path):
    return json.loads(Path(path).read_text())


def read_manifest(store) -> list[dict]:
    with open(Path(store) / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def store_arrays(store):
    """(images, labels, dataset_ids) of the whole store, in store order."""
    s = SliceStore(store)
    items = [s[i] for i in range(len(s))]
    if not items:
        return np.zeros((0, SIZE, SIZE), np.uint8), np.zeros((0, SIZE, SIZE), np.uint8), []
    return (
        np.stack([it["image"].numpy() for it in items]),
        np.stack([it["label"].numpy() for it in items]),
        [it["dataset_id"] for it in items],
    )


def committed_keys(store) -> list[str]:
    return [v["key"] for m in read_shard_manifests(store) for v in m["volumes"]]


def run_cli(*args) -> int:
    return main(["prepare", *map(str, args), "--quiet"])


# ----------------------------------------------------------------------------------------------
# a small corpus shared by several tests (read-only: every test prepares into its own store)
# ----------------------------------------------------------------------------------------------

# name: (dataset, modality, anatomy, spacing, z-range of body, label slices, ct_window, hu)
CORPUS = {
    "liver": ("ct_liver", "CT", "abdomen", (0.8, 0.9, 2.5), None, (3, 4, 5), [50, 350], 40.0),
    "chest": ("ct_chest", "CT", "thorax", (0.7, 0.7, 3.0), (1, 9), None, None, 40.0),
    "brain": ("mr_brain", "MR", "brain", (1.0, 1.2, 1.5), (2, 8), None, None, None),
}
EXPECTED_SLICES = {"liver": 3, "chest": 8, "brain": 6}
EXPECTED_SLICE_INDICES = {"liver": [3, 4, 5], "chest": list(range(1, 9)), "brain": list(range(2, 8))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    entries, items = [], []
    for name, (ds, mod, anatomy, spacing, zr, lab_slices, window, hu) in CORPUS.items():
        vol = ct_phantom(z_range=zr, hu=hu) if mod == "CT" else mr_phantom(z_range=zr)
        image = save_nifti(root / "images" / f"{name}.nii.gz", vol, spacing)
        label = (
            save_nifti(root / "labels" / f"{name}.nii.gz", label_blob(slices=lab_slices), spacing)
            if lab_slices
            else None
        )
        entry = {"image": f"images/{name}.nii.gz", "dataset": ds, "modality": mod, "anatomy": anatomy}
        if label:
            entry["label"] = f"labels/{name}.nii.gz"
        if window:
            entry["ct_window"] = window
        entries.append(entry)
        items.append(make_item(image, ds, mod, label, window, anatomy=anatomy))
    datalist = write_datalist(root / "datalist.json", entries)
    return {"root": root, "datalist": datalist, "items": items, "names": list(CORPUS)}


# ----------------------------------------------------------------------------------------------
# 1. store round trip
# ----------------------------------------------------------------------------------------------


def test_store_round_trip(corpus, tmp_path, capsys):
    out = tmp_path / "store"
    assert run_cli("--datalist", corpus["datalist"], "--out", out, "--size", SIZE) == 0
    stdout = capsys.readouterr().out
    assert "3 volumes stored, 0 skipped, 0 failed" in stdout

    total = sum(EXPECTED_SLICES.values())
    store = SliceStore(out)
    assert len(store) == total

    # datasets.json
    registry = read_json(out / "datasets.json")
    assert set(registry) == {"ct_liver", "ct_chest", "mr_brain"}
    assert sorted(e["id"] for e in registry.values()) == [0, 1, 2]
    for name, (ds, mod, anatomy, spacing, _, _, window, _) in CORPUS.items():
        entry = registry[ds]
        assert {"id", "modality", "anatomy", "num_slices", "spacing", "matrix", "ct_window"} <= set(entry)
        assert entry["modality"] == mod
        assert entry["anatomy"] == anatomy
        assert entry["num_slices"] == EXPECTED_SLICES[name]
        assert entry["spacing"] == pytest.approx(list(spacing), rel=1e-6)
        assert entry["matrix"] == list(SHAPE)
        if mod == "CT":
            assert entry["ct_window"] == pytest.approx(window or [40.0, 400.0])
        else:
            assert entry["ct_window"] is None

    # items, in datalist order
    expected_ids = [registry[CORPUS[n][0]]["id"] for n in corpus["names"] for _ in range(EXPECTED_SLICES[n])]
    images, labels, ids = store_arrays(out)
    assert ids == expected_ids
    assert list(store.dataset_ids) == expected_ids
    item = store[0]
    assert set(item) >= {"image", "label", "dataset_id", "index"}
    assert item["image"].dtype == torch.uint8 and tuple(item["image"].shape) == (SIZE, SIZE)
    assert item["label"].dtype == torch.uint8 and tuple(item["label"].shape) == (SIZE, SIZE)
    assert images.dtype == np.uint8 and images.shape == (total, SIZE, SIZE)
    assert store[-1]["index"] == total - 1
    with pytest.raises(IndexError):
        store[total]

    # content: background is 0; a constant 40 HU body lands on the value its window predicts
    liver = slice(0, 3)
    chest = slice(3, 11)
    brain = slice(11, 17)
    assert (images[:, 0, 0] == 0).all()
    assert np.abs(images[liver, CENTRE, CENTRE].astype(int) - window_value(40, 50, 350)).max() <= 1
    assert np.abs(images[chest, CENTRE, CENTRE].astype(int) - window_value(40, 40, 400)).max() <= 1
    assert (images[brain, CENTRE, CENTRE] > 0).all()
    assert images[brain].max() >= 200  # MR is stretched to (nearly) the full range
    # labels: only the liver volume has one; its blob covers the centre on every kept slice
    assert (labels[liver, CENTRE, CENTRE] == 1).all()
    assert (labels[liver, 0, 0] == 0).all()
    assert not labels[3:].any()

    # report.json
    report = read_json(out / "report.json")["volumes"]
    assert len(report) == 3
    by_image = {Path(e["image"]).name: e for e in report}
    for name in corpus["names"]:
        e = by_image[f"{name}.nii.gz"]
        assert e["status"] == "ok", e
        assert e["slices"] == EXPECTED_SLICES[name]
        assert e["error"] is None

    # manifest.csv: one row per slice, in store order
    rows = read_manifest(out)
    assert len(rows) == total
    assert [int(r["index"]) for r in rows] == list(range(total))
    assert [int(r["dataset_id"]) for r in rows] == expected_ids
    got_indices = {}
    for r in rows:
        got_indices.setdefault(Path(r["source"]).name, []).append(int(r["slice_index"]))
        assert r["modality"] == CORPUS[Path(r["source"]).name.split(".")[0]][1]
    assert got_indices == {f"{n}.nii.gz": EXPECTED_SLICE_INDICES[n] for n in corpus["names"]}
    assert {r["has_label"] for r in rows if "liver" in r["source"]} == {"True"}
    assert {r["has_label"] for r in rows if "liver" not in r["source"]} == {"False"}


def test_prepare_store_api_returns_report_and_registry(corpus, tmp_path):
    result = prepare_store(corpus["items"], tmp_path / "s", size=SIZE, progress=False)
    assert result.counts["ok"] == 3 and result.ok == 3
    assert [e["slices"] for e in result.report] == [EXPECTED_SLICES[n] for n in corpus["names"]]
    assert result.registry == read_json(tmp_path / "s" / "datasets.json")
    assert len(SliceStore(tmp_path / "s")) == sum(EXPECTED_SLICES.values())


def test_split_and_dataset_filters(corpus, tmp_path):
    items = [dict(it) for it in corpus["items"]]
    items[2]["split"] = "validation"  # the MR volume
    out = tmp_path / "s"
    prepare_store(items, out, size=SIZE, progress=False)
    assert len(SliceStore(out, split="training")) == EXPECTED_SLICES["liver"] + EXPECTED_SLICES["chest"]
    assert len(SliceStore(out, split="validation")) == EXPECTED_SLICES["brain"]
    assert len(SliceStore(out, datasets=["ct_chest"])) == EXPECTED_SLICES["chest"]
    with pytest.raises(KeyError):
        SliceStore(out, datasets=["nope"])


def test_items_without_optional_keys(tmp_path):
    """A minimal item (image, dataset, modality) is enough: label/ct_window/split are optional."""
    image = save_nifti(tmp_path / "ct.nii.gz", ct_phantom(z_range=(0, 10)), (1.0, 1.0, 2.0))
    result = prepare_store(
        [{"image": image, "dataset": "d", "modality": "CT"}], tmp_path / "s", size=SIZE, progress=False
    )
    assert [e["status"] for e in result.report] == ["ok"], result.report
    assert len(SliceStore(tmp_path / "s")) == 10


def test_registry_geometry_is_a_field_of_view_the_volumes_have(tmp_path):
    """Volumes of one dataset at 0.7 mm × 40 and 1.2 mm × 24 voxels in-plane cover 28 and 28.8 mm:
    the registry's spacing × matrix must be near those (medians of spacing and matrix taken
    separately give 0.95 mm × 32 = 30.4 mm, wider than either volume)."""
    items = []
    for name, spacing, n in (("fine", 0.7, 40), ("coarse", 1.2, 24)):
        vol = ct_phantom(shape=(n, n, 10), z_range=(0, 10))
        image = save_nifti(tmp_path / f"{name}.nii.gz", vol, (spacing, spacing, 2.0))
        items.append({"image": image, "dataset": "d", "modality": "CT"})
    registry = prepare_store(items, tmp_path / "s", size=SIZE, progress=False).registry
    entry = registry["d"]
    assert entry["spacing"] == pytest.approx([0.95, 0.95, 2.0])
    fov = np.asarray(entry["spacing"][:2]) * np.asarray(entry["matrix"][:2])
    assert fov == pytest.approx([28.4, 28.4], abs=entry["spacing"][0] / 2)  # the median of 28 and 28.8 mm
    assert entry["matrix"] == [30, 30, 10]


# ----------------------------------------------------------------------------------------------
# 2. DataLoader workers and DistributedSampler
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "store"
    prepare_store(corpus["items"], out, size=SIZE, progress=False)
    return out


def test_store_with_dataloader_workers(prepared):
    store = SliceStore(prepared)
    n = len(store)
    direct = [store[i] for i in range(n)]
    loader = DataLoader(store, batch_size=4, num_workers=2, shuffle=False)
    seen, images, ids = [], [], []
    for batch in loader:
        assert batch["image"].dtype == torch.uint8
        assert tuple(batch["image"].shape[1:]) == (SIZE, SIZE)
        seen += batch["index"].tolist()
        ids += batch["dataset_id"].tolist()
        images.append(batch["image"])
    assert seen == list(range(n))
    assert ids == [d["dataset_id"] for d in direct]
    assert torch.equal(torch.cat(images), torch.stack([d["image"] for d in direct]))


def test_store_with_distributed_sampler(prepared):
    store = SliceStore(prepared)
    n = len(store)
    per_rank = []
    for rank in range(2):
        sampler = DistributedSampler(store, num_replicas=2, rank=rank, shuffle=False)
        indices = list(iter(sampler))
        assert len(indices) == -(-n // 2)
        loader = DataLoader(store, batch_size=3, sampler=sampler, num_workers=0)
        got = [i for b in loader for i in b["index"].tolist()]
        assert got == indices
        per_rank.append(set(got))
    assert per_rank[0] | per_rank[1] == set(range(n))
    # odd store: the sampler pads one index, otherwise the shares are disjoint
    assert len(per_rank[0] & per_rank[1]) <= n % 2


# ----------------------------------------------------------------------------------------------
# 3. resume
# ----------------------------------------------------------------------------------------------


def test_rerun_skips_committed_volumes(corpus, tmp_path, capsys):
    out = tmp_path / "store"
    assert run_cli("--datalist", corpus["datalist"], "--out", out, "--size", SIZE) == 0
    before_images, _, before_ids = store_arrays(out)
    before_shards = sorted(p.name for p in (out / "shards").iterdir())
    capsys.readouterr()

    assert run_cli("--datalist", corpus["datalist"], "--out", out, "--size", SIZE) == 0
    cap = capsys.readouterr()
    assert "0 volumes stored, 3 skipped, 0 failed" in cap.out
    report = read_json(out / "report.json")["volumes"]
    assert len(report) == 3
    assert {e["status"] for e in report} == {"skipped"}
    assert {e["error"] for e in report} == {"already in store"}
    assert {Path(e["image"]).stem.split(".")[0]: e["slices"] for e in report} == EXPECTED_SLICES  # what the store holds

    after_images, _, after_ids = store_arrays(out)
    assert len(after_ids) == sum(EXPECTED_SLICES.values())
    assert after_ids == before_ids and np.array_equal(after_images, before_images)
    assert sorted(p.name for p in (out / "shards").iterdir()) == before_shards
    assert len(read_manifest(out)) == len(after_ids)
    keys = committed_keys(out)
    assert len(keys) == len(set(keys)) == 3
    assert read_json(out / "datasets.json")["ct_chest"]["num_slices"] == EXPECTED_SLICES["chest"]


def test_growing_store_keeps_dataset_ids(corpus, tmp_path):
    out = tmp_path / "store"
    liver, chest, brain = corpus["items"]
    prepare_store([liver, brain], out, size=SIZE, progress=False)
    ids_before = {k: v["id"] for k, v in read_json(out / "datasets.json").items()}
    assert ids_before == {"ct_liver": 0, "mr_brain": 1}

    result = prepare_store([liver, chest, brain], out, size=SIZE, progress=False)
    status = {Path(e["image"]).name: e["status"] for e in result.report}
    assert status == {"liver.nii.gz": "skipped", "chest.nii.gz": "ok", "brain.nii.gz": "skipped"}
    registry = read_json(out / "datasets.json")
    # ct_chest sorts first but the ids already handed out do not move
    assert {k: v["id"] for k, v in registry.items()} == {"ct_liver": 0, "mr_brain": 1, "ct_chest": 2}
    _, _, ids = store_arrays(out)
    assert ids == [0] * 3 + [1] * 6 + [2] * 8
    assert len(ids) == sum(EXPECTED_SLICES.values())


# ----------------------------------------------------------------------------------------------
# 4. resume after a crash in the middle of a shard write
# ----------------------------------------------------------------------------------------------

# body z-range -> kept slices; the HU makes every volume's slices recognisable in the store
CRASH_VOLUMES = {"a": ((0, 10), 0.0), "b": ((1, 9), 40.0), "c": ((2, 7), 80.0), "d": ((3, 10), 120.0)}
CRASH_SLICES = {"a": 10, "b": 8, "c": 5, "d": 7}


@pytest.fixture
def crash_items(tmp_path):
    items = []
    for name, (zr, hu) in CRASH_VOLUMES.items():
        image = save_nifti(tmp_path / "vols" / f"{name}.nii.gz", ct_phantom(z_range=zr, hu=hu), (1.0, 1.0, 2.0))
        items.append(make_item(image, "ct", "CT"))
    return items


def _crash_on_nth_shard_manifest(monkeypatch, n: int) -> list[str]:
    """Make the n-th shard-manifest write raise (after that shard's arrays were written)."""
    real = store_mod.atomic_write_json
    seen: list[str] = []

    def flaky(path, obj):
        path = Path(path)
        if path.parent.name == store_mod.SHARD_DIR:
            seen.append(path.name)
            if len(seen) == n:
                raise RuntimeError("simulated crash")
        return real(path, obj)

    monkeypatch.setattr(store_mod, "atomic_write_json", flaky)
    return seen


def _expected_centres(names):
    return [window_value(CRASH_VOLUMES[n][1]) for n in names for _ in range(CRASH_SLICES[n])]


def _check_centres(out, names):
    images, _, _ = store_arrays(out)
    got = images[:, CENTRE, CENTRE].astype(int)
    assert len(got) == sum(CRASH_SLICES[n] for n in names)
    assert np.abs(got - np.asarray(_expected_centres(names))).max() <= 1


def test_resume_after_crash_mid_shard(crash_items, tmp_path, monkeypatch):
    out = tmp_path / "store"
    a, b, c, d = crash_items
    prepare_store([a], out, size=SIZE, shard_size=1, progress=False)  # r000-00000: a

    seen = _crash_on_nth_shard_manifest(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_store([a, b, c, d], out, size=SIZE, shard_size=1, progress=False)
    monkeypatch.undo()
    assert seen == ["r000-00001.json", "r000-00002.json"]

    shards = out / "shards"
    # c's arrays were written, its manifest never was: an orphan, invisible to readers
    assert (shards / "r000-00002.images.npy").exists()
    assert not (shards / "r000-00002.json").exists()
    assert not list(shards.glob(".*.tmp"))
    store = SliceStore(out)
    assert len(store) == CRASH_SLICES["a"] + CRASH_SLICES["b"]
    _check_centres(out, "ab")

    result = prepare_store([a, b, c, d], out, size=SIZE, shard_size=1, progress=False)
    status = {Path(e["image"]).name: e["status"] for e in result.report}
    assert status == {"a.nii.gz": "skipped", "b.nii.gz": "skipped", "c.nii.gz": "ok", "d.nii.gz": "ok"}
    assert len(SliceStore(out)) == sum(CRASH_SLICES.values())
    _check_centres(out, "abcd")
    keys = committed_keys(out)
    assert len(keys) == len(set(keys)) == 4
    # the orphan was overwritten by c's committed shard, whose arrays match its manifest
    manifest = read_json(shards / "r000-00002.json")
    assert [Path(v["image"]).name for v in manifest["volumes"]] == ["c.nii.gz"]
    assert (
        np.load(shards / "r000-00002.images.npy", mmap_mode="r").shape[0] == manifest["num_slices"] == CRASH_SLICES["c"]
    )
    assert sorted(p.name for p in shards.glob("*.json")) == [f"r000-{i:05d}.json" for i in range(4)]
    assert read_json(out / "datasets.json")["ct"]["num_slices"] == sum(CRASH_SLICES.values())
    assert len(read_manifest(out)) == sum(CRASH_SLICES.values())


def test_resume_after_crash_with_several_volumes_per_shard(crash_items, tmp_path, monkeypatch):
    """Shards of two volumes (shard_size 12): a crash loses the whole uncommitted shard only."""
    out = tmp_path / "store"
    a, b, c, d = crash_items
    prepare_store([a], out, size=SIZE, shard_size=1, progress=False)
    _crash_on_nth_shard_manifest(monkeypatch, 1)  # the first shard of this run: b + c (13 slices)
    with pytest.raises(RuntimeError):
        prepare_store([a, b, c, d], out, size=SIZE, shard_size=12, progress=False)
    monkeypatch.undo()
    assert len(SliceStore(out)) == CRASH_SLICES["a"]
    prepare_store([a, b, c, d], out, size=SIZE, shard_size=12, progress=False)
    _check_centres(out, "abcd")
    keys = committed_keys(out)
    assert len(keys) == len(set(keys)) == 4


@pytest.mark.parametrize("case", ["new_dataset", "fresh_store"])
def test_crash_leaves_committed_shards_readable(crash_items, tmp_path, monkeypatch, case):
    """The run dies after committing a shard that ``datasets.json`` does not know yet (a dataset new
    to the store, or a store whose first run dies): the committed shards are the truth, so the store
    must still open and serve them, and a re-run completes it."""
    out = tmp_path / "store"
    a, b, c, d = crash_items
    if case == "new_dataset":
        prepare_store([a], out, size=SIZE, shard_size=1, progress=False)
        b = {**b, "dataset": "ct_new"}
        crash_at = 2  # b is committed, c's manifest write dies
    else:
        crash_at = 3  # a and b are committed, c's manifest write dies
    _crash_on_nth_shard_manifest(monkeypatch, crash_at)
    with pytest.raises(RuntimeError):
        prepare_store([a, b, c, d], out, size=SIZE, shard_size=1, progress=False)
    monkeypatch.undo()
    assert len(committed_keys(out)) == 2
    store = SliceStore(out)
    assert len(store) == CRASH_SLICES["a"] + CRASH_SLICES["b"]
    _check_centres(out, "ab")
    prepare_store([a, b, c, d], out, size=SIZE, shard_size=1, progress=False)
    assert len(SliceStore(out)) == sum(CRASH_SLICES.values())
    _check_centres(out, "abcd")


# ----------------------------------------------------------------------------------------------
# 5. bad inputs
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def bad_corpus(tmp_path):
    """Two good volumes and one of each bad kind; returns (datalist path, {name: reason pattern})."""
    d = tmp_path / "data"
    d.mkdir()
    sp = (1.0, 1.0, 2.0)
    entries = [
        {
            "image": Path(save_nifti(d / "good_ct.nii.gz", ct_phantom(z_range=(0, 10)), sp)).name,
            "dataset": "good",
            "modality": "CT",
        },
        {
            "image": Path(save_nifti(d / "good_mr.nii.gz", mr_phantom(z_range=(2, 8)), sp)).name,
            "dataset": "good_mr",
            "modality": "MR",
        },
    ]
    reasons = {}

    def bad(name, reason, **extra):
        entries.append({"image": name, "dataset": "bad", "modality": "CT", **extra})
        reasons[name] = reason

    (d / "random.nii.gz").write_bytes(np.random.default_rng(0).bytes(4096))
    bad("random.nii.gz", "unreadable")
    raw = Path(save_nifti(d / "whole.nii.gz", ct_phantom(), sp)).read_bytes()
    (d / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    bad("truncated.nii.gz", "unreadable")
    bad("missing.nii.gz", "file not found")
    save_nifti(d / "flat.nii.gz", ct_phantom()[:, :, 0], sp)
    bad("flat.nii.gz", "2D image")
    save_nifti(d / "series4d.nii.gz", np.stack([ct_phantom()] * 3, axis=-1), sp)
    bad("series4d.nii.gz", "4D image with 3 volumes")
    nan = ct_phantom()
    nan[1, 2, 3] = nan[10, 20, 5] = nan[30, 30, 9] = np.nan
    save_nifti(d / "nan.nii.gz", nan, sp)
    bad("nan.nii.gz", "3 NaN/Inf voxels")
    inf = ct_phantom()
    inf[5, 5, 5] = np.inf
    inf[6, 6, 6] = -np.inf
    save_nifti(d / "inf.nii.gz", inf, sp)
    bad("inf.nii.gz", "2 NaN/Inf voxels")
    save_nifti(d / "zeros.nii.gz", np.zeros(SHAPE, np.float32), sp)
    bad("zeros.nii.gz", ("constant volume", "all-zero"))
    save_nifti(d / "constant.nii.gz", np.full(SHAPE, 100.0, np.float32), sp)
    bad("constant.nii.gz", "constant volume")
    save_nifti(d / "shape_img.nii.gz", ct_phantom(), sp)
    save_nifti(d / "shape_lab.nii.gz", label_blob((40, 48, 10)), sp)
    bad("shape_img.nii.gz", "label shape", label="shape_lab.nii.gz")
    save_nifti(d / "pet.nii.gz", ct_phantom(), sp)
    entries.append({"image": "pet.nii.gz", "dataset": "bad", "modality": "PET"})
    reasons["pet.nii.gz"] = "unknown modality 'PET'"
    return write_datalist(d / "datalist.json", entries), reasons


def _has_reason(text: str, reason) -> bool:
    return any(r in text for r in ((reason,) if isinstance(reason, str) else reason))


def test_bad_inputs_are_reported_and_skipped(bad_corpus, tmp_path, capsys):
    datalist, reasons = bad_corpus
    data = Path(datalist).parent
    out = tmp_path / "store"
    assert run_cli("--datalist", datalist, "--out", out, "--size", SIZE) == 0
    cap = capsys.readouterr()
    assert f"2 volumes stored, 0 skipped, {len(reasons)} failed" in cap.out

    report = read_json(out / "report.json")["volumes"]
    assert len(report) == len(reasons) + 2
    by_name = {Path(e["image"]).name: e for e in report}
    assert by_name["good_ct.nii.gz"]["status"] == "ok" and by_name["good_ct.nii.gz"]["slices"] == 10
    assert by_name["good_mr.nii.gz"]["status"] == "ok" and by_name["good_mr.nii.gz"]["slices"] == 6
    err_lines = cap.err.splitlines()
    for name, reason in reasons.items():
        e = by_name[name]
        assert e["status"] == "failed", (name, e)
        assert e["slices"] == 0
        assert _has_reason(e["error"], reason), (name, e["error"])
        assert "\n" not in e["error"]
        path = str(data / name)
        lines = [ln for ln in err_lines if path in ln]
        assert len(lines) == 1, (name, cap.err)
        assert "failed" in lines[0] and _has_reason(lines[0], reason), lines[0]
    # the good volumes are stored, nothing of the bad ones is
    assert len(SliceStore(out)) == 16
    assert {Path(r["source"]).name for r in read_manifest(out)} == {"good_ct.nii.gz", "good_mr.nii.gz"}
    assert set(committed_keys(out)) == {
        f"{data / 'good_ct.nii.gz'}|",
        f"{data / 'good_mr.nii.gz'}|",
    }

    # --strict: the same corpus again (good ones already stored, bad ones fail again) -> exit 1
    assert run_cli("--datalist", datalist, "--out", out, "--size", SIZE, "--strict") == 1
    cap = capsys.readouterr()
    assert f"0 volumes stored, 2 skipped, {len(reasons)} failed" in cap.out
    assert "--strict" in cap.err
    assert len(SliceStore(out)) == 16


def test_no_volume_succeeded_exits_non_zero(bad_corpus, tmp_path, capsys):
    datalist, reasons = bad_corpus
    raw = read_json(datalist)
    only_bad = write_datalist(Path(datalist).with_name("bad_only.json"), raw["training"][2:])
    assert run_cli("--datalist", only_bad, "--out", tmp_path / "store", "--size", SIZE) == 1
    cap = capsys.readouterr()
    assert "no volume succeeded" in cap.err
    assert f"0 volumes stored, 0 skipped, {len(reasons)} failed" in cap.out
    assert len(SliceStore(tmp_path / "store")) == 0


@pytest.mark.parametrize("kind", ["not_json", "missing", "no_splits"])
def test_unreadable_datalist_exits_2_with_one_line(tmp_path, capsys, kind):
    path = tmp_path / "datalist.json"
    if kind == "not_json":
        path.write_text("{this is not json")
    elif kind == "no_splits":
        path.write_text(json.dumps({"images": []}))
    rc = run_cli("--datalist", path, "--out", tmp_path / "store")
    cap = capsys.readouterr()
    assert rc == 2
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(lines) == 1, cap.err
    assert str(path) in lines[0]
    assert not (tmp_path / "store" / "shards").exists()


def test_bad_rank_is_a_usage_error(corpus, tmp_path, capsys):
    rc = run_cli("--datalist", corpus["datalist"], "--out", tmp_path / "s", "--rank", 2, "--world-size", 2)
    cap = capsys.readouterr()
    assert rc == 2
    assert len([ln for ln in cap.err.splitlines() if ln.strip()]) == 1, cap.err
    assert "rank" in cap.err


def test_bad_size_and_workers_are_usage_errors(corpus, tmp_path, capsys):
    assert run_cli("--datalist", corpus["datalist"], "--out", tmp_path / "s", "--size", 8) == 2
    assert run_cli("--datalist", corpus["datalist"], "--out", tmp_path / "s", "--workers", -1) == 2
    # a fraction of 1.5 held every volume out, and training found no slice later
    for fraction in (1.5, -0.5):
        assert (
            run_cli("--data-root", tmp_path, "--modality", "CT", "--out", tmp_path / "s", "--val-fraction", fraction)
            == 2
        )
    err = capsys.readouterr().err
    assert "--size" in err and "--workers" in err and "--val-fraction must be in [0, 1), got 1.5" in err
    assert "got -0.5" in err and not (tmp_path / "s").exists()


def test_empty_annotation_is_skipped_not_failed(tmp_path, capsys):
    """A valid volume whose label is empty has no slice to keep: "skipped" with the reason,
    nothing stored, and a re-run does not try it again."""
    image = save_nifti(tmp_path / "ct.nii.gz", ct_phantom(), (1.0, 1.0, 2.0))
    label = save_nifti(tmp_path / "ct_seg.nii.gz", np.zeros(SHAPE, np.uint8), (1.0, 1.0, 2.0))
    good = save_nifti(tmp_path / "good.nii.gz", ct_phantom(z_range=(0, 4)), (1.0, 1.0, 2.0))
    items = [make_item(image, "ct", "CT", label), make_item(good, "ct", "CT")]
    result = prepare_store(items, tmp_path / "s", size=SIZE, progress=False)
    by_name = {Path(e["image"]).name: e for e in result.report}
    assert by_name["ct.nii.gz"]["status"] == "skipped"
    assert "no axial slice holds annotation" in by_name["ct.nii.gz"]["error"]
    assert by_name["ct.nii.gz"]["slices"] == 0
    assert by_name["good.nii.gz"]["status"] == "ok" and by_name["good.nii.gz"]["slices"] == 4
    assert "ct.nii.gz" in capsys.readouterr().err
    assert len(SliceStore(tmp_path / "s")) == 4
    again = prepare_store(items, tmp_path / "s", size=SIZE, progress=False)
    assert {e["error"] for e in again.report} == {"already in store"}
    assert len(SliceStore(tmp_path / "s")) == 4


# ----------------------------------------------------------------------------------------------
# 6. --rank / --world-size
# ----------------------------------------------------------------------------------------------


def test_ranks_share_the_datalist(tmp_path, capsys):
    d = tmp_path / "data"
    entries = []
    slices = {}
    for k in range(5):
        zr = (k, 10)
        save_nifti(d / f"v{k}.nii.gz", ct_phantom(z_range=zr, hu=20.0 * k), (1.0, 1.0, 2.0))
        entries.append({"image": f"v{k}.nii.gz", "dataset": "ct" if k % 2 else "ct_b", "modality": "CT"})
        slices[f"v{k}.nii.gz"] = 10 - k
    datalist = write_datalist(d / "datalist.json", entries)
    out = tmp_path / "store"

    assert run_cli("--datalist", datalist, "--out", out, "--size", SIZE, "--rank", 0, "--world-size", 2) == 0
    names0 = {Path(e["image"]).name for e in read_json(out / "report.json")["volumes"]}
    assert names0 == {"v0.nii.gz", "v2.nii.gz", "v4.nii.gz"}
    assert run_cli("--datalist", datalist, "--out", out, "--size", SIZE, "--rank", 1, "--world-size", 2) == 0
    capsys.readouterr()

    keys = committed_keys(out)
    assert len(keys) == len(set(keys)) == 5
    assert {Path(k.split("|")[0]).name for k in keys} == set(slices)
    report = read_json(out / "report.json")["volumes"]
    assert sorted(Path(e["image"]).name for e in report) == sorted(slices)
    assert all(e["status"] == "ok" and e["slices"] == slices[Path(e["image"]).name] for e in report)
    total = sum(slices.values())
    assert len(SliceStore(out)) == total
    registry = read_json(out / "datasets.json")
    assert registry["ct_b"]["num_slices"] == slices["v0.nii.gz"] + slices["v2.nii.gz"] + slices["v4.nii.gz"]
    assert registry["ct"]["num_slices"] == slices["v1.nii.gz"] + slices["v3.nii.gz"]
    assert {p.name.split("-")[0] for p in (out / "shards").glob("*.json")} == {"r000", "r001"}
    rows = read_manifest(out)
    assert len(rows) == total
    assert Counter(Path(r["source"]).name for r in rows) == Counter(slices)


# ----------------------------------------------------------------------------------------------
# 7. --workers gives the same store
# ----------------------------------------------------------------------------------------------


def test_workers_give_the_same_store(corpus, tmp_path, capsys):
    out0, out2 = tmp_path / "w0", tmp_path / "w2"
    assert run_cli("--datalist", corpus["datalist"], "--out", out0, "--size", SIZE, "--workers", 0) == 0
    assert run_cli("--datalist", corpus["datalist"], "--out", out2, "--size", SIZE, "--workers", 2) == 0
    capsys.readouterr()
    img0, lab0, ids0 = store_arrays(out0)
    img2, lab2, ids2 = store_arrays(out2)
    assert len(ids0) == sum(EXPECTED_SLICES.values())
    assert ids0 == ids2
    assert np.array_equal(img0, img2)
    assert np.array_equal(lab0, lab2)
    assert read_json(out0 / "datasets.json") == read_json(out2 / "datasets.json")
    assert read_json(out0 / "report.json") == read_json(out2 / "report.json")
    assert read_manifest(out0) == read_manifest(out2)


def test_several_stores_read_as_one_relabel_every_slice_with_the_merged_id(tmp_path):
    """Store A holds zeta and alpha, store B alpha and mid: read together, ids are re-assigned in name
    order (alpha 0, mid 1, zeta 2) and every slice keeps its pixels and carries its own dataset's new id."""
    from conftest import phantom_volume

    rng = np.random.default_rng(3)
    stores = {}
    for store, names in (("A", ["zeta", "alpha"]), ("B", ["alpha", "mid"])):
        items = []
        for k, name in enumerate(names):
            path = tmp_path / f"{store}{k}.nii.gz"
            nib.save(nib.Nifti1Image(phantom_volume(rng, (32, 32, 3 + k)), np.eye(4)), path)
            items.append({"image": str(path), "label": None, "dataset": name, "modality": "MR"})
        prepare_store(items, tmp_path / store, size=32, progress=False)
        stores[store] = SliceStore(tmp_path / store)
    merged = SliceStore([tmp_path / "A", tmp_path / "B"])
    assert {name: e["id"] for name, e in merged.datasets.items()} == {"alpha": 0, "mid": 1, "zeta": 2}
    assert merged.datasets["alpha"]["num_slices"] == sum(s.datasets["alpha"]["num_slices"] for s in stores.values())
    singles = [item for s in stores.values() for item in s]
    own_name = [{e["id"]: n for n, e in s.datasets.items()}[item["dataset_id"]] for s in stores.values() for item in s]
    assert len(merged) == len(singles) == 2 * 3 + 2 * 4
    for i, (single, name) in enumerate(zip(singles, own_name)):
        assert torch.equal(merged[i]["image"], single["image"])
        assert merged[i]["dataset_id"] == merged.datasets[name]["id"]


# ----------------------------------------------------------------------------------------------
# 9. the store keeps what its volumes were prepared with
# ----------------------------------------------------------------------------------------------


def test_config_ct_window_is_the_one_recorded_for_read_back(tmp_path):
    """`ct_window` of configs/prepare.yaml windows CT items without their own; the records and
    datasets.json must carry that window (not a built-in 40/400), or generated CT of the dataset is
    read back to the wrong HU."""
    from medvar_bundle.bundle_config import run_config
    from medvar_bundle.io import to_intensity

    image = save_nifti(tmp_path / "ct.nii.gz", ct_phantom(hu=500.0))
    datalist = write_datalist(tmp_path / "datalist.json", [{"image": image, "dataset": "bone", "modality": "CT"}])
    out = tmp_path / "store"
    run_config(
        "prepare", None, {"datalist": datalist, "output_dir": str(out), "size": SIZE, "ct_window": [500.0, 2000.0],
                           "progress": False},
    )  # fmt: skip
    entry = read_json(out / "datasets.json")["bone"]
    assert entry["ct_window"] == [500.0, 2000.0]
    assert [v["ct_window"] for m in read_shard_manifests(out) for v in m["volumes"]] == [[500.0, 2000.0]]
    images, _, _ = store_arrays(out)
    body = images[0][SIZE // 2, SIZE // 2]
    assert body == window_value(500.0, 500.0, 2000.0)
    assert abs(float(to_intensity(np.array([body], np.uint8), entry)[0]) - 500.0) < 2000 / 255


def test_an_item_with_another_window_than_its_dataset_fails_alone(tmp_path, capsys):
    """Generated CT of a dataset is read back with one window: an item windowed otherwise would be
    read back to the wrong HU, so it fails with its reason and the others are stored."""
    a = save_nifti(tmp_path / "a.nii.gz", ct_phantom())
    b = save_nifti(tmp_path / "b.nii.gz", ct_phantom())
    items = [make_item(a, "ct", "CT", ct_window=(40, 400)), make_item(b, "ct", "CT", ct_window=(40, 80))]
    result = prepare_store(items, tmp_path / "store", size=SIZE, progress=False)
    assert {Path(e["image"]).name: (e["status"], e["error"]) for e in result.report} == {
        "a.nii.gz": ("ok", None),
        "b.nii.gz": ("failed", "CT window [40.0, 80.0] where dataset ct has [40.0, 400.0] (one window per dataset)"),
    }
    assert "medvar prepare: failed: " in capsys.readouterr().err and result.registry["ct"]["num_volumes"] == 1


@pytest.mark.parametrize("change", ["split", "dataset"])
def test_rerun_refuses_a_stored_volume_under_another_split_or_dataset(corpus, tmp_path, change):
    """A re-run skips stored volumes: a volume moved to the held-out split must not stay in training."""
    out = tmp_path / "store"
    prepare_store(corpus["items"], out, size=SIZE, progress=False)
    before = store_arrays(out)[0]
    moved = [dict(item) for item in corpus["items"]]
    moved[1][change] = {"split": "validation", "dataset": "ct_other"}[change]
    with pytest.raises(ValueError, match=f"stored with {change} .*prepare into a new store"):
        prepare_store(moved, out, size=SIZE, progress=False)
    assert np.array_equal(store_arrays(out)[0], before)


def test_one_image_with_two_labels_is_stored_twice_and_skipped_twice(corpus, tmp_path):
    item = next(i for i in corpus["items"] if i["label"])
    other = save_nifti(tmp_path / "other_label.nii.gz", label_blob(slices=(2, 3)), CORPUS["liver"][3])
    items = [item, {**item, "label": other}]
    out = tmp_path / "store"
    assert prepare_store(items, out, size=SIZE, progress=False).counts["ok"] == 2
    again = prepare_store(items, out, size=SIZE, progress=False)
    assert [e["status"] for e in again.report] == ["skipped", "skipped"]
    assert sorted(e["slices"] for e in again.report) == [2, 3]


def test_a_growing_store_keeps_its_datasets_stored_ct_window(tmp_path):
    """The window of a dataset is its first stored volume's: a later run's item with another one
    (a changed ct_window) fails instead of joining the dataset read back with the old window."""
    a = save_nifti(tmp_path / "a.nii.gz", ct_phantom())
    b = save_nifti(tmp_path / "b.nii.gz", ct_phantom())
    out = tmp_path / "store"
    prepare_store([make_item(a, "ct", "CT", ct_window=(40, 400))], out, size=SIZE, progress=False)
    later = prepare_store([make_item(b, "ct", "CT", ct_window=(40, 80))], out, size=SIZE, progress=False)
    assert [e["status"] for e in later.report] == ["failed"] and "has [40.0, 400.0]" in later.report[0]["error"]
    assert later.registry["ct"]["ct_window"] == [40.0, 400.0] and later.registry["ct"]["num_volumes"] == 1


def test_a_bad_token_file_does_not_make_prepare_delete_image_shards(corpus, tmp_path, capsys):
    """Token files are tokenize's: prepare re-does a shard only for its images or labels (had it
    removed the shard here, a store whose source volumes have moved would have lost its slices)."""
    out = tmp_path / "store"
    prepare_store(corpus["items"], out, size=SIZE, progress=False)
    before = store_arrays(out)[0]
    (tag,) = [m["shard"] for m in read_shard_manifests(out)]
    (out / "tokens.json").write_text(json.dumps({"shards": {tag: {"size": 8, "sha256": "0" * 64}}}))
    prepare_store(corpus["items"], out, size=SIZE, progress=False)
    assert "re-doing" not in capsys.readouterr().err
    assert [m["shard"] for m in read_shard_manifests(out)] == [tag]
    assert np.array_equal(store_arrays(out)[0], before)

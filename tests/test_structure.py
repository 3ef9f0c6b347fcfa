"""The in-domain structure metric: k-NN precision / recall, graded damage, the structure network's
file and its place in `medvar evaluate` (structure FD / precision / recall, efficiency Q, groups)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from medvar_bundle.bundle_config import run_config
from medvar_bundle.cli import main
from medvar_bundle.data.store import SliceStore
from medvar_bundle.evaluation import evaluate_generation
from medvar_bundle.evaluation.report import FLOOR
from medvar_bundle.io import write_slice_stack
from medvar_bundle.metrics import (
    STRUCTURE_FILE,
    StructureNet,
    efficiency,
    frechet_distance_from_features,
    knn_precision,
    knn_precision_recall,
    load_structure_net,
    store_slices,
)
from medvar_bundle.metrics.damage import DAMAGES, blur, noise, scramble_phase, shuffle_patches
from medvar_bundle.metrics.structure import RandTextureSurrogated, StructureLoss
from medvar_bundle.weights import MissingWeightsError

# --------------------------------------------------------------------------------------------
# k-NN precision and recall
# --------------------------------------------------------------------------------------------


def lattice(offset: float, n: int = 5) -> np.ndarray:
    """``n²`` points of a unit lattice in 2D, shifted by ``offset`` along x: ``(n², 2)``."""
    x, y = np.meshgrid(np.arange(n, dtype=float), np.arange(n, dtype=float))
    return np.stack([x.ravel() + offset, y.ravel()], axis=1)


def test_precision_and_recall_count_points_inside_the_other_sets_balls():
    mode_a, mode_b = lattice(0.0), lattice(100.0)
    real = np.concatenate([mode_a, mode_b])
    assert knn_precision_recall(real, real) == (1.0, 1.0)
    # a generator that only draws mode A: everything it draws is realistic, half the real set is missed
    assert knn_precision_recall(real, mode_a) == (1.0, 0.5)
    # one that draws mode A and junk far from both modes: half of it is unrealistic
    assert knn_precision_recall(real, np.concatenate([mode_a, lattice(1000.0)])) == (0.5, 0.5)
    assert knn_precision_recall(real, lattice(500.0)) == (0.0, 0.0)
    # the radius is the distance to the k-th neighbour, 1 for k = 1 on a unit lattice: shifted by 1.5,
    # the column at x = 5.5 is 1.5 from the real set (out) and the real column at x = 0 is 1.5 from the fake one
    assert knn_precision_recall(mode_a, lattice(1.5), k=1) == (20 / 25, 20 / 25)
    # precision needs only the real set's radii: one or two fake points are enough
    assert knn_precision(real, mode_a[:2]) == 1.0 and knn_precision(real, lattice(500.0)[:1]) == 0.0
    with pytest.raises(ValueError, match="more than 3 rows in the reference set"):
        knn_precision_recall(real, mode_a[:3])  # recall: the fake set is the reference


# --------------------------------------------------------------------------------------------
# graded damage
# --------------------------------------------------------------------------------------------


def slices(n: int = 3, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def test_shuffled_patches_keep_every_pixel_and_move_tiles():
    x = slices()
    for fraction in (0.0, 0.5, 1.0):
        y = shuffle_patches(x, fraction, seed=1, patch=32)
        assert y.shape == x.shape and y.dtype == np.uint8
        for a, b in zip(x, y):  # the same 32² tiles, only re-ordered
            tiles = sorted(t.tobytes() for t in a.reshape(2, 32, 2, 32).transpose(0, 2, 1, 3).reshape(4, 32, 32))
            moved = sorted(t.tobytes() for t in b.reshape(2, 32, 2, 32).transpose(0, 2, 1, 3).reshape(4, 32, 32))
            assert tiles == moved
        assert np.array_equal(y, x) == (fraction == 0.0)
    assert shuffle_patches(x, 0.0, patch=None).shape == x.shape  # default: 8 × 8 tiles of 8² on 64² slices
    with pytest.raises(ValueError, match="do not tile"):
        shuffle_patches(slices(size=48), 1.0, patch=32)


def test_blur_and_noise_known_answers():
    flat = np.full((2, 64, 64), 90, np.uint8)
    assert np.array_equal(blur(flat, 4.0), flat)  # blur keeps a constant
    stripes = np.tile(np.array([0, 200], np.uint8), 32)[None, None].repeat(64, axis=1)
    assert blur(stripes, 2.0)[:, 8:-8, 8:-8].std() < 1.0  # and removes the finest detail
    noisy = noise(flat, 20.0, seed=3).astype(float)
    assert abs(noisy.mean() - 90) < 0.5 and abs(noisy.std() - 20) < 0.5
    assert [severity for _, (_, severity) in DAMAGES.items()] == [
        (1.0, 2.0, 4.0), (8.0, 20.0, 50.0), (0.25, 0.5, 1.0), (0.25, 0.5, 1.0)
    ]  # fmt: skip


def square_on_stripes(size: int = 64) -> np.ndarray:
    """One slice ``(1, S, S)``: vertical stripes of period 8 px (levels 50–150), a bright 16² square."""
    x = 100 + 50 * np.sin(2 * np.pi * np.arange(size) / 8)[None, None, :].repeat(size, axis=1)
    x[:, 8:24, 8:24] = 250
    return np.rint(x).astype(np.uint8)


def test_scrambled_phase_keeps_each_slices_levels_and_grain_and_loses_its_layout():
    x = square_on_stripes()
    assert np.array_equal(scramble_phase(x, 0.0, seed=1), x)
    y = scramble_phase(x, 1.0, seed=1)
    assert np.array_equal(np.sort(y, axis=None), np.sort(x, axis=None))  # the slice's own histogram
    assert np.array_equal(scramble_phase(x, 1.0, seed=1), y) and not np.array_equal(scramble_phase(x, 1.0, seed=2), y)
    # the grain stays: the strongest frequency beside the mean is still the stripes' (8 px across)
    power = np.abs(np.fft.fft2(y[0].astype(float) - y.mean()))
    assert np.unravel_index(power.argmax(), power.shape) in {(0, 8), (0, 56)}
    # the layout goes: the square's 256 brightest pixels are scattered, few stay in its place
    assert (y[0, 8:24, 8:24] == 250).mean() < 0.25


def test_texture_surrogates_are_a_class_of_their_own_without_a_position():
    image = torch.from_numpy(square_on_stripes()).float() / 255.0
    item = {"image": image, "dataset_id": 2, "position": 0.4}
    assert RandTextureSurrogated(surrogate_id=5, prob=0.0)(item) is item
    out = RandTextureSurrogated(surrogate_id=5, prob=1.0)(item)
    assert out["dataset_id"] == 5 and np.isnan(out["position"]) and item["dataset_id"] == 2  # the item is not changed
    levels = (out["image"] * 255).round().to(torch.uint8).numpy()
    assert out["image"].shape == image.shape and not np.array_equal(levels, square_on_stripes())
    assert np.array_equal(np.sort(levels, axis=None), np.sort(square_on_stripes(), axis=None))


def test_structure_loss_leaves_unknown_positions_out():
    logits, position = torch.zeros(3, 4), torch.tensor([0.5, 0.0, 0.9])
    target = torch.tensor([0, 1, 3]), torch.tensor([0.25, float("nan"), 0.4])
    cross_entropy = float(np.log(4.0))  # uniform logits over 4 classes
    loss = StructureLoss(position_weight=2.0)((logits, position), target)
    assert loss.item() == pytest.approx(cross_entropy + 2.0 * (0.25**2 + 0.5**2) / 2)
    no_position = StructureLoss()((logits, position), (target[0], torch.full((3,), float("nan"))))
    assert no_position.item() == pytest.approx(cross_entropy)


# --------------------------------------------------------------------------------------------
# the network, its file, and the evaluation
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def structure_store(synthetic_store, tmp_path_factory):
    """A copy of the synthetic store with a structure network trained on it (a few steps)."""
    store = shutil.copytree(synthetic_store, tmp_path_factory.mktemp("structure") / "store")
    run_config("train_structure", None, {"store": str(store), "max_steps": 4, "batch_size": 8, "progress": False})
    return store


def test_training_writes_a_frozen_network_with_its_record(structure_store):
    record = json.loads((structure_store / f"{STRUCTURE_FILE}.json").read_text())
    assert record["datasets"] == ["set0", "set1"] and record["settings"]["max_steps"] == 4
    assert record["training"]["num_slices"] == 16 and record["validation"]["num_slices"] == 16
    assert 0.0 <= record["validation"]["dataset_accuracy"] <= 1.0 and record["feature_dim"] == 256
    net = load_structure_net(None, structure_store)
    assert isinstance(net, StructureNet) and not net.training
    assert not any(p.requires_grad for p in net.parameters())
    # standardised by the training slices: mean 0 on them, std 1 where the unit varies at least as
    # much as the median unit, less where it varies less (its std is floored at the median)
    features = net.extract(np.concatenate([store_slices(structure_store, "training", n) for n in ("set0", "set1")]))
    raw_std = net.extract(np.concatenate([store_slices(structure_store, "training", n) for n in ("set0", "set1")]),
                          standardise=False).std(axis=0)  # fmt: skip
    assert features.shape == (16, 256)
    np.testing.assert_allclose(features.mean(axis=0), 0.0, atol=1e-3)  # float32 features
    floor = max(np.median(raw_std), 1e-6)
    above = raw_std >= floor
    np.testing.assert_allclose(features.std(axis=0)[above], 1.0, atol=1e-3)
    np.testing.assert_allclose(features.std(axis=0)[~above], raw_std[~above] / floor, atol=1e-3)


def test_a_network_of_another_store_or_none_is_one_line(structure_store, tmp_path):
    blob = torch.load(structure_store / STRUCTURE_FILE, weights_only=True)
    blob["datasets"] = {"set0": blob["datasets"]["set0"], "set2": blob["datasets"]["set1"]}
    torch.save(blob, tmp_path / "other.pt")  # as if trained on a store with other datasets
    with pytest.raises(ValueError, match="trained on datasets .* but the store"):
        load_structure_net(tmp_path / "other.pt", structure_store)
    with pytest.raises(MissingWeightsError, match="medvar train-structure --store"):
        load_structure_net(None, tmp_path)
    with pytest.raises(ValueError, match="not a structure network file"):
        torch.save({"format": "something-else"}, tmp_path / "foreign.pt")
        load_structure_net(tmp_path / "foreign.pt", structure_store)
    blob["format"] = "medvar-structure-1"  # trained by MedVAR < 0.8.3, without texture surrogates
    torch.save(blob, tmp_path / "stale.pt")
    with pytest.raises(MissingWeightsError, match="< 0.8.3, trained without texture surrogates.*train-structure"):
        load_structure_net(tmp_path / "stale.pt", structure_store)


def test_without_held_out_slices_the_structure_scores_stand_and_the_floors_are_null(
    structure_store, tmp_path, offline_hub
):
    """The store holds no `test` split: structure FD, precision and recall against the training
    slices are as beside the validation split; the floor row and each method's floor at N are null."""
    registry = SliceStore(structure_store).datasets
    flat = tmp_path / "flat"
    for name, entry in registry.items():
        grey = np.full_like(store_slices(structure_store, "validation", name), 128)
        write_slice_stack(grey, entry, flat / f"{name}.nii.gz")
    with_floor = evaluate_generation(structure_store, [flat], tmp_path / "validation", allow_download=False)["rows"]
    report = evaluate_generation(structure_store, [flat], tmp_path / "test", allow_download=False, heldout_split="test")
    rows = report["rows"]
    for name in registry:
        assert rows[FLOOR][name] is None and rows["flat"][name]["floor_structure_fd"] is None
        assert with_floor["flat"][name]["floor_structure_fd"] is not None
        for key in ("structure_fd", "structure_precision", "structure_recall"):
            assert rows["flat"][name][key] == pytest.approx(with_floor["flat"][name][key], rel=1e-9)
    assert any(note.startswith("no test slices of ") for note in report["notes"])


def test_evaluate_reports_structure_metrics_and_uses_them_as_q(structure_store, tmp_path, offline_hub):
    """Held-out slices posing as a method score exactly the floor; a set far from the real slices
    gets precision 0; the efficiency's Q is the structure FD; groups follow anatomy × modality."""
    registry = SliceStore(structure_store).datasets
    heldout, flat = tmp_path / "heldout", tmp_path / "flat"
    for name, entry in registry.items():
        real = store_slices(structure_store, "validation", name)
        write_slice_stack(real, entry, heldout / f"{name}.nii.gz")
        write_slice_stack(np.full_like(real, 128), entry, flat / f"{name}.nii.gz")
    (flat / "summary.json").write_text(
        json.dumps({"datasets": {n: {"seconds_per_image": 0.5} for n in registry}, "parameters": 1000})
    )
    report = evaluate_generation(structure_store, [heldout, flat], tmp_path / "report", allow_download=False)
    rows = report["rows"]
    assert report["efficiency"]["q"] == "structure_fd"
    assert any("efficiency Q = structure_fd" in note for note in report["notes"])
    dim = load_structure_net(None, structure_store).feature_dim
    assert any(note.startswith(f"structure FD on fewer slices than its {dim} features") for note in report["notes"])
    for name in registry:
        for key in ("structure_fd", "structure_precision", "structure_recall"):
            assert rows["heldout"][name][key] == pytest.approx(rows[FLOOR][name][key], abs=1e-9)
        assert rows["flat"][name]["structure_precision"] == 0.0
        assert rows["flat"][name]["structure_fd"] > rows[FLOOR][name]["structure_fd"]
        # all held-out slices as a method: its floor at N is the floor row's structure FD itself
        assert rows["heldout"][name]["floor_structure_fd"] == pytest.approx(rows[FLOOR][name]["structure_fd"])
    overall = rows["flat"]["overall"]
    assert overall["efficiency"] == pytest.approx(efficiency(overall["structure_fd"], 0.5))
    # anatomy × modality: the synthetic store's two datasets are MR without an anatomy, one group
    assert report["groups"] == {"MR unspecified": ["set0", "set1"]}
    for key in ("structure_fd", "structure_precision", "histogram"):
        group = report["group_rows"]["flat"]["MR unspecified"][key]
        assert group == pytest.approx((rows["flat"]["set0"][key] + rows["flat"]["set1"][key]) / 2)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## Struct. FD per dataset" in markdown and "### Struct. FD per anatomy × modality" in markdown


def test_structure_fd_is_frechet_distance_of_the_standardised_features(structure_store):
    net = load_structure_net(None, structure_store)
    a, b = (store_slices(structure_store, split, "set0") for split in ("training", "validation"))
    fa, fb = net.extract(a), net.extract(b)
    raw_a, raw_b = net.extract(a, standardise=False), net.extract(b, standardise=False)
    std = net.feature_std.double().numpy()
    mean = net.feature_mean.double().numpy()
    np.testing.assert_allclose(fa, (raw_a - mean) / std, rtol=1e-5, atol=1e-6)
    assert frechet_distance_from_features(fa, fb) == pytest.approx(
        frechet_distance_from_features((raw_a - mean) / std, (raw_b - mean) / std), rel=1e-6
    )


def test_cli_train_structure_help_and_bad_store(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train-structure", "--help"])
    assert exit_info.value.code == 0 and "STORE/structure.pt" in capsys.readouterr().out
    assert main(["train-structure", "--store", str(tmp_path / "nowhere"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a slice store" in err[0]


def test_cli_train_structure_refuses_a_bad_out_before_training(synthetic_store, tmp_path, capsys, monkeypatch):
    """A folder, or a path under a file, as --out was found only when the trained network was saved."""
    monkeypatch.setattr("medvar_bundle.cli.run_config", lambda *a, **k: pytest.fail("training ran"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("not a folder")
    cases = [(tmp_path / "folder", "is a folder; give the network file's path"),
             (tmp_path / "file" / "structure.pt", f"{tmp_path / 'file'} is a file")]  # fmt: skip
    for out, expected in cases:
        assert main(["train-structure", "--store", str(synthetic_store), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("medvar train-structure: error: ") and expected in err[0], err


def test_ranking_script_skips_a_dataset_without_held_out_slices_and_scores_two_samples(tmp_path, capsys):
    """scripts/structure_ranking.py on a store where one dataset has no held-out volume (a hash split
    of two volumes often gives none), with a sample folder of two slices (as `make compare` draws
    from the DDPM): the dataset is skipped with one line, and two slices get a precision but no recall."""
    import nibabel as nib
    from conftest import load_script, phantom_volume

    from medvar_bundle.data import prepare_store

    rng = np.random.default_rng(7)
    items = []
    for i, (dataset, split) in enumerate([("set0", "training"), ("set0", "validation"), ("set1", "training")]):
        path = tmp_path / f"vol{i}.nii.gz"
        nib.save(nib.Nifti1Image(phantom_volume(rng), np.diag([1.0, 1.0, 3.0, 1.0])), path)
        items.append({"image": str(path), "label": None, "dataset": dataset, "modality": "MR", "split": split})
    store = tmp_path / "store"
    prepare_store(items, store, size=64, progress=False)
    run_config("train_structure", None, {"store": str(store), "max_steps": 4, "batch_size": 8, "progress": False})
    samples = tmp_path / "samples"
    heldout = np.stack([SliceStore(store, split="validation")[i]["image"].numpy() for i in range(2)])
    write_slice_stack(heldout, SliceStore(store).datasets["set0"], samples / "set0.nii.gz")
    out = tmp_path / "ranking.json"
    ranking = load_script("structure_ranking")
    argv = ["--store", str(store), "--samples", str(samples), "--damage-samples", "--min-slices", "1"]
    assert ranking.main([*argv, "--samples", f"two={samples}", "--out", str(out)]) == 0
    assert "set1 skipped: 8 training and 0 held-out slices" in capsys.readouterr().err
    rows = json.loads(out.read_text())
    assert list(rows) == ["set0"]
    two = rows["set0"]["MedVAR samples"]
    assert two["num_slices"] == 2 and two["structure_recall"] is None and 0 <= two["structure_precision"] <= 1
    assert two["structure_fd"] is not None and rows["set0"]["real held-out (floor)"]["structure_recall"] is not None
    # the same folder labelled; the mildest blur and noise of each set
    assert rows["set0"]["two samples"] == two
    blurred, noised = rows["set0"]["two samples, blur 1"], rows["set0"]["two samples, noise 8"]
    assert len({blurred["structure_fd"], two["structure_fd"], noised["structure_fd"]}) == 3
    assert blurred["power_spectrum"] > two["power_spectrum"]
    assert "two samples, shuffled patches 0.25" not in rows["set0"]
    # a missing folder, or a label taken twice, is one line and exit status 2
    assert ranking.main(["--store", str(store), "--samples", str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert ranking.main(["--store", str(store), "--samples", f"x={samples}", "--samples", f"x={samples}"]) == 2
    assert "the label 'x samples' is taken" in capsys.readouterr().err


def test_the_floor_at_a_methods_sample_size_grows_as_the_sample_shrinks():
    """Real slices as a 4-slice method were compared with the floor of all 200 held-out slices, which
    a perfect generator of 4 slices cannot reach: the floor is now measured at the method's N."""
    from medvar_bundle.evaluation.scores import FLOOR_DRAWS, SliceSet, floor_structure_fd

    rng = np.random.default_rng(0)
    train = SliceSet(np.zeros((300, 1, 1), np.uint8), {"structure": rng.normal(size=(300, 8))})
    heldout = SliceSet(np.zeros((200, 1, 1), np.uint8), {"structure": rng.normal(size=(200, 8))})
    full = frechet_distance_from_features(train.features["structure"], heldout.features["structure"])
    assert floor_structure_fd(train, heldout, 200, seed=0) == pytest.approx(full)
    assert floor_structure_fd(train, heldout, 201, seed=0) is None  # fewer held-out slices than N
    at = {n: floor_structure_fd(train, heldout, n, seed=0) for n in (4, 16, 64)}
    assert at[4] > at[16] > at[64] > full  # the Fréchet distance's small-sample bias
    # the mean over FLOOR_DRAWS subsets of n slices, repeatable with the seed
    assert floor_structure_fd(train, heldout, 16, seed=0) == at[16] != floor_structure_fd(train, heldout, 16, seed=1)
    assert FLOOR_DRAWS > 1 and floor_structure_fd(train, heldout, 1, seed=0) is None
    assert floor_structure_fd(SliceSet(train.slices), heldout, 16, seed=0) is None  # no structure network

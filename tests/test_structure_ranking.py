"""The structure metric ranks what a radiologist ranks, on synthetic anatomy with known answers.

Two datasets of synthetic "patients" whose anatomy changes along the body axis: heads (skull ring,
brain, ventricles that grow towards the middle slices) and abdomens (body wall, spine, liver,
kidneys that appear in the middle slices), each patient with its own size, shape and texture. A
structure network is trained on the training patients only; held-out patients must then score
near the real floor, every kind of damage worse as it grows, texture without anatomy worse than
blurred anatomy, and held-out heads posing as abdomens (or the reverse) far outside the floor.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medvar_bundle.bundle_config import run_config
from medvar_bundle.data import prepare_store
from medvar_bundle.metrics import frechet_distance_from_features, knn_precision_recall, load_structure_net, store_slices
from medvar_bundle.metrics.damage import DAMAGES

SIZE, SLICES = 64, 16


def _texture(rng: np.random.Generator, shape: tuple[int, int], amplitude: float) -> np.ndarray:
    """Smooth random texture: white noise averaged over 4×4 cells, bilinearly enlarged."""
    coarse = rng.normal(0.0, amplitude, (shape[0] // 4 + 1, shape[1] // 4 + 1))
    return np.kron(coarse, np.ones((4, 4)))[: shape[0], : shape[1]]


def patient(rng: np.random.Generator, kind: str) -> np.ndarray:
    """One synthetic volume ``(SIZE, SIZE, SLICES)`` of a head or an abdomen; the anatomy depends
    on the relative slice position t ∈ [0, 1] and on the patient's own random parameters."""
    x, y = np.meshgrid(np.linspace(-1, 1, SIZE), np.linspace(-1, 1, SIZE), indexing="ij")
    vol = np.zeros((SIZE, SIZE, SLICES), np.float32)
    half_axes = ((0.55, 0.7), (0.7, 0.85)) if kind == "head" else ((0.8, 0.92), (0.5, 0.62))
    a, b = (rng.uniform(*r) for r in half_axes)
    shift = rng.uniform(-0.05, 0.05, 2)
    amplitude = rng.uniform(15, 30)
    for z in range(SLICES):
        t = z / (SLICES - 1)
        scale = 0.75 + 0.25 * np.sin(np.pi * t)  # wider in the middle slices
        r2 = ((x - shift[0]) / (a * scale)) ** 2 + ((y - shift[1]) / (b * scale)) ** 2
        sl = np.zeros((SIZE, SIZE))
        if kind == "head":
            sl[r2 < 1] = 900.0  # skull
            sl[r2 < 0.75] = 400.0 + _texture(rng, sl.shape, amplitude)[r2 < 0.75]  # brain
            size = 0.05 + 0.12 * np.sin(np.pi * t) ** 2  # ventricles, largest mid-head
            for side in (-1, 1):
                ventricle = ((x - shift[0] - side * 0.12) / size) ** 2 + ((y - shift[1]) / (2 * size)) ** 2 < 1
                sl[ventricle] = 120.0
        else:
            sl[r2 < 1] = 300.0 + _texture(rng, sl.shape, amplitude)[r2 < 1]  # body
            sl[(x - shift[0] + 0.25) ** 2 / 0.09 + (y - shift[1] + 0.1) ** 2 / 0.06 < 1 - t] = 600.0  # liver
            sl[(x - shift[0]) ** 2 + (y - shift[1] - 0.4 * b) ** 2 < 0.01] = 1000.0  # spine
            if 0.3 < t < 0.8:  # kidneys
                for side in (-1, 1):
                    sl[(x - shift[0] - side * 0.45) ** 2 / 0.01 + (y - shift[1] - 0.15) ** 2 / 0.02 < 1] = 750.0
        vol[..., z] = sl
    return vol


@pytest.fixture(scope="module")
def anatomy(tmp_path_factory):
    """A store of 8 training and 4 held-out patients per kind, and a structure network trained on it."""
    root = tmp_path_factory.mktemp("anatomy")
    rng = np.random.default_rng(0)
    items = []
    for kind in ("head", "abdomen"):
        for i in range(12):
            path = root / f"{kind}{i}.nii.gz"
            nib.save(nib.Nifti1Image(patient(rng, kind), np.diag([3.0, 3.0, 5.0, 1.0])), path)
            split = "validation" if i >= 8 else "training"
            items.append({"image": str(path), "label": None, "dataset": kind, "modality": "MR", "split": split})
    store = root / "store"
    prepare_store(items, store, size=SIZE, progress=False)
    run_config(
        "train_structure", None,
        {"store": str(store), "max_steps": 150, "batch_size": 16, "progress": False,
         "network_def#input_size": SIZE},
    )  # fmt: skip
    return store, load_structure_net(None, store)


def structure_scores(net, train: np.ndarray, fake: np.ndarray) -> tuple[float, float]:
    """(structure FD, precision) of ``fake`` against ``train``."""
    ref, gen = net.extract(train), net.extract(fake)
    return frechet_distance_from_features(ref, gen), knn_precision_recall(ref, gen)[0]


@pytest.mark.parametrize("dataset", ["head", "abdomen"])
def test_held_out_patients_score_best_and_damage_worse_as_it_grows(anatomy, dataset):
    store, net = anatomy
    train, heldout = (store_slices(store, split, dataset) for split in ("training", "validation"))
    floor, floor_precision = structure_scores(net, train, heldout)
    for kind, (damage, severities) in DAMAGES.items():
        scores = [structure_scores(net, train, damage(heldout, s, seed=1)) for s in severities]
        fds = [fd for fd, _ in scores]
        assert floor < fds[0] < fds[1] < fds[2], f"{kind}: floor {floor:.1f}, damaged {fds}"
        assert scores[2][1] < floor_precision, f"{kind}: precision {scores[2][1]:.2f} vs {floor_precision:.2f}"


@pytest.mark.parametrize("dataset", ["head", "abdomen"])
def test_texture_without_anatomy_scores_worse_than_blurred_anatomy(anatomy, dataset):
    """A radiologist reads a slice blurred by 2 px; the same slice's intensities and grain with its
    Fourier phase scrambled (the blobs of an undertrained diffusion model) show no anatomy at all."""
    store, net = anatomy
    train, heldout = (store_slices(store, split, dataset) for split in ("training", "validation"))
    (blur, _), (scramble, _) = DAMAGES["blur"], DAMAGES["scrambled phase"]
    blurred, texture = (
        structure_scores(net, train, damage(heldout, s, seed=1))[0] for damage, s in ((blur, 2.0), (scramble, 1.0))
    )
    assert texture > blurred, f"scrambled phase {texture:.1f}, blur σ 2 {blurred:.1f}"


def test_real_slices_of_one_dataset_labelled_as_another_score_badly(anatomy):
    store, net = anatomy
    for real, posing in (("head", "abdomen"), ("abdomen", "head")):
        train = store_slices(store, "training", real)
        floor, floor_precision = structure_scores(net, train, store_slices(store, "validation", real))
        fd, precision = structure_scores(net, train, store_slices(store, "validation", posing))
        assert fd > 5 * floor and precision < floor_precision / 2, (real, posing, floor, fd, precision)

"""scripts/tokenizer_references.py: JPEG 2000 at the token budget and a patch PCA, with known answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "tokenizer_references.py"


@pytest.fixture(scope="module")
def refs():
    return load_script("tokenizer_references")


def _smooth_images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Float slices (n, size, size) in [0, 1]: random sums of a few broad Gaussian blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.zeros((n, size, size))
    for image in out:
        for _ in range(4):
            cy, cx, w = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
            image += rng.uniform(0.1, 0.3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * w * w))
    return out.clip(0, 1)


def test_patches_round_trip_and_a_full_basis_reconstructs_exactly(refs):
    images = _smooth_images(3)
    patches = refs.to_patches(images, 16)
    assert patches.shape == (3 * 16, 256)
    assert np.array_equal(patches[1], images[0, 0:16, 16:32].ravel())  # row-major over the slice
    assert np.array_equal(refs.from_patches(patches, 64, 16), images)
    mean, axes = refs.pca_basis(images, 16, 256)
    np.testing.assert_allclose(refs.pca_reconstruct(images, mean, axes, 16), images, atol=1e-9)


def test_pca_error_on_its_own_patches_falls_with_every_component(refs):
    images = _smooth_images(6)
    errors = []
    for k in (1, 2, 4, 8, 16):
        mean, axes = refs.pca_basis(images, 16, k)
        errors.append(np.square(refs.pca_reconstruct(images, mean, axes, 16) - images).mean())
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_jpeg2000_meets_the_byte_budget_and_more_bytes_keep_more(refs):
    rng = np.random.default_rng(0)
    image = (_smooth_images(1, 128)[0] * 255 + rng.normal(0, 4, (128, 128))).clip(0, 255).astype(np.uint8)
    errors = []
    for budget in (300, 1020, 4000):
        decoded, used = refs.jpeg2000_at_budget(image, budget)
        assert decoded.shape == image.shape and decoded.dtype == np.uint8
        assert used <= budget * 1.05
        errors.append(np.square(decoded.astype(float) - image).mean())
    assert errors[0] > errors[1] > errors[2]


def test_prints_one_row_per_reference_and_refuses_a_missing_store(synthetic_store, tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--store", str(synthetic_store), "--components", "8"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "16 validation slices" in out.stdout
    assert "| jpeg2000, 1020 bytes |" in out.stdout and "| pca 16² × 8 |" in out.stdout
    missing = subprocess.run([sys.executable, str(SCRIPT), "--store", str(tmp_path)], capture_output=True, text=True)
    assert missing.returncode == 1 and str(tmp_path) in missing.stderr and missing.stderr.count("\n") == 1
    odd = [sys.executable, str(SCRIPT), "--store", str(synthetic_store), "--patch", "24"]
    bad = subprocess.run(odd, capture_output=True, text=True)
    assert bad.returncode == 2 and "--patch 24 must divide the slice side 64" in bad.stderr


def test_a_tokenizer_is_scored_unquantized_and_through_its_own_tokens(refs, tokenized_store, tmp_path):
    from medvar_bundle.data.store import SliceStore
    from medvar_bundle.model_file import load_tokenizer
    from medvar_bundle.runtime import autocast, fast_bf16, model_input

    path = tokenized_store.parent / "tokenizer.pt"
    store = SliceStore(tokenized_store, split="validation")
    images = np.stack([store[i]["image"].numpy() for i in range(len(store))])
    model = load_tokenizer(path)
    recons = refs.tokenizer_reconstructions(model, images, batch_size=5)
    with torch.no_grad(), autocast("cpu", fast_bf16("cpu")):
        x = model_input(torch.from_numpy(images), "cpu")
        through_tokens = (model.decode(model.encode(x)).float()[:, 0] + 1) / 2  # what evaluate-tokenizer scores
        unquantized = (model.decoder(model.encoder(x)).float().clamp(-1, 1)[:, 0] + 1) / 2
    torch.testing.assert_close(recons["quantized"], through_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(recons["unquantized"], unquantized, atol=1e-5, rtol=0)
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--store", str(tokenized_store), "--tokenizer", str(path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "| tokenizer, unquantized |" in out.stdout and "| tokenizer, quantized |" in out.stdout
    gone = [sys.executable, str(SCRIPT), "--store", str(tokenized_store), "--tokenizer", str(tmp_path / "no.pt")]
    missing = subprocess.run(gone, capture_output=True, text=True)
    assert missing.returncode == 1 and "no.pt" in missing.stderr and missing.stderr.count("\n") == 1

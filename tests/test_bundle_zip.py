"""scripts/make_bundle.py: the model-zoo zip has the zoo layout, the package code and nothing compiled."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medvar_bundle.model_file import save_model
from medvar_bundle.networks import MultiScaleVQVAE
from medvar_bundle.networks.transformer import NextScaleTransformer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_bundle.py"
REQUIRED = [
    "configs/metadata.json",
    "configs/inference.yaml",
    "configs/logging.conf",
    "docs/README.md",
    "docs/data_license.txt",
    "LICENSE",
    "large_files.yml",
    "medvar_bundle/__init__.py",
]


def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


def test_help():
    out = _make("--help")
    assert out.returncode == 0 and "--models" in out.stdout and "dist/medvar_bundle.zip" in out.stdout


def test_zip_has_the_zoo_layout(tmp_path):
    out = _make("--out", str(tmp_path / "bundle.zip"))
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.zip"]  # no temporary file left behind
    names = zipfile.ZipFile(tmp_path / "bundle.zip").namelist()
    assert all(n.startswith("medvar_bundle/") for n in names)
    inner = {n.removeprefix("medvar_bundle/") for n in names}
    assert set(REQUIRED) <= inner
    assert {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").iterdir()} <= inner
    assert "models/" in inner and not any(n.startswith("models/") and n != "models/" for n in inner)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    package = [n for n in inner if n.startswith("medvar_bundle/")]
    assert package and all(n.endswith(".py") for n in package)


def test_zip_is_readable_as_the_umask_allows_and_a_folder_out_is_one_line(tmp_path):
    """The zip was once left with mkstemp's 0600: other users and CI could not read it."""
    old = os.umask(0o022)
    try:
        assert _make("--out", str(tmp_path / "bundle.zip")).returncode == 0
    finally:
        os.umask(old)
    assert (tmp_path / "bundle.zip").stat().st_mode & 0o777 == 0o644
    out = _make("--out", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip() == f"make_bundle: --out {tmp_path} is a folder; give the zip's file name"


def test_models_folder_goes_into_models(tmp_path):
    models = tmp_path / "run"
    models.mkdir()
    (models / "model.pt").write_bytes(b"weights")
    (models / "datasets.json").write_text("{}")
    (models / "optimizer.pt").write_bytes(b"not part of a bundle")
    assert _make("--out", str(tmp_path / "b.zip"), "--models", str(models)).returncode == 0
    with zipfile.ZipFile(tmp_path / "b.zip") as zf:
        assert sorted(n for n in zf.namelist() if n.startswith("medvar_bundle/models/")) == [
            "medvar_bundle/models/",
            "medvar_bundle/models/datasets.json",
            "medvar_bundle/models/model.pt",
        ]
        assert zf.read("medvar_bundle/models/model.pt") == b"weights"


def test_a_models_folder_without_weights_is_refused(tmp_path):
    out = _make("--out", str(tmp_path / "b.zip"), "--models", str(tmp_path))
    assert out.returncode == 2 and "holds none of" in out.stderr
    assert not (tmp_path / "b.zip").exists()


def test_unpacked_bundle_generates_with_monai_alone(tmp_path):
    """The zip, unpacked into an empty folder, runs `python -m monai.bundle run` on its inference config with
    its own package and weights (nothing from the repository) and writes NIfTI stacks."""
    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE.from_preset("tiny", image_size=64)
    transformer = NextScaleTransformer(num_datasets=1, depth=1, patch_nums=tokenizer.patch_nums)
    models = tmp_path / "models"
    models.mkdir()
    registry = {"brain_mr": {"id": 0, "modality": "MR", "anatomy": "brain", "spacing": [1.0, 1.0, 1.5],
                             "matrix": [192, 256, 120], "ct_window": None}}  # fmt: skip
    save_model(models / "medvar.pt", tokenizer, transformer, registry, step=1)
    assert _make("--out", str(tmp_path / "b.zip"), "--models", str(models)).returncode == 0
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    zipfile.ZipFile(tmp_path / "b.zip").extractall(unpacked)
    root = unpacked / "medvar_bundle"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [sys.executable, "-c", "import medvar_bundle; print(medvar_bundle.__file__)"],
        capture_output=True, text=True, cwd=root, env=env,
    )  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(root), where.stdout
    out = tmp_path / "samples"
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml",
         "--num_samples", "2", "--output_dir", str(out), "--progress", "False"],
        capture_output=True, text=True, cwd=root, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    stack = nib.load(out / "brain_mr.nii.gz")
    assert stack.shape == (64, 64, 2) and stack.get_data_dtype() == np.uint8
    assert json.loads((out / "summary.json").read_text())["num"] == 2


def test_a_training_runs_portable_file_becomes_medvar_pt(tmp_path):
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    (run / "model.pt").write_bytes(b"portable")
    (run / "models" / "model.pt").write_bytes(b"state_dict")
    assert _make("--out", str(tmp_path / "b.zip"), "--models", str(run / "models")).returncode == 0
    with zipfile.ZipFile(tmp_path / "b.zip") as zf:
        assert zf.read("medvar_bundle/models/medvar.pt") == b"portable"
        assert zf.read("medvar_bundle/models/model.pt") == b"state_dict"

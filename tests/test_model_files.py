"""Malformed model files: each loader and each command that reads one answers with one line naming the file.

Every bad file is built here from a valid one (or from another project's weights, built locally):
wrong tensor shapes, missing keys, a torchvision ResNet-18 state_dict, a pickle whose ``__reduce__``
runs ``os.system``, a truncated file, an empty file and a file that is not a torch file at all.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from medvar_bundle.cli import main
from medvar_bundle.model_file import (
    ModelFileError,
    load_baseline,
    load_model,
    load_tokenizer,
    save_baseline,
    save_tokenizer,
)
from medvar_bundle.networks import MultiScaleVQVAE
from medvar_bundle.networks.ddpm import ConditionalDDPM

REGISTRY = {"a": {"id": 0, "modality": "CT"}, "b": {"id": 1, "modality": "MR"}}


class RunsCode:
    """Unpickling this object runs a shell command (what ``weights_only=True`` must refuse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def good(model_path, tmp_path_factory) -> dict[str, Path]:
    """A valid file for each loader: tokenizer, MedVAR model (conftest's ``model_path``), DDPM baseline."""
    root = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    tokenizer = save_tokenizer(MultiScaleVQVAE.from_preset("tiny", image_size=64), root / "tokenizer.pt", step=1)
    ddpm = ConditionalDDPM(num_datasets=2, image_size=32)
    return {
        "tokenizer": tokenizer,
        "model": model_path,
        "baseline": save_baseline(root / "baseline.pt", ddpm, REGISTRY),
    }


LOADERS = {"tokenizer": load_tokenizer, "model": load_model, "baseline": load_baseline}


def _state_dict(blob: dict, kind: str) -> dict:
    """The (first) state_dict of a loaded file of ``kind``."""
    return blob["tokenizer"]["state_dict"] if kind == "model" else blob["state_dict"]


def bad_file(kind: str, case: str, good: dict[str, Path], folder: Path) -> tuple[Path, str]:
    """Write a malformed file of ``kind``; returns it and a phrase its error line must contain."""
    path = folder / f"{kind}-{case}.pt"
    blob = torch.load(good[kind], weights_only=True)
    if case == "wrong_shape":
        weights = _state_dict(blob, kind)
        name = next(k for k, v in weights.items() if v.ndim == 4)
        weights[name] = torch.zeros(*weights[name].shape[:-1], weights[name].shape[-1] + 1)
        torch.save(blob, path)
        return path, f"other shapes: 1 ({name}"
    if case == "missing_key":
        weights = _state_dict(blob, kind)
        name = sorted(weights)[0]
        del weights[name]
        torch.save(blob, path)
        return path, f"missing 1 ({name})"
    if case == "foreign":
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
        return path, "not a MedVAR" if kind == "tokenizer" else "expected format"
    if case == "pickled_code":
        torch.save({"config": {}, "state_dict": {}, "format": "x", "payload": RunsCode(folder / "MARKER")}, path)
        return path, "carries pickled code"
    if case == "truncated":
        payload = good[kind].read_bytes()
        path.write_bytes(payload[: len(payload) // 2])
        return path, "not a readable"
    if case == "empty":
        path.write_bytes(b"")
        return path, "not a readable"
    assert case == "not_torch"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return path, "not a readable"


CASES = ["wrong_shape", "missing_key", "foreign", "pickled_code", "truncated", "empty", "not_torch"]


def test_the_good_files_load(good):
    assert load_tokenizer(good["tokenizer"]).image_size == 64
    assert sorted(load_model(good["model"]).datasets) == ["abdomen_ct", "brain_mr"]
    assert load_baseline(good["baseline"]).model.num_datasets == 2


@pytest.mark.parametrize("kind", sorted(LOADERS))
@pytest.mark.parametrize("case", CASES)
def test_a_bad_file_gives_one_line_naming_it(kind, case, good, tmp_path):
    path, phrase = bad_file(kind, case, good, tmp_path)
    with pytest.raises(ValueError) as err:
        LOADERS[kind](path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and phrase in message, message
    assert not (tmp_path / "MARKER").exists()  # the pickled os.system never ran
    if case in ("wrong_shape", "missing_key"):
        assert isinstance(err.value, ModelFileError)


def test_a_config_that_does_not_fit_its_weights_is_refused_before_building(good, tmp_path, monkeypatch):
    blob = torch.load(good["tokenizer"], weights_only=True)
    blob["config"]["ch"] = 4096  # would build a network far larger than the file holds
    torch.save(blob, tmp_path / "big.pt")
    built = []
    real_init = MultiScaleVQVAE.__init__

    def spy(self, *args, **kwargs):
        built.append(torch.get_default_device().type)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(MultiScaleVQVAE, "__init__", spy)
    with pytest.raises(ModelFileError, match="other shapes"):
        load_tokenizer(tmp_path / "big.pt")
    assert built == ["meta"]  # only the allocation-free shape check was built
    blob["config"] = {"no_such_option": 1}
    torch.save(blob, tmp_path / "config.pt")
    with pytest.raises(ModelFileError, match="config does not build a MultiScaleVQVAE .TypeError"):
        load_tokenizer(tmp_path / "config.pt")


@pytest.mark.parametrize("case", ["wrong_shape", "foreign", "pickled_code", "empty"])
def test_commands_answer_a_bad_model_file_with_one_line(case, good, synthetic_store, tmp_path, capsys):
    store = shutil.copytree(synthetic_store, tmp_path / "store")  # tokenize takes the store's writer lock
    model, phrase = bad_file("model", case, good, tmp_path)
    tokenizer, tok_phrase = bad_file("tokenizer", case, good, tmp_path)
    runs = [
        (["generate", "--model", str(model), "--out", str(tmp_path / "gen")], model, phrase),
        (["evaluate-tokenizer", "--tokenizer", str(tokenizer), "--store", str(store)], tokenizer, tok_phrase),
        (["tokenize", "--tokenizer", str(tokenizer), "--store", str(store)], tokenizer, tok_phrase),
    ]
    for argv, path, expected in runs:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"medvar {argv[0]}: error: {path}: ") and expected in err[0], err
    assert not (tmp_path / "MARKER").exists()

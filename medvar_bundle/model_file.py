"""Model files: the tokenizer file, the self-contained MedVAR model file and the DDPM baseline file.

Every file is a dictionary of tensors and JSON-able values, written atomically and read back with
``torch.load(..., weights_only=True)`` (:func:`~medvar_bundle.files.load_weights`), so loading a
file never runs code from it.

The MedVAR model file holds everything generation needs:

- ``tokenizer``: ``{"config", "state_dict"}`` of the :class:`MultiScaleVQVAE`;
- ``transformer``: ``{"config", "state_dict"}`` of the :class:`NextScaleTransformer`;
- ``datasets``: the dataset registry of the slice store it was trained on (``datasets.json``:
  name → id, modality, anatomy, median original spacing (mm) and matrix, CT window in HU);
- ``step`` and free-form ``extra`` (training figures).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medvar_bundle.files import atomic_torch_save, load_weights, read_format_file
from medvar_bundle.networks.ddpm import ConditionalDDPM
from medvar_bundle.networks.msvqvae import MultiScaleVQVAE
from medvar_bundle.networks.transformer import NextScaleTransformer

MODEL_FILE = "model.pt"
FORMAT = "medvar-model-1"
TOKENIZER_FILE = "tokenizer.pt"
BASELINE_FILE = "baseline.pt"
BASELINE_FORMAT = "medvar-ddpm-1"


def save_tokenizer(model: MultiScaleVQVAE, path: str | os.PathLike, step: int, extra: dict | None = None) -> Path:
    """Write a self-contained tokenizer file: ``{"config", "state_dict", "step", ...}`` (atomic)."""
    return atomic_torch_save(
        path, {"config": model.config, "state_dict": model.state_dict(), "step": int(step), **(extra or {})}
    )


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu") -> MultiScaleVQVAE:
    """Rebuild a tokenizer saved by :func:`save_tokenizer` (eval mode)."""
    path = Path(path)
    blob = load_weights(path, "tokenizer")
    if not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
        raise ValueError(f"{path}: not a MedVAR tokenizer file (no config/state_dict)")
    model = MultiScaleVQVAE(**blob["config"])
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()


class ModelMismatchError(ValueError):
    """Tokenizer, transformer and dataset registry do not fit together."""


def check_compatible(
    tokenizer: MultiScaleVQVAE, transformer: NextScaleTransformer, datasets: dict | None = None
) -> None:
    """Raise :class:`ModelMismatchError` (one line) unless the transformer speaks the tokenizer's
    tokens (same V, C_vae, scales) and has one id per registry dataset."""
    t, v = tokenizer.config, transformer.config
    for key in ("vocab_size", "embed_dim", "patch_nums"):
        a, b = (tuple(t[key]), tuple(v[key])) if key == "patch_nums" else (t[key], v[key])
        if a != b:
            raise ModelMismatchError(
                f"tokenizer/transformer mismatch: tokenizer {key}={t[key]}, transformer {key}={v[key]}"
            )
    if datasets is not None:
        ids = sorted(int(e["id"]) for e in datasets.values())
        if ids != list(range(transformer.num_datasets)):
            raise ModelMismatchError(
                f"dataset registry ids {ids} do not match the transformer's {transformer.num_datasets} dataset ids"
            )


@dataclass
class MedVARModel:
    """A loaded model file: the two networks (eval mode) and the dataset registry."""

    tokenizer: MultiScaleVQVAE
    transformer: NextScaleTransformer
    datasets: dict
    step: int = 0
    extra: dict = field(default_factory=dict)

    def dataset_id(self, name: str) -> int:
        """Id of a dataset by name; ``ValueError`` listing the valid names otherwise."""
        if name not in self.datasets:
            raise ValueError(f"unknown dataset {name!r}; this model knows: {', '.join(sorted(self.datasets))}")
        return int(self.datasets[name]["id"])

    def to(self, device: str | torch.device) -> MedVARModel:
        self.tokenizer.to(device)
        self.transformer.to(device)
        return self


def save_model(
    path: str | os.PathLike,
    tokenizer: MultiScaleVQVAE,
    transformer: NextScaleTransformer,
    datasets: dict,
    step: int = 0,
    extra: dict | None = None,
) -> Path:
    """Write the self-contained model file atomically (temporary file, then rename)."""
    check_compatible(tokenizer, transformer, datasets)
    blob = {
        "format": FORMAT,
        "tokenizer": {"config": tokenizer.config, "state_dict": tokenizer.state_dict()},
        "transformer": {"config": transformer.config, "state_dict": transformer.state_dict()},
        "datasets": datasets,
        "step": int(step),
        "extra": extra or {},
    }
    return atomic_torch_save(path, blob)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> MedVARModel:
    """Read a model file written by :func:`save_model`; networks in eval mode on ``device``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a MedVAR model file; :class:`ModelMismatchError` if its parts disagree.
    """
    path = Path(path)
    blob = read_format_file(path, "MedVAR model", FORMAT)
    tokenizer = MultiScaleVQVAE(**blob["tokenizer"]["config"])
    tokenizer.load_state_dict(blob["tokenizer"]["state_dict"])
    transformer = NextScaleTransformer(**blob["transformer"]["config"])
    transformer.load_state_dict(blob["transformer"]["state_dict"])
    try:
        check_compatible(tokenizer, transformer, blob["datasets"])
    except ModelMismatchError as err:
        raise ModelMismatchError(f"{path}: {err}") from err
    model = MedVARModel(
        tokenizer.eval(), transformer.eval(), blob["datasets"], blob.get("step", 0), blob.get("extra", {})
    )
    return model.to(device)


@dataclass
class DDPMBaseline:
    """A loaded baseline file: the network (eval mode) and the dataset registry it was trained on."""

    model: ConditionalDDPM
    datasets: dict
    step: int = 0
    extra: dict = field(default_factory=dict)


def _check_registry(model: ConditionalDDPM, datasets: dict) -> None:
    ids = sorted(int(e["id"]) for e in datasets.values())
    if ids != list(range(model.num_datasets)):
        raise ValueError(f"dataset registry ids {ids} do not match the network's {model.num_datasets} dataset ids")


def save_baseline(
    path: str | os.PathLike, model: ConditionalDDPM, datasets: dict, step: int = 0, extra: dict | None = None
) -> Path:
    """Write the self-contained baseline file ``{"format", "config", "state_dict", "datasets",
    "step", "extra"}`` atomically (temporary file, then rename)."""
    _check_registry(model, datasets)
    blob = {
        "format": BASELINE_FORMAT, "config": model.config, "state_dict": model.state_dict(), "datasets": datasets,
        "step": int(step), "extra": extra or {},
    }  # fmt: skip
    return atomic_torch_save(path, blob)


def load_baseline(path: str | os.PathLike, device: str | torch.device = "cpu") -> DDPMBaseline:
    """Read a file written by :func:`save_baseline`; the network in eval mode, ``channels_last``, on ``device``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a baseline file, or its registry does not fit the network.
    """
    path = Path(path)
    blob = read_format_file(path, "DDPM baseline", BASELINE_FORMAT)
    model = ConditionalDDPM(**blob["config"])
    model.load_state_dict(blob["state_dict"])
    try:
        _check_registry(model, blob["datasets"])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    model = model.to(device, memory_format=torch.channels_last).eval()
    return DDPMBaseline(model, blob["datasets"], blob.get("step", 0), blob.get("extra", {}))

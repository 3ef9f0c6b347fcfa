"""The self-contained MedVAR model file (``models/model.pt`` in a bundle).

One ``torch.save`` dictionary holds everything generation needs:

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

from medvar_bundle.data.store import atomic_torch_save
from medvar_bundle.networks.msvqvae import MultiScaleVQVAE
from medvar_bundle.networks.transformer import NextScaleTransformer

MODEL_FILE = "model.pt"
FORMAT = "medvar-model-1"


class ModelMismatchError(ValueError):
    """Tokenizer, transformer and dataset registry do not fit together."""


def read_format_file(path: Path, kind: str, fmt: str) -> dict:
    """Load a self-contained file whose dictionary carries ``"format": fmt`` (on CPU).

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line when the file is truncated, foreign or of another format.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {kind} file not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: one line, not a traceback
        raise ValueError(f"{path}: not a readable {kind} file ({type(err).__name__}: {err})") from err
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise ValueError(f"{path}: not a {kind} file (expected format {fmt!r})")
    return blob


def check_compatible(tokenizer: MultiScaleVQVAE, transformer: NextScaleTransformer, datasets: dict | None = None) -> None:
    """Raise :class:`ModelMismatchError` (one line) unless the transformer speaks the tokenizer's
    tokens (same V, C_vae, scales) and has one id per registry dataset."""
    t, v = tokenizer.config, transformer.config
    for key in ("vocab_size", "embed_dim", "patch_nums"):
        a, b = (tuple(t[key]), tuple(v[key])) if key == "patch_nums" else (t[key], v[key])
        if a != b:
            raise ModelMismatchError(f"tokenizer/transformer mismatch: tokenizer {key}={t[key]}, transformer {key}={v[key]}")
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
    model = MedVARModel(tokenizer.eval(), transformer.eval(), blob["datasets"], blob.get("step", 0), blob.get("extra", {}))
    return model.to(device)

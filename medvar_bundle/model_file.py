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

from medvar_bundle.files import atomic_torch_save, load_weights, one_line, read_format_file
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


class ModelFileError(ValueError):
    """A model file that cannot be used: one line naming the file and the reason."""


def _names(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def _rebuild(path: Path, kind: str, part: object, cls: type[torch.nn.Module]) -> torch.nn.Module:
    """Build ``cls`` from ``part = {"config", "state_dict"}`` of a model file and load its weights.

    The network is first built on the ``meta`` device (nothing allocated) and its parameter names
    and shapes compared with the file's tensors, so a config that does not fit its weights (or
    would build a network larger than the file) is refused before any memory is spent on it.

    Raises:
        ModelFileError: one line naming ``path``: the part is missing, its config does not build
            a ``cls``, or its weights miss keys, carry unexpected ones or have other shapes.
    """
    config = part.get("config") if isinstance(part, dict) else None
    weights = part.get("state_dict") if isinstance(part, dict) else None
    if not isinstance(config, dict) or not isinstance(weights, dict):
        raise ModelFileError(f"{path}: not a MedVAR {kind} (no {kind} config and state_dict)")
    bad = [str(k) for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelFileError(f"{path}: the {kind} state_dict holds values that are not tensors: {_names(bad)}")
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in cls(**config).state_dict().items()}
    except Exception as err:  # a foreign or damaged config: one line, not a traceback
        text = f"{type(err).__name__}: {one_line(err, 200)}"
        raise ModelFileError(f"{path}: the {kind} config does not build a {cls.__name__} ({text})") from None
    missing = [k for k in shapes if k not in weights]
    unexpected = [k for k in weights if k not in shapes]
    other = [f"{k} {tuple(weights[k].shape)} instead of {shapes[k]}" for k in shapes if k in weights
             and tuple(weights[k].shape) != shapes[k]]  # fmt: skip
    if missing or unexpected or other:
        problems = [f"{what} {_names(keys)}" for what, keys in
                    (("missing", missing), ("unexpected", unexpected), ("other shapes:", other)) if keys]  # fmt: skip
        raise ModelFileError(f"{path}: the {kind} weights do not fit its config: {'; '.join(problems)}")
    model = cls(**config)
    model.load_state_dict(weights)
    return model


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu") -> MultiScaleVQVAE:
    """Rebuild a tokenizer saved by :func:`save_tokenizer` (eval mode).

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file: unreadable, foreign or carrying pickled code
            (:func:`~medvar_bundle.files.load_weights`), or :class:`ModelFileError`.
    """
    path = Path(path)
    model = _rebuild(path, "tokenizer", load_weights(path, "tokenizer"), MultiScaleVQVAE)
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
        ValueError: one line naming the file: not a MedVAR model file, pickled code, a part that
            does not fit its config (:class:`ModelFileError`), or :class:`ModelMismatchError` if
            its parts disagree.
    """
    path = Path(path)
    blob = read_format_file(path, "MedVAR model", FORMAT)
    tokenizer = _rebuild(path, "tokenizer", blob.get("tokenizer"), MultiScaleVQVAE)
    transformer = _rebuild(path, "transformer", blob.get("transformer"), NextScaleTransformer)
    _check_datasets(path, blob.get("datasets"))
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


def _check_datasets(path: Path, datasets: object) -> None:
    """Refuse a dataset registry that is not ``{name: {"id": int, ...}}`` (:class:`ModelFileError`)."""
    entries = datasets.values() if isinstance(datasets, dict) else None
    if entries is None or not all(isinstance(e, dict) and isinstance(e.get("id"), int) for e in entries):
        raise ModelFileError(f"{path}: no dataset registry ({{name: {{'id': int, ...}}}}) in the file")


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
        ValueError: one line naming the file: not a baseline file, pickled code, weights that do
            not fit the config (:class:`ModelFileError`), or a registry that does not fit the network.
    """
    path = Path(path)
    blob = read_format_file(path, "DDPM baseline", BASELINE_FORMAT)
    model = _rebuild(path, "DDPM baseline", blob, ConditionalDDPM)
    _check_datasets(path, blob.get("datasets"))
    try:
        _check_registry(model, blob["datasets"])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    model = model.to(device, memory_format=torch.channels_last).eval()
    return DDPMBaseline(model, blob["datasets"], blob.get("step", 0), blob.get("extra", {}))

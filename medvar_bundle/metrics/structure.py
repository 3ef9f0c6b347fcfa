"""An in-domain structure metric that needs no downloaded weights.

FID-style metrics need ImageNet/RadImageNet/CLIP weights that are never on an offline machine,
and the weight-free metrics (histogram, power spectrum) cannot tell a brain from a blotch. This
module holds a small CNN trained only on a store's *training* slices to tell each slice's dataset
and its relative position along the body axis (``SliceStore.positions``: 0 the lowest kept slice
of its volume, 1 the highest), and to set apart texture-matched surrogates of the slices (their
intensities and grain, their anatomy scrambled: :class:`RandTextureSurrogated`). To do that it
has to see anatomy: which organs, in which layout, at which level of the body.

Its features ``(N, 128 + 128)`` are the spatial means of the stem's and the first three stages'
activations (pixel-level detail, texture and edges at 2 to 16 pixels of the 256² slice) beside
the 128-d embedding the heads read (global layout), each standardised by the training slices'
mean and standard deviation (at least the median one) so that every dimension weighs alike. In
that space the evaluation reports the Fréchet distance and k-NN precision / recall (Kynkäänniemi
et al., 2019) of a set against the training slices, with the held-out-vs-training floor beside
them (:mod:`medvar_bundle.evaluation.scores`).

``configs/train_structure.yaml`` (``medvar train-structure``) trains it with MONAI's
``SupervisedTrainer``; :func:`save_structure_net` freezes it with its training record into
``STORE/structure.pt``, where ``medvar evaluate`` finds it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.transforms import RandomizableTransform
from numpy.typing import ArrayLike
from torch import Tensor, nn

from medvar_bundle.data.store import SliceStore
from medvar_bundle.files import atomic_torch_save, atomic_write_json, load_weights, read_format_file
from medvar_bundle.weights import MissingWeightsError

from .damage import scramble_phase
from .slices import as_slices

STRUCTURE_FILE = "structure.pt"
"""The frozen network's file name inside a store (``medvar evaluate`` looks for it there)."""

FORMAT = "medvar-structure-2"
STALE_FORMAT = "medvar-structure-1"
"""Networks of MedVAR < 0.8.3, trained without texture surrogates: refused, to be trained again."""


class StructureNet(nn.Module):
    """A CNN with a dataset head and a relative-position head.

    Input: slices in [0, 1] ``(B, 1, S, S)``, resized to ``input_size²`` if needed. A stem (one
    MONAI ``Convolution``: 3×3, stride 2, batch norm, ReLU) with ``channels[0]`` channels, then
    one stage per further entry of ``channels``, each two ``Convolution`` blocks (the first with
    stride 2), so the last stage is ``input_size / 2^len(channels)`` pixels wide; its map is
    averaged to 2×2 and flattened into an ``embed_dim`` embedding (linear + ReLU) that both heads
    read. Features: the spatial means of the stem and every stage but the last, then the embedding.

    Args:
        num_datasets: classes of the dataset head: the store's datasets, plus one when training
            shows it texture-matched surrogates as a class of their own (:class:`RandTextureSurrogated`).
        channels: channels of the stem and of each stage.
        embed_dim: width of the embedding.
        input_size: side the slices are resized to.
    """

    def __init__(
        self,
        num_datasets: int,
        channels: Sequence[int] = (16, 16, 32, 64, 128),
        embed_dim: int = 128,
        input_size: int = 256,
    ) -> None:
        super().__init__()
        self.config = {
            "num_datasets": int(num_datasets), "channels": [int(c) for c in channels], "embed_dim": int(embed_dim),
            "input_size": int(input_size),
        }  # fmt: skip
        stages, c_in = [Convolution(2, 1, channels[0], strides=2, kernel_size=3, norm="batch", act="relu")], channels[0]
        for c in channels[1:]:
            stages.append(
                nn.Sequential(
                    Convolution(2, c_in, c, strides=2, kernel_size=3, norm="batch", act="relu"),
                    Convolution(2, c, c, kernel_size=3, norm="batch", act="relu"),
                )
            )
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.embed = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c_in, embed_dim), nn.ReLU())
        self.dataset_head = nn.Linear(embed_dim, num_datasets)
        self.position_head = nn.Linear(embed_dim, 1)
        dim = sum(channels[:-1]) + embed_dim
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))

    def _forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """Per-stage spatial means of the first stages ``[(B, C_k)]`` and the embedding ``(B, E)``."""
        size = self.config["input_size"]
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="area" if x.shape[-1] >= size else "bilinear")
        means = []
        for stage in self.stages[:-1]:
            x = stage(x)
            means.append(x.mean(dim=(2, 3)))
        return means, self.embed(self.stages[-1](x))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Dataset logits ``(B, num_datasets)`` and relative position ``(B,)`` of slices ``(B, 1, S, S)``."""
        _, embedding = self._forward(x)
        return self.dataset_head(embedding), self.position_head(embedding)[:, 0]

    @property
    def feature_dim(self) -> int:
        """``D``, the width of the features :meth:`extract` returns."""
        return self.feature_mean.numel()

    def raw_features(self, x: Tensor) -> Tensor:
        """Unstandardised features ``(B, D)`` of slices ``(B, 1, S, S)`` in [0, 1]."""
        means, embedding = self._forward(x)
        return torch.cat([*means, embedding], dim=1)

    @torch.no_grad()
    def extract(self, images: ArrayLike | Tensor, batch_size: int = 32, standardise: bool = True) -> np.ndarray:
        """Features of uint8 slices ``(N, S, S)``: float64 ``(N, D)``, standardised by the training
        slices' statistics unless ``standardise`` is False. Runs in eval mode on the network's device."""
        slices = as_slices(images)
        was_training, device = self.training, self.feature_mean.device
        self.eval()
        out = []
        for start in range(0, len(slices), batch_size):
            x = torch.from_numpy(slices[start : start + batch_size]).to(device, torch.float32)[:, None] / 255.0
            f = self.raw_features(x)
            out.append((f - self.feature_mean) / self.feature_std if standardise else f)
        self.train(was_training)
        return torch.cat(out).double().cpu().numpy()


class StructureLoss(nn.Module):
    """Cross-entropy of the dataset plus ``position_weight`` × the squared error of the relative
    position: ``((logits (B, K), position (B,)), (dataset_id (B,), position (B,))) → scalar``.
    A NaN position (a texture-matched surrogate has none) is left out of the squared error."""

    def __init__(self, position_weight: float = 5.0) -> None:
        super().__init__()
        self.position_weight = position_weight

    def forward(self, output: tuple[Tensor, Tensor], target: tuple[Tensor, Tensor]) -> Tensor:
        (logits, position), (dataset_id, true_position) = output, target
        known = ~torch.isnan(true_position)
        squared_error = (position.float() - true_position.float().nan_to_num()).square()
        return F.cross_entropy(logits.float(), dataset_id) + self.position_weight * (
            squared_error[known].sum() / known.sum().clamp(min=1)
        )


class RandTextureSurrogated(RandomizableTransform):
    """With probability ``prob``, replace an item's slice by a texture-matched surrogate of itself
    (:func:`~medvar_bundle.metrics.damage.scramble_phase` at fraction 1: the slice's intensities
    and power spectrum, its anatomy gone) labelled ``surrogate_id`` with a NaN position.

    Telling a dataset from its texture alone needs no anatomy, so a network trained only to name
    the dataset learns grain and gives grainy noise blobs the features of real slices. With the
    surrogates as a class of their own, the dataset can only be named from the layout.
    Items: ``{"image": float (1, S, S) in [0, 1], "dataset_id": int, "position": float}``.

    Args:
        surrogate_id: the surrogates' class (the number of datasets: one past the last id).
        prob: the share of items replaced.
    """

    def __init__(self, surrogate_id: int, prob: float = 0.2) -> None:
        RandomizableTransform.__init__(self, prob)
        self.surrogate_id = surrogate_id

    def __call__(self, data: dict) -> dict:
        self.randomize(None)
        if not self._do_transform:
            return data
        out, image = dict(data), data["image"].clone()
        slices = (image[:1].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        surrogate = scramble_phase(slices, 1.0, seed=int(self.R.randint(2**31)))
        image[:1] = torch.from_numpy(surrogate).to(image) / 255.0
        out.update(image=image, dataset_id=self.surrogate_id, position=float("nan"))
        return out


class StructureSlices(torch.utils.data.Dataset):
    """A store split as ``{"image": float (1, S, S) in [0, 1], "dataset_id": int, "position": float}``.

    Args:
        store: the slice store.
        split: its split.
        transform: applied to each item (e.g. MONAI ``RandAffined`` on ``image``).
    """

    def __init__(self, store: str | os.PathLike, split: str = "training", transform=None) -> None:
        self.store = SliceStore(store, split=split)
        if len(self.store) == 0:
            raise ValueError(f"{store}: no {split} slices to train the structure network on")
        self.datasets, self.transform = self.store.datasets, transform

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict:
        item = self.store[index]
        out = {
            "image": item["image"][None].float() / 255.0,
            "dataset_id": item["dataset_id"],
            "position": float(self.store.positions[index]),
        }
        return self.transform(out) if self.transform is not None else out


def structure_batch(batch: dict, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs):
    """``prepare_batch`` of the trainer: ``(image (B, 1, S, S), (dataset_id (B,), position (B,)))``."""
    image = batch["image"].to(device, non_blocking=non_blocking)
    targets = (batch["dataset_id"].to(device).long(), batch["position"].to(device).float())
    return image, targets


@torch.no_grad()
def _heads_on(network: StructureNet, store: SliceStore, batch_size: int) -> dict:
    """Dataset accuracy and mean |position error| of the network on a store split."""
    if len(store) == 0:
        return {"num_slices": 0, "dataset_accuracy": None, "position_mae": None}
    device = network.feature_mean.device
    network.eval()
    correct, error = 0, 0.0
    for start in range(0, len(store), batch_size):
        index = range(start, min(start + batch_size, len(store)))
        x = torch.stack([store[i]["image"] for i in index]).to(device, torch.float32)[:, None] / 255.0
        logits, position = network(x)
        correct += int((logits.argmax(1).cpu().numpy() == store.dataset_ids[list(index)]).sum())
        error += float(np.abs(position.cpu().numpy() - store.positions[list(index)]).sum())
    return {"num_slices": len(store), "dataset_accuracy": correct / len(store), "position_mae": error / len(store)}


def save_structure_net(
    network: StructureNet,
    store: str | os.PathLike,
    output_file: str | os.PathLike,
    settings: dict,
    started: float | None = None,
    batch_size: int = 64,
) -> Path:
    """Freeze a trained network: fit the feature standardisation on the store's training slices,
    measure both heads on the training and validation splits, and write ``output_file``
    (state_dict, config, the store's dataset registry and the record) and ``<output_file>.json``
    (the record), both atomically.

    Args:
        network: the trained network.
        store: the store it was trained on.
        output_file: the ``.pt`` file (``STORE/structure.pt`` by default).
        settings: the training settings to record (steps, batch size, learning rate, seed).
        started: ``time.time()`` at the start of training, for the record's seconds.
        batch_size: slices per batch here.
    """
    network.eval()
    train = SliceStore(store, split="training")
    slices = np.stack([train[i]["image"].numpy() for i in range(len(train))])
    raw = network.extract(slices, batch_size, standardise=False)
    std = raw.std(axis=0)
    # a unit (nearly) silent on every training slice may fire on an unusual image: dividing by its
    # tiny std would let that one unit outweigh all others, so no std counts below the median one
    network.feature_mean.copy_(torch.from_numpy(raw.mean(axis=0)))
    network.feature_std.copy_(torch.from_numpy(np.maximum(std, max(float(np.median(std)), 1e-6))))
    record = {
        "settings": settings,
        "seconds": None if started is None else time.time() - started,
        "training": _heads_on(network, train, batch_size),
        "validation": _heads_on(network, SliceStore(store, split="validation"), batch_size),
        "feature_dim": int(raw.shape[1]),
    }
    blob = {
        "format": FORMAT, "config": network.config, "datasets": train.datasets, "record": record,
        "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
    }  # fmt: skip
    path = atomic_torch_save(output_file, blob)
    atomic_write_json(Path(f"{path}.json"), {"datasets": sorted(train.datasets), **record})
    return path


def load_structure_net(
    path: str | os.PathLike | None, store: str | os.PathLike, device: str | torch.device = "cpu"
) -> StructureNet:
    """Load a frozen structure network (``weights_only``) for the datasets of ``store``.

    Args:
        path: the ``structure.pt``; None looks for ``STORE/structure.pt``.
        store: the real store the evaluation scores against; the network must have been trained
            on a store with the same dataset names and ids.

    Raises:
        MissingWeightsError: no file, or one of an older version (one line saying how to train one).
        ValueError: a file of another kind, or trained on other datasets.
    """
    file = Path(path) if path else Path(store) / STRUCTURE_FILE
    if not file.is_file():
        if path:
            raise MissingWeightsError(f"{file}: structure network not found (train one with `medvar train-structure`)")
        raise MissingWeightsError(
            f"no {STRUCTURE_FILE} in {store}: train one with `medvar train-structure --store {store}`"
        )
    try:
        blob = read_format_file(file, "structure network", FORMAT)
    except ValueError:
        old = load_weights(file, "structure network")
        if isinstance(old, dict) and old.get("format") == STALE_FORMAT:
            raise MissingWeightsError(
                f"{file}: a structure network of MedVAR < 0.8.3, trained without texture surrogates (its structure "
                f"FD rewards grainy noise); train it again with `medvar train-structure --store {store}`"
            ) from None
        raise
    ids = {name: entry["id"] for name, entry in SliceStore(store).datasets.items()}
    trained = {name: entry["id"] for name, entry in blob["datasets"].items()}
    if ids != trained:
        raise ValueError(
            f"{file}: trained on datasets {trained}, but the store {store} has {ids}; "
            f"train one on this store with `medvar train-structure --store {store}`"
        )
    network = StructureNet(**blob["config"])
    network.load_state_dict(blob["state_dict"])
    return network.to(device).eval().requires_grad_(False)

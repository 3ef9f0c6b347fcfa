"""Pieces shared by the training configs: validation store, epoch budget, schedules, seeding, checkpoint lookup."""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.resumable import derived_seed
from ..data.store import SliceStore

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"checkpoint_(\d+)\.pt$")


def validation_store(stores, dataset_class: type[SliceStore] = SliceStore) -> SliceStore:
    """The ``validation`` split of the store(s), or their ``training`` split (with a warning) if there is none."""
    store = dataset_class(stores, split="validation")
    if len(store) == 0:
        logger.warning("no 'validation' split in %s: validating on the training split", stores)
        store = dataset_class(stores, split="training")
    return store


def epochs_for(max_steps: int, loader: DataLoader) -> int:
    """Epochs of ``loader`` that hold ``max_steps`` steps (the trainer's ``max_epochs``).

    Raises:
        ValueError: one line naming the store(s) when the loader has not one full batch.
    """
    if len(loader) == 0:
        store = getattr(loader.dataset, "data", loader.dataset)  # a SeededSamples wraps the store
        roots = [str(r) for r in getattr(store, "roots", [])]
        raise ValueError(
            f"{roots}: {len(loader.sampler)} slices to train on, fewer than one batch of {loader.batch_size}"
        )
    return math.ceil(max_steps / len(loader))


def evenly_spaced(total: int, limit: int | None) -> np.ndarray:
    """Indices of at most ``limit`` items spread evenly over ``range(total)``: all of them when
    ``limit`` is None or not below ``total`` (a capped evaluation still sees every volume)."""
    if limit is None or limit >= total:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, num=limit).round().astype(int))


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier of the optimizer step that follows ``step`` completed steps
    (:class:`~torch.optim.lr_scheduler.LambdaLR`'s count): linear warm-up ``(step + 1) / warmup_steps``,
    then a cosine from 1 down to ``min_lr_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def reseed(seed: int, step: int, rank: int) -> None:
    """Seed torch's global generator from (seed, step, rank), so the random draws of a step
    (conditional dropout, stochastic depth, diffusion noise, dead-code re-draws) are the same in a
    resumed run as in an uninterrupted one."""
    torch.manual_seed(derived_seed(seed, step, rank))


def checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The ``checkpoint_<step>.pt`` files of ``folder``, oldest step first."""
    found = []
    for p in Path(folder).glob("*checkpoint_*.pt"):
        m = CHECKPOINT_PATTERN.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The ``checkpoint_<step>.pt`` with the highest step in ``folder``, or None."""
    found = checkpoints(folder)
    return found[-1] if found else None

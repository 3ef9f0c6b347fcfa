"""Pieces shared by the training engines: batches from the slice store, checkpoints, resume."""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.engines import SupervisedTrainer
from torch.utils.data import DataLoader, DistributedSampler

from ..data.store import SliceStore
from ..files import load_weights

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"checkpoint_(\d+)\.pt$")


def store_loader(
    stores,
    split: str | None,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    num_replicas: int = 1,
    rank: int = 0,
    transform=None,
    dataset_class: type[SliceStore] = SliceStore,
) -> DataLoader:
    """A DataLoader over one or several slice stores.

    ``dataset_class`` reads the stores: :class:`SliceStore` (images) or a subclass such as
    :class:`~medvar_bundle.data.tokens.TokenStore` (token ids). The sampler is a seeded
    :class:`DistributedSampler` (one replica unless training with DDP); MONAI's workflows call
    ``set_epoch`` on it, so the data order of every epoch is a function of the seed and the epoch
    alone: a run resumed from a checkpoint on an epoch boundary sees the same batches as an
    uninterrupted one (mid-epoch, Ignite restarts the epoch's iterator; random augmentation, if
    ``transform`` has any, is not checkpointed).
    """
    dataset = dataset_class(stores, split=split, transform=transform)
    if len(dataset) == 0:
        raise ValueError(f"{stores}: no slices in split {split!r}")
    sampler = DistributedSampler(
        dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
    )
    if drop_last and len(sampler) < batch_size:
        raise ValueError(f"{stores}: {len(sampler)} slices in split {split!r}, fewer than one batch of {batch_size}")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last)


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
        roots = [str(r) for r in getattr(loader.dataset, "roots", [])]
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
    (conditional dropout, stochastic depth) are the same in a resumed run as in an uninterrupted one."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The ``checkpoint_<step>.pt`` with the highest step in ``folder``, or None."""
    found = []
    for p in Path(folder).glob("*checkpoint_*.pt"):
        m = CHECKPOINT_PATTERN.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def attach_checkpoints(
    engine: Engine, save_dict: dict, folder: str | os.PathLike, every: int, n_saved: int = 2
) -> Checkpoint:
    """Save ``save_dict`` every ``every`` iterations as ``checkpoint_<step>.pt`` and resume from the latest.

    Ignite's :class:`~ignite.handlers.Checkpoint` writes atomically (temporary file + rename), so a
    run killed at any moment leaves the previous checkpoint intact. If ``folder`` already holds
    checkpoints, the objects (network, optimizer, engine state with its iteration count) are
    loaded now, before the engine runs. Returns the handler; call it with the engine to save at
    the end of training.
    """
    folder = Path(folder)
    resume = latest_checkpoint(folder)
    if resume is not None:
        Checkpoint.load_objects(to_load=save_dict, checkpoint=load_weights(resume, "checkpoint"))
        logger.info("resumed from %s at step %d", resume, engine.state.iteration)
    handler = Checkpoint(
        save_dict,
        DiskSaver(str(folder), require_empty=False, atomic=True),
        n_saved=n_saved,
        global_step_transform=lambda e, _: e.state.iteration,
    )
    engine.add_event_handler(Events.ITERATION_COMPLETED(every=every), handler)
    return handler


def attach_time_budget(
    engine: Engine, max_seconds: float | None, start: float | None = None, clock: Callable[[], float] = time.monotonic
) -> None:
    """Terminate ``engine`` once ``max_seconds`` of wall-clock time have passed since ``start``.

    Checked at every ``ITERATION_COMPLETED``: the iteration that crosses the budget completes (and
    the handlers of that event still run), then the engine stops as after its last step, so the
    caller's end-of-training validation and save follow. Under an initialised process group, rank
    0's clock decides for every rank (all stop at the same step; one small broadcast per step).

    Args:
        engine: the trainer.
        max_seconds: the budget (> 0); None attaches nothing.
        start: the moment the budget starts, a reading of ``clock`` (default: now).
        clock: seconds, monotonic (tests pass a fake one).
    """
    if max_seconds is None:
        return
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    start = clock() if start is None else start

    def _check(engine: Engine) -> None:
        spent = [clock() - start >= max_seconds]
        if dist.is_initialized():
            dist.broadcast_object_list(spent, src=0)
        if spent[0]:
            logger.info("time budget of %.0f s spent at step %d: stopping", max_seconds, engine.state.iteration)
            engine.terminate()

    engine.add_event_handler(Events.ITERATION_COMPLETED, _check)


@contextmanager
def process_group(distributed: bool, device: str | torch.device) -> Iterator[tuple[int, int, torch.device]]:
    """The distributed setting of a training run, as ``(rank, world_size, device)``.

    With ``distributed`` and no process group yet, one is initialised from torchrun's environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) — NCCL for a CUDA ``device``, gloo
    otherwise — and destroyed on exit; a group the caller initialised is used and left alone. In a
    group, a CUDA device without an index becomes ``cuda:$LOCAL_RANK`` and the device is made the
    current one. Outside a group: ``(0, 1, device)``.
    """
    dev = torch.device(device)
    created = distributed and not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if dev.type == "cuda" and dist.is_initialized():
            if dev.index is None:
                dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
        yield rank, world_size, dev
    finally:
        if created:
            dist.destroy_process_group()


def step_trainer(
    iteration_update: Callable[[Engine, dict], dict],
    loader: DataLoader,
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    max_steps: int,
    state: dict,
    checkpoint_dir: str | os.PathLike,
    checkpoint_every: int,
    max_seconds: float | None = None,
    started: float | None = None,
) -> tuple[SupervisedTrainer, Checkpoint]:
    """A MONAI :class:`SupervisedTrainer` whose iterations are optimizer steps, resumable and bounded.

    ``iteration_update`` does one step; ``network`` is what the trainer runs (possibly wrapped in
    DDP). ``state`` (network, optimizer, schedulers, ...) plus the trainer itself is checkpointed
    every ``checkpoint_every`` steps into ``checkpoint_dir`` and loaded back from the latest
    checkpoint there (:func:`attach_checkpoints`). The run stops after ``max_steps`` steps — also
    when resumed from a run with another ``max_steps`` — or once ``max_seconds`` of wall-clock time
    have passed since ``started`` (:func:`attach_time_budget`).

    Returns:
        The trainer and the checkpoint handler (call it with the trainer to save at the end).
    """
    epoch_length = len(loader)
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=math.ceil(max_steps / epoch_length),
        train_data_loader=loader,
        network=network,
        optimizer=optimizer,
        loss_function=None,
        iteration_update=iteration_update,
        epoch_length=epoch_length,
    )
    checkpointer = attach_checkpoints(trainer, {**state, "trainer": trainer}, checkpoint_dir, checkpoint_every)
    trainer.state.max_epochs = math.ceil(max_steps / epoch_length)  # not the resumed run's

    @trainer.on(Events.ITERATION_COMPLETED)
    def _stop_at_max_steps(engine: Engine) -> None:
        if engine.state.iteration >= max_steps:
            engine.terminate()

    attach_time_budget(trainer, max_seconds, started)
    return trainer, checkpointer

"""Components of the DDPM baseline's training (paper §6, Table 1; ``configs/train_ddpm.yaml`` composes them).

The config builds a MONAI ``SupervisedTrainer`` whose ``iteration_update`` is :class:`DDPMIteration`
(one optimizer step on ``batch_size`` slices per process) and a ``SupervisedEvaluator`` whose
``iteration_update`` is :class:`DDPMEvaluation`, scored by :class:`DDPMFigures`; :class:`SaveBaseline`
writes the run's files after each validation. ``medvar train-baseline`` runs the same config.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.networks.schedulers import DDPMScheduler
from torch import Tensor, nn

from ..files import atomic_torch_save, atomic_write_json
from ..model_file import BASELINE_FILE, save_baseline
from ..networks.ddpm import ConditionalDDPM
from ..runtime import autocast, model_input
from .common import reseed


def raw_network(model: nn.Module) -> nn.Module:
    """The network itself: ``model`` or, for a ``DistributedDataParallel`` wrapper, its ``module``."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def ddpm_network(preset: str, num_datasets: int, image_size: int, cond_drop: float, **overrides) -> ConditionalDDPM:
    """:meth:`ConditionalDDPM.from_preset` with ``overrides`` of the preset's constructor arguments
    (``channels``, ``attention_levels``, ...), its weights in ``channels_last`` (the fast layout of
    the convolutions under bf16; a later ``.to(device)`` keeps it)."""
    network = ConditionalDDPM.from_preset(
        preset, num_datasets=num_datasets, **{**overrides, "image_size": image_size, "cond_drop": cond_drop}
    )
    return network.to(memory_format=torch.channels_last)


def epsilon_loss(
    model: nn.Module,
    scheduler: DDPMScheduler,
    images: Tensor,
    dataset_id: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    bf16: bool,
) -> Tensor:
    """Per-image ε-prediction MSE of the denoiser.

    Args:
        model: a :class:`ConditionalDDPM`, possibly wrapped in DDP.
        scheduler: its training schedule (``model.scheduler``).
        images: clean slices ``(B, 1, S, S)`` fp32 in [-1, 1].
        dataset_id: ``(B,)`` long.
        noise: ε ``(B, 1, S, S)`` fp32, standard normal.
        timesteps: ``(B,)`` long in ``0..T-1``.
        bf16: run the network under bf16 autocast.

    Returns:
        ``(B,)`` fp32 mean squared error between predicted and true noise.
    """
    noisy = scheduler.add_noise(images, noise, timesteps)
    with autocast(images.device, bf16):
        predicted = model(noisy, timesteps, dataset_id)
    return F.mse_loss(predicted.float(), noise, reduction="none").mean(dim=(1, 2, 3))


class DDPMIteration:
    """One optimizer step of the DDPM baseline: the ``SupervisedTrainer``'s ``iteration_update``.

    ``batch``: ``image`` store slices in [0, 255] ``(B, H, W)`` or ``(B, 1, H, W)``, ``dataset_id``
    ``(B,)``. Each slice gets a timestep drawn uniformly in ``0..T-1`` and Gaussian noise; the loss
    is the mean squared error of the predicted noise (:func:`epsilon_loss`), with the network's
    conditional dropout of dataset ids (training mode). Gradients are clipped to ``grad_clip``;
    the trainer's ``optimizer`` steps (the learning rate is the ``LrScheduleHandler``'s). The
    random draws of a step depend on ``seed``, the step and the process rank only
    (:func:`~medvar_bundle.engines.common.reseed`), so a resumed run repeats them.
    ``engine.network`` may be wrapped in ``DistributedDataParallel``.

    Returns the step's ``loss`` (fp32 ε-MSE), ``lr`` (of this step) and ``grad_norm`` (before clipping).
    """

    def __init__(self, bf16: bool = True, grad_clip: float = 1.0, seed: int = 0) -> None:
        self.bf16, self.grad_clip, self.seed = bf16, grad_clip, seed

    def __call__(self, engine: Engine, batch: dict) -> dict:
        model, optimizer, dev = engine.network, engine.optimizer, engine.state.device
        network = raw_network(model)
        model.train()
        reseed(self.seed, engine.state.iteration, dist.get_rank() if dist.is_initialized() else 0)
        images, ids = model_input(batch["image"], dev), batch["dataset_id"].to(dev)
        noise = torch.randn_like(images)
        timesteps = torch.randint(0, network.scheduler.num_train_timesteps, (images.shape[0],), device=dev)
        optimizer.zero_grad(set_to_none=True)
        loss = epsilon_loss(model, network.scheduler, images, ids, noise, timesteps, self.bf16).mean()
        loss.backward()
        grad_norm = float(nn.utils.clip_grad_norm_(network.parameters(), self.grad_clip))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        return {"loss": loss.item(), "lr": lr, "grad_norm": grad_norm}


class DDPMEvaluation:
    """The evaluator's ``iteration_update``: per-image ε-prediction MSE in eval mode (no conditional dropout).

    The figure is comparable between runs: of the ``n`` images of the evaluator's (unshuffled)
    loader, image ``j`` gets the training timestep ``round(j·(T−1)/(n−1))`` (the timesteps evenly
    cover the schedule) and its noise comes from a generator seeded with ``seed`` at the first
    batch of every evaluator run. ``batch`` as for :class:`DDPMIteration`.

    Returns ``{"loss": (B,) fp32}``, the input of :class:`DDPMFigures`.
    """

    def __init__(self, bf16: bool = True, seed: int = 0) -> None:
        self.bf16, self.seed = bf16, seed
        self.generator: torch.Generator | None = None
        self.timesteps: Tensor | None = None
        self.start = 0

    @torch.no_grad()
    def __call__(self, engine: Engine, batch: dict) -> dict:
        network, dev = raw_network(engine.network), engine.state.device
        network.eval()
        if engine.state.iteration == 1:  # a new evaluator run
            n, last = len(engine.data_loader.dataset), network.scheduler.num_train_timesteps - 1
            self.timesteps = torch.linspace(0, last, n).round().long().to(dev)
            self.generator = torch.Generator(device=dev).manual_seed(self.seed)
            self.start = 0
        images, ids = model_input(batch["image"], dev), batch["dataset_id"].to(dev)
        noise = torch.randn(images.shape, generator=self.generator, device=dev)
        noise = noise.contiguous(memory_format=torch.channels_last)
        t = self.timesteps[self.start : self.start + len(ids)]
        self.start += len(ids)
        return {"loss": epsilon_loss(network, network.scheduler, images, ids, noise, t, self.bf16)}


class DDPMFigures(Metric):
    """The validation figures of the baseline, accumulated over batches (an Ignite metric).

    ``update`` takes the evaluator's output ``{"loss": (B,)}`` (per-image ε-MSE); ``compute`` gives
    ``loss`` (the mean over images) and ``num_images``.
    """

    def reset(self) -> None:
        self.total = 0.0
        self.n = 0

    def iteration_completed(self, engine: Engine) -> None:
        """Ignite unpacks mappings into ``(y_pred, y)``; this metric takes the whole output dictionary."""
        self.update(self._output_transform(engine.state.output))

    def update(self, output: dict) -> None:
        self.total += float(output["loss"].sum())
        self.n += len(output["loss"])

    def compute(self) -> dict:
        return {"loss": self.total / max(self.n, 1), "num_images": self.n}


class SaveBaseline:
    """A validation record: the baseline files of the run folder ``output_dir``.

    Writes ``baseline.pt`` (the portable file of :func:`~medvar_bundle.model_file.save_baseline`:
    network, the dataset registry ``datasets``, step and the validation row under
    ``"validation"``), ``models/model.pt`` (the network's plain state_dict, for MONAI's
    ``CheckpointLoader``) and ``models/datasets.json`` (the registry).
    """

    def __init__(self, network: nn.Module, output_dir: str | os.PathLike, datasets: dict) -> None:
        self.network, self.out, self.datasets = network, Path(output_dir), datasets

    def __call__(self, row: dict, metrics: dict) -> None:
        network = raw_network(self.network)
        save_baseline(self.out / BASELINE_FILE, network, self.datasets, row["step"], {"validation": row})
        atomic_torch_save(self.out / "models" / "model.pt", network.state_dict())
        atomic_write_json(self.out / "models" / "datasets.json", self.datasets)

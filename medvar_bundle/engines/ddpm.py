"""Training of the DDPM baseline on a slice store, on MONAI/Ignite engines (paper §6, Table 1).

`medvar train-baseline` and ``python -m monai.bundle run training --config_file
configs/train_ddpm.yaml`` both call :func:`train_ddpm`. One trainer iteration is one optimizer
step on ``batch_size`` slices per process.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.handlers import StatsHandler, TensorBoardStatsHandler
from monai.networks.schedulers import DDPMScheduler
from monai.utils import set_determinism
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Subset
from torch.utils.tensorboard import SummaryWriter

from ..data.store import SliceStore
from ..model_file import BASELINE_FILE, save_baseline
from ..networks.ddpm import ConditionalDDPM
from ..runtime import autocast, model_input
from .common import evenly_spaced, process_group, reseed, step_trainer, store_loader, warmup_cosine

logger = logging.getLogger(__name__)


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


@torch.no_grad()
def evaluate_ddpm(
    model: ConditionalDDPM,
    store: SliceStore,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    bf16: bool = True,
    max_images: int | None = None,
    num_workers: int = 0,
    seed: int = 0,
) -> dict:
    """ε-prediction MSE of ``model`` (eval mode: no conditional dropout) on the slices of ``store``,
    an evenly spaced subset with ``max_images``.

    The figure is comparable between calls: image ``j`` of the ``n`` evaluated gets the training
    timestep ``round(j·(T−1)/(n−1))`` (the timesteps evenly cover the schedule) and noise from a
    generator seeded with ``seed``.

    Returns:
        ``loss`` (mean over images) and ``num_images``.
    """
    model.eval()
    dev = torch.device(device)
    indices = evenly_spaced(len(store), max_images).tolist()
    timesteps = torch.linspace(0, model.scheduler.num_train_timesteps - 1, len(indices)).round().long().to(dev)
    generator = torch.Generator(device=dev).manual_seed(seed)
    total, start = 0.0, 0
    for batch in DataLoader(Subset(store, indices), batch_size=batch_size, num_workers=num_workers):
        images, ids = model_input(batch["image"], dev), batch["dataset_id"].to(dev)
        noise = torch.randn(images.shape, generator=generator, device=dev).contiguous(memory_format=torch.channels_last)
        t = timesteps[start : start + len(ids)]
        total += float(epsilon_loss(model, model.scheduler, images, ids, noise, t, bf16).sum())
        start += len(ids)
    return {"loss": total / len(indices), "num_images": len(indices)}


def train_ddpm(
    dataset_dir: str | Sequence[str],
    output_dir: str,
    max_steps: int = 2000,
    batch_size: int = 8,
    device: str = "cpu",
    preset: str = "tiny",
    model_overrides: dict | None = None,
    lr: float = 1e-4,
    warmup_steps: int = 100,
    min_lr_ratio: float = 0.01,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    grad_clip: float = 1.0,
    cond_drop: float = 0.1,
    checkpoint_every: int = 200,
    val_every: int = 500,
    val_max_images: int | None = 256,
    bf16: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = True,
    distributed: bool = False,
    max_seconds: float | None = None,
) -> Path:
    """Train the dataset-conditioned DDPM baseline on the slices of one or several stores.

    Each step draws, per slice, a timestep uniformly in ``0..T-1`` (T = 1000) and Gaussian noise,
    and minimises the mean squared error of the predicted noise (:func:`epsilon_loss`); dataset
    ids are replaced by the null id with probability ``cond_drop`` (classifier-free guidance).
    AdamW (``betas``, ``weight_decay`` on all parameters) at a peak learning rate ``lr`` after a
    linear warm-up of ``warmup_steps``, then a cosine down to ``min_lr_ratio · lr`` at
    ``max_steps`` (:func:`warmup_cosine`); bf16 autocast and ``channels_last``; gradient norm
    clipped to ``grad_clip``. The network is ``preset`` with ``model_overrides`` and
    ``cond_drop``; its image size is the stores' slice size.

    Args:
        dataset_dir: store folder(s); training uses their ``training`` split, validation their
            ``validation`` split (the training split if there is none).
        output_dir: run folder: ``checkpoints/``, ``tensorboard/``, ``metrics.jsonl``, ``baseline.pt``.
        batch_size: slices per step and process.
        distributed: run under DDP (as does an already initialised process group); a group is
            initialised from torchrun's environment if needed (NCCL on CUDA, gloo on CPU). Only
            rank 0 logs, writes TensorBoard, checkpoints and ``baseline.pt``.
        max_seconds: wall-clock training budget in seconds, counted from the start of this call
            (:func:`~medvar_bundle.engines.common.attach_time_budget`): training stops after the step
            that spends it, then the end-of-training validation, save and checkpoint run as after
            ``max_steps``. None: no budget.

    Checkpoints (network, optimizer, LR scheduler, trainer state) go to ``output_dir/checkpoints``
    every ``checkpoint_every`` steps and at the end; a run started on a folder with checkpoints
    resumes from the latest one (each step's random draws depend on the seed and the step only).
    The cosine follows the ``max_steps`` of the current call, so a finished run can be extended.
    Validation (:func:`evaluate_ddpm` on at most ``val_max_images`` slices) runs every
    ``val_every`` steps and at the end; it is appended to ``metrics.jsonl``, logged to TensorBoard
    as ``val/loss``, and each time ``baseline.pt`` (:func:`~medvar_bundle.model_file.save_baseline`:
    network, the stores' dataset registry, step, ``extra={"validation": ...}``) is rewritten.

    Returns:
        Path of ``output_dir/baseline.pt``.
    """
    started = time.monotonic()
    out = Path(output_dir)
    with process_group(distributed, device) as (rank, world_size, dev):
        main = rank == 0
        set_determinism(seed=seed)
        loader = store_loader(
            dataset_dir, "training", batch_size, num_workers=num_workers, seed=seed, num_replicas=world_size, rank=rank
        )
        store: SliceStore = loader.dataset
        val_store = SliceStore(dataset_dir, split="validation")
        if len(val_store) == 0:
            logger.warning("no 'validation' split in %s: validating on the training split", dataset_dir)
            val_store = store
        registry = store.datasets

        image_size = int(store[0]["image"].shape[-1])
        network = ConditionalDDPM.from_preset(
            preset,
            num_datasets=len(registry),
            **{**(model_overrides or {}), "image_size": image_size, "cond_drop": cond_drop},
        ).to(dev, memory_format=torch.channels_last)
        model: nn.Module = network
        if dist.is_initialized():
            model = DistributedDataParallel(network, device_ids=[dev.index] if dev.type == "cuda" else None)
        optimizer = torch.optim.AdamW(network.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        schedule = functools.partial(
            warmup_cosine, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio
        )
        lr_scheduler = LambdaLR(optimizer, schedule)
        noise_schedule, T = network.scheduler, network.scheduler.num_train_timesteps
        if main:
            logger.info(
                "DDPM %.1fM parameters at %d²; global batch %d (%d × %d processes), peak lr %.3g",
                sum(p.numel() for p in network.parameters()) / 1e6, image_size, batch_size * world_size, batch_size,
                world_size, lr,
            )  # fmt: skip

        def step(engine: Engine, batch: dict) -> dict:
            model.train()
            reseed(seed, engine.state.iteration, rank)
            images, ids = model_input(batch["image"], dev), batch["dataset_id"].to(dev)
            noise = torch.randn_like(images)
            timesteps = torch.randint(0, T, (images.shape[0],), device=dev)
            optimizer.zero_grad(set_to_none=True)
            loss = epsilon_loss(model, noise_schedule, images, ids, noise, timesteps, bf16).mean()
            loss.backward()
            grad_norm = float(nn.utils.clip_grad_norm_(network.parameters(), grad_clip))
            lr_now = optimizer.param_groups[0]["lr"]
            optimizer.step()
            lr_scheduler.step()
            return {"loss": loss.item(), "lr": lr_now, "grad_norm": grad_norm}

        trainer, checkpointer = step_trainer(
            step, loader, model, optimizer, dev, max_steps,
            {"network": network, "optimizer": optimizer, "scheduler": lr_scheduler},
            out / "checkpoints", checkpoint_every, max_seconds, started,
        )  # fmt: skip

        if main:
            out.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(log_dir=str(out / "tensorboard")) if main else None

        def validate(engine: Engine) -> None:
            metrics = evaluate_ddpm(network, val_store, batch_size, dev, bf16, val_max_images, num_workers, seed)
            row = {"step": engine.state.iteration, **metrics}
            with open(out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            writer.add_scalar("val/loss", metrics["loss"], row["step"])
            logger.info("step %d: val ε-MSE %.4f on %d slices", row["step"], row["loss"], row["num_images"])
            save_baseline(out / BASELINE_FILE, network, registry, row["step"], {"validation": row})

        if main:
            StatsHandler(
                iteration_log=lambda e, i: i % 50 == 0, output_transform=lambda o: o["loss"], name=logger.name
            ).attach(trainer)
            TensorBoardStatsHandler(
                summary_writer=writer, output_transform=lambda o: o, iteration_log=True, epoch_log=False
            ).attach(trainer)
            trainer.add_event_handler(Events.ITERATION_COMPLETED(every=val_every), validate)
            if progress:
                ProgressBar(persist=True).attach(trainer, output_transform=lambda o: {"loss": o["loss"]})

        if trainer.state.iteration < max_steps:
            trainer.run()
        if main and (trainer.state.iteration % val_every or not (out / BASELINE_FILE).exists()):
            validate(trainer)
        checkpointer(trainer)
        if main:
            writer.close()
        if dist.is_initialized():
            dist.barrier()  # baseline.pt is complete when any rank returns
    return out / BASELINE_FILE

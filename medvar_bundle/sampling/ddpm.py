"""Reverse diffusion for the DDPM baseline (paper §6, Table 1) on MONAI's schedulers.

Sampling with N < 1000 steps uses N evenly spaced training timesteps and the noise schedule
*respaced* to them (Nichol & Dhariwal 2021, §4): ``ᾱ`` kept at those timesteps, ``β`` recomputed
between neighbours. MONAI's ``DDPMScheduler.set_timesteps`` alone would step from ``t`` to
``t − 1`` whatever the stride, and ``DDIMScheduler``'s stride ``1000 // N`` misses the timesteps
``set_timesteps`` picks when N does not divide 1000; on the respaced schedule both schedulers
take exact steps between consecutive kept timesteps (with N = 1000 it is the original schedule).
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, NoiseSchedules, Scheduler
from torch import Tensor

from medvar_bundle.networks.ddpm import ConditionalDDPM
from medvar_bundle.runtime import autocast, to_uint8

from .guidance import guided_logits

SAMPLERS = ("ddpm", "ddim")


@NoiseSchedules.add_def("respaced", "A schedule kept at a subset of its timesteps, given by their alphas_cumprod")
def _respaced(num_train_timesteps: int, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(betas, alphas, alphas_cumprod)`` of the chain through the kept timesteps: ``alphas_cumprod``
    ``(N,)`` is ᾱ at the kept timesteps in increasing order, ``N = num_train_timesteps``."""
    if alphas_cumprod.shape != (num_train_timesteps,):
        raise ValueError(
            f"respaced schedule: {num_train_timesteps} steps but alphas_cumprod of shape {tuple(alphas_cumprod.shape)}"
        )
    alphas = alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return 1 - alphas, alphas, alphas_cumprod


def sampling_scheduler(train_scheduler: DDPMScheduler, name: str, num_steps: int) -> tuple[Scheduler, Tensor]:
    """A MONAI scheduler that denoises in ``num_steps`` steps, and the training timestep of each step.

    Args:
        train_scheduler: the schedule the network was trained with (T timesteps).
        name: ``"ddpm"`` (ancestral, posterior variance) or ``"ddim"`` (deterministic, η = 0).
        num_steps: N in ``1..T``.

    Returns:
        The scheduler over the respaced N-step chain (its ``timesteps`` run ``N-1 … 0``), and
        ``(N,)`` long: the training timestep the network sees at each chain index, ``0 … T-1``
        evenly spaced (MONAI's ``set_timesteps`` choice; ``T-1`` alone for a one-step chain).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)}")
    T = train_scheduler.num_train_timesteps
    if not 1 <= num_steps <= T:
        raise ValueError(f"number of sampling steps must be in [1, {T}], got {num_steps}")
    # a one-step chain starts from noise too: its step is the last training timestep, not 0 (ᾱ ≈ 1)
    kept = torch.linspace(0, T - 1, num_steps).round().long() if num_steps > 1 else torch.tensor([T - 1])
    alphas_cumprod = train_scheduler.alphas_cumprod.detach().cpu().float()[kept]
    kind = DDPMScheduler if name == "ddpm" else DDIMScheduler
    scheduler = kind(num_train_timesteps=num_steps, schedule="respaced", alphas_cumprod=alphas_cumprod)
    scheduler.set_timesteps(num_steps)
    return scheduler, kept


@torch.no_grad()
def sample(
    model: ConditionalDDPM,
    scheduler_name: str,
    num_steps: int,
    dataset_id: Tensor,
    generator: torch.Generator,
    cfg: float = 0.0,
    bf16: bool = True,
) -> Tensor:
    """Generate slices by reverse diffusion from Gaussian noise.

    Args:
        model: the network, in eval mode.
        scheduler_name: ``"ddpm"`` or ``"ddim"`` (see :func:`sampling_scheduler`).
        num_steps: denoising steps (network evaluations, twice the batch with guidance); the
            paper's Table 1 uses 10, 20, 30, 50 and 100.
        dataset_id: ``(B,)`` long on the model's device; ``model.null_id`` samples unconditionally.
        generator: the only source of randomness (initial noise, DDPM's per-step noise), on the
            model's device: a seed fixes the images for a given batch composition.
        cfg: classifier-free guidance strength (≥ 0; 0 = purely conditional, no null pass).
        bf16: bf16 autocast for the network (the chain itself stays fp32).

    Returns:
        uint8 slices ``(B, S, S)``.
    """
    if not cfg >= 0:
        raise ValueError(f"cfg must be >= 0, got {cfg}")
    scheduler, timesteps = sampling_scheduler(model.scheduler, scheduler_name, num_steps)
    device, B, S = dataset_id.device, dataset_id.shape[0], model.image_size
    ids = torch.cat([dataset_id, torch.full_like(dataset_id, model.null_id)]) if cfg > 0 else dataset_id
    x = torch.randn(B, 1, S, S, generator=generator, device=device).contiguous(memory_format=torch.channels_last)
    for i in scheduler.timesteps.tolist():
        t = timesteps[i].to(device).expand(ids.shape[0])
        with autocast(device, bf16):
            eps = model(x.repeat(2, 1, 1, 1) if cfg > 0 else x, t, ids).float()
        eps = guided_logits(eps[:B], eps[B:], cfg) if cfg > 0 else eps
        x, _ = scheduler.step(eps, i, x, generator=generator)
    return to_uint8(x)[:, 0]

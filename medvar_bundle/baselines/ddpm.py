"""The diffusion baseline (paper §6, Table 1): a dataset-conditioned DDPM on MONAI's ``DiffusionModelUNet``.

The network predicts the noise ε of ``x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε`` for single-channel slices
``x_0`` in [-1, 1], under MONAI's ``DDPMScheduler`` (1000 training timesteps, linear β from 1e-4
to 0.02). It is conditioned on the same dataset identifier as MedVAR: MONAI's class embedding,
added to the timestep embedding, with ``num_datasets + 1`` ids — the last one is the *null* id,
which training substitutes with probability ``cond_drop`` so that sampling can use classifier-free
guidance ``ε = (1+cfg)·ε_cond − cfg·ε_null`` (:func:`~medvar_bundle.sampling.guided_logits`).

Sampling with N < 1000 steps uses N evenly spaced training timesteps and the noise schedule
*respaced* to them (Nichol & Dhariwal 2021, §4): ``ᾱ`` kept at those timesteps, ``β`` recomputed
between neighbours. MONAI's ``DDPMScheduler.set_timesteps`` alone would step from ``t`` to
``t − 1`` whatever the stride, and ``DDIMScheduler``'s stride ``1000 // N`` misses the timesteps
``set_timesteps`` picks when N does not divide 1000; on the respaced schedule both schedulers
take exact steps between consecutive kept timesteps (with N = 1000 it is the original schedule).

Presets share ADM's layout at 256²: six levels (256² … 8²), self-attention at 32², 16² and 8²;
they differ in widths and residual blocks per level. ``tiny`` and ``small`` match MedVAR's CPU
transformer presets in parameters (6.1M, 40.8M), ``ddpm-s`` and ``ddpm-l`` the paper's DDPM-S
(330M) and DDPM-L (600M).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, NoiseSchedules, Scheduler
from torch import Tensor, nn

from medvar_bundle.data.store import atomic_torch_save
from medvar_bundle.engines.common import autocast, to_uint8
from medvar_bundle.model_file import read_format_file
from medvar_bundle.sampling import guided_logits

BASELINE_FILE = "baseline.pt"
FORMAT = "medvar-ddpm-1"
SAMPLERS = ("ddpm", "ddim")

_ATTENTION_32_16_8 = (False, False, False, True, True, True)
DDPM_PRESETS: dict[str, dict] = {
    # CPU presets, matched to MedVAR's transformer presets tiny (6.1M) and small (40.8M).
    "tiny": dict(channels=(32, 64, 64, 96, 128, 128), attention_levels=_ATTENTION_32_16_8, num_res_blocks=1, num_head_channels=32),
    "small": dict(channels=(64, 128, 128, 256, 256, 256), attention_levels=_ATTENTION_32_16_8, num_res_blocks=2, num_head_channels=64),
    # The paper's DDPM-S (330M) and DDPM-L (600M); ADM's channel multipliers (1, 1, 2, 2, 4, 4).
    "ddpm-s": dict(channels=(256, 256, 512, 512, 1024, 1024), attention_levels=_ATTENTION_32_16_8, num_res_blocks=1, num_head_channels=64),
    "ddpm-l": dict(channels=(288, 288, 576, 576, 1152, 1152), attention_levels=_ATTENTION_32_16_8, num_res_blocks=2, num_head_channels=64),
}
"""Constructor keyword arguments of :class:`ConditionalDDPM` per preset name."""


@NoiseSchedules.add_def("respaced", "A schedule kept at a subset of its timesteps, given by their alphas_cumprod")
def _respaced(num_train_timesteps: int, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(betas, alphas, alphas_cumprod)`` of the chain through the kept timesteps: ``alphas_cumprod``
    ``(N,)`` is ᾱ at the kept timesteps in increasing order, ``N = num_train_timesteps``."""
    if alphas_cumprod.shape != (num_train_timesteps,):
        raise ValueError(f"respaced schedule: {num_train_timesteps} steps but alphas_cumprod of shape {tuple(alphas_cumprod.shape)}")
    alphas = alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return 1 - alphas, alphas, alphas_cumprod


def ddpm_preset(name: str) -> dict:
    """Constructor keyword arguments of the named preset, a fresh copy."""
    if name not in DDPM_PRESETS:
        raise ValueError(f"unknown DDPM preset {name!r}; choose one of {sorted(DDPM_PRESETS)}")
    return dict(DDPM_PRESETS[name])


class ConditionalDDPM(nn.Module):
    """ε-prediction network conditioned on a dataset id, with its training noise schedule.

    Args:
        num_datasets: number of dataset ids ``0..num_datasets-1``; id ``num_datasets`` is the null
            condition (unconditional / classifier-free guidance).
        image_size: side S of the square slices in pixels; divisible by ``2^(levels-1)``.
        channels, attention_levels, num_res_blocks, num_head_channels, norm_num_groups: the
            ``DiffusionModelUNet`` (2-D, one input and one output channel); one entry per level.
        num_train_timesteps, schedule: MONAI's ``DDPMScheduler`` used in training (and respaced
            for sampling).
        cond_drop: probability, in training, of replacing a sample's dataset id by the null id.

    ``config`` holds the keyword arguments that rebuild the model: ``ConditionalDDPM(**m.config)``.
    """

    def __init__(
        self,
        num_datasets: int,
        image_size: int = 256,
        channels: tuple[int, ...] = DDPM_PRESETS["tiny"]["channels"],
        attention_levels: tuple[bool, ...] = _ATTENTION_32_16_8,
        num_res_blocks: int | tuple[int, ...] = 1,
        num_head_channels: int = 32,
        norm_num_groups: int = 32,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        cond_drop: float = 0.1,
    ) -> None:
        super().__init__()
        if num_datasets < 1:
            raise ValueError(f"num_datasets must be at least 1, got {num_datasets}")
        channels, attention_levels = tuple(int(c) for c in channels), tuple(bool(a) for a in attention_levels)
        if image_size % 2 ** (len(channels) - 1):
            raise ValueError(f"image size {image_size} is not divisible by 2^{len(channels) - 1} ({len(channels)} UNet levels)")
        num_res_blocks = num_res_blocks if isinstance(num_res_blocks, int) else tuple(int(n) for n in num_res_blocks)
        self.config = dict(
            num_datasets=num_datasets, image_size=image_size, channels=channels, attention_levels=attention_levels,
            num_res_blocks=num_res_blocks, num_head_channels=num_head_channels, norm_num_groups=norm_num_groups,
            num_train_timesteps=num_train_timesteps, schedule=schedule, cond_drop=cond_drop,
        )  # fmt: skip
        self.num_datasets, self.null_id, self.image_size, self.cond_drop = num_datasets, num_datasets, image_size, cond_drop
        self.unet = DiffusionModelUNet(
            spatial_dims=2, in_channels=1, out_channels=1, channels=channels, attention_levels=attention_levels,
            num_res_blocks=num_res_blocks, num_head_channels=num_head_channels, norm_num_groups=norm_num_groups,
            num_class_embeds=num_datasets + 1, use_flash_attention=True,
        )  # fmt: skip
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule=schedule)

    @classmethod
    def from_preset(cls, name: str, num_datasets: int, **overrides) -> ConditionalDDPM:
        """Build a named preset (``tiny``, ``small``, ``ddpm-s``, ``ddpm-l``) with overrides."""
        return cls(num_datasets=num_datasets, **{**ddpm_preset(name), **overrides})

    def forward(self, x: Tensor, timesteps: Tensor, dataset_id: Tensor) -> Tensor:
        """Predicted noise.

        Args:
            x: noisy slices ``(B, 1, S, S)``.
            timesteps: ``(B,)`` long training timesteps in ``0..num_train_timesteps-1``.
            dataset_id: ``(B,)`` long in ``0..num_datasets`` (``num_datasets`` = null). In training
                mode each id is replaced by the null id with probability ``cond_drop``.

        Returns:
            ε̂ ``(B, 1, S, S)`` in the dtype of the computation (bf16 under autocast).
        """
        if self.training and self.cond_drop > 0:
            drop = torch.rand(dataset_id.shape, device=dataset_id.device) < self.cond_drop
            dataset_id = torch.where(drop, torch.full_like(dataset_id, self.null_id), dataset_id)
        return self.unet(x, timesteps, class_labels=dataset_id)


def sampling_scheduler(train_scheduler: DDPMScheduler, name: str, num_steps: int) -> tuple[Scheduler, Tensor]:
    """A MONAI scheduler that denoises in ``num_steps`` steps, and the training timestep of each step.

    Args:
        train_scheduler: the schedule the network was trained with (T timesteps).
        name: ``"ddpm"`` (ancestral, posterior variance) or ``"ddim"`` (deterministic, η = 0).
        num_steps: N in ``1..T``.

    Returns:
        The scheduler over the respaced N-step chain (its ``timesteps`` run ``N-1 … 0``), and
        ``(N,)`` long: the training timestep the network sees at each chain index, ``0 … T-1``
        evenly spaced (MONAI's ``set_timesteps`` choice).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)}")
    T = train_scheduler.num_train_timesteps
    if not 1 <= num_steps <= T:
        raise ValueError(f"number of sampling steps must be in [1, {T}], got {num_steps}")
    kept = torch.linspace(0, T - 1, num_steps).round().long()
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


def save_baseline(path: str | os.PathLike, model: ConditionalDDPM, datasets: dict, step: int = 0, extra: dict | None = None) -> Path:
    """Write the self-contained baseline file ``{"format", "config", "state_dict", "datasets",
    "step", "extra"}`` atomically (temporary file, then rename)."""
    _check_registry(model, datasets)
    blob = {
        "format": FORMAT, "config": model.config, "state_dict": model.state_dict(), "datasets": datasets,
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
    blob = read_format_file(path, "DDPM baseline", FORMAT)
    model = ConditionalDDPM(**blob["config"])
    model.load_state_dict(blob["state_dict"])
    try:
        _check_registry(model, blob["datasets"])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    model = model.to(device, memory_format=torch.channels_last).eval()
    return DDPMBaseline(model, blob["datasets"], blob.get("step", 0), blob.get("extra", {}))

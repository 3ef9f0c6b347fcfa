"""The diffusion baseline (paper §6, Table 1): a dataset-conditioned DDPM on MONAI's ``DiffusionModelUNet``.

The network predicts the noise ε of ``x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε`` for single-channel slices
``x_0`` in [-1, 1], under MONAI's ``DDPMScheduler`` (1000 training timesteps, linear β from 1e-4
to 0.02). It is conditioned on the same dataset identifier as MedVAR: MONAI's class embedding,
added to the timestep embedding, with ``num_datasets + 1`` ids — the last one is the *null* id,
which training substitutes with probability ``cond_drop`` so that sampling can use classifier-free
guidance ``ε = (1+cfg)·ε_cond − cfg·ε_null`` (:func:`~medvar_bundle.sampling.guidance.guided_logits`;
sampling in :mod:`medvar_bundle.sampling.ddpm`).

Presets share ADM's layout at 256²: six levels (256² … 8²), self-attention at 32², 16² and 8²;
they differ in widths and residual blocks per level. ``tiny`` and ``small`` match MedVAR's CPU
transformer presets in parameters (6.1M, 40.8M), ``ddpm-s`` and ``ddpm-l`` the paper's DDPM-S
(330M) and DDPM-L (600M).
"""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler
from torch import Tensor, nn

_ATTENTION_32_16_8 = (False, False, False, True, True, True)
DDPM_PRESETS: dict[str, dict] = {
    # CPU presets, matched to MedVAR's transformer presets tiny (6.1M) and small (40.8M).
    "tiny": dict(
        channels=(32, 64, 64, 96, 128, 128), attention_levels=_ATTENTION_32_16_8, num_res_blocks=1, num_head_channels=32
    ),
    "small": dict(
        channels=(64, 128, 128, 256, 256, 256),
        attention_levels=_ATTENTION_32_16_8,
        num_res_blocks=2,
        num_head_channels=64,
    ),
    # The paper's DDPM-S (330M) and DDPM-L (600M); ADM's channel multipliers (1, 1, 2, 2, 4, 4).
    "ddpm-s": dict(
        channels=(256, 256, 512, 512, 1024, 1024),
        attention_levels=_ATTENTION_32_16_8,
        num_res_blocks=1,
        num_head_channels=64,
    ),
    "ddpm-l": dict(
        channels=(288, 288, 576, 576, 1152, 1152),
        attention_levels=_ATTENTION_32_16_8,
        num_res_blocks=2,
        num_head_channels=64,
    ),
}
"""Constructor keyword arguments of :class:`ConditionalDDPM` per preset name."""


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
            raise ValueError(
                f"image size {image_size} is not divisible by 2^{len(channels) - 1} ({len(channels)} UNet levels)"
            )
        num_res_blocks = num_res_blocks if isinstance(num_res_blocks, int) else tuple(int(n) for n in num_res_blocks)
        self.config = dict(
            num_datasets=num_datasets, image_size=image_size, channels=channels, attention_levels=attention_levels,
            num_res_blocks=num_res_blocks, num_head_channels=num_head_channels, norm_num_groups=norm_num_groups,
            num_train_timesteps=num_train_timesteps, schedule=schedule, cond_drop=cond_drop,
        )  # fmt: skip
        self.num_datasets, self.null_id, self.image_size, self.cond_drop = (
            num_datasets,
            num_datasets,
            image_size,
            cond_drop,
        )
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

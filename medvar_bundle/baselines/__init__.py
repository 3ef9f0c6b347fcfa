"""Baselines MedVAR is compared with: the dataset-conditioned DDPM on MONAI's DiffusionModelUNet (paper §6)."""

from medvar_bundle.baselines.ddpm import (
    BASELINE_FILE,
    DDPM_PRESETS,
    ConditionalDDPM,
    DDPMBaseline,
    ddpm_preset,
    load_baseline,
    sample,
    sampling_scheduler,
    save_baseline,
)

__all__ = [
    "BASELINE_FILE",
    "DDPM_PRESETS",
    "ConditionalDDPM",
    "DDPMBaseline",
    "ddpm_preset",
    "load_baseline",
    "sample",
    "sampling_scheduler",
    "save_baseline",
]

"""Networks of MedVAR: the multi-scale VQ-VAE tokenizer (and, later, the next-scale transformer)."""

from medvar_bundle.networks.msvqvae import TOKENIZER_PRESETS, MultiScaleVQVAE, tokenizer_preset
from medvar_bundle.networks.quantizer import (
    PAPER_PATCH_NUMS,
    MultiScaleQuantizer,
    Phi,
    QuantizerOutput,
    derive_patch_nums,
)

__all__ = [
    "PAPER_PATCH_NUMS",
    "TOKENIZER_PRESETS",
    "MultiScaleQuantizer",
    "MultiScaleVQVAE",
    "Phi",
    "QuantizerOutput",
    "derive_patch_nums",
    "tokenizer_preset",
]

"""Evaluation metrics: feature distances (FID/RadFID, KID, CMMD), weight-free metrics, efficiency.

- :mod:`.distances`: set-to-set distances on precomputed features ``(N, D)``.
- :mod:`.extractors`: InceptionV3 / RadImageNet / CLIP features of uint8 slices, from local weights.
- :mod:`.weight_free`: MS-SSIM diversity, intensity-histogram and power-spectrum distances,
  memorisation ratio — no pretrained network needed.
- :mod:`.slices`: slice sets from a store and the real-vs-real floor of any metric.
- :mod:`.efficiency`: the paper's quality–speed score.
"""

from .distances import cmmd, feature_statistics, frechet_distance, frechet_distance_from_features, kid
from .efficiency import efficiency
from .extractors import FeatureExtractor, load_clip, load_inception, load_radimagenet
from .slices import real_vs_real_floor, store_slices
from .weight_free import (
    histogram_distance,
    memorisation_ratio,
    ms_ssim_diversity,
    power_spectrum_distance,
    radial_power_spectrum,
)

__all__ = [
    "FeatureExtractor",
    "cmmd",
    "efficiency",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "histogram_distance",
    "kid",
    "load_clip",
    "load_inception",
    "load_radimagenet",
    "memorisation_ratio",
    "ms_ssim_diversity",
    "power_spectrum_distance",
    "radial_power_spectrum",
    "real_vs_real_floor",
    "store_slices",
]

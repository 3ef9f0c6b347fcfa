"""Evaluation metrics: feature distances (FID/RadFID, KID, CMMD), weight-free metrics, efficiency.

- :mod:`.distances`: set-to-set distances on precomputed features ``(N, D)``.
- :mod:`.structure`: the in-domain structure network trained on a store's training slices (no
  downloaded weights), whose features give ``structure_fd`` and k-NN precision / recall.
- :mod:`.extractors`: InceptionV3 / RadImageNet / CLIP features of uint8 slices, from local weights.
- :mod:`.weight_free`: MS-SSIM diversity, intensity-histogram and power-spectrum distances,
  memorisation ratio — no pretrained network needed.
- :mod:`.slices`: slice sets from a store and the real-vs-real floor of any metric.
- :mod:`.efficiency`: the paper's quality–speed score.
"""

from .distances import (
    cmmd,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    kid,
    knn_precision,
    knn_precision_recall,
)
from .efficiency import efficiency
from .extractors import FeatureExtractor, load_clip, load_inception, load_radimagenet
from .slices import real_vs_real_floor, split_slices, store_slices
from .structure import STRUCTURE_FILE, StructureNet, load_structure_net
from .weight_free import (
    MS_SSIM_MIN_SIDE,
    histogram_distance,
    memorisation_ratio,
    ms_ssim_diversity,
    power_spectrum_distance,
    radial_power_spectrum,
    spectrum_distance,
)

__all__ = [
    "MS_SSIM_MIN_SIDE",
    "STRUCTURE_FILE",
    "FeatureExtractor",
    "StructureNet",
    "cmmd",
    "efficiency",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "histogram_distance",
    "kid",
    "knn_precision",
    "knn_precision_recall",
    "load_clip",
    "load_inception",
    "load_radimagenet",
    "load_structure_net",
    "memorisation_ratio",
    "ms_ssim_diversity",
    "power_spectrum_distance",
    "radial_power_spectrum",
    "real_vs_real_floor",
    "spectrum_distance",
    "split_slices",
    "store_slices",
]

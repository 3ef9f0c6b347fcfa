"""Evaluation of generated slices against real data (paper §5.2–§7).

- :mod:`.scores`: read ``medvar generate`` folders back, score them per dataset against a slice
  store beside the real-vs-real floor (:func:`evaluate_generation`, ``medvar evaluate``).
- :mod:`.report`: ``report.json`` / ``.md`` / ``.csv`` tables like the paper's Tables 1–3, the
  Fig. 7-style trade-off plot and sample grids.
- :mod:`.ablation`: the sampling ablation of Table 4 (:func:`ablate`, ``medvar ablate``).
"""

from .ablation import ablate, ablation_settings, parse_grid
from .scores import Evaluator, evaluate_generation, load_evaluator, read_generated, read_generated_folder

__all__ = [
    "Evaluator",
    "ablate",
    "ablation_settings",
    "evaluate_generation",
    "load_evaluator",
    "parse_grid",
    "read_generated",
    "read_generated_folder",
]

"""Inference-time ablation (paper §7, Table 4): one model and one seed under several sampling
settings, each generated with :func:`~medvar_bundle.inference.generate` and scored by the same
:class:`~medvar_bundle.evaluation.scores.Evaluator`."""

from __future__ import annotations

import csv
import io
import itertools
import os
import re
from collections.abc import Sequence
from pathlib import Path

from medvar_bundle.files import atomic_write_bytes, atomic_write_json
from medvar_bundle.inference import GenerationRequests, generate
from medvar_bundle.io import check_writable
from medvar_bundle.model_file import load_model
from medvar_bundle.sampling.medvar import SamplingOptions

from .report import COLUMNS, format_cell, markdown_table
from .scores import load_evaluator

PLAIN = {"cfg": 0.0, "top_k": 0, "top_p": 1.0}
"""The reference setting: no guidance, no top-k (``top_k = 0`` keeps all V codes), no top-p."""

PAPER_ROWS = (
    ("Baseline", {}),
    ("+ top-p", {"top_p": 0.95}),
    ("+ top-k", {"top_p": 0.95, "top_k": 900}),
    ("+ CFG", {"top_p": 0.95, "top_k": 900, "cfg": 4.0}),
)
"""The paper's cumulative rows (Table 4), as changes to :data:`PLAIN`."""


def parse_grid(items: Sequence[str]) -> dict[str, list[float]]:
    """``["cfg=0,4", "top_k=0,900"]`` → ``{"cfg": [0.0, 4.0], "top_k": [0, 900]}`` (top_k int, others float)."""
    grid = {}
    for item in items:
        key, _, values = item.partition("=")
        cast = int if key == "top_k" else float
        try:
            grid[key] = [cast(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,... with {cast.__name__} values") from None
    return grid


def _describe(setting: dict) -> str:
    """``"cfg=4, top_k=900"``: what differs from :data:`PLAIN` (``"Baseline"`` when nothing)."""
    return ", ".join(f"{k}={v:g}" for k, v in setting.items() if v != PLAIN[k]) or "Baseline"


def ablation_settings(grid: dict[str, Sequence[float]] | None = None) -> list[tuple[str, dict]]:
    """The ``(description, setting)`` rows, the plain setting first.

    Args:
        grid: sampling option (``cfg``, ``top_k``, ``top_p``) → values; every combination is a row
            and options it leaves out stay plain. None: the paper's cumulative rows
            (Baseline, + top-p 0.95, + top-k 900, + CFG 4).
    """
    if grid is None:
        return [(label, PLAIN | changes) for label, changes in PAPER_ROWS]
    unknown = sorted(set(grid) - set(PLAIN))
    if unknown or not all(grid.values()):
        raise ValueError(f"--grid: options must be {', '.join(PLAIN)} with at least one value each, got {dict(grid)}")
    combinations = [PLAIN | dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    settings = [PLAIN] + [s for i, s in enumerate(combinations) if s != PLAIN and s not in combinations[:i]]
    return [(_describe(s), s) for s in settings]


def _off(key: str, value: float) -> str:
    """A setting cell: ``×`` when the option is off (its plain value), as in Table 4."""
    return "×" if value == PLAIN[key] else f"{value:g}"


def ablation_tables(result: dict) -> tuple[str, str]:
    """``ablation.md`` and ``ablation.csv`` of an :func:`ablate` result."""
    metric, rows = result["metric"], result["rows"]
    header = ["Description", "Params", "CFG", "Top-p", "Top-k", COLUMNS[metric], "Δ", "s/image"]
    cells = [
        [row["description"], format_cell("parameters", result["parameters"]), _off("cfg", row["cfg"]),
         _off("top_p", row["top_p"]), _off("top_k", row["top_k"]), format_cell(metric, row["value"]),
         f"{row['delta']:+.4g}", format_cell("seconds_per_image", row["seconds_per_image"])]
        for row in rows
    ]  # fmt: skip
    markdown = "\n\n".join([
        f"# Sampling ablation: {result['dataset']}, seed {result['seed']}, {result['num']} slices",
        markdown_table(header, cells),
        f"Δ: change of {COLUMNS[metric]} against the Baseline row (lower is better); top-k × keeps all codes. "
        f"Full report: `{result['evaluation']}`.",
    ]) + "\n"  # fmt: skip
    buffer = io.StringIO()
    fields = ["description", "cfg", "top_p", "top_k", "value", "delta", "seconds_per_image", "folder"]
    writer = csv.DictWriter(buffer, fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row[k] for k in fields} for row in rows)
    return markdown, buffer.getvalue()


def ablate(
    model: str | os.PathLike,
    real: str | os.PathLike,
    dataset: str,
    num: int,
    out_dir: str | os.PathLike,
    grid: dict[str, Sequence[float]] | None = None,
    seed: int = 42,
    inception_weights: str | os.PathLike | None = None,
    radimagenet_weights: str | os.PathLike | None = None,
    clip_weights: str | os.PathLike | None = None,
    allow_download: bool = True,
    max_slices: int | None = None,
    heldout_split: str = "validation",
    quality_metric: str = "power_spectrum",
    batch_size: int = 16,
    device: str = "cpu",
    bf16: bool = True,
    progress: bool = True,
) -> dict:
    """Generate ``num`` slices of ``dataset`` under each sampling setting and tabulate one metric
    and its change Δ against the plain setting (paper Table 4).

    Everything is checked (settings, model, store, weights) before sampling; ``top_k = 0`` becomes
    the model's codebook size V. Each setting is generated with the same ``seed`` into
    ``out_dir/NN_DESCRIPTION/``; all are evaluated together into ``out_dir/evaluation/`` (the full
    report of :func:`evaluate_generation`, real floor included); the metric is the efficiency's
    ``Q`` there: FID with InceptionV3 weights, else the structure FD when the store has a structure
    network (``STORE/structure.pt``), else ``quality_metric``. Writes ``ablation.json``,
    ``ablation.md`` and ``ablation.csv``.

    Args:
        model: a model file of ``medvar train``.
        real: the slice store holding ``dataset``'s training and held-out slices.
        grid: see :func:`ablation_settings` (None: the paper's cumulative rows).
        seed: the generation seed, the same for every setting.
        Others: as :func:`~medvar_bundle.inference.generate` and :func:`evaluate_generation`.

    Returns:
        The content of ``ablation.json``: ``metric``, ``parameters`` (the transformer's), and
        ``rows`` (description, cfg, top_k, top_p, folder, value, delta, seconds_per_image).
    """
    settings = ablation_settings(grid)
    loaded = load_model(model)
    GenerationRequests(loaded, [dataset], num, batch_size, seed)  # a bad request fails before any work
    options = [SamplingOptions(s["cfg"], s["top_k"] or loaded.transformer.vocab_size, s["top_p"]) for _, s in settings]
    parameters = sum(p.numel() for p in loaded.transformer.parameters())
    del loaded
    evaluator = load_evaluator(
        real, None, inception_weights, radimagenet_weights, clip_weights, allow_download, max_slices, heldout_split,
        quality_metric, device=device,
    )  # fmt: skip
    if dataset not in evaluator.registry:
        raise ValueError(
            f"dataset {dataset!r} is not in the store {real}; it has: {', '.join(sorted(evaluator.registry))}"
        )
    out = Path(out_dir)
    check_writable(out)

    folders = []
    for i, ((label, _), option) in enumerate(zip(settings, options)):
        folders.append(out / f"{i:02d}_{re.sub(r'[^A-Za-z0-9=.-]+', '_', label).strip('_')}")
        generate(
            model, [dataset], num, folders[-1], cfg=option.cfg, top_k=option.top_k, top_p=option.top_p, seed=seed,
            batch_size=batch_size, device=device, bf16=bf16, progress=progress,
        )  # fmt: skip
    labels = [label for label, _ in settings]
    report = evaluator.evaluate(folders, out / "evaluation", labels, [dataset])
    metric = evaluator.q_metric
    scores = [report["rows"][label][dataset] for label in labels]
    result = {
        "model": str(model), "dataset": dataset, "num": num, "seed": seed, "metric": metric, "parameters": parameters,
        "evaluation": str(out / "evaluation" / "report.md"),
        "rows": [
            {"description": label, **setting, "folder": folder.name, "value": row[metric],
             "delta": row[metric] - scores[0][metric], "seconds_per_image": row["seconds_per_image"]}
            for (label, setting), folder, row in zip(settings, folders, scores)
        ],
    }  # fmt: skip
    markdown, table = ablation_tables(result)
    atomic_write_bytes(out / "ablation.md", markdown.encode())
    atomic_write_bytes(out / "ablation.csv", table.encode())
    atomic_write_json(out / "ablation.json", result)
    return result

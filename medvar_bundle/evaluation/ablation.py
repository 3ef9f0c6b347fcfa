"""Inference-time ablation (paper §7, Table 4): one model under several sampling settings, over
one or more datasets and seeds, each generated with :func:`~medvar_bundle.inference.generate` and
scored by the same :class:`~medvar_bundle.evaluation.scores.Evaluator`."""

from __future__ import annotations

import csv
import io
import itertools
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from medvar_bundle.files import atomic_write_bytes, atomic_write_json
from medvar_bundle.inference import GenerationRequests, generate
from medvar_bundle.io import check_writable, read_summary
from medvar_bundle.model_file import load_model
from medvar_bundle.sampling.medvar import SamplingOptions

from .report import COLUMNS, OVERALL, format_cell, markdown_table
from .scores import load_evaluator

logger = logging.getLogger(__name__)

PLAIN = {"cfg": 0.0, "top_k": 0, "top_p": 1.0, "temperature": 1.0, "final_temperature": None}
"""The reference setting, one value per field of :class:`SamplingOptions`: no guidance, no top-k (``top_k = 0``
keeps all V codes), no top-p, softmax temperature 1 at every scale."""

PAPER_ROWS = (
    ("Baseline", {}),
    ("+ top-p", {"top_p": 0.95}),
    ("+ top-k", {"top_p": 0.95, "top_k": 900}),
    ("+ CFG", {"top_p": 0.95, "top_k": 900, "cfg": 4.0}),
)
"""The paper's cumulative rows (Table 4), as changes to :data:`PLAIN`."""


def parse_grid(items: Sequence[str]) -> dict[str, list[float]]:
    """``["cfg=0,4", "top_k=0,900"]`` → ``{"cfg": [0.0, 4.0], "top_k": [0, 900]}`` (top_k int, others float;
    ``none`` for an option whose plain value is None: ``final_temperature=none`` is the constant temperature)."""
    grid = {}
    for item in items:
        key, _, values = item.partition("=")
        cast = int if key == "top_k" else float
        nullable = key in PLAIN and PLAIN[key] is None
        try:
            grid[key] = [None if nullable and v.lower() == "none" else cast(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,... with {cast.__name__} values") from None
    return grid


def _describe(setting: dict) -> str:
    """``"cfg=4, top_k=900"``: what differs from :data:`PLAIN` (``"Baseline"`` when nothing)."""
    return ", ".join(f"{k}={v:g}" for k, v in setting.items() if v != PLAIN[k]) or "Baseline"


def ablation_settings(grid: dict[str, Sequence[float]] | None = None) -> list[tuple[str, dict]]:
    """The ``(description, setting)`` rows, the plain setting first.

    Args:
        grid: sampling option (``cfg``, ``top_k``, ``top_p``, ``temperature``, ``final_temperature``) → values;
            every combination is a row and options it leaves out stay plain. None: the paper's
            cumulative rows (Baseline, + top-p 0.95, + top-k 900, + CFG 4).
    """
    if grid is None:
        return [(label, PLAIN | changes) for label, changes in PAPER_ROWS]
    unknown = sorted(set(grid) - set(PLAIN))
    if unknown or not all(grid.values()):
        raise ValueError(f"--grid: options must be {', '.join(PLAIN)} with at least one value each, got {dict(grid)}")
    combinations = [PLAIN | dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    settings = [PLAIN] + [s for i, s in enumerate(combinations) if s != PLAIN and s not in combinations[:i]]
    return [(_describe(s), s) for s in settings]


def _off(key: str, value: float | None) -> str:
    """A setting cell: ``×`` when the option is off (its plain value), as in Table 4."""
    return "×" if value == PLAIN[key] else f"{value:g}"


def _spread(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation over seeds (sd None for one seed; both None when a value is missing)."""
    if not values or any(v is None for v in values):
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def plus_minus(mean: float | None, sd: float | None, signed: bool = False) -> str:
    """``"-12.3 ± 4.5"`` (``"–"`` for a missing mean; no ``±`` for one seed)."""
    if mean is None:
        return "–"
    text = f"{mean:+.4g}" if signed else f"{mean:.4g}"
    return text if sd is None else f"{text} ± {sd:.2g}"


def ablation_tables(result: dict) -> tuple[str, str]:
    """``ablation.md`` and ``ablation.csv`` of an :func:`ablate` result."""
    metric, rows, names, seeds = result["metric"], result["rows"], result["datasets"], result["seeds"]
    header = ["Description", "Params", "CFG", "Top-p", "Top-k", "Temp.", "Final temp.", COLUMNS[metric], "Δ", "s/image"]
    cells = [
        [row["description"], format_cell("parameters", result["parameters"]), _off("cfg", row["cfg"]),
         _off("top_p", row["top_p"]), _off("top_k", row["top_k"]), _off("temperature", row["temperature"]),
         _off("final_temperature", row["final_temperature"]),
         plus_minus(row["value"], row["sd"]),
         plus_minus(row["delta"], row["delta_sd"], signed=True),
         format_cell("seconds_per_image", row["seconds_per_image"])]
        for row in rows
    ]  # fmt: skip
    what = names[0] if len(names) == 1 else f"{len(names)} datasets"
    sections = [
        f"# Sampling ablation: {what}, seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}, "
        f"{result['num']} slices per dataset",
        markdown_table(header, cells),
        (f"{COLUMNS[metric]}: the mean over the datasets ({', '.join(names)}), " if len(names) > 1 else "")
        + (f"mean ± sd over the {len(seeds)} seeds; " if len(seeds) > 1 else "")
        + "Δ: change against the Baseline row (lower is better"
        + ("; paired per seed, mean ± sd" if len(seeds) > 1 else "")
        + f"); top-k × keeps all codes. Full report: `{result['evaluation']}`.",
    ]
    if len(names) > 1:
        per_dataset = [
            [row["description"], *(format_cell(metric, row["per_dataset"][n]) for n in names)] for row in rows
        ]
        sections += [f"## {COLUMNS[metric]} per dataset", markdown_table(["Description", *names], per_dataset)]
    markdown = "\n\n".join(sections) + "\n"
    buffer = io.StringIO()
    fields = ["description", *PLAIN, "value", "sd", "delta", "delta_sd", "seconds_per_image", "folder"]
    writer = csv.DictWriter(buffer, fields + names, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**{k: row[k] for k in fields}, **row["per_dataset"]} for row in rows)
    return markdown, buffer.getvalue()


def _generated(
    folder: Path, model: str | os.PathLike, num: int, seed: int, option: SamplingOptions, names: Sequence[str]
) -> bool:
    """Whether ``folder`` already holds these slices of ``model`` (its ``summary.json`` says so): a
    killed ablation resumes without sampling again what it had finished."""
    summary = read_summary(folder)
    wanted = {"model": str(model), "num": num, "seed": seed, **asdict(option)}
    return all(summary.get(k) == v for k, v in wanted.items()) and set(names) <= set(summary.get("datasets", {}))


def ablate(
    model: str | os.PathLike,
    real: str | os.PathLike,
    datasets: Sequence[str] | None,
    num: int,
    out_dir: str | os.PathLike,
    grid: dict[str, Sequence[float]] | None = None,
    seeds: Sequence[int] = (42,),
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
    """Generate ``num`` slices of each dataset under each sampling setting and seed, and tabulate one
    metric and its change Δ against the plain setting (paper Table 4), with its spread over seeds.

    Everything is checked (settings, model, store, weights) before sampling; ``top_k = 0`` becomes
    the model's codebook size V. Each setting and seed is generated into
    ``out_dir/NN_DESCRIPTION/seedS/`` (skipped when a previous run finished it there); all are
    evaluated together into ``out_dir/evaluation/`` (the full report of
    :func:`evaluate_generation`, real floor included, methods labelled ``DESCRIPTION, seed S``);
    the metric is the efficiency's ``Q`` there: FID with InceptionV3 weights, else the structure
    FD when the store has a structure network (``STORE/structure.pt``), else ``quality_metric``.
    A setting's value is the report's overall row (the mean over the datasets) averaged over the
    seeds; every seed samples each setting from the same noise, so Δ is paired per seed. Writes
    ``ablation.json``, ``ablation.md`` and ``ablation.csv``.

    Args:
        model: a model file of ``medvar train``.
        real: the slice store holding the datasets' training and held-out slices.
        datasets: dataset names of the model (None: all of them).
        grid: see :func:`ablation_settings` (None: the paper's cumulative rows).
        seeds: generation seeds, each used for every setting.
        Others: as :func:`~medvar_bundle.inference.generate` and :func:`evaluate_generation`.

    Returns:
        The content of ``ablation.json``: ``metric``, ``parameters`` (the transformer's),
        ``datasets``, ``seeds`` and ``rows`` (description, cfg, top_k, top_p, temperature, final_temperature,
        folder; ``value`` and ``sd``: mean and standard deviation over seeds; ``delta`` and ``delta_sd`` likewise;
        ``per_seed`` and ``per_dataset`` values; ``seconds_per_image``).
    """
    settings = ablation_settings(grid)
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    loaded = load_model(model)
    registry = loaded.datasets
    names = list(datasets) if datasets else sorted(registry, key=lambda n: registry[n]["id"])
    GenerationRequests(loaded, names, num, batch_size, seeds[0])  # a bad request fails before any work
    options = [SamplingOptions(**{**s, "top_k": s["top_k"] or loaded.transformer.vocab_size}) for _, s in settings]
    parameters = sum(p.numel() for p in loaded.transformer.parameters())
    del loaded
    evaluator = load_evaluator(
        real, None, inception_weights, radimagenet_weights, clip_weights, allow_download, max_slices, heldout_split,
        quality_metric, device=device,
    )  # fmt: skip
    absent = [n for n in names if n not in evaluator.registry]
    if absent:
        raise ValueError(
            f"dataset {', '.join(map(repr, absent))} is not in the store {real}; it has: "
            f"{', '.join(sorted(evaluator.registry))}"
        )
    out = Path(out_dir)
    check_writable(out)

    folders, runs, labels = [], [], []
    for i, ((label, _), option) in enumerate(zip(settings, options)):
        folders.append(out / f"{i:02d}_{re.sub(r'[^A-Za-z0-9=.-]+', '_', label).strip('_')}")
        for seed in seeds:
            runs.append(folders[-1] / f"seed{seed}")
            labels.append(f"{label}, seed {seed}")
            if _generated(runs[-1], model, num, seed, option, names):
                logger.info("%s already sampled in %s", labels[-1], runs[-1])
                continue
            generate(
                model, names, num, runs[-1], **asdict(option), seed=seed, batch_size=batch_size, device=device,
                bf16=bf16, progress=progress,
            )  # fmt: skip
    report = evaluator.evaluate(runs, out / "evaluation", labels, names)
    metric = evaluator.q_metric

    def scores(label: str, key: str = OVERALL, column: str = metric) -> list[float | None]:
        return [(report["rows"][f"{label}, seed {seed}"].get(key) or {}).get(column) for seed in seeds]

    baseline = scores(settings[0][0])
    rows = []
    for (label, setting), folder in zip(settings, folders):
        values = scores(label)
        deltas = [None if v is None or b is None else v - b for v, b in zip(values, baseline)]
        rows.append({
            "description": label, **setting, "folder": folder.name, **dict(zip(("value", "sd"), _spread(values))),
            **dict(zip(("delta", "delta_sd"), _spread(deltas))), "per_seed": dict(zip(map(str, seeds), values)),
            "per_dataset": {n: _spread(scores(label, n))[0] for n in names},
            "seconds_per_image": _spread(scores(label, column="seconds_per_image"))[0],
        })  # fmt: skip
    result = {
        "model": str(model), "datasets": names, "num": num, "seeds": seeds, "metric": metric,
        "parameters": parameters, "evaluation": str(out / "evaluation" / "report.md"), "rows": rows,
    }  # fmt: skip
    markdown, table = ablation_tables(result)
    atomic_write_bytes(out / "ablation.md", markdown.encode())
    atomic_write_bytes(out / "ablation.csv", table.encode())
    atomic_write_json(out / "ablation.json", result)
    return result

"""The evaluation report: JSON, Markdown and CSV tables shaped like the paper's Tables 1–3, the
Fig. 7-style trade-off plot and side-by-side sample grids.

``report["rows"][method][dataset or "overall"]`` is a flat dict ``column → value`` (None = not
computed or not applicable); the floor row is named :data:`FLOOR`. ``report["group_rows"][method]
[group]`` holds the same columns per anatomy × modality (``"CT head"``, ``"MR brain"``; the mean
over the group's datasets), the columns of the paper's Tables 2–3; ``report["groups"]`` lists
each group's datasets.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from medvar_bundle.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from medvar_bundle.visualize import save_figure, save_grid  # noqa: E402

FLOOR = "real (held-out vs train)"
OVERALL = "overall"

COLUMNS = {
    "seconds_per_image": "s/image",
    "parameters": "Params",
    "efficiency": "Efficiency",
    "structure_fd": "Struct. FD",
    "floor_structure_fd": "Struct. FD floor at N",
    "structure_precision": "Struct. P",
    "structure_recall": "Struct. R",
    "fid": "FID",
    "radfid": "RadFID",
    "kid": "KID",
    "kid_std": "KID std",
    "cmmd": "CMMD",
    "histogram": "Hist. W1",
    "power_spectrum": "PSD dist.",
    "ms_ssim": "MS-SSIM",
    "memorisation": "Memorisation",
    "num_slices": "N",
}
"""Column key → table header, in table order (Table 1: time, parameters, efficiency, then metrics)."""

METRICS = (
    "efficiency", "structure_fd", "floor_structure_fd", "structure_precision", "structure_recall", "fid", "radfid",
    "kid", "cmmd", "histogram", "power_spectrum", "ms_ssim", "memorisation",
)  # fmt: skip
"""Columns that get their own method × dataset table (Tables 2–3)."""

PLOTTED = ("structure_fd", "fid", "radfid", "kid", "cmmd", "histogram", "power_spectrum")
"""Quality metrics drawn against seconds per image."""

LEGEND = """\
- Struct. FD, P, R: Fréchet distance (lower is better) and k-NN precision / recall (k = 3, Kynkäänniemi et al.
  2019; higher is better) in the feature space of the store's structure network: a small CNN trained only on the
  store's training slices to tell each slice's dataset and position along the body axis (`medvar train-structure`).
  Precision: the share of a set's slices that look like some real slice (any number of slices; with two it can
  only be 0, 0.5 or 1); recall: the share of real slices the set covers (empty for 3 slices or fewer).
- FID, KID (InceptionV3), RadFID (RadImageNet), CMMD (CLIP): distances to the training split, lower is better.
- Hist. W1: Wasserstein-1 distance of the pixel-intensity histograms, in 8-bit levels.
- PSD dist.: mean |difference| of the log10 radially averaged power spectra, in decades (blur, missing texture).
- MS-SSIM: mean MS-SSIM between random pairs of one set; lower = more diverse; compare with the real row.
- Memorisation: median distance of generated slices to their nearest training slice over that of held-out
  slices; about 1 = as novel as new patients, much less than 1 = copies of training slices.
- Efficiency: Q · log10(1 + P)^γ (paper eq. 4), P = s/image from the folder's summary.json.
- The real row scores all held-out slices (other patients) against the training split (N: their count).
  Struct. FD floor at N: the structure FD of N held-out slices, N the method's own slice count (mean of 5
  random draws): the floor a perfect generator of that many slices reaches, since a Fréchet distance grows
  as its sample shrinks; empty where fewer than N slices are held out. Overall = mean over datasets (empty
  when a dataset's value is)."""


def format_cell(key: str, value) -> str:
    """A table cell: ``—`` for None, parameters as 310M / 2.0B, seconds with an ``s``."""
    if value is None:
        return "—"
    if key == "parameters":
        for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
            if value >= size:
                return f"{value / size:.3g}{unit}"
        return str(value)
    if key == "num_slices":
        return str(value)
    return f"{value:.3g}s" if key == "seconds_per_image" else f"{value:.4g}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def report_markdown(report: dict) -> str:
    """``report.md``: settings, the overall table (Table 1), per metric with a value a method ×
    dataset table and a method × anatomy-and-modality table (Tables 2–3), notes and a legend."""
    rows, names = report["rows"], report["datasets"]
    eff = report["efficiency"]
    sizes = f"at most {report['max_slices']}" if report["max_slices"] else "all"
    parts = [
        "# MedVAR generation report",
        f"Real store `{report['real']}`: training split as reference, "
        f"`{report['heldout_split']}` split as the real floor; "
        f"{sizes} slices of each set (seed {report['seed']}). "
        f"Efficiency Q = {COLUMNS[eff['q']]}, γ = {eff['gamma']}.",
        "## Overall",
        markdown_table(
            ["Method", *COLUMNS.values()],
            [[label, *(format_cell(k, r[OVERALL].get(k)) for k in COLUMNS)] for label, r in rows.items()],
        ),
    ]
    groups, group_rows = list(report.get("groups", {})), report.get("group_rows", {})
    for key in METRICS:
        if any(row and row.get(key) is not None for per_dataset in rows.values() for row in per_dataset.values()):
            table = [
                [label, *(format_cell(key, (r[n] or {}).get(key)) for n in [*names, OVERALL])]
                for label, r in rows.items()
            ]
            parts += [f"## {COLUMNS[key]} per dataset", markdown_table(["Method", *names, OVERALL], table)]
            if groups:
                by_group = [
                    [label, *(format_cell(key, r[g].get(key)) for g in groups)] for label, r in group_rows.items()
                ]
                parts += [f"### {COLUMNS[key]} per anatomy × modality", markdown_table(["Method", *groups], by_group)]
    parts += ["## Notes", "\n".join(f"- {note}" for note in report["notes"]) or "- none", "## Columns", LEGEND]
    return "\n\n".join(parts) + "\n"


def report_csv(report: dict) -> str:
    """``report.csv``: one row per method and dataset (``overall`` included), then per method and
    anatomy × modality group, raw values."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "dataset", *COLUMNS])
    for table in ("rows", "group_rows"):
        for label, per_name in report.get(table, {}).items():
            for name, row in per_name.items():
                writer.writerow([label, name, *("" if row is None or row.get(k) is None else row[k] for k in COLUMNS)])
    return buffer.getvalue()


def plot_tradeoff(report: dict, path: str | os.PathLike) -> Path | None:
    """Fig. 7 style: each overall metric against seconds per image (log x), one bubble per method
    with area ∝ parameters (a fixed size where unknown), the real floor as a dashed line. Each
    method keeps one colour in every panel (20 colours, repeated beyond); a legend beside the
    panels names them (labels written on the bubbles overlap where methods sit close).

    Returns:
        The PNG, or None when no method has both a time and a metric value.
    """
    rows = report["rows"]
    methods = [label for label in rows if label != FLOOR and rows[label][OVERALL].get("seconds_per_image")]
    metrics = [m for m in PLOTTED if any(rows[label][OVERALL].get(m) is not None for label in methods)]
    if not metrics:
        return None
    known = [rows[label][OVERALL]["parameters"] for label in methods if rows[label][OVERALL]["parameters"]]
    largest = max(known, default=1)
    palette = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colours = {label: palette(i % palette.N) for i, label in enumerate(methods)}
    fig, axes = plt.subplots(
        1, len(metrics) + 1, figsize=(4.2 * len(metrics) + 3.4, 3.6), squeeze=False,
        gridspec_kw={"width_ratios": [1] * len(metrics) + [0.8]},
    )  # fmt: skip
    handles = [
        Line2D([], [], marker="o", linestyle="", markersize=8, markerfacecolor=colours[label], markeredgecolor="k",
               alpha=0.6, label=label)
        for label in methods
    ]  # fmt: skip
    for ax, metric in zip(axes[0], metrics):
        for label in methods:
            row = rows[label][OVERALL]
            if row.get(metric) is None:
                continue
            area = 1200 * row["parameters"] / largest if row["parameters"] else 80
            ax.scatter(
                row["seconds_per_image"], row[metric], s=max(area, 20), color=colours[label], alpha=0.5, edgecolors="k"
            )
        floor = rows[FLOOR][OVERALL].get(metric)
        if floor is not None:
            ax.axhline(floor, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.margins(x=0.3, y=0.2)
        ax.set_xlabel("seconds per image")
        ax.set_ylabel(COLUMNS[metric])
        ax.grid(True, which="both", alpha=0.3)
    if any(rows[FLOOR][OVERALL].get(metric) is not None for metric in metrics):
        handles.append(Line2D([], [], color="grey", linestyle="--", linewidth=1, label="real floor"))
    axes[0, -1].axis("off")
    axes[0, -1].legend(handles=handles, loc="center left", fontsize=7, frameon=False)
    fig.suptitle("Quality vs inference time (bubble area ∝ parameters)", fontsize=10)
    return save_figure(fig, path)


def write_report(
    report: dict,
    samples: dict[str, list[tuple[str, np.ndarray]]],
    out_dir: str | os.PathLike,
    aspects: dict[str, float] | None = None,
) -> dict:
    """Write the PNGs, ``report.md``, ``report.csv`` and last ``report.json`` into ``out_dir``.

    Args:
        report: the report (see the module docstring); ``report["files"]`` is filled in.
        samples: dataset → ``(row title, uint8 slices (n, S, S))`` for its sample grid.
        aspects: dataset → the pixel aspect its grid is drawn with
            (:func:`~medvar_bundle.visualize.pixel_aspect`; 1, square pixels, when missing).

    Returns:
        ``report``.
    """
    out = Path(out_dir)
    files = {
        f"samples_{name}": save_grid(
            [list(s) for _, s in rows],
            out / f"samples_{name}.png",
            [t for t, _ in rows],
            name,
            (aspects or {}).get(name, 1.0),
        ).name
        for name, rows in samples.items()
    }
    tradeoff = plot_tradeoff(report, out / "tradeoff.png")
    if tradeoff is None:
        report["notes"].append("no trade-off plot: no method has both s/image and a metric")
    else:
        files["tradeoff"] = tradeoff.name
    report["files"] = files | {"markdown": "report.md", "csv": "report.csv"}
    atomic_write_bytes(out / "report.md", report_markdown(report).encode())
    atomic_write_bytes(out / "report.csv", report_csv(report).encode())
    atomic_write_json(out / "report.json", report)
    return report

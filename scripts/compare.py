"""MedVAR against the DDPM baseline under the same wall-clock training budgets, on the demo store,
and how both improve with training time.

Needs the store prepared and tokenized, its structure network trained and the tokenizer trained
(``make demo``). Every stage is skipped when its output exists with the same options, so a re-run
resumes; ``OUT/run.json`` fixes the options both trainings depend on (seed, step cap, the DDPM's
learning rate), and a re-run with others is refused: give it another ``--out``.

1. For each budget of ``--minutes`` (cumulative minutes of wall-clock training, e.g. 5 15 60):
   ``OUT/medvar/`` trains the next-scale transformer (tiny preset, the demo's batch 8, lr 0.096
   per 256 images, warm-up 20; ``configs/train.yaml`` with ``max_seconds``) on from the previous
   budget to this one, and ``OUT/ddpm/`` the DDPM baseline (tiny preset, matched in parameters;
   batch 8; ``configs/train_ddpm.yaml``) likewise. Both stop on the budget, not on
   ``--max-steps`` (whose cosine therefore barely decays the learning rate); validation runs only
   at each budget's end, on at most 64 slices. The model files at each budget are copied to
   ``OUT/points/Mmin/`` with ``training.json`` (optimizer steps, seconds each run took). A run
   killed mid-way resumes from its last checkpoint with the budget's whole time again, so that
   point gets more training than its label says (``training.json`` shows it). With ``--parallel``
   the two train at the same time, one process each (``make compare`` does: on 2 cores each
   budget is then minutes of one core for each model).
2. ``OUT/samples/Mmin/medvar/``: ``--num`` MedVAR slices per dataset
   (:func:`~medvar_bundle.inference.generate`).
3. ``OUT/samples/Mmin/ddpm-N/`` at the last budget, for each N of ``--ddpm-steps`` (the largest
   first): ``--ddpm-num`` slices per dataset
   from one N-step chain over all datasets' slices. DDPM sampling is slow on CPU: a step count whose
   estimated time (from the previous chain's time per step) would overrun ``--ddpm-minutes`` is
   skipped and reported. ``OUT/samples/Mmin/medvar-first/`` holds MedVAR's first ``--ddpm-num``
   slices per dataset: a Fréchet distance grows as its set shrinks, so MedVAR is also scored at
   the DDPM's sample count.
4. ``OUT/evaluation/``: :func:`~medvar_bundle.evaluation.evaluate_generation` of every sample folder
   against the store (methods labelled ``MedVAR-tiny M min``, ``DDPM-tiny(N) M min``).
5. ``OUT/curve.png`` (the efficiency's quality metric, the structure FD when the store has a
   structure network, against training minutes: overall and per dataset, the real floor dashed),
   ``OUT/curve.json`` (the plotted figures) and ``OUT/curve_grid.png`` (per dataset: held-out real
   slices, MedVAR's at each budget, the DDPM's with the most steps at the last budget).

Sample folders have ``medvar generate``'s layout: ``NAME.nii.gz``, ``NAME.png`` and
``summary.json`` (with ``seconds_per_image`` per dataset and ``parameters``, the sampling network's).

    .venv/bin/python scripts/compare.py [--store runs/demo/store] [--tokenizer runs/demo/tokenizer/tokenizer.pt]
        [--out runs/demo/compare] [--minutes 5 15 60] [--num 16] [--ddpm-num 2] [--ddpm-steps 10 20 30 50 100]
        [--ddpm-minutes 10] [--threads N]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from medvar_bundle.bundle_config import config_component, run_config
from medvar_bundle.data.store import read_registry
from medvar_bundle.files import atomic_write_bytes, atomic_write_json
from medvar_bundle.inference import generate
from medvar_bundle.io import (
    SUMMARY_FILE,
    check_entry,
    output_geometry,
    read_summary,
    save_sample_grid,
    write_slice_stack,
    write_summary,
)
from medvar_bundle.model_file import BASELINE_FILE, MODEL_FILE, load_baseline
from medvar_bundle.sampling.ddpm import sample

logger = logging.getLogger("compare")

VAL_MAX_IMAGES = 64
"""Slices of the end-of-training validation (DDPM's noise MSE over 256² slices is slow on CPU)."""
SAMPLING = ("cfg", "temperature", "final_temperature")
"""MedVAR's sampling options the comparison sets (configs/inference.yaml's ids; its defaults where not given)."""
TRAINING = ("seed", "max_steps", "ddpm_lr")
"""The options both trainings depend on: fixed for an output folder (``OUT/run.json``)."""
RUN_FILE = "run.json"


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _label(minutes: float) -> str:
    return f"{minutes:g}min"


def _train(config: str, overrides: dict, threads: int) -> float:
    """One training run of ``configs/<config>.yaml`` on ``threads`` torch threads (0: torch's
    choice); returns its wall-clock seconds. A top-level function, so a spawned process can run it."""
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    run_config(config, "train", overrides)
    return time.perf_counter() - start


def check_run(args: argparse.Namespace, out: Path) -> None:
    """Record ``TRAINING``'s options in ``OUT/run.json``, or, when the folder holds a run already,
    refuse other values with one line: a re-run resumes that run's models and samples.

    Raises:
        SystemExit: ``out`` holds a run made with other training options.
    """
    options = {key: getattr(args, key) for key in TRAINING}
    record = out / RUN_FILE
    if record.is_file():
        old = json.loads(record.read_text())
        for key, value in options.items():
            if old.get(key) != value:
                raise SystemExit(
                    f"compare: {out} holds a run with --{key.replace('_', '-')} {old.get(key)}, not {value}: "
                    "give another --out (or remove that folder)"
                )
    else:
        atomic_write_json(record, options)


def train_to_budgets(args: argparse.Namespace, out: Path) -> dict[float, dict[str, Path]]:
    """Train MedVAR and the DDPM baseline through every budget of ``args.minutes``; for each budget
    the copies of both model files in ``OUT/points/Mmin/`` (``{"medvar": ..., "ddpm": ...}``)."""
    common = dict(
        dataset_dir=args.store, max_steps=args.max_steps, batch_size=8, device=f"$torch.device({args.device!r})",
        preset="tiny", warmup_steps=20, val_every=args.max_steps, checkpoint_every=50, val_max_images=VAL_MAX_IMAGES,
        seed=args.seed,
    )  # fmt: skip
    runs = {
        "medvar": ("train", MODEL_FILE, {"tokenizer": args.tokenizer, "lr": 0.096}),
        "ddpm": ("train_ddpm", BASELINE_FILE, {"lr": args.ddpm_lr}),
    }
    points, previous = {}, 0.0
    for minutes in sorted(args.minutes):
        folder = out / "points" / _label(minutes)
        record_file = folder / "training.json"
        record = json.loads(record_file.read_text()) if record_file.is_file() else {}
        todo = {name: run for name, run in runs.items() if name not in record}
        for name in runs.keys() - todo.keys():
            logger.info("%s already trained to %g min: %s", name, minutes, folder / runs[name][1])
        jobs = {
            name: (config, {**common, **extra, "output_dir": str(out / name), "max_seconds": 60 * (minutes - previous)})
            for name, (config, _, extra) in todo.items()
        }
        if args.parallel and len(jobs) > 1:
            threads = args.threads or max(1, (os.cpu_count() or 2) // len(jobs))
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(len(jobs), mp_context=context) as pool:
                futures = {name: pool.submit(_train, *job, threads) for name, job in jobs.items()}
                seconds = {name: future.result() for name, future in futures.items()}
        else:
            seconds = {name: _train(*job, args.threads) for name, job in jobs.items()}
        for name in jobs:
            data = (out / name / runs[name][1]).read_bytes()  # read once: copied, and its step recorded
            atomic_write_bytes(folder / runs[name][1], data)
            step = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)["step"]
            record[name] = {"steps": int(step), "seconds": seconds[name]}
            atomic_write_json(record_file, record)
        points[minutes] = {name: folder / file_name for name, (_, file_name, _) in runs.items()}
        previous = minutes
    return points


def _drawn_with(summary: dict, options: dict) -> bool:
    """Whether a sample folder's ``summary.json`` is complete and was drawn with ``options``."""
    return "parameters" in summary and all(summary.get(key) == value for key, value in options.items())


def sample_medvar(model: Path, folder: Path, args: argparse.Namespace) -> Path:
    """``args.num`` MedVAR slices per dataset into ``folder`` with guidance ``args.cfg`` and softmax
    temperatures ``args.temperature`` to ``args.final_temperature`` (its ``summary.json`` carries the
    transformer's ``parameters``); samples already there under other sampling options, another
    number or seed are drawn again."""
    summary = read_summary(folder)
    options = {key: getattr(args, key) for key in SAMPLING}
    if _drawn_with(summary, {**options, "num": args.num, "seed": args.seed}):
        logger.info("MedVAR samples already in %s", folder)
        return folder
    generate(model, None, args.num, folder, seed=args.seed, device=args.device, **options)
    return folder


def first_slices(source: Path, num: int, folder: Path, registry: dict) -> Path:
    """The first ``num`` slices of every stack of the sample folder ``source``, written into
    ``folder`` (with ``source``'s summary): MedVAR at the DDPM's sample count, so that Fréchet
    distances, which grow as a set shrinks, are also compared at equal numbers of slices (its
    summary gains ``"first": num``). Cut again when ``source`` was sampled anew or ``num`` changed."""
    from medvar_bundle.io import read_generated

    summary = read_summary(source)
    cut = {**summary, "first": num}
    if summary and read_summary(folder) == cut:  # cut from these very samples already
        return folder
    for stack in sorted(source.glob("*.nii.gz")):
        name = stack.name.removesuffix(".nii.gz")
        write_slice_stack(read_generated(stack, registry[name])[:num], registry[name], folder / stack.name)
    write_summary(folder, cut)
    return folder


def sample_ddpm(baseline_file: Path, steps: int, num: int, folder: Path, args: argparse.Namespace) -> dict:
    """``num`` slices per dataset from one ``steps``-step guided chain over all datasets; writes
    ``medvar generate``'s layout into ``folder`` (``summary.json`` last) and returns the summary.
    Every image's time is the chain's time over its images."""
    baseline = load_baseline(baseline_file, args.device)
    names = sorted(baseline.datasets, key=lambda n: baseline.datasets[n]["id"])
    for name in names:  # before the chain, not after it: every dataset's stack must be writable
        check_entry(name, baseline.datasets[name])
    ids = torch.tensor([baseline.datasets[n]["id"] for n in names for _ in range(num)], device=args.device)
    start = time.perf_counter()
    images = sample(
        baseline.model,
        args.ddpm_sampler,
        steps,
        ids,
        torch.Generator(args.device).manual_seed(args.seed),
        args.ddpm_cfg,
    )
    if images.is_cuda:
        torch.cuda.synchronize()  # the chain's kernels run asynchronously: count their tail too
    seconds = time.perf_counter() - start
    stacks = np.split(images.cpu().numpy(), len(names))
    summary = {
        "model": str(baseline_file), "method": "DDPM", "sampler": args.ddpm_sampler, "steps": steps, "num": num,
        "seed": args.seed, "batch_size": len(ids), "device": args.device, "bf16": True, "cfg": args.ddpm_cfg,
        "parameters": _parameters(baseline.model), "seconds": seconds, "datasets": {},
    }  # fmt: skip
    for name, stack in zip(names, stacks):
        title = f"{name}: DDPM samples ({steps} {args.ddpm_sampler} steps, cfg {args.ddpm_cfg}, seed {args.seed})"
        files = {
            "nifti": str(write_slice_stack(stack, baseline.datasets[name], folder / f"{name}.nii.gz")),
            "grid": str(save_sample_grid(stack[:64], folder / f"{name}.png", title=title,
                                         spacing=output_geometry(baseline.datasets[name], stack.shape[-1])[0])),
        }  # fmt: skip
        summary["datasets"][name] = {"id": baseline.datasets[name]["id"], "seconds": seconds / len(names),
                                     "seconds_per_image": seconds / len(ids), "files": files}  # fmt: skip
    write_summary(folder, summary)
    logger.info("DDPM %d steps: %d slices in %.0f s -> %s", steps, len(ids), seconds, folder)
    return summary


def sample_ddpm_all(baseline: Path, samples: Path, args: argparse.Namespace) -> tuple[list[Path], list[int]]:
    """The DDPM folders of every step count within ``args.ddpm_minutes``: (written or existing
    folders, skipped step counts). The largest step count runs first (the one MedVAR is held
    against), then the others from the smallest up; a chain is skipped when the previous chain's
    time per step (a folder's from an earlier run counts too) times its steps would overrun the limit.
    A folder drawn with another number, seed, guidance or sampler is drawn again."""
    folders, skipped, per_step, spent = [], [], 0.0, 0.0
    order = sorted(args.ddpm_steps)
    wanted = {"num": args.ddpm_num, "seed": args.seed, "cfg": args.ddpm_cfg, "sampler": args.ddpm_sampler}
    for steps in order[-1:] + order[:-1]:
        folder = samples / f"ddpm-{steps}"
        done = read_summary(folder)
        if _drawn_with(done, wanted):
            logger.info("DDPM %d-step samples already in %s", steps, folder)
            folders.append(folder)
            per_step = done["seconds"] / steps
            continue
        if spent + steps * per_step > 60 * args.ddpm_minutes:
            logger.warning(
                "DDPM %d steps skipped: about %.0f s more would overrun --ddpm-minutes %g",
                steps,
                steps * per_step,
                args.ddpm_minutes,
            )
            skipped.append(steps)
            continue
        seconds = sample_ddpm(baseline, steps, args.ddpm_num, folder, args)["seconds"]
        spent, per_step = spent + seconds, seconds / steps
        folders.append(folder)
    return folders, skipped


def evaluate(store: str, folders: list[Path], labels: list[str], out: Path, device: str) -> dict:
    """Score every sample folder against the store (the evaluation package is imported only here);
    a report already in ``out`` that scored the same folders under the same labels, after their
    samples were last written, is reused."""
    from medvar_bundle.evaluation import evaluate_generation

    done = out / "report.json"
    if done.is_file():
        report = json.loads(done.read_text())
        newer = all(done.stat().st_mtime >= (f / SUMMARY_FILE).stat().st_mtime for f in folders)
        if newer and report.get("methods") == {label: str(folder) for label, folder in zip(labels, folders)}:
            logger.info("evaluation already in %s", out)
            return report
    return evaluate_generation(store, [str(f) for f in folders], str(out), labels=labels, device=device)


def curve_figures(report: dict, methods: dict[str, dict[float, str]]) -> dict:
    """The curve's figures: the report's quality metric (structure FD with a structure network,
    else the efficiency's Q) per method, training budget and dataset (and ``overall``), and the
    floor per dataset. ``methods``: method → budget (minutes) → its label in ``report``."""
    from medvar_bundle.evaluation.report import FLOOR

    rows = report["rows"]
    metric = "structure_fd" if rows[FLOOR]["overall"].get("structure_fd") is not None else report["efficiency"]["q"]
    names = list(rows[FLOOR])
    return {
        "metric": metric,
        "floor": {name: (rows[FLOOR][name] or {}).get(metric) for name in names},
        "methods": {
            method: {
                f"{m:g}": {name: (rows[label].get(name) or {}).get(metric) for name in names} for m, label in by.items()
            }
            for method, by in methods.items()
        },
    }


def plot_curve(figures: dict, path: Path) -> Path:
    """Quality against training minutes, one panel per dataset and one overall, floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medvar_bundle.visualize import save_figure

    names = list(figures["floor"])
    cols = 4
    fig, axes = plt.subplots(-(-len(names) // cols), cols, figsize=(3.4 * cols, 2.9 * -(-len(names) // cols)))
    for ax, name in zip(axes.flat, names):
        for method, by in figures["methods"].items():
            points = [(float(m), v[name]) for m, v in by.items() if v[name] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        if figures["floor"][name] is not None:  # None: fewer than two held-out slices
            ax.axhline(figures["floor"][name], color="grey", linestyle="--", linewidth=1, label="real floor")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("training minutes", fontsize=8)
        ax.set_ylabel(figures["metric"], fontsize=8)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(f"{figures['metric']} (lower is better) against wall-clock training time", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def curve_grid(store: str, registry: dict, columns: list[tuple[str, Path]], path: Path, per_column: int = 2) -> Path:
    """Per dataset, ``per_column`` held-out real slices then ``per_column`` slices of each
    ``(title, sample folder)``; the titles go into the figure's title, in column order."""
    from medvar_bundle.io import entry_aspect, read_generated
    from medvar_bundle.metrics.slices import split_slices
    from medvar_bundle.visualize import save_grid

    rows, titles = [], []
    names = sorted(registry, key=lambda n: registry[n]["id"])
    for name in names:
        held = split_slices(store, "validation", name, per_column, seed=0)  # None: no held-out volume
        sets = [[] if held is None else list(held)]
        for _, folder in columns:
            stack = folder / f"{name}.nii.gz"
            sets.append(list(read_generated(stack, registry[name])[:per_column]) if stack.is_file() else [])
        # an empty cell keeps the columns aligned where a set has fewer slices
        rows.append([s for images in sets for s in [*images, *[None] * (per_column - len(images))]])
        titles.append(name)
    order = " | ".join(["real held-out", *(title for title, _ in columns)])
    aspects = [entry_aspect(registry[name]) for name in names]
    return save_grid(rows, path, titles, title=f"{per_column} slices each: {order}", aspect=aspects)


def grid_columns(out: Path, budgets: list[float], ddpm: list[Path]) -> list[tuple[str, Path]]:
    """The curve grid's (title, sample folder) columns: MedVAR at each of ``budgets`` (minutes),
    then, of ``ddpm`` (the last budget's ``ddpm-N`` folders, in any order), the chain with the most
    steps, e.g. ``("DDPM-100 30 min", OUT/samples/30min/ddpm-100)``."""
    columns = [(f"MedVAR {m:g} min", out / "samples" / _label(m) / "medvar") for m in budgets]
    if ddpm:
        most = max(ddpm, key=lambda folder: int(folder.name.removeprefix("ddpm-")))
        columns.append((f"DDPM-{most.name.removeprefix('ddpm-')} {max(budgets):g} min", most))
    return columns


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="runs/demo/store", help="prepared and tokenized slice store")
    parser.add_argument(
        "--tokenizer", default="runs/demo/tokenizer/tokenizer.pt", help="the tokenizer that made the store's tokens"
    )
    parser.add_argument("--out", default="runs/demo/compare", help="output folder")
    parser.add_argument(
        "--minutes",
        type=float,
        nargs="+",
        default=[5.0, 15.0],
        help="cumulative wall-clock training budgets of each model; samples and scores at each (default 5 15)",
    )
    parser.add_argument(
        "--max-steps", type=int, default=100_000, help="step cap, far beyond the budget (default 100000)"
    )
    parser.add_argument(
        "--ddpm-lr", type=float, default=1e-3, help="peak learning rate of the DDPM baseline (default 1e-3)"
    )
    parser.add_argument("--num", type=int, default=16, help="MedVAR slices per dataset (default 16)")
    parser.add_argument("--ddpm-num", type=int, default=2, help="DDPM slices per dataset and step count (default 2)")
    parser.add_argument("--ddpm-steps", type=int, nargs="+", default=[10, 20, 30, 50, 100], help="DDPM step counts")
    parser.add_argument("--ddpm-minutes", type=float, default=10.0, help="time limit of all DDPM sampling (default 10)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's choice)")
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="train MedVAR and the DDPM at the same time, one process each (each on --threads threads, "
        "default half the cores): each budget is then wall-clock minutes of each on its share of the machine",
    )
    parser.add_argument(
        "--cfg", type=float, help="MedVAR's classifier-free guidance (default: configs/inference.yaml's cfg)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        help="MedVAR's softmax temperature, at the first scale with --final-temperature (default: "
        "configs/inference.yaml's temperature)",
    )
    parser.add_argument(
        "--final-temperature",
        type=float,
        help="MedVAR's softmax temperature at the last scale, reached linearly from --temperature (default: "
        "configs/inference.yaml's final_temperature)",
    )
    parser.add_argument("--ddpm-sampler", choices=["ddpm", "ddim"], default="ddpm", help="DDPM sampler (default ddpm)")
    parser.add_argument("--ddpm-cfg", type=float, default=2.0, help="DDPM classifier-free guidance (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for option in SAMPLING:
        if getattr(args, option) is None:
            default = config_component("inference", option)
            setattr(args, option, None if default is None else float(default))
    return args


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    check_run(args, out)
    points = train_to_budgets(args, out)
    registry = read_registry(args.store)
    folders, labels, skipped = [], [], []
    ddpm: list[Path] = []  # the last budget's DDPM sample folders
    methods: dict[str, dict[float, str]] = {}
    for minutes, files in points.items():
        samples = out / "samples" / _label(minutes)
        medvar = sample_medvar(files["medvar"], samples / "medvar", args)
        folders.append(medvar)
        labels.append(f"MedVAR-tiny {minutes:g} min")
        methods.setdefault("MedVAR-tiny", {})[minutes] = labels[-1]
        if minutes != max(points):  # DDPM samples at the last budget only: a 256² chain costs minutes per slice
            continue
        ddpm, missed = sample_ddpm_all(files["ddpm"], samples, args)
        for folder in ddpm:
            steps = folder.name.removeprefix("ddpm-")
            folders.append(folder)
            labels.append(f"DDPM-tiny({steps}) {minutes:g} min")
            methods.setdefault(f"DDPM-tiny({steps})", {})[minutes] = labels[-1]
        skipped += [f"{steps} steps at {minutes:g} min" for steps in missed]
        if ddpm:
            folders.append(first_slices(medvar, args.ddpm_num, samples / "medvar-first", registry))
            labels.append(f"MedVAR-tiny {minutes:g} min, first {args.ddpm_num}")
    report = evaluate(args.store, folders, labels, out / "evaluation", args.device)
    figures = curve_figures(report, methods)
    atomic_write_json(out / "curve.json", figures)
    plot_curve(figures, out / "curve.png")
    curve_grid(args.store, registry, grid_columns(out, list(points), ddpm), out / "curve_grid.png")
    print(
        f"compare: samples in {out / 'samples'}; report {out / 'evaluation' / 'report.md'}; curve {out / 'curve.png'}"
    )
    if skipped:
        print(
            f"compare: DDPM {', '.join(skipped)} skipped (over --ddpm-minutes {args.ddpm_minutes}); "
            "raise it to run them"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""MedVAR against the DDPM baseline under the same wall-clock training budget, on the demo store.

Needs the store prepared and tokenized and the tokenizer trained (``make demo``). Each stage is
skipped when its output exists, so a re-run resumes:

1. ``OUT/medvar/model.pt``: the next-scale transformer (tiny preset, the demo's batch 8, lr 0.096
   per 256 images, warm-up 20) trained for ``--minutes`` of wall-clock time
   (``configs/train.yaml`` with ``max_seconds``).
2. ``OUT/ddpm/baseline.pt``: the DDPM baseline (tiny preset, matched in parameters; batch 8) for the
   same budget (``configs/train_ddpm.yaml``).
   Both stop on the budget, not on ``--max-steps`` (whose cosine therefore barely decays the
   learning rate); validation runs only at the end, on at most 64 slices. A run killed mid-way
   resumes from its last checkpoint with a fresh budget.
3. ``OUT/samples/medvar/``: ``--num`` slices per dataset (:func:`~medvar_bundle.inference.generate`).
4. ``OUT/samples/ddpm-N/`` for each N of ``--ddpm-steps``: ``--ddpm-num`` slices per dataset from
   one N-step chain over all datasets' slices. DDPM sampling is slow on CPU: a step count whose
   estimated time (from the previous chain's time per step) would overrun ``--ddpm-minutes`` is
   skipped and reported.
5. ``OUT/evaluation/``: :func:`~medvar_bundle.evaluation.evaluate_generation` of every sample folder
   against the store.

Sample folders have ``medvar generate``'s layout: ``NAME.nii.gz``, ``NAME.png`` and
``summary.json`` (with ``seconds_per_image`` per dataset and ``parameters``, the sampling network's).

    .venv/bin/python scripts/compare.py [--store runs/demo/store] [--tokenizer runs/demo/tokenizer/tokenizer.pt]
        [--out runs/demo/compare] [--minutes 6] [--num 16] [--ddpm-num 2] [--ddpm-steps 10 20 30 50 100]
        [--ddpm-minutes 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from medvar_bundle.bundle_config import run_config
from medvar_bundle.files import atomic_write_json
from medvar_bundle.inference import generate
from medvar_bundle.io import save_sample_grid, write_slice_stack
from medvar_bundle.model_file import BASELINE_FILE, MODEL_FILE, load_baseline
from medvar_bundle.sampling.ddpm import sample

logger = logging.getLogger("compare")

VAL_MAX_IMAGES = 64
"""Slices of the end-of-training validation (DDPM's noise MSE over 256² slices is slow on CPU)."""


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def train_both(args: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    """Train MedVAR and the DDPM baseline for ``args.minutes`` each, unless their files exist."""
    common = dict(
        dataset_dir=args.store, max_steps=args.max_steps, batch_size=8, device=f"$torch.device({args.device!r})",
        preset="tiny", warmup_steps=20, val_every=args.max_steps, checkpoint_every=50, val_max_images=VAL_MAX_IMAGES,
        seed=args.seed, max_seconds=60 * args.minutes,
    )  # fmt: skip
    model = out / "medvar" / MODEL_FILE
    if model.is_file():
        logger.info("MedVAR already trained: %s", model)
    else:
        run_config(
            "train", "train", {**common, "output_dir": str(model.parent), "tokenizer": args.tokenizer, "lr": 0.096}
        )
    baseline = out / "ddpm" / BASELINE_FILE
    if baseline.is_file():
        logger.info("DDPM already trained: %s", baseline)
    else:
        run_config("train_ddpm", "train", {**common, "output_dir": str(baseline.parent), "lr": args.ddpm_lr})
    return model, baseline


def _summary(folder: Path) -> dict:
    """A sample folder's ``summary.json`` ({} when absent)."""
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def sample_medvar(model: Path, folder: Path, args: argparse.Namespace) -> Path:
    """``args.num`` MedVAR slices per dataset into ``folder`` (its ``summary.json`` carries the
    transformer's ``parameters``)."""
    if "parameters" in _summary(folder):
        logger.info("MedVAR samples already in %s", folder)
        return folder
    generate(model, None, args.num, folder, seed=args.seed, device=args.device)
    return folder


def sample_ddpm(baseline_file: Path, steps: int, num: int, folder: Path, args: argparse.Namespace) -> dict:
    """``num`` slices per dataset from one ``steps``-step guided chain over all datasets; writes
    ``medvar generate``'s layout into ``folder`` (``summary.json`` last) and returns the summary.
    Every image's time is the chain's time over its images."""
    baseline = load_baseline(baseline_file, args.device)
    names = sorted(baseline.datasets, key=lambda n: baseline.datasets[n]["id"])
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
            "grid": str(save_sample_grid(stack[:64], folder / f"{name}.png", title=title)),
        }
        summary["datasets"][name] = {"id": baseline.datasets[name]["id"], "seconds": seconds / len(names),
                                     "seconds_per_image": seconds / len(ids), "files": files}  # fmt: skip
    atomic_write_json(folder / "summary.json", summary)
    logger.info("DDPM %d steps: %d slices in %.0f s -> %s", steps, len(ids), seconds, folder)
    return summary


def sample_ddpm_all(baseline: Path, samples: Path, args: argparse.Namespace) -> tuple[list[Path], list[int]]:
    """The DDPM folders of every step count within ``args.ddpm_minutes``: (written or existing
    folders, skipped step counts). A chain is skipped when the previous chain's time per step
    (a folder's from an earlier run counts too) times its steps would overrun the limit."""
    folders, skipped, per_step, spent = [], [], 0.0, 0.0
    for steps in sorted(args.ddpm_steps):
        folder = samples / f"ddpm-{steps}"
        done = _summary(folder)
        if "parameters" in done:
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


def evaluate(store: str, folders: list[Path], labels: list[str], out: Path, device: str) -> Path:
    """Score every sample folder against the store (the evaluation package is imported only here)."""
    from medvar_bundle.evaluation import evaluate_generation

    evaluate_generation(store, [str(f) for f in folders], str(out), labels=labels, device=device)
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="runs/demo/store", help="prepared and tokenized slice store")
    parser.add_argument(
        "--tokenizer", default="runs/demo/tokenizer/tokenizer.pt", help="the tokenizer that made the store's tokens"
    )
    parser.add_argument("--out", default="runs/demo/compare", help="output folder")
    parser.add_argument(
        "--minutes", type=float, default=6.0, help="wall-clock training budget of each model (default 6)"
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
    parser.add_argument("--ddpm-sampler", choices=["ddpm", "ddim"], default="ddpm", help="DDPM sampler (default ddpm)")
    parser.add_argument("--ddpm-cfg", type=float, default=2.0, help="DDPM classifier-free guidance (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    out = Path(args.out)
    model, baseline = train_both(args, out)
    medvar = sample_medvar(model, out / "samples" / "medvar", args)
    ddpm, skipped = sample_ddpm_all(baseline, out / "samples", args)
    labels = ["MedVAR-tiny"] + [f"DDPM-tiny({f.name.removeprefix('ddpm-')})" for f in ddpm]
    report = evaluate(args.store, [medvar, *ddpm], labels, out / "evaluation", args.device)
    print(f"compare: models {model}, {baseline}; samples in {out / 'samples'}; report {report / 'report.md'}")
    if skipped:
        print(
            f"compare: DDPM step counts {skipped} skipped "
            f"(over --ddpm-minutes {args.ddpm_minutes}); raise it to run them"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

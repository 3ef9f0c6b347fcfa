"""Does a quality metric rank what a radiologist ranks? Score known sets against a store's training slices.

Per dataset of the store (with at least --min-slices held-out and more than 3 training slices; the
others are named on stderr and skipped), every set is scored against
the dataset's training split: the held-out slices (other patients: the real floor), their tokenizer
reconstructions (with --tokenizer), the held-out slices blurred, noised and with shuffled 32²
patches at three severities (medvar_bundle.metrics.damage), the held-out slices of every other
dataset posing as this one, and folders of `medvar generate` (with --samples; with --damage-samples
also each folder's slices under the mildest blur and the mildest noise, which tells whether a
metric scores the samples for their texture: a set a blur makes much worse, or noise much better,
is scored for its grain). Columns: the
structure FD, precision and recall (the store's structure.pt, `medvar train-structure`), and the
weight-free histogram and power-spectrum distances for comparison. Prints one Markdown table per
dataset; --out also writes the figures as JSON.

    python scripts/structure_ranking.py --store runs/demo/store \\
        --tokenizer runs/demo/tokenizer/tokenizer.pt --samples runs/demo/samples
    python scripts/structure_ranking.py --store runs/demo/store --damage-samples \\
        --samples MedVAR=runs/demo/compare/samples/30min/medvar-first \\
        --samples DDPM-100=runs/demo/compare/samples/30min/ddpm-100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from medvar_bundle.data.store import SPLITS, SliceStore
from medvar_bundle.evaluation.report import markdown_table
from medvar_bundle.evaluation.scores import PRECISION_RECALL_K, structure_scores
from medvar_bundle.io import read_generated
from medvar_bundle.metrics import (
    histogram_distance,
    load_structure_net,
    power_spectrum_distance,
    store_slices,
)
from medvar_bundle.metrics.damage import DAMAGES
from medvar_bundle.model_file import load_tokenizer
from medvar_bundle.networks.msvqvae import Reconstruction
from medvar_bundle.runtime import to_model_range, to_uint8

MILD_DAMAGES = ("blur", "noise")
"""The damages --damage-samples applies to sample sets, each at its mildest severity."""


def sample_folders(specs: list[str]) -> dict[str, Path]:
    """``--samples`` values ``[LABEL=]FOLDER`` → ``{"LABEL samples": FOLDER}``. A label holds no
    path separator (``runs/lr=1e-3/x`` is a folder); without one, the first folder is "MedVAR"
    and the others take their folder's name.

    Raises:
        FileNotFoundError: a folder that does not exist.
        ValueError: two folders under one label.
    """
    folders: dict[str, Path] = {}
    for spec in specs:
        label, sign, folder = spec.partition("=")
        if not sign or os.sep in label:
            label, folder = "", spec
        label = f"{label or ('MedVAR' if not folders else Path(folder).name)} samples"
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--samples {spec}: no such folder")
        if label in folders:
            raise ValueError(f"--samples {spec}: the label {label!r} is taken; give LABEL=FOLDER")
        folders[label] = Path(folder)
    return folders


def _cell(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


@torch.no_grad()
def reconstruct(tokenizer, slices: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Tokenizer reconstructions of uint8 slices ``(N, S, S)``, uint8."""
    network = Reconstruction(tokenizer).eval()
    batches = [torch.from_numpy(slices[i : i + batch_size])[:, None] for i in range(0, len(slices), batch_size)]
    return np.concatenate([to_uint8(network(to_model_range(x)))[:, 0].numpy() for x in batches])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--store", required=True, help="slice store with a structure.pt (medvar train-structure)")
    parser.add_argument("--tokenizer", help="tokenizer.pt: also score its reconstructions of the held-out slices")
    parser.add_argument(
        "--samples", action="append", default=[], metavar="[LABEL=]FOLDER",
        help="a `medvar generate` folder: also score its NAME.nii.gz stacks, as 'LABEL samples' (LABEL: by default "
        "MedVAR for the first folder, else the folder's name); repeat for more folders",
    )  # fmt: skip
    parser.add_argument(
        "--damage-samples", action="store_true",
        help="also score each --samples folder under the mildest blur and the mildest noise of the damages",
    )  # fmt: skip
    parser.add_argument("--min-slices", type=int, default=8, help="skip datasets with fewer held-out slices")
    parser.add_argument("--seed", type=int, default=1, help="seed of the noise and the shuffles")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    try:
        folders = sample_folders(args.samples)
        net = load_structure_net(None, args.store)
        registry = SliceStore(args.store).datasets
        tokenizer = load_tokenizer(args.tokenizer, "cpu") if args.tokenizer else None
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"structure_ranking: {err}", file=sys.stderr)
        return 2
    count = {n: {split: len(SliceStore(args.store, split=split, datasets=[n])) for split in SPLITS} for n in registry}
    enough = {n: c["validation"] >= args.min_slices and c["training"] > PRECISION_RECALL_K for n, c in count.items()}
    names = [n for n in registry if enough[n]]
    for name in sorted(registry.keys() - names):
        c = count[name]
        print(
            f"structure_ranking: {name} skipped: {c['training']} training and {c['validation']} held-out slices "
            f"(--min-slices {args.min_slices}, more than {PRECISION_RECALL_K} training)",
            file=sys.stderr,
        )
    heldout = {n: store_slices(args.store, "validation", n) for n in names}
    results = {}
    for name in names:
        train = store_slices(args.store, "training", name)
        reference = net.extract(train)
        sets = [("real held-out (floor)", heldout[name])]
        if tokenizer is not None:
            sets.append(("tokenizer reconstructions", reconstruct(tokenizer, heldout[name])))
        sets += [
            (f"{kind} {severity:g}", damage(heldout[name], severity, seed=args.seed))
            for kind, (damage, severities) in DAMAGES.items()
            for severity in severities
        ]
        for label, folder in folders.items():
            stack = folder / f"{name}.nii.gz"
            if not stack.is_file():
                continue
            samples = read_generated(stack, registry[name])
            sets.append((label, samples))
            for kind in MILD_DAMAGES if args.damage_samples else ():
                damage, severities = DAMAGES[kind]
                sets.append((f"{label}, {kind} {severities[0]:g}", damage(samples, severities[0], seed=args.seed)))
        sets += [(f"{other} posing as {name}", heldout[other]) for other in names if other != name]
        rows = {}
        for label, slices in sets:
            features = net.extract(slices)
            rows[label] = {
                **structure_scores(reference, features),
                "histogram": histogram_distance(train, slices),
                "power_spectrum": power_spectrum_distance(train, slices),
                "num_slices": len(slices),
            }
        results[name] = rows
        print(f"\n### {name} ({len(train)} training, {len(heldout[name])} held-out slices)\n")
        print(
            markdown_table(
                ["set", "Struct. FD", "Struct. P", "Struct. R", "Hist. W1", "PSD dist."],
                [
                    [
                        label,
                        _cell(r["structure_fd"], ".1f"),
                        _cell(r["structure_precision"], ".2f"),
                        _cell(r["structure_recall"], ".2f"),
                        f"{r['histogram']:.2f}",
                        f"{r['power_spectrum']:.3f}",
                    ]
                    for label, r in rows.items()
                ],  # fmt: skip
            )
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

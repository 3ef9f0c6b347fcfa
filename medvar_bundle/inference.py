"""Generation components: requests → next-scale inferer → NIfTI slice stacks and PNG grids.

``configs/inference.yaml`` composes them into a MONAI ``SupervisedEvaluator``: its data are
:class:`GenerationRequests` (one batch request per item: dataset, count, seed), its
``iteration_update`` is :class:`GenerationIteration` (which runs the config's ``inferer``, a
:class:`~medvar_bundle.sampling.medvar.NextScaleInferer`), and :class:`GeneratedStacks` writes each
dataset's files once its last batch is done. ``medvar generate`` and :func:`generate` run the same
config.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch.utils.data import Dataset

from medvar_bundle.bundle_config import device_expression, run_config
from medvar_bundle.io import (
    SUMMARY_FILE,
    check_entry,
    check_writable,
    output_geometry,
    save_progression,
    save_sample_grid,
    write_slice_stack,
    write_summary,
)
from medvar_bundle.model_file import MedVARModel

logger = logging.getLogger(__name__)


def slice_seed(seed: int, dataset: str, index: int) -> int:
    """Seed of slice ``index`` of ``dataset``: a function of the three only (NumPy's
    ``SeedSequence`` of ``seed``, the name's CRC-32 and the index), so a slice does not depend on
    the other datasets of the request, their order, the batch size or how many slices are drawn."""
    return int(np.random.SeedSequence([seed, zlib.crc32(dataset.encode()), index]).generate_state(1)[0])


class GenerationRequests(Dataset):
    """What to generate, as batch requests: the evaluator's dataset.

    Item ``i`` is ``{"dataset": name, "dataset_id": id, "first": index of its first slice,
    "count": slices in this batch, "seed": the request's seed}``, in batches of ``batch_size``,
    dataset after dataset (in the order given; all of the registry's by id when ``datasets`` is
    None). Slice ``n`` of a dataset is drawn from its own generator (:func:`slice_seed`), so the
    same seed gives the same slices whatever else is generated and whatever the batch size.

    Raises:
        ValueError: no dataset, ``num_samples`` or ``batch_size`` < 1, a name the model does not know,
            or a dataset whose registry entry cannot be written (:func:`~medvar_bundle.io.check_entry`).
    """

    def __init__(
        self, model: MedVARModel, datasets: str | Sequence[str] | None, num_samples: int, batch_size: int, seed: int
    ) -> None:
        registry = model.datasets
        names = [datasets] if isinstance(datasets, str) else datasets
        if names is None:
            names = sorted(registry, key=lambda n: registry[n]["id"])
        if not names:
            raise ValueError("no dataset given")
        if num_samples <= 0:
            raise ValueError(f"num_samples must be a positive number of slices, got {num_samples}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        ids = {name: model.dataset_id(name) for name in names}
        for name in names:
            check_entry(name, registry[name])
        self.names, self.num_samples = list(names), num_samples
        self.items = [
            {"dataset": name, "dataset_id": ids[name], "first": first,
             "count": min(batch_size, num_samples - first), "seed": seed}
            for name in self.names
            for first in range(0, num_samples, batch_size)
        ]  # fmt: skip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class GenerationIteration:
    """The evaluator's ``iteration_update``: sample one batch request with the engine's ``inferer``.

    Each slice of the request gets its own ``torch.Generator`` on the engine's device, seeded with
    :func:`slice_seed`. Returns ``{"dataset", "first", "pred": uint8 (B, S, S), "stages": uint8
    (B, K, S, S) or None}``; ``stages`` (the coarse-to-fine progression) only for the first batch
    with ``progression``.
    """

    def __init__(self, progression: bool = False) -> None:
        self.progression = progression

    def __call__(self, engine: Engine, request: dict) -> dict:
        device, first, count = engine.state.device, int(request["first"]), int(request["count"])
        generators = [
            torch.Generator(device).manual_seed(slice_seed(int(request["seed"]), request["dataset"], first + i))
            for i in range(count)
        ]
        ids = torch.full((count,), int(request["dataset_id"]), dtype=torch.long, device=device)
        stages = self.progression and first == 0
        images, steps = engine.inferer(ids, engine.network, generator=generators, progression=stages)
        return {"dataset": request["dataset"], "first": request["first"], "pred": images, "stages": steps}


class SamplerWarmUp:
    """Evaluator handler: sample one untimed batch before the first request.

    The first batch of a process pays one-off costs (kernel selection, memory pools, a CUDA
    context) that are not the method's speed; without this they would count in the first
    dataset's ``seconds_per_image``. The warm-up batch has the first request's size and dataset
    and its own generator, so the requests' slices are unchanged.

    Args:
        requests: the evaluator's :class:`GenerationRequests`.
        enabled: False adds no handler (the first batch is then timed cold).
    """

    def __init__(self, requests: GenerationRequests, enabled: bool = True) -> None:
        self.requests, self.enabled = requests, enabled
        self.seconds: float | None = None

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        request, device = self.requests[0], engine.state.device
        ids = torch.full((int(request["count"]),), int(request["dataset_id"]), dtype=torch.long, device=device)
        started = time.perf_counter()
        engine.inferer(ids, engine.network, generator=torch.Generator(device).manual_seed(0), progression=False)
        self.seconds = time.perf_counter() - started
        logger.info("warm-up: a batch of %d in %.2f s (not counted in seconds_per_image)", len(ids), self.seconds)


class GeneratedStacks:
    """Evaluator handler: collect each dataset's slices and write its files when its last batch is done.

    Per dataset ``NAME`` in ``output_dir``: ``NAME.nii.gz`` (:func:`~medvar_bundle.io.write_slice_stack`:
    CT int16 HU, MR uint8, affine in mm; ``resample_original`` resamples in-plane to the
    dataset's matrix, its median field of view over its median spacing), ``NAME.png`` (a grid of
    up to 64 slices) and, when the iteration returned stages, ``NAME_progression.png`` (up to 8
    samples, coarse to fine). At the end ``summary.json`` records ``summary`` (the options), the
    transformer's parameter count, each dataset's seconds (per slice too) and files.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        registry: dict,
        network: torch.nn.Module,
        patch_nums: Sequence[int],
        summary: dict,
        resample_original: bool = False,
    ) -> None:
        self.out = Path(output_dir)
        self.registry, self.patch_nums, self.resample_original = registry, patch_nums, resample_original
        self.summary = {**summary, "parameters": sum(p.numel() for p in network.parameters()), "datasets": {}}
        self.images: list[np.ndarray] = []
        self.stages: list[np.ndarray] = []
        self.started = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: check_writable(self.out))
        engine.add_event_handler(Events.ITERATION_STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, lambda e: write_summary(self.out, self.summary))

    def start(self, engine: Engine) -> None:
        if engine.state.batch["first"] == 0:
            self.images, self.stages, self.started = [], [], time.perf_counter()

    def collect(self, engine: Engine) -> None:
        output = engine.state.output
        self.images.append(output["pred"].cpu().numpy())
        if output["stages"] is not None:
            self.stages = [output["stages"][:8, k].cpu().numpy() for k in range(output["stages"].shape[1])]
        request = engine.state.batch
        if request["first"] + request["count"] == self.summary["num"]:
            self.write(request["dataset"], request["seed"], time.perf_counter() - self.started)

    def write(self, name: str, seed: int, seconds: float) -> None:
        stack = np.concatenate(self.images)
        options = ", ".join(
            f"{key.replace('_', ' ')} {self.summary[key]:g}"
            for key in ("cfg", "temperature", "final_temperature")
            if self.summary.get(key) is not None
        )
        spacing, _ = output_geometry(self.registry[name], stack.shape[-1])
        files = {
            "nifti": str(write_slice_stack(stack, self.registry[name], self.out / f"{name}.nii.gz",
                                           self.resample_original)),
            "grid": str(save_sample_grid(stack[:64], self.out / f"{name}.png",
                                         title=f"{name}: MedVAR samples ({options}, seed {seed})", spacing=spacing)),
        }  # fmt: skip
        if self.stages:
            files["progression"] = str(
                save_progression(
                    self.stages,
                    self.out / f"{name}_progression.png",
                    self.patch_nums,
                    title=f"{name}: coarse to fine",
                    spacing=spacing,
                )
            )
        n = len(stack)
        self.summary["datasets"][name] = {
            "id": int(self.registry[name]["id"]), "seconds": seconds, "seconds_per_image": seconds / n, "files": files,
        }  # fmt: skip
        logger.info("%s: %d slices in %.1f s (%.3f s/slice) -> %s", name, n, seconds, seconds / n, files["nifti"])


def generate(
    model: str | os.PathLike, datasets: str | Sequence[str] | None, num: int, out_dir: str | os.PathLike, **overrides
) -> dict:
    """Run ``configs/inference.yaml``: ``num`` slices per dataset of the model file ``model`` into ``out_dir``.

    ``overrides`` are other ids of the config (``cfg``, ``top_k``, ``top_p``, ``temperature``,
    ``final_temperature``, ``seed``, ``batch_size``, ``device``, ``bf16``, ``resample_original``,
    ``progression``, ``progress``), whose defaults live in the config. Returns the summary written to
    ``summary.json`` (see :class:`GeneratedStacks`).
    """
    if "device" in overrides:
        overrides["device"] = device_expression(str(overrides["device"]))
    run_config(
        "inference", "infer",
        {"model_file": str(model), "datasets": datasets, "num_samples": num, "output_dir": str(out_dir), **overrides},
    )  # fmt: skip
    return json.loads((Path(out_dir) / SUMMARY_FILE).read_text())

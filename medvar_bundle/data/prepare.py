"""`medvar prepare`: run the §3.2 pipeline over a corpus and commit the slices to a store.

Volumes are processed independently (``workers`` DataLoader processes); the main process is the
only writer. A bad volume becomes one line on stderr and one ``failed`` entry in ``report.json``;
the corpus goes on. Re-running skips volumes already committed, and ``rank``/``world_size`` split
the datalist across machines writing into the same (or separate) stores.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..bundle_config import config_component
from ..files import WriterLock, atomic_write_json, one_line, remove_stale_temp_files
from .readers import VolumeFileError
from .store import (
    SHARD_DIR,
    ShardWriter,
    done_volumes,
    remove_shard,
    verify_store,
    volume_key,
    write_store_index,
)
from .transforms import DEFAULT_CT_WINDOW, MODALITIES, SLICE_SIZE, NoSlicesError, VolumeError

MAX_ERROR_CHARS = 300


def root_cause(exc: BaseException) -> BaseException:
    """The innermost ``__cause__`` of an exception (MONAI's Compose wraps transform errors)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def describe_error(exc: BaseException, path: str | None = None) -> str:
    """One line for users: the innermost cause of a (MONAI-wrapped) exception, without a leading
    ``path: `` (the line that reports it names ``path`` already; another file, a label, stays named)."""
    exc = root_cause(exc)
    text = " ".join(str(exc).split())
    if isinstance(exc, VolumeFileError) and exc.path == path:
        text = exc.reason
    if "cannot find a suitable reader" in text:
        return "unreadable: no image reader could open it (corrupt, truncated or not a NIfTI/NRRD/MHA/DICOM file)"
    if not isinstance(exc, VolumeError):
        text = f"unreadable ({type(exc).__name__}: {text})" if text else f"unreadable ({type(exc).__name__})"
    return one_line(text, MAX_ERROR_CHARS)


def precheck(item: dict) -> str | None:
    """Problems found without reading the volume (missing file, unknown modality), else None."""
    if not item.get("image"):
        return "datalist entry has no 'image'"
    if not item.get("dataset"):
        return "datalist entry has no 'dataset'"
    if not os.path.exists(item["image"]):
        return "file not found"
    if item.get("label") and not os.path.exists(item["label"]):
        return f"label file not found: {item['label']}"
    if item.get("modality") not in MODALITIES:
        return f"unknown modality {item.get('modality')!r}: use one of {', '.join(MODALITIES)}"
    return None


class PreparedVolumes(Dataset):
    """Runs ``transform`` (the ``preprocessing`` of ``configs/prepare.yaml``) on datalist items, never raising.

    Each item becomes ``{"item", "status" ("ok"|"failed"|"skipped"), "error", "images" (uint8
    (n, size, size) or None), "labels", "geometry", "slice_indices", "has_label"}``.
    """

    def __init__(self, items: list[dict], transform: Callable[[dict], dict]) -> None:
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        out = {"item": item, "status": "ok", "error": None, "images": None, "labels": None}
        problem = precheck(item)
        if problem:
            return {**out, "status": "failed", "error": problem}
        try:
            d = self.transform({k: item.get(k) for k in ("image", "label", "modality", "ct_window")})
        except Exception as exc:  # every failure is reported, none stops the corpus
            status = "skipped" if isinstance(root_cause(exc), NoSlicesError) else "failed"
            return {**out, "status": status, "error": describe_error(exc, item["image"])}
        out["images"] = np.ascontiguousarray(np.moveaxis(d["image"][0], -1, 0))
        if "label" in d:
            out["labels"] = np.ascontiguousarray(np.moveaxis(d["label"][0], -1, 0))
        out.update(geometry=d["image_geometry"], slice_indices=d["slice_indices"], has_label=d["has_label"])
        return out


def _single_thread_worker(_: int) -> None:
    torch.set_num_threads(1)


def _identity(x):
    return x


@dataclass
class PrepareResult:
    """What a prepare run did: per-volume report entries and the dataset registry."""

    report: list[dict] = field(default_factory=list)
    registry: dict = field(default_factory=dict)

    @property
    def counts(self) -> Counter:
        return Counter(e["status"] for e in self.report)

    @property
    def ok(self) -> int:
        return sum(1 for e in self.report if e["status"] == "ok" or e.get("error") == "already in store")


def _entry(item: dict, status: str, slices: int = 0, error: str | None = None) -> dict:
    return {
        "image": item.get("image") or "",
        "label": item.get("label"),
        "dataset": item.get("dataset"),
        "split": item.get("split"),
        "status": status,
        "slices": int(slices),
        "error": error,
    }


def remove_dead_writes(out: Path, rank: int) -> list[Path]:
    """Delete the temporary files that killed runs left in the store ``out`` (see
    :func:`~medvar_bundle.files.remove_stale_temp_files`): those of dead processes of this host, and, whoever
    wrote them, those of this rank's shards (images, labels, manifest) and report, which only the holder of
    this rank's lock writes. Returns the files removed."""
    shard = re.compile(rf"r{rank:03d}-\d+\.(images\.npy|labels\.npy|json)")
    report = re.compile(rf"rank{rank:03d}-of-\d+\.json")
    return [
        *remove_stale_temp_files(out),
        *remove_stale_temp_files(out / SHARD_DIR, lambda target: shard.fullmatch(target) is not None),
        *remove_stale_temp_files(out / "reports", lambda target: report.fullmatch(target) is not None),
    ]


def _merge_reports(out: Path, world_size: int) -> list[dict]:
    entries = []
    for p in sorted((out / "reports").glob(f"rank*-of-{world_size:03d}.json")):
        entries += json.loads(p.read_text())["volumes"]
    atomic_write_json(out / "report.json", {"volumes": entries})
    return entries


def _window(item: dict, default: Sequence[float]) -> list[float] | None:
    """The (level, width) in HU a CT item is windowed with (its own, else ``default``); None for MR."""
    if item.get("modality") != "CT":
        return None
    return [float(x) for x in (item.get("ct_window") or default)]


def _other_window(item: dict, declared: dict[str, dict], default: Sequence[float]) -> str | None:
    """Why a CT item cannot join its dataset: a window other than the dataset's (its first stored
    volume's, else its first item's), since generated CT of a dataset is read back to HU with one
    window; None when it can."""
    dataset = declared.get(str(item.get("dataset")))
    window = _window(item, default)
    if dataset is None or window is None or window == dataset["ct_window"]:
        return None
    return f"CT window {window} where dataset {item['dataset']} has {dataset['ct_window']} (one window per dataset)"


def _check_unchanged(item: dict, stored: dict, out: Path) -> None:
    """Refuse an item whose image the store holds under another split or dataset: a re-run skips
    stored volumes, so a held-out volume would silently stay in training (or the reverse)."""
    now = {"split": item.get("split", "training"), "dataset": item.get("dataset")}
    for key, value in now.items():
        if stored.get(key) != value:
            raise ValueError(
                f"{out}: {item['image']} is stored with {key} {stored.get(key)!r}, the datalist now says {value!r}; "
                "a stored volume keeps its split and dataset: prepare into a new store"
            )


def prepare_store(
    items: list[dict],
    out: str | os.PathLike,
    transform: Callable[[dict], dict] | None = None,
    size: int = SLICE_SIZE,
    workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    shard_size: int = 2048,
    progress: bool = True,
    verify: bool = False,
    default_window: Sequence[float] = DEFAULT_CT_WINDOW,
) -> PrepareResult:
    """Prepare ``items`` (see :mod:`~medvar_bundle.data.sources`) into the store at ``out``.

    Args:
        transform: one datalist item → ``image`` uint8 ``(1, size, size, n)`` (and ``label``,
            ``image_geometry``, ``slice_indices``, ``has_label``); default: the ``preprocessing``
            of ``configs/prepare.yaml`` at this ``size``.
        size: in-plane slice size in pixels (the transform's).
        workers: DataLoader worker processes (0: in this process).
        rank, world_size: this machine's share of ``items`` (``items[rank::world_size]``);
            default to torchrun's ``RANK``/``WORLD_SIZE``, else 0 and 1.
        shard_size: slices per shard.
        verify: before resuming, compare every committed shard file's sha256 with its manifest
            (sizes are always compared); a shard whose images or labels fail is removed with one
            line on stderr, and its volumes are prepared again (token files are ``tokenize``'s).
        default_window: (level, width) in HU of CT items without their own ``ct_window``: the
            transform's window, recorded in the volumes' records and ``datasets.json`` so that
            generated CT is read back to HU with it.

    Returns:
        The run's report (this rank's volumes) and the store's dataset registry.

    Raises:
        FolderLockedError: another ``prepare`` of the same rank is writing into ``out``.
        ValueError: an item's image is stored already under another split or dataset (a stored
            volume keeps them: prepare into a new store instead).
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if transform is None:
        transform = config_component("prepare", "preprocessing", {"size": size})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    declared: dict[str, dict] = {}
    for i in items:
        if i.get("dataset") and i.get("modality") in MODALITIES:
            window = _window(i, default_window)
            declared.setdefault(
                str(i["dataset"]), {"modality": i["modality"], "anatomy": i.get("anatomy"), "ct_window": window}
            )
    with WriterLock(out, f"prepare-r{rank:03d}"):  # one writer per rank's shards; readers never wait
        mine = items[rank::world_size]
        remove_dead_writes(out, rank)
        for bad in verify_store(out, checksum=verify):
            # each rank re-does its own shards; a bad token file is tokenize's to encode again
            if bad["shard"].startswith(f"r{rank:03d}-") and bad["kind"] != "tokens":
                tqdm.write(f"medvar prepare: re-doing shard {bad['shard']}: {bad['problem']}", file=sys.stderr)
                remove_shard(out, bad["shard"])
        stored = done_volumes(out)
        by_image: dict[str, list[dict]] = {}
        stored_windows: dict[str, list[float]] = {}  # a dataset's window is its first stored volume's
        for record in stored.values():
            by_image.setdefault(record["image"], []).append(record)
            if record.get("ct_window"):
                stored_windows.setdefault(record["dataset"], record["ct_window"])
        for name, window in stored_windows.items():
            if name in declared:
                declared[name]["ct_window"] = window
        result = PrepareResult()
        todo = []
        for item in mine:
            key = volume_key(item.get("image") or "", item.get("label"))
            for record in by_image.get(item.get("image"), []):
                _check_unchanged(item, record, out)
            if key in stored:
                result.report.append(_entry(item, "skipped", stored[key]["num_slices"], "already in store"))
            elif (other := _other_window(item, declared, default_window)) is not None:
                tqdm.write(f"medvar prepare: failed: {item.get('image')}: {other}", file=sys.stderr)
                result.report.append(_entry(item, "failed", error=other))
            else:
                todo.append(item)

        report_file = out / "reports" / f"rank{rank:03d}-of-{world_size:03d}.json"
        # the store is readable from the start and after every shard; manifest.csv is written at the end
        write_store_index(out, declared, manifest=False)
        writer = ShardWriter(
            out, shard_size=shard_size, rank=rank, on_commit=lambda: write_store_index(out, declared, manifest=False)
        )
        loader = DataLoader(
            PreparedVolumes(todo, transform),
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            worker_init_fn=_single_thread_worker if workers else None,
        )
        bar = tqdm(loader, total=len(todo), desc="prepare", unit="vol", disable=not progress, file=sys.stderr)
        for res in bar:
            item = res["item"]
            if res["status"] != "ok":
                tqdm.write(f"medvar prepare: {res['status']}: {item.get('image')}: {res['error']}", file=sys.stderr)
            if res["status"] == "failed":
                result.report.append(_entry(item, "failed", error=res["error"]))
                continue
            slices = 0 if res["images"] is None else int(res["images"].shape[0])
            record = {
                "key": volume_key(item["image"], item.get("label")),
                "image": item["image"],
                "label": item.get("label"),
                "dataset": item["dataset"],
                "modality": item["modality"],
                "anatomy": item.get("anatomy") or "",
                "split": item.get("split", "training"),
                "ct_window": _window(item, default_window),
                "spacing": (res.get("geometry") or {}).get("spacing", []),
                "matrix": (res.get("geometry") or {}).get("matrix", []),
                "slice_indices": res.get("slice_indices") or [],
                "has_label": bool(res.get("has_label")),
            }
            empty = np.zeros((0, size, size), np.uint8)
            writer.add(record, res["images"] if res["images"] is not None else empty, res["labels"])
            result.report.append(_entry(item, res["status"], slices, res["error"]))
            bar.set_postfix(ok=result.counts["ok"], failed=result.counts["failed"])
        writer.flush()
        atomic_write_json(report_file, {"volumes": result.report})
        _merge_reports(out, world_size)
        result.registry = write_store_index(out, declared)
        return result

"""The slice store: memory-mapped uint8 shards of 256×256 axial slices plus their manifest.

Layout of ``STORE/``::

    shards/<tag>.images.npy   uint8 (N, 256, 256)  axial slices, array axes (x, y) in RAS order
    shards/<tag>.labels.npy   uint8 (N, 256, 256)  label maps (zeros where a volume has none)
    shards/<tag>.json         the shard's manifest; written last, so it is the commit record
    datasets.json             {name: {id, modality, anatomy, num_slices, spacing, matrix, ct_window}}
    report.json               {"volumes": [{image, dataset, status, slices, error}]}
    manifest.csv              one row per slice (index, shard, row, dataset, dataset_id, ...)

A shard's arrays are written to temporary files and renamed into place, then its JSON manifest is
renamed into place. A shard without its JSON is an interrupted write and is ignored (and
overwritten on resume), so a killed run never leaves a half-visible shard. The manifest records
each array file's size and sha256 (``files``); :class:`SliceStore` checks both when it first opens
a file and refuses a corrupt one (:class:`CorruptShardError`), :func:`verify_store` checks a whole
store, and ``prepare`` re-does the shards that fail.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..files import atomic_save_npy, atomic_write_bytes, atomic_write_json, check_file

SHARD_DIR = "shards"
SPLITS = ("training", "validation", "test")


class CorruptShardError(ValueError):
    """A store's file is damaged: a shard file does not match the size or sha256 its manifest
    records, or a JSON file of the store (``datasets.json``, a shard manifest, ``tokens.json``) is
    not a JSON object."""


def read_store_json(path: str | os.PathLike) -> dict:
    """A store's JSON file (``datasets.json``, a shard manifest, ``tokens.json``).

    Raises:
        CorruptShardError: one line naming the file, when it is not a JSON object.
    """
    try:
        content = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as exc:
        raise CorruptShardError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(content, dict):
        raise CorruptShardError(f"{path}: not a JSON object (a {type(content).__name__})")
    return content


def check_store(root: str | os.PathLike) -> Path:
    """``root`` as a path, once it is known to hold a slice store.

    Raises:
        FileNotFoundError: one line, when ``root`` has no ``datasets.json``.
    """
    root = Path(root)
    if not (root / "datasets.json").is_file():
        raise FileNotFoundError(f"{root}: not a slice store (no datasets.json); run `medvar prepare` first")
    return root


def read_registry(root: str | os.PathLike) -> dict:
    """A slice store's ``datasets.json`` (:func:`check_store`, then :func:`read_store_json`)."""
    return read_store_json(check_store(root) / "datasets.json")


def volume_key(image: str, label: str | None = None) -> str:
    """Identity of an input volume in the store (its image and label paths)."""
    return f"{image}|{label or ''}"


class ShardWriter:
    """Buffers prepared volumes and commits them to the store one shard at a time.

    Memory holds at most one shard of slices plus the volume being added. Each writer
    (one per rank) names its shards ``r<rank>-<seq>`` so that several machines can write into one
    store without clashes.

    Args:
        root: the store folder.
        shard_size: slices per shard (a volume is never split; a shard may exceed this by one volume).
        rank: the writer's rank, part of the shard names.
        on_commit: called after each shard is committed (e.g. to refresh ``datasets.json``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        shard_size: int = 2048,
        rank: int = 0,
        on_commit: Callable[[], object] | None = None,
    ) -> None:
        self.root = Path(root)
        self.shard_dir = self.root / SHARD_DIR
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size, self.rank, self.on_commit = shard_size, rank, on_commit
        self._seq = self._next_seq()
        self._images: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._volumes: list[dict] = []
        self._count = 0

    def _next_seq(self) -> int:
        done = [int(p.name.split(".")[0].split("-")[1]) for p in self.shard_dir.glob(f"r{self.rank:03d}-*.json")]
        return max(done, default=-1) + 1

    def add(self, volume: dict, images: np.ndarray, labels: np.ndarray | None) -> None:
        """Queue one volume's slices.

        Args:
            volume: the volume record (image, label, dataset, modality, anatomy, split, spacing,
                matrix, slice_indices, has_label, key).
            images: uint8 ``(n, 256, 256)``.
            labels: uint8 ``(n, 256, 256)`` or None.
        """
        n = int(images.shape[0])
        self._images.append(images)
        self._labels.append(labels if labels is not None else np.zeros_like(images))
        self._volumes.append({**volume, "num_slices": n})
        self._count += n
        if self._count >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Commit what is buffered as one shard (arrays first, then the manifest)."""
        if not self._volumes:
            return
        tag = f"r{self.rank:03d}-{self._seq:05d}"
        files = {}
        if self._count:
            files["images"] = atomic_save_npy(self.shard_dir / f"{tag}.images.npy", np.concatenate(self._images))
            files["labels"] = atomic_save_npy(self.shard_dir / f"{tag}.labels.npy", np.concatenate(self._labels))
        manifest = {"shard": tag, "num_slices": self._count, "volumes": self._volumes, "files": files}
        atomic_write_json(self.shard_dir / f"{tag}.json", manifest)
        self._seq += 1
        self._images, self._labels, self._volumes, self._count = [], [], [], 0
        if self.on_commit is not None:
            self.on_commit()


def read_shard_manifests(root: str | os.PathLike) -> list[dict]:
    """All committed shard manifests of a store, in name order."""
    return [read_store_json(p) for p in sorted((Path(root) / SHARD_DIR).glob("*.json"))]


def verify_store(root: str | os.PathLike, checksum: bool = True) -> list[dict]:
    """Check every committed shard's array files against their manifest (and token files against
    ``tokens.json``). Returns one ``{"shard", "kind", "file", "problem"}`` per bad file (empty: all
    good); ``kind`` is ``images``, ``labels`` or ``tokens``.

    Args:
        checksum: also compare sha256 digests (reads every file); False compares sizes only.
    """
    root = Path(root)
    token_records = {}
    if (root / "tokens.json").is_file():
        token_records = read_store_json(root / "tokens.json").get("shards", {})
    bad = []
    for m in read_shard_manifests(root):
        records = dict(m.get("files", {}))
        if m["shard"] in token_records:
            records["tokens"] = token_records[m["shard"]]
        for kind, record in records.items():
            path = root / SHARD_DIR / f"{m['shard']}.{kind}.npy"
            problem = check_file(path, record, checksum)
            if problem is not None:
                bad.append({"shard": m["shard"], "kind": kind, "file": str(path), "problem": problem})
    return bad


def remove_shard(root: str | os.PathLike, tag: str) -> None:
    """Delete a shard: its manifest first (so it stops being committed), then its files."""
    shard_dir = Path(root) / SHARD_DIR
    (shard_dir / f"{tag}.json").unlink(missing_ok=True)
    for kind in ("images", "labels", "tokens"):
        (shard_dir / f"{tag}.{kind}.npy").unlink(missing_ok=True)


def done_volumes(root: str | os.PathLike) -> dict[str, dict]:
    """The records of the volumes already committed to the store (those a re-run skips), by
    :func:`volume_key`, in commit order."""
    return {v["key"]: v for m in read_shard_manifests(root) for v in m["volumes"]}


def median_list(values: Sequence[Sequence[float]]) -> list[float]:
    return [float(x) for x in np.median(np.asarray(values, dtype=np.float64), axis=0)] if values else []


def median_geometry(volumes: Sequence[dict]) -> tuple[list[float], list[int]] | None:
    """A dataset's typical ``spacing`` (mm) and ``matrix`` (voxels) from its volumes' records.

    ``spacing`` is the median of each axis. In-plane, ``matrix`` is the volumes' median field of
    view (each volume's own ``spacing × matrix``, mm, per axis) over that spacing, so ``spacing ×
    matrix`` is that median field: the medians of spacing and matrix taken separately can give a
    field wider than every volume's (a 0.7 mm × 512 and a 1.2 mm × 300 volume, fields of 358 and
    360 mm, would give 0.95 mm × 406 = 386 mm). The slice count is the median of ``matrix[2]``.
    None without volumes.
    """
    if not volumes:
        return None
    spacing = median_list([v["spacing"] for v in volumes])
    fov = median_list([[s * n for s, n in zip(v["spacing"][:2], v["matrix"][:2])] for v in volumes])
    slices = median_list([v["matrix"][2:3] for v in volumes])
    return spacing, [max(1, round(f / s)) for f, s in zip(fov, spacing[:2])] + [int(round(n)) for n in slices]


def build_registry(root: str | os.PathLike, declared: dict[str, dict] | None = None) -> dict:
    """Rebuild ``datasets.json`` content from the committed shards.

    Ids already in ``datasets.json`` are kept; new names get the next ids in sorted order, so ids
    stay stable when a store grows. ``declared`` maps dataset names to a datalist item of theirs
    (modality, anatomy, ct_window), so datasets without slices yet are listed too.
    """
    root = Path(root)
    declared = declared or {}
    old = read_store_json(root / "datasets.json") if (root / "datasets.json").exists() else {}
    vols: dict[str, list[dict]] = {}
    for m in read_shard_manifests(root):
        for v in m["volumes"]:
            vols.setdefault(v["dataset"], []).append(v)
    next_id = max((e["id"] for e in old.values()), default=-1) + 1
    registry = {}
    for name in sorted(set(vols) | set(declared) | set(old)):
        if name in old:
            ds_id = old[name]["id"]
        else:
            ds_id, next_id = next_id, next_id + 1
        used = [v for v in vols.get(name, []) if v["num_slices"]]
        info = {**old.get(name, {}), **declared.get(name, {}), **(vols[name][0] if name in vols else {})}
        modality = info.get("modality")
        window = info.get("ct_window")
        geometry = median_geometry(used)
        registry[name] = {
            "id": ds_id,
            "modality": modality,
            "anatomy": info.get("anatomy") or "",
            "num_slices": int(sum(v["num_slices"] for v in used)),
            "num_volumes": len(used),
            "spacing": geometry[0] if geometry else old.get(name, {}).get("spacing"),
            "matrix": geometry[1] if geometry else old.get(name, {}).get("matrix"),
            "ct_window": [float(x) for x in window] if modality == "CT" and window else None,
        }
    return registry


MANIFEST_COLUMNS = (
    "index",
    "shard",
    "row",
    "dataset",
    "dataset_id",
    "modality",
    "anatomy",
    "split",
    "source",
    "slice_index",
    "has_label",
)


def manifest_rows(root: str | os.PathLike, registry: dict) -> list[dict]:
    """One dict per committed slice, in store order (the order :class:`SliceStore` uses)."""
    rows = []
    for m in read_shard_manifests(root):
        row = 0
        for v in m["volumes"]:
            for z in v["slice_indices"]:
                rows.append(
                    {
                        "index": len(rows),
                        "shard": m["shard"],
                        "row": row,
                        "dataset": v["dataset"],
                        "dataset_id": registry[v["dataset"]]["id"],
                        "modality": v["modality"],
                        "anatomy": v.get("anatomy") or "",
                        "split": v.get("split", "training"),
                        "source": v["image"],
                        "slice_index": z,
                        "has_label": v["has_label"],
                    }
                )
                row += 1
    return rows


def write_store_index(root: str | os.PathLike, declared: dict[str, dict] | None = None, manifest: bool = True) -> dict:
    """Rewrite ``datasets.json`` (and, with ``manifest``, ``manifest.csv``) from the committed
    shards; returns the registry."""
    root = Path(root)
    registry = build_registry(root, declared)
    atomic_write_json(root / "datasets.json", registry)
    if not manifest:
        return registry
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS)
    writer.writeheader()
    writer.writerows(manifest_rows(root, registry))
    atomic_write_bytes(root / "manifest.csv", buf.getvalue().encode())
    return registry


class SliceStore(Dataset):
    """Read one or several slice stores as a map-style torch ``Dataset``.

    Items are dicts: ``image`` uint8 tensor ``(256, 256)`` (axes x, y of the RAS volume),
    ``label`` uint8 ``(256, 256)``, ``dataset_id`` int, ``index`` int. Shards are opened lazily as
    read-only memory maps in each process, so the store works with DataLoader workers and a
    ``DistributedSampler`` without copying the corpus.

    Args:
        roots: a store folder or a list of them. With several stores, dataset names are merged and
            ids re-assigned in sorted name order (see :attr:`datasets`).
        split: keep only slices of this split ("training", "validation", "test"), or all if None.
        datasets: keep only these dataset names.
        transform: optional callable applied to each item dict.

    Attributes:
        dataset_ids: ``(N,)`` int64, each slice's dataset id.
        positions: ``(N,)`` float32, each slice's relative position along its volume's body axis
            among the volume's kept slices: 0 the lowest (most inferior), 1 the highest.
    """

    def __init__(
        self,
        roots: str | os.PathLike | Sequence[str | os.PathLike],
        split: str | None = None,
        datasets: Sequence[str] | None = None,
        transform=None,
    ) -> None:
        self.roots = [Path(roots)] if isinstance(roots, (str, os.PathLike)) else [Path(r) for r in roots]
        registries = []
        for root in self.roots:
            registries.append(read_registry(root))
        if len(registries) == 1:
            self.datasets = registries[0]
        else:
            merged: dict[str, dict] = {}
            for reg in registries:
                for name, entry in reg.items():
                    if name in merged:
                        merged[name] = {**merged[name], "num_slices": merged[name]["num_slices"] + entry["num_slices"]}
                    else:
                        merged[name] = dict(entry)
            self.datasets = {name: {**merged[name], "id": i} for i, name in enumerate(sorted(merged))}
        self.transform = transform
        shard_paths, records, ids, shard_of, row_of, split_of, names, positions = [], [], [], [], [], [], [], []
        for root in self.roots:
            for m in read_shard_manifests(root):
                if not m["num_slices"]:
                    continue
                shard_paths.append(root / SHARD_DIR / m["shard"])
                records.append(dict(m.get("files", {})))
                row = 0
                for v in m["volumes"]:
                    n = v["num_slices"]
                    ids += [self.datasets[v["dataset"]]["id"]] * n
                    names += [v["dataset"]] * n
                    split_of += [v.get("split", "training")] * n
                    shard_of += [len(shard_paths) - 1] * n
                    row_of += list(range(row, row + n))
                    row += n
                    z = np.asarray(v["slice_indices"][:n], dtype=np.float64)
                    positions += list((z - z.min()) / max(z.max() - z.min(), 1.0)) if n else []
        keep = np.ones(len(ids), dtype=bool)
        if split is not None:
            keep &= np.asarray(split_of) == split
        if datasets is not None:
            unknown = set(datasets) - set(self.datasets)
            if unknown:
                raise KeyError(f"unknown dataset(s) {sorted(unknown)}; the store has {sorted(self.datasets)}")
            keep &= np.isin(np.asarray(names, dtype=object), list(datasets))
        self._shard_paths, self._records = shard_paths, records
        self.dataset_ids = np.asarray(ids, dtype=np.int64)[keep]
        self._shard = np.asarray(shard_of, dtype=np.int64)[keep]
        self._row = np.asarray(row_of, dtype=np.int64)[keep]
        self.positions = np.asarray(positions, dtype=np.float32)[keep]
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def __len__(self) -> int:
        return int(self._shard.size)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = {}  # memory maps are reopened in each worker, never pickled
        return state

    def _array(self, shard: int, kind: str) -> np.ndarray:
        """A shard's array, memory-mapped; the first time in a process its file's size and sha256
        are checked against the manifest's record (stores written before records skip the check).

        Raises:
            CorruptShardError: one line naming the file and what is wrong with it.
        """
        key = (shard, kind)
        if key not in self._maps:
            path = Path(f"{self._shard_paths[shard]}.{kind}.npy")
            record = self._records[shard].get(kind)
            problem = None if record is None else check_file(path, record)
            if problem is not None:
                store = path.parent.parent
                raise CorruptShardError(
                    f"{problem}; run `medvar verify --store {store}`, then `medvar prepare` (or `medvar tokenize`) "
                    "on it to re-do the bad shards"
                )
            self._maps[key] = np.load(path, mmap_mode="r")
        return self._maps[key]

    def _locate(self, index: int) -> tuple[int, int, int]:
        """(index, shard, row) of a possibly negative index; IndexError when out of range."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a store of {len(self)} slices")
        return index, int(self._shard[index]), int(self._row[index])

    def __getitem__(self, index: int) -> dict:
        index, shard, row = self._locate(index)
        item = {
            "image": torch.from_numpy(np.array(self._array(shard, "images")[row])),
            "label": torch.from_numpy(np.array(self._array(shard, "labels")[row])),
            "dataset_id": int(self.dataset_ids[index]),
            "index": index,
        }
        return self.transform(item) if self.transform is not None else item

"""Generated folders against a real slice store: every metric per dataset, beside the real floor.

A *generated folder* is what ``medvar generate`` writes: ``NAME.nii.gz`` per dataset (256×256×N;
CT in int16 HU, MR uint8), ``summary.json`` (``datasets.NAME.seconds_per_image`` and, when the
writer records it, ``parameters``: the sampling network's parameter count).

Reference sets, per dataset: the store's *training* split is the reference every set is scored
against; the *held-out* split (validation, other patients) stands in for a perfect generator, so
``metric(training, held-out)`` is the real-vs-real floor at that sample size
(:func:`~medvar_bundle.metrics.real_vs_real_floor`), computed here by the same scoring function as
the generated sets.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from medvar_bundle.data.store import SPLITS, SliceStore
from medvar_bundle.io import GeneratedFolder, check_writable, entry_aspect, read_generated, read_generated_folder
from medvar_bundle.metrics import (
    MS_SSIM_MIN_SIDE,
    FeatureExtractor,
    cmmd,
    efficiency,
    frechet_distance_from_features,
    histogram_distance,
    kid,
    knn_precision,
    load_clip,
    load_inception,
    load_radimagenet,
    load_structure_net,
    memorisation_ratio,
    ms_ssim_diversity,
    power_spectrum_distance,
    radial_power_spectrum,
    spectrum_distance,
    split_slices,
    store_slices,
)
from medvar_bundle.weights import MissingWeightsError

from .report import FLOOR, OVERALL, write_report

logger = logging.getLogger(__name__)

QUALITY_METRICS = {"power_spectrum": power_spectrum_distance, "histogram": histogram_distance}
"""Weight-free metrics that can stand in for FID as the efficiency's ``Q``."""

EXTRACTORS = {
    "inception": (load_inception, "FID, KID"),
    "radimagenet": (load_radimagenet, "RadFID"),
    "clip": (load_clip, "CMMD"),
}
"""Extractor name → (loader, the metrics it enables)."""

AVERAGED = (
    "structure_fd", "floor_structure_fd", "structure_precision", "structure_recall", "fid", "kid", "kid_std", "radfid",
    "cmmd", "histogram", "power_spectrum", "ms_ssim", "memorisation", "seconds_per_image",
)  # fmt: skip
"""Columns whose overall value is the mean over datasets."""

GRID_SLICES = 8
"""Slices of each set in the ``samples_NAME.png`` grids."""


def grid_picks(num_slices: int, count: int = GRID_SLICES) -> np.ndarray:
    """Indices of ``count`` held-out slices for a sample grid, at the centres of ``count`` equal
    runs of the set (which is in store order, volume by volume from the lowest slice): spread over
    the body axis, never the near-empty first and last slices of a volume."""
    count = min(count, num_slices)
    return ((np.arange(count) + 0.5) * num_slices / count).astype(np.int64)


PRECISION_RECALL_K = 3
"""k of the k-NN precision / recall (Kynkäänniemi et al., 2019)."""


def random_subset(slices: np.ndarray, max_slices: int | None, seed: int) -> np.ndarray:
    """At most ``max_slices`` rows of ``slices`` ``(N, ...)``, drawn at random and kept in order
    (the selection :func:`~medvar_bundle.metrics.store_slices` makes)."""
    if max_slices is None or max_slices >= len(slices):
        return slices
    return slices[np.sort(np.random.default_rng(seed).choice(len(slices), max_slices, replace=False))]


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


@dataclass
class SliceSet:
    """uint8 slices ``(N, S, S)`` and their features ``(N, D)`` per extractor name."""

    slices: np.ndarray
    features: dict[str, np.ndarray] = field(default_factory=dict)

    @cached_property
    def spectrum(self) -> np.ndarray:
        """:func:`~medvar_bundle.metrics.radial_power_spectrum` of the slices, ``(S // 2,)``,
        computed once: a dataset's training set is scored against every method."""
        return radial_power_spectrum(self.slices)


def score(train: SliceSet, heldout: SliceSet | None, fake: SliceSet) -> dict:
    """Every metric of ``fake`` against the training reference of one dataset.

    Feature metrics are None when their extractor is not loaded; ``ms_ssim`` (the diversity of
    ``fake`` itself) is None for slices under ``MS_SSIM_MIN_SIDE`` pixels and for a single slice.
    With ``fake = heldout`` this is the real-vs-real floor (its ``memorisation`` is 1 by definition
    and its ``ms_ssim`` the diversity of real slices). Without held-out slices (``heldout`` None)
    ``memorisation`` is None: it is measured against how close unseen patients come.

    Returns:
        ``num_slices``; ``structure_fd``, ``structure_precision``, ``structure_recall`` (the
        store's structure network; precision is None when the training set has ``k`` slices or
        fewer, recall when ``fake`` has: each needs the k-NN radii of its own reference set);
        ``fid``, ``kid``, ``kid_std`` (InceptionV3), ``radfid`` (RadImageNet), ``cmmd`` (CLIP);
        ``histogram`` (8-bit levels), ``power_spectrum`` (decades), ``ms_ssim``, ``memorisation``
        (see :mod:`medvar_bundle.metrics`). Fréchet distances (and KID) are None for a single slice.
    """
    ref, gen = train.features, fake.features
    row: dict = {"num_slices": len(fake.slices), "fid": None, "kid": None, "kid_std": None}
    row["structure_fd"] = row["structure_precision"] = row["structure_recall"] = None
    pair = len(fake.slices) >= 2  # MS-SSIM compares pairs of the set's slices
    several = pair and len(train.slices) >= 2  # a Fréchet distance needs two slices a side for a covariance
    if "structure" in ref:
        row.update(structure_scores(ref["structure"], gen["structure"]))
    if "inception" in ref and several:
        row["fid"] = frechet_distance_from_features(ref["inception"], gen["inception"])
        size = min(1000, len(train.slices), len(fake.slices))
        row["kid"], row["kid_std"] = kid(ref["inception"], gen["inception"], subset_size=size)
    row["radfid"] = (
        frechet_distance_from_features(ref["radimagenet"], gen["radimagenet"])
        if "radimagenet" in ref and several
        else None
    )
    row["cmmd"] = cmmd(ref["clip"], gen["clip"]) if "clip" in ref else None
    row["histogram"] = histogram_distance(train.slices, fake.slices)
    row["power_spectrum"] = spectrum_distance(train.spectrum, fake.spectrum)
    row["ms_ssim"] = ms_ssim_diversity(fake.slices) if pair and fake.slices.shape[-1] >= MS_SSIM_MIN_SIDE else None
    row["memorisation"] = None if heldout is None else memorisation_ratio(fake.slices, train.slices, heldout.slices)
    return row


def structure_scores(reference: np.ndarray, features: np.ndarray) -> dict:
    """``structure_fd``, ``structure_precision`` and ``structure_recall`` of structure features
    ``(M, D)`` against the training slices' ``(N, D)``; each None where its set is too small (a
    covariance needs two slices a side; precision needs the training set's k-NN radii, recall the
    set's own, so more than ``PRECISION_RECALL_K`` slices)."""
    k = PRECISION_RECALL_K
    several = min(len(reference), len(features)) >= 2
    return {
        "structure_fd": frechet_distance_from_features(reference, features) if several else None,
        "structure_precision": knn_precision(reference, features, k) if len(reference) > k else None,
        "structure_recall": knn_precision(features, reference, k) if len(features) > k else None,
    }


FLOOR_DRAWS = 5
"""Random held-out subsets the floor at a method's sample size is averaged over."""


def floor_structure_fd(train: SliceSet, heldout: SliceSet | None, n: int, seed: int) -> float | None:
    """The structure FD of ``n`` held-out real slices against the training slices: the floor at a
    method's own sample size (a Fréchet distance grows as its sample shrinks, so a method of 16
    slices is compared with real sets of 16, not with all held-out slices). The mean over
    ``FLOOR_DRAWS`` random subsets (all held-out slices once when ``n`` equals their count);
    None without the structure network or held-out slices, under two slices a side, or when the
    held-out slices are fewer than ``n`` (a floor from fewer slices would sit above the one at ``n``)."""
    if heldout is None or "structure" not in train.features or min(n, len(train.slices)) < 2 or n > len(heldout.slices):
        return None
    reference, real = train.features["structure"], heldout.features["structure"]
    if n == len(real):
        return frechet_distance_from_features(reference, real)
    rng = np.random.default_rng(seed)
    draws = [np.sort(rng.choice(len(real), size=n, replace=False)) for _ in range(FLOOR_DRAWS)]
    return float(np.mean([frechet_distance_from_features(reference, real[idx]) for idx in draws]))


def small_floor_notes(floor: dict[str, dict | None]) -> list[str]:
    """Datasets whose floor rests on ``PRECISION_RECALL_K`` held-out slices or fewer (``floor``:
    dataset → its row): their floor has no structure recall (and under two slices no Fréchet
    distance), its precision is a share of those few slices, and the overall floor values that
    need the missing ones are empty."""
    k = PRECISION_RECALL_K
    return [
        f"floor of {name}: {row['num_slices']} held-out slice(s), too few for a structure recall (more than {k})"
        + (" or Fréchet distance (2)" if row["num_slices"] < 2 else "")
        + f"; its precision is a share of {row['num_slices']}"
        for name, row in floor.items()
        if row is not None and row["num_slices"] <= k
    ]


def ms_ssim_notes(floor: dict[str, dict | None]) -> list[str]:
    """Why the floor row's MS-SSIM is null where it is (``floor``: dataset → its row): a dataset
    with one held-out slice has no pair to compare; otherwise the slices are too small."""
    missing = [name for name, row in floor.items() if row is not None and row["ms_ssim"] is None]
    single = [name for name in missing if floor[name]["num_slices"] < 2]
    notes = []
    if single:
        notes.append(f"MS-SSIM of the floor: null in {', '.join(single)}, one held-out slice has no pair to compare")
    if len(single) < len(missing):
        notes.append(
            f"MS-SSIM: null, it needs slices of at least {MS_SSIM_MIN_SIDE} pixels (5 scales, 11-pixel window)"
        )
    return notes


def sample_size_notes(rows: dict[str, dict[str, dict | None]], feature_dim: int) -> list[str]:
    """A note where a set (a method's, or the held-out floor's) has fewer slices than the structure
    features have dimensions (``rows``: label → dataset → row): a Fréchet distance then rests on
    a covariance of rank N − 1 < D, and its value depends on N, most for a few slices."""
    small = []
    for label, per_dataset in rows.items():
        counts = {row["num_slices"] for row in per_dataset.values() if row is not None}
        sizes = sorted(n for n in counts if n < feature_dim)
        if sizes:
            small.append(f"{label} {', '.join(map(str, sizes))}")
    if not small:
        return []
    return [
        f"structure FD on fewer slices than its {feature_dim} features ({'; '.join(small)} per dataset): "
        "its value depends on N, most for a few slices, so hold a row against its floor_structure_fd "
        "(the floor at its own N) and against rows of the same N"
    ]


def macro_average(rows: Sequence[dict | None]) -> dict:
    """The overall row: per column the mean over datasets (``num_slices``: the sum); None where a
    dataset or a value is missing, so overall values always cover the same datasets."""
    out = {}
    for column in ("num_slices", *AVERAGED):
        values = [None if row is None else row.get(column) for row in rows]
        if any(v is None for v in values):
            out[column] = None
        else:
            out[column] = int(np.sum(values)) if column == "num_slices" else float(np.mean(values))
    return out


def anatomy_groups(registry: dict, names: Sequence[str]) -> dict[str, list[str]]:
    """Datasets by anatomy × modality, as the columns of the paper's Tables 2–3: ``"CT head"``,
    ``"MR brain"`` → dataset names; CT groups first, then MR, anatomies in alphabetical order
    (a dataset without an anatomy is ``unspecified``; " Chest" and "chest" are one anatomy)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in names:
        entry = registry[name]
        anatomy = " ".join((entry.get("anatomy") or "").lower().split()) or "unspecified"
        groups.setdefault((entry["modality"], anatomy), []).append(name)
    return {f"{modality} {anatomy}": groups[modality, anatomy] for modality, anatomy in sorted(groups)}


# --------------------------------------------------------------------------------------------
# the evaluation
# --------------------------------------------------------------------------------------------


def load_extractors(
    paths: dict[str, str | os.PathLike | None], allow_download: bool, device: str
) -> tuple[dict[str, FeatureExtractor], list[str]]:
    """Load every extractor whose weights can be found.

    An extractor whose weights are not configured and not found is left out with a note (also
    logged as one warning line); a configured path that does not exist raises
    :class:`~medvar_bundle.weights.MissingWeightsError` (the user asked for that metric).

    Args:
        paths: extractor name (``inception``, ``radimagenet``, ``clip``) → configured file or None.
    """
    loaded, notes = {}, []
    for name, (load, metrics) in EXTRACTORS.items():
        try:
            loaded[name] = load(paths.get(name), allow_download).to(device)
        except MissingWeightsError as err:
            if paths.get(name):
                raise
            notes.append(f"{metrics}: null (no weights): {err}")
            logger.warning(notes[-1])
    return loaded, notes


@dataclass
class Evaluator:
    """A real store, the loaded extractors and the evaluation settings (see :func:`evaluate_generation`)."""

    real: Path
    registry: dict
    extractors: dict[str, FeatureExtractor]
    notes: list[str]
    max_slices: int | None = None
    heldout_split: str = "validation"
    quality_metric: str = "power_spectrum"
    gamma: float = 0.1
    seed: int = 0
    batch_size: int = 32

    @property
    def q_metric(self) -> str:
        """The efficiency's ``Q``: FID when InceptionV3 weights are loaded, else the structure FD
        when the store has a structure network, else the weight-free ``quality_metric``."""
        if "inception" in self.extractors:
            return "fid"
        return "structure_fd" if "structure" in self.extractors else self.quality_metric

    def slice_set(self, slices: np.ndarray) -> SliceSet:
        return SliceSet(slices, {name: ex.extract(slices, self.batch_size) for name, ex in self.extractors.items()})

    def dataset_names(
        self, folders: Sequence[GeneratedFolder], requested: Sequence[str] | None, notes: list[str]
    ) -> list[str]:
        """The datasets to evaluate: ``requested``, or every store dataset some folder holds
        (others are skipped with a note)."""
        held = {name for folder in folders for name in folder.datasets}
        if requested:
            unknown = [n for n in requested if n not in self.registry]
            if unknown:
                raise ValueError(
                    f"dataset(s) {unknown} not in the store {self.real}; it has: {', '.join(sorted(self.registry))}"
                )
            missing = [n for n in requested if n not in held]
            if missing:
                raise ValueError(f"no generated folder holds {', '.join(f'{n}.nii.gz' for n in missing)}")
            return list(requested)
        if not held & set(self.registry):
            raise ValueError(
                f"no generated stack is a dataset of the store {self.real} ({', '.join(sorted(self.registry))})"
            )
        skipped = sorted(held - set(self.registry))
        if skipped:
            notes.append(f"skipped {', '.join(skipped)}: not datasets of the store {self.real}")
        return sorted(held & set(self.registry))

    def evaluate(
        self,
        fake_dirs: Sequence[str | os.PathLike],
        out_dir: str | os.PathLike,
        labels: Sequence[str] | None = None,
        datasets: Sequence[str] | None = None,
    ) -> dict:
        """Score every generated folder on every dataset, write the report, return ``report.json``."""
        if labels is not None and len(labels) != len(fake_dirs):
            raise ValueError(f"{len(labels)} labels for {len(fake_dirs)} generated folders")
        folders = [read_generated_folder(d, labels[i] if labels else None) for i, d in enumerate(fake_dirs)]
        if len({f.label for f in folders}) != len(folders):
            raise ValueError(
                f"generated folders share a label ({', '.join(f.label for f in folders)}); give one --label each"
            )
        notes = list(self.notes)
        names = self.dataset_names(folders, datasets, notes)
        for folder in folders:
            if not folder.summary:
                notes.append(f"{folder.label}: no summary.json, so no s/image and no efficiency")
            elif folder.parameters is None:
                notes.append(f"{folder.label}: summary.json has no 'parameters'; its bubble has a fixed size")
        check_writable(out_dir)

        rows: dict[str, dict[str, dict | None]] = {folder.label: {} for folder in folders} | {FLOOR: {}}
        samples: dict[str, list[tuple[str, np.ndarray]]] = {}
        for name in names:
            scored, samples[name] = self._score_dataset(name, folders)
            for label, row in scored.items():
                rows[label][name] = row
        unsplit = [name for name in names if rows[FLOOR][name] is None]
        if unsplit:
            notes.append(
                f"no {self.heldout_split} slices of {', '.join(unsplit)} in the store: no real floor, floor at N "
                "or memorisation ratio there, so the overall floor is empty (hold out volumes in prepare: "
                "a datalist's validation list, or --val-fraction)"
            )
        notes += small_floor_notes(rows[FLOOR]) + ms_ssim_notes(rows[FLOOR])
        if "structure" in self.extractors:
            notes += sample_size_notes(rows, self.extractors["structure"].feature_dim)
        parameters = {folder.label: folder.parameters for folder in folders} | {FLOOR: None}
        groups = anatomy_groups(self.registry, names)
        group_rows = {
            label: {group: macro_average([per_dataset[n] for n in members]) for group, members in groups.items()}
            for label, per_dataset in rows.items()
        }
        for label, per_dataset in rows.items():
            per_dataset[OVERALL] = macro_average([per_dataset[n] for n in names])
            for row in [*per_dataset.values(), *group_rows[label].values()]:
                if row is not None:
                    self._add_efficiency(row, parameters[label])
        if self.q_metric != "fid":
            notes.append(
                f"efficiency Q = {self.q_metric}: "
                + ("the structure FD (no InceptionV3 weights)" if self.q_metric == "structure_fd"
                   else "a weight-free metric (no InceptionV3 weights and no structure network)")
            )  # fmt: skip
        report = {
            "real": str(self.real), "heldout_split": self.heldout_split, "max_slices": self.max_slices,
            "seed": self.seed,
            "datasets": names, "methods": {f.label: str(f.path) for f in folders},
            "efficiency": {"q": self.q_metric, "p": "seconds_per_image", "gamma": self.gamma, "log": "log10"},
            "groups": groups, "notes": notes, "rows": rows, "group_rows": group_rows,
        }  # fmt: skip
        return write_report(report, samples, out_dir, {name: entry_aspect(self.registry[name]) for name in names})

    def _score_dataset(
        self, name: str, folders: Sequence[GeneratedFolder]
    ) -> tuple[dict[str, dict | None], list[tuple[str, np.ndarray]]]:
        """One dataset: the row of each folder (None without a stack of it) and of the floor (None
        without held-out slices), and the sample-grid rows ``(title, uint8 (n, S, S))``, real slices
        (:func:`grid_picks`; held-out ones, or training ones where none are held out) first."""
        train = self.slice_set(store_slices(self.real, "training", name, self.max_slices, self.seed))
        held = split_slices(self.real, self.heldout_split, name, self.max_slices, self.seed)
        heldout = None if held is None else self.slice_set(held)
        logger.info(
            "evaluate %s: %d training, %d %s slices",
            name, len(train.slices), 0 if heldout is None else len(heldout.slices), self.heldout_split,
        )  # fmt: skip
        rows: dict[str, dict | None] = {}
        floors: dict[int, float | None] = {}  # the floor at N, once per N: methods of one N share it
        real, split = (train, "training") if heldout is None else (heldout, self.heldout_split)
        samples = [(f"real ({split})", real.slices[grid_picks(len(real.slices))])]
        for folder in folders:
            rows[folder.label] = None
            if name in folder.datasets:
                slices = self._fake_slices(folder, name, train.slices.shape[1:])
                n = len(slices)
                if n not in floors:
                    floors[n] = floor_structure_fd(train, heldout, n, self.seed)
                rows[folder.label] = score(train, heldout, self.slice_set(slices)) | {
                    "seconds_per_image": folder.seconds_per_image(name),
                    "floor_structure_fd": floors[n],
                }
                samples.append((folder.label, slices[:GRID_SLICES]))
        rows[FLOOR] = None
        if heldout is not None:
            floor = score(train, heldout, heldout)
            rows[FLOOR] = floor | {"floor_structure_fd": floor["structure_fd"]}
        return rows, samples

    def _fake_slices(self, folder: GeneratedFolder, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A folder's slices of one dataset (a subset of ``max_slices``), checked against the
        store's slice ``shape`` ``(S, S)``."""
        slices = random_subset(
            read_generated(folder.path / f"{name}.nii.gz", self.registry[name]), self.max_slices, self.seed
        )
        if slices.shape[1:] != shape or len(slices) < 2:
            raise ValueError(
                f"{folder.path / name}.nii.gz: need at least 2 slices of {shape[0]}×{shape[1]} like the store, "
                f"got {len(slices)} of {slices.shape[1]}×{slices.shape[2]} (generated with --resample-original?)"
            )
        logger.info("evaluate %s: %s (%d slices)", name, folder.label, len(slices))
        return slices

    def _add_efficiency(self, row: dict, parameters: int | None) -> None:
        """``row["efficiency"] = Q · log10(1 + P)^γ`` (None without Q or P) and ``row["parameters"]``."""
        q, p = row.get(self.q_metric), row.get("seconds_per_image")
        row["parameters"] = parameters
        row["efficiency"] = efficiency(q, p, self.gamma) if q is not None and p else None


def load_structure(
    path: str | os.PathLike | None, real: str | os.PathLike, device: str
) -> tuple[dict[str, FeatureExtractor], list[str]]:
    """The store's structure network as the ``structure`` extractor, or a note saying how to get one.

    A configured ``path`` that does not exist raises
    :class:`~medvar_bundle.weights.MissingWeightsError`; without one, ``REAL/structure.pt`` is
    used when present.
    """
    try:
        return {"structure": load_structure_net(path, real, device)}, []
    except MissingWeightsError as err:
        if path:
            raise
        note = f"structure metrics: null (no structure network): {err}"
        logger.warning(note)
        return {}, [note]


def load_evaluator(
    real: str | os.PathLike,
    structure_weights: str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
    radimagenet_weights: str | os.PathLike | None = None,
    clip_weights: str | os.PathLike | None = None,
    allow_download: bool = True,
    max_slices: int | None = None,
    heldout_split: str = "validation",
    quality_metric: str = "power_spectrum",
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 32,
) -> Evaluator:
    """Check the settings and load the extractors, before any long work (arguments as
    :func:`evaluate_generation`)."""
    registry = SliceStore(real).datasets
    if quality_metric not in QUALITY_METRICS:
        raise ValueError(f"--quality-metric must be one of {', '.join(QUALITY_METRICS)}, got {quality_metric!r}")
    if heldout_split not in SPLITS or heldout_split == "training":
        raise ValueError(f"--heldout-split must be validation or test, got {heldout_split!r}")
    if max_slices is not None and max_slices < 2:
        raise ValueError(f"--max-slices must be >= 2, got {max_slices}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    paths = {"inception": inception_weights, "radimagenet": radimagenet_weights, "clip": clip_weights}
    structure, notes = load_structure(structure_weights, real, device)
    extractors, more_notes = load_extractors(paths, allow_download, device)
    extractors, notes = structure | extractors, notes + more_notes
    return Evaluator(
        Path(real),
        registry,
        extractors,
        notes,
        max_slices,
        heldout_split,
        quality_metric,
        seed=seed,
        batch_size=batch_size,
    )


def evaluate_generation(
    real: str | os.PathLike,
    fake_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    labels: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    structure_weights: str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
    radimagenet_weights: str | os.PathLike | None = None,
    clip_weights: str | os.PathLike | None = None,
    allow_download: bool = True,
    max_slices: int | None = None,
    heldout_split: str = "validation",
    quality_metric: str = "power_spectrum",
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 32,
) -> dict:
    """Evaluate generated folders against a real slice store (paper §5.2, Tables 1–3, Fig. 7).

    Per dataset, every generated set and the held-out real set are scored against the training
    split with :func:`score`; the held-out row is the real-vs-real floor. FID/KID, RadFID and CMMD
    need their extractor weights: missing weights make those metrics null with a note (and one
    warning line), an explicit path that does not exist raises ``MissingWeightsError``. The
    overall row is the mean over datasets (every dataset weighs the same). Efficiency is
    ``Q · log10(1 + P)^0.1`` with ``P`` the folder's seconds per image and ``Q`` the FID, or
    ``quality_metric`` when there are no InceptionV3 weights.

    Writes to ``out_dir``: ``report.json`` (written last), ``report.md`` (the overall table and
    one method × dataset table per metric), ``report.csv`` (one row per method and dataset),
    ``tradeoff.png`` (metrics vs s/image, bubble area ∝ parameters, log x) and
    ``samples_NAME.png`` (held-out real slices above each method's).

    Args:
        real: the slice store.
        fake_dirs: folders written by ``medvar generate`` (or in its format).
        out_dir: the report folder.
        labels: one method name per folder (default: the folder names).
        datasets: datasets to evaluate (default: every store dataset some folder holds).
        structure_weights: the structure network (``medvar train-structure``; default
            ``REAL/structure.pt`` when present, else the structure metrics are null).
        inception_weights, radimagenet_weights, clip_weights: extractor weight files
            (default: the torch hub cache, else a download when ``allow_download``).
        max_slices: at most this many slices of each set (training, held-out, each generated
            one), drawn with ``seed``; the floor is most comparable when generated and held-out
            sets have the same size.
        heldout_split: the real split standing in for a perfect generator.
        quality_metric: the weight-free ``Q`` without FID: ``power_spectrum`` (default: sees
            blur and missing texture, like the paper's comparison of sampling steps) or ``histogram``.
        seed: seed of the subsets.
        device: where the extractors run.
        batch_size: slices per extractor batch.

    Returns:
        The report (as in ``report.json``): ``rows[method][dataset or "overall"]`` → column → value.
    """
    evaluator = load_evaluator(
        real, structure_weights, inception_weights, radimagenet_weights, clip_weights, allow_download, max_slices,
        heldout_split, quality_metric, seed, device, batch_size,
    )  # fmt: skip
    return evaluator.evaluate(fake_dirs, out_dir, labels, datasets)

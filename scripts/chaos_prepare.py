"""Chaos harness for `medvar prepare`: SIGKILL it (workers included) at random moments, let it finish,
and compare the store with a clean run's.

    .venv/bin/python scripts/chaos_prepare.py [--kills 20] [--seed 0] [--volumes 200] [--side 128]
        [--workers 2] [--shard-size 32] [--size 256] [--startup-kills 0.25] [--at-write 0.5]
        [--data DATALIST] [--work DIR] [--json PATH]

1. A synthetic corpus (or ``--data``): CT and MR NIfTI volumes of four datasets, two with labels, plus a
   volume whose label is empty ("skipped") and a file that is not a NIfTI ("failed").
2. A clean reference run: ``medvar prepare --workers W`` into ``WORK/reference``, timed (start-up until
   its first ``datasets.json`` write, the work until its last shard commit, the end).
3. ``medvar prepare --workers W`` into ``WORK/chaos`` in its own process group, killed with
   ``os.killpg(pgid, SIGKILL)`` after a random delay, until ``--kills`` kills have landed: a quarter in
   start-up, the others spread over the corpus (see :func:`chaos`); half of them wait, after their delay,
   for the next write in progress (a temporary file) and land in it.
   After each kill, the store is opened with ``SliceStore`` and every slice it exposes is read and
   compared with the reference slice of the same volume (a partial shard would show there), and what
   was being written when the kill landed is read from the files it left.
4. A last run without a kill; then the stores are compared: every volume's image and label slices byte
   for byte, the volume records of the shard manifests, ``datasets.json``, ``manifest.csv`` (except its
   ``shard``/``row`` columns), ``report.json`` (a volume committed by a killed run is reported by the
   last one as ``skipped: already in store``), ``medvar verify --store``, no temporary file, no orphan
   shard file, no held lock.

Exit status 0 when nothing was lost or changed and every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from medvar_bundle.data import SliceStore
from medvar_bundle.data.store import SHARD_DIR, read_shard_manifests
from medvar_bundle.files import TEMP_NAME, FolderLockedError, WriterLock

# name, modality, anatomy, has a label
DATASETS = (
    ("ct_liver", "CT", "abdomen", True),
    ("ct_chest", "CT", "thorax", False),
    ("mr_brain", "MR", "brain", False),
    ("mr_knee", "MR", "knee", True),
)
POLL_S = 0.01  # how often a run's files are looked at, seconds
WRITE_POLL_S = 0.0005  # ... while waiting for a write in progress
MANIFEST_RUN_COLUMNS = ("shard", "row")  # where a slice sits depends on where the runs were cut
ALREADY = "already in store"


# ------------------------------------------------------------------------------------------------
# corpus
# ------------------------------------------------------------------------------------------------


def phantom(rng: np.random.Generator, modality: str, side: int, depth: int) -> tuple[np.ndarray, tuple[int, int]]:
    """One synthetic volume, float32 ``(side, side, depth)`` voxels, and its body's axial range ``[z0, z1)``.

    CT: air (-1000 HU) around an elliptic body of soft tissue (0..80 HU) with three blobs of -100..700 HU.
    MR: exact zeros around an elliptic body of 100..300 with three blobs of 50..600 (arbitrary units).
    """
    x, y = np.meshgrid(np.linspace(-1, 1, side), np.linspace(-1, 1, side), indexing="ij")
    a, b = rng.uniform(0.55, 0.9, size=2)
    body = (x / a) ** 2 + (y / b) ** 2 < 1
    z0 = int(rng.integers(0, 2))
    z1 = depth - int(rng.integers(0, 2))
    ct = modality == "CT"
    vol = np.full((side, side, depth), -1000.0 if ct else 0.0, np.float32)
    for z in range(z0, z1):
        sl = np.where(body, rng.uniform(0, 80) if ct else rng.uniform(100, 300), vol[..., z])
        for _ in range(3):
            cx, cy, r = rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), rng.uniform(0.08, 0.25)
            sl[((x - cx) ** 2 + (y - cy) ** 2 < r * r) & body] = rng.uniform(-100, 700) if ct else rng.uniform(50, 600)
        vol[..., z] = sl
    return vol, (z0, z1)


def _save(path: Path, array: np.ndarray, spacing: tuple[float, float, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))


def build_corpus(root: str | os.PathLike, volumes: int = 200, seed: int = 0, side: int = 128) -> Path:
    """Write ``volumes`` synthetic NIfTI volumes (6..16 axial slices of ``side``² voxels) of the four
    :data:`DATASETS` in turn (every fifth held out as "validation"), a CT whose label is all zeros
    (reported "skipped") and a file of random bytes (reported "failed"), and their datalist.

    Returns:
        ``root/datalist.json``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    entries: dict[str, list[dict]] = {"training": [], "validation": []}
    for i in range(volumes):
        name, modality, anatomy, labelled = DATASETS[i % len(DATASETS)]
        depth = int(rng.integers(6, 17))
        spacing = (float(rng.uniform(0.6, 1.2)), float(rng.uniform(0.6, 1.2)), float(rng.uniform(1.0, 5.0)))
        vol, (z0, z1) = phantom(rng, modality, side, depth)
        entry = {"image": f"{name}/vol{i:03d}.nii.gz", "dataset": name, "modality": modality, "anatomy": anatomy}
        _save(root / entry["image"], vol, spacing)
        if labelled:
            lab = np.zeros(vol.shape, np.uint8)
            first, value = int(rng.integers(z0, z1 - 1)), int(rng.integers(1, 4))
            lab[side // 3 : side // 2, side // 3 : side // 2, first : first + int(rng.integers(1, 4))] = value
            entry["label"] = f"{name}/vol{i:03d}_seg.nii.gz"
            _save(root / entry["label"], lab, spacing)
        if name == "ct_chest":  # a dataset's own window, given with each item (one window per dataset)
            entry["ct_window"] = [50.0, 350.0]
        entries["validation" if i % 5 == 4 else "training"].append(entry)
    empty, _ = phantom(rng, "CT", side, 8)
    _save(root / "extra" / "empty_label.nii.gz", empty, (1.0, 1.0, 2.0))
    _save(root / "extra" / "empty_label_seg.nii.gz", np.zeros(empty.shape, np.uint8), (1.0, 1.0, 2.0))
    entries["training"].append(
        {"image": "extra/empty_label.nii.gz", "label": "extra/empty_label_seg.nii.gz", "dataset": "ct_liver",
         "modality": "CT", "anatomy": "abdomen"}
    )  # fmt: skip
    (root / "extra" / "broken.nii.gz").write_bytes(rng.bytes(4096))
    entries["training"].append(
        {"image": "extra/broken.nii.gz", "dataset": "ct_chest", "modality": "CT", "ct_window": [50.0, 350.0]}
    )
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps(entries, indent=1))
    return datalist


# ------------------------------------------------------------------------------------------------
# reading a store
# ------------------------------------------------------------------------------------------------


@dataclass
class StoreContent:
    """What ``SliceStore`` exposes, by volume.

    Attributes:
        images, labels: volume key → uint8 ``(n, size, size)``, its slices in store order.
        records: the volume records of the shard manifests, in store order (``num_slices`` included).
        shard_of: volume key → the shard that holds it.
        errors: one line per failure to open the store or read a slice.
    """

    images: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    shard_of: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def read_store(store: str | os.PathLike) -> StoreContent:
    """Open ``store`` with ``SliceStore`` and read every slice it exposes, grouped by volume.

    A store without ``datasets.json`` and without a committed shard (a run killed in start-up) is empty.
    """
    store = Path(store)
    out = StoreContent()
    try:
        manifests = read_shard_manifests(store)
        if not manifests and not (store / "datasets.json").exists():
            return out
        slices = SliceStore(store)
    except Exception as exc:  # whatever a reader would hit is a finding
        out.errors.append(f"open: {type(exc).__name__}: {exc}")
        return out
    keys = []
    for m in manifests:
        for v in m["volumes"]:
            out.records.append(v)
            out.shard_of[v["key"]] = m["shard"]
            keys += [v["key"]] * (v["num_slices"] if m["num_slices"] else 0)
    if len(keys) != len(slices):
        out.errors.append(f"SliceStore exposes {len(slices)} slices, the shard manifests list {len(keys)}")
        return out
    images: dict[str, list[np.ndarray]] = {}
    labels: dict[str, list[np.ndarray]] = {}
    unreadable = set()
    for index, key in enumerate(keys):
        try:
            item = slices[index]
        except Exception as exc:  # one line per shard: its other slices fail the same way
            if out.shard_of[key] not in unreadable:
                unreadable.add(out.shard_of[key])
                out.errors.append(f"shard {out.shard_of[key]}, slice {index}: {type(exc).__name__}: {exc}")
            continue
        images.setdefault(key, []).append(item["image"].numpy())
        labels.setdefault(key, []).append(item["label"].numpy())
    out.images = {k: np.stack(v) for k, v in images.items()}
    out.labels = {k: np.stack(v) for k, v in labels.items()}
    return out


def compare_slices(reference: StoreContent, got: StoreContent, complete: bool) -> dict:
    """Slices of ``got`` against the reference's, volume by volume.

    Args:
        complete: ``got`` should hold every reference volume (after the last run); else a volume not yet
            committed is not lost (after a kill).

    Returns:
        ``{"lost": reference slices absent from got (only when complete), "changed": slices present in
        both whose image or label differs, or that one side lacks within a volume, "extra": slices of
        volumes the reference lacks or that got holds twice, "bad_shards": shards holding a lost, changed
        or extra slice or failing to read}``.
    """
    lost = changed = extra = 0
    bad = set()
    counts = Counter(r["key"] for r in got.records)
    known = {r["key"] for r in reference.records}
    for key, n in counts.items():
        if n > 1 or key not in known:
            extra += sum(r["num_slices"] for r in got.records if r["key"] == key)
            bad.add(got.shard_of[key])
    for key, ref_images in reference.images.items():
        if key not in got.images:
            if complete or key in counts:
                lost += len(ref_images)
                if key in counts:
                    bad.add(got.shard_of[key])
            continue
        images, labels = got.images[key], got.labels[key]
        if images.shape != ref_images.shape:
            changed += max(len(images), len(ref_images))
            bad.add(got.shard_of[key])
            continue
        differ = (images != ref_images).any(axis=(1, 2)) | (labels != reference.labels[key]).any(axis=(1, 2))
        if differ.any():
            changed += int(differ.sum())
            bad.add(got.shard_of[key])
    return {"lost": lost, "changed": changed, "extra": extra, "bad_shards": sorted(bad)}


# ------------------------------------------------------------------------------------------------
# running prepare
# ------------------------------------------------------------------------------------------------


def medvar_command() -> list[str]:
    """The ``medvar`` entry point of this interpreter's environment."""
    exe = Path(sys.executable).with_name("medvar")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "medvar_bundle.cli"]


def prepare_command(datalist: Path, store: Path, workers: int, shard_size: int, size: int) -> list[str]:
    return [
        *medvar_command(),
        "prepare",
        "--datalist", str(datalist),
        "--out", str(store),
        "--workers", str(workers),
        "--shard-size", str(shard_size),
        "--size", str(size),
        "--quiet",
    ]  # fmt: skip


def committed_shards(store: Path) -> int:
    return len(list((store / SHARD_DIR).glob("*.json")))


def _written_since(path: Path, start_ns: int) -> bool:
    try:
        return path.stat().st_mtime_ns >= start_ns
    except FileNotFoundError:
        return False


@dataclass
class Phases:
    """A clean run's phases, seconds: start-up (until its first ``datasets.json`` write), the work (until
    its last shard commit; the first of which came ``first_commit`` after the start-up), the end (report,
    ``manifest.csv``, exit)."""

    startup: float
    work: float
    end: float
    first_commit: float

    @property
    def total(self) -> float:
        return self.startup + self.work + self.end


def timed_run(cmd: list[str], store: Path, log: Path) -> tuple[int, Phases]:
    """Run ``cmd`` to its end, watching ``store``; returns its exit status and :class:`Phases`."""
    start_ns, t0 = time.time_ns(), time.monotonic()
    ready = first_commit = last_commit = None
    shards = committed_shards(store) if (store / SHARD_DIR).is_dir() else 0
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            now = time.monotonic() - t0
            if ready is None and _written_since(store / "datasets.json", start_ns):
                ready = now
            if ready is not None and (n := committed_shards(store)) != shards:
                shards, last_commit = n, now
                first_commit = now if first_commit is None else first_commit
            time.sleep(POLL_S)
    total = time.monotonic() - t0
    ready = total if ready is None else ready
    last_commit = ready if last_commit is None else last_commit
    first_commit = last_commit if first_commit is None else first_commit
    return proc.returncode, Phases(ready, last_commit - ready, total - last_commit, first_commit - ready)


@dataclass
class Outcome:
    """One chaos run: ``killed`` (SIGKILL landed) or it ended by itself with ``returncode``; ``at_write``:
    the kill waited for a write in progress after its delay."""

    delay: float
    at_write: bool
    killed: bool
    returncode: int
    seconds: float
    moment: str = ""
    new_shards: int = 0
    visible_slices: int = 0
    partial_shards_seen: list[str] = field(default_factory=list)
    read_errors: list[str] = field(default_factory=list)


def _write_in_progress(store: Path, start_ns: int) -> bool:
    """Whether a temporary file created since ``start_ns`` (an atomic write of this run, not yet renamed)
    is in the store or its shard folder."""
    for folder in (store, store / SHARD_DIR):
        try:
            for entry in os.scandir(folder):
                if entry.name.endswith(".tmp") and entry.stat().st_mtime_ns >= start_ns:
                    return True
        except FileNotFoundError:  # not created yet, or renamed while looked at
            continue
    return False


def run_and_kill(
    cmd: list[str], store: Path, delay: float, anchor: str, at_write: bool, log: Path
) -> tuple[Outcome, int]:
    """Start ``cmd`` in a new process group and SIGKILL the group ``delay`` seconds after ``anchor``
    ("start": the process start; "ready": its first ``datasets.json`` write), unless it ends first.

    Args:
        at_write: once the delay has passed, wait for a write in progress (a temporary file in the
            store) and kill during it.

    Returns:
        The outcome and the run's start time (``time.time_ns()``).
    """
    start_ns, t0 = time.time_ns(), time.monotonic()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = t0 + delay if anchor == "start" else None
        killed = False
        while proc.poll() is None:
            if deadline is None and _written_since(store / "datasets.json", start_ns):
                deadline = time.monotonic() + delay
            due = deadline is not None and time.monotonic() >= deadline
            if due and (not at_write or _write_in_progress(store, start_ns)):
                os.killpg(proc.pid, signal.SIGKILL)
                killed = proc.wait() == -signal.SIGKILL
                break
            time.sleep(WRITE_POLL_S if due else POLL_S)
    return Outcome(delay, at_write, killed, proc.returncode, time.monotonic() - t0), start_ns


SHARD_TAG = re.compile(r"r\d{3}-\d+\.")
"""The start of a shard file's name (``r000-00003.images.npy``, ``r000-00003.json``)."""


def kill_moment(store: Path, start_ns: int, shards_before: int) -> str:
    """What the killed run was doing, from what it left: a temporary file (a write in progress), shard
    arrays without their manifest (between a shard's arrays and its commit), else its phase."""
    temps = sorted(p.name for p in store.rglob(".*.tmp") if p.stat().st_mtime_ns >= start_ns)
    if temps:
        target = TEMP_NAME.match(temps[0])["target"]
        if SHARD_TAG.match(target) is None:  # report.json, rank000-of-001.json, datasets.json, ...
            return f"{target} write"
        return "shard array write" if target.endswith(".npy") else "shard manifest write"
    shard_dir = store / SHARD_DIR
    for arrays in shard_dir.glob("*.images.npy"):
        tag = arrays.name.split(".")[0]
        if arrays.stat().st_mtime_ns >= start_ns and not (shard_dir / f"{tag}.json").exists():
            return "between shard arrays and manifest"
    if not _written_since(store / "datasets.json", start_ns):
        return "start-up"
    if _written_since(store / "report.json", start_ns):
        return "end (after report.json)"
    if committed_shards(store) > shards_before:
        return "reading volumes (after a commit)"
    return "reading volumes"


# ------------------------------------------------------------------------------------------------
# final comparison
# ------------------------------------------------------------------------------------------------


def _read_manifest_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k not in MANIFEST_RUN_COLUMNS} for row in csv.DictReader(fh)]


def _store_files(store: Path) -> set[str]:
    """The store's files outside ``shards/`` (relative paths)."""
    return {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file() and SHARD_DIR not in p.parts}


def report_differences(reference: Path, chaos: Path) -> list[str]:
    """``report.json`` entries that differ. A volume committed before the last run is reported by it as
    ``skipped`` / ``already in store`` with 0 slices: that is the same outcome as the reference's."""
    ref = {e["image"]: e for e in json.loads((reference / "report.json").read_text())["volumes"]}
    got = {e["image"]: e for e in json.loads((chaos / "report.json").read_text())["volumes"]}
    problems = [f"{image}: missing from the report" for image in ref.keys() - got.keys()]
    problems += [f"{image}: not in the reference report" for image in got.keys() - ref.keys()]
    for image in ref.keys() & got.keys():
        r, g = ref[image], got[image]
        resumed = g["status"] == "skipped" and g["error"] == ALREADY and r["status"] in ("ok", "skipped")
        if g != r and not (resumed and {**g, "status": r["status"], "slices": r["slices"], "error": r["error"]} == r):
            problems.append(f"{image}: {g} != {r}")
    return problems


def leftovers(store: Path) -> dict:
    """Temporary files, orphan shard files (arrays without a manifest, or a manifest without its arrays)
    and whether the ``prepare`` lock is still held."""
    shard_dir = store / SHARD_DIR
    committed = {p.name.split(".")[0]: json.loads(p.read_text()) for p in shard_dir.glob("*.json")}
    orphans = [p.name for p in shard_dir.glob("*.npy") if p.name.split(".")[0] not in committed]
    orphans += [
        f"{tag}.{kind}.npy"
        for tag, m in committed.items()
        for kind in m.get("files", {})
        if not (shard_dir / f"{tag}.{kind}.npy").exists()
    ]
    try:
        WriterLock(store, "prepare-r000").acquire().release()
        held = False
    except FolderLockedError:
        held = True
    return {"temp_files": sorted(str(p.relative_to(store)) for p in store.rglob("*.tmp")), "orphans": orphans,
            "lock_held": held}  # fmt: skip


def verify(store: Path) -> tuple[int, str]:
    """``medvar verify --store`` (sha256 of every shard file), in this process: exit status and last line."""
    from medvar_bundle.cli import main as medvar

    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
        rc = medvar(["verify", "--store", str(store)])
    lines = text.getvalue().strip().splitlines()
    return rc, lines[-1] if lines else ""


def compare_final(reference: Path, chaos: Path, ref_content: StoreContent) -> dict:
    """Every check of the finished chaos store against the reference (see the module docstring)."""
    got = read_store(chaos)
    slices = compare_slices(ref_content, got, complete=True)
    verify_rc, verify_line = verify(chaos)
    return {
        **slices,
        "read_errors": got.errors,
        "records_equal": got.records == ref_content.records,
        "datasets_json_equal": json.loads((chaos / "datasets.json").read_text())
        == json.loads((reference / "datasets.json").read_text()),
        "manifest_csv_equal": _read_manifest_csv(chaos / "manifest.csv")
        == _read_manifest_csv(reference / "manifest.csv"),
        "report_differences": report_differences(reference, chaos),
        "files_equal": _store_files(chaos) == _store_files(reference),
        "verify_rc": verify_rc,
        "verify": verify_line,
        **leftovers(chaos),
        "slices": sum(len(v) for v in got.images.values()),
        "reference_slices": sum(len(v) for v in ref_content.images.values()),
        "shards": committed_shards(chaos),
        "reference_shards": committed_shards(reference),
    }


# ------------------------------------------------------------------------------------------------
# the harness
# ------------------------------------------------------------------------------------------------


@dataclass
class ChaosResult:
    """Everything one chaos session measured; ``passed`` when nothing was lost or changed and every check held."""

    command: list[str]
    reference_phases: dict
    reference_seconds: float
    chaos_seconds: float
    runs: list[Outcome]
    final: dict
    final_returncode: int

    @property
    def kills(self) -> int:
        return sum(o.killed for o in self.runs)

    @property
    def failures(self) -> list[str]:
        """One line per failed check (empty: passed)."""
        f = self.final
        problems = [f"killed run exited {o.returncode} by itself" for o in self.runs if not o.killed and o.returncode]
        problems += [f"after kill {i}: partial shards visible {o.partial_shards_seen}" for i, o in
                     enumerate(self.runs) if o.partial_shards_seen]  # fmt: skip
        problems += [f"after kill {i}: {e}" for i, o in enumerate(self.runs) for e in o.read_errors]
        if self.final_returncode:
            problems.append(f"the last run exited {self.final_returncode}")
        problems += [f"{f[k]} slices {k}" for k in ("lost", "changed", "extra") if f[k]]
        problems += [f"final read: {e}" for e in f["read_errors"]]
        checks = (
            ("the shard manifests' volume records", "records_equal"),
            ("datasets.json", "datasets_json_equal"),
            ("manifest.csv", "manifest_csv_equal"),
            ("the set of store files", "files_equal"),
        )
        problems += [f"{name} differs from the reference's" for name, key in checks if not f[key]]
        problems += [f"report.json: {p}" for p in f["report_differences"]]
        if f["verify_rc"]:
            problems.append(f"medvar verify: {f['verify']}")
        problems += [f"leftover temporary file {t}" for t in f["temp_files"]]
        problems += [f"orphan shard file {t}" for t in f["orphans"]]
        if f["lock_held"]:
            problems.append("the prepare lock is still held")
        return problems

    def to_json(self) -> dict:
        return {
            "command": self.command,
            "kills": self.kills,
            "runs": [asdict(o) for o in self.runs],
            "moments": dict(Counter(o.moment for o in self.runs if o.killed)),
            "reference_phases_s": self.reference_phases,
            "reference_seconds": self.reference_seconds,
            "chaos_seconds": self.chaos_seconds,
            "final": self.final,
            "final_returncode": self.final_returncode,
            "partial_shards_seen": sum(len(o.partial_shards_seen) for o in self.runs),
            "failures": self.failures,
            "passed": not self.failures,
        }


def chaos(
    datalist: Path,
    work: Path,
    kills: int = 20,
    seed: int = 0,
    workers: int = 2,
    shard_size: int = 32,
    size: int = 256,
    startup_kills: float = 0.25,
    at_write: float = 0.5,
    max_runs: int | None = None,
    say: Callable[[str], object] = print,
) -> ChaosResult:
    """Run the reference, ``kills`` killed runs (at most ``max_runs`` runs, default ``3 * kills``) and the
    last run into ``work/reference`` and ``work/chaos`` (both must not exist), and compare.

    Each kill is drawn (``random.Random(seed)``) as one of:

    * a start-up kill (probability ``startup_kills``): uniform over ``[0, S]`` s from the process start,
      S the reference's start-up (imports, config, resume checks, up to its first ``datasets.json`` write);
    * a work kill: uniform over ``[0, L + 2 W r / k]`` s from this run's first ``datasets.json`` write, L
      the reference's time from there to its first commit (workers start, the first shard fills), W its
      work time after that, r the fraction of volumes not yet committed, k the kills still to land; each
      kill then commits about r / k of the corpus, so the kills spread over the whole corpus (a
      uniform delay over the whole run lets the first kill commit most of it). Once every volume is
      committed (r = 0) the window is the reference's end phase (report, ``manifest.csv``).

    Args:
        startup_kills: the fraction of start-up kills.
        at_write: the fraction of kills that, once their delay has passed, wait for the next write in
            progress (a temporary file in the store) and land during it.
        say: where progress lines go.
    """
    reference, store = work / "reference", work / "chaos"
    logs = work / "logs"
    logs.mkdir(parents=True)
    say(f"reference: medvar prepare --workers {workers} --shard-size {shard_size} --size {size} into {reference}")
    rc, phases = timed_run(prepare_command(datalist, reference, workers, shard_size, size), reference, logs / "ref.log")
    if rc:
        raise RuntimeError(f"the reference run exited {rc}; see {logs / 'ref.log'}")
    ref_content = read_store(reference)
    if ref_content.errors:
        raise RuntimeError(f"the reference store does not read: {ref_content.errors[0]}")
    total_volumes = len(ref_content.records)
    say(
        f"reference: {phases.total:.1f} s (start-up {phases.startup:.1f} s, work {phases.work:.1f} s with the "
        f"first commit after {phases.first_commit:.1f} s, "
        f"end {phases.end:.1f} s), {committed_shards(reference)} shards, "
        f"{sum(len(v) for v in ref_content.images.values())} slices of {total_volumes} volumes"
    )
    rng = random.Random(seed)
    cmd = prepare_command(datalist, store, workers, shard_size, size)
    runs: list[Outcome] = []
    t0 = time.monotonic()
    while sum(o.killed for o in runs) < kills and len(runs) < (max_runs or 3 * kills):
        done = len({v["key"] for m in read_shard_manifests(store) for v in m["volumes"]}) if store.exists() else 0
        remaining, kills_left = 1.0 - done / total_volumes, kills - sum(o.killed for o in runs)
        if rng.random() < startup_kills:
            anchor, window = "start", phases.startup
        else:
            latency, work = phases.first_commit, phases.work - phases.first_commit
            anchor, window = "ready", latency + 2 * work * remaining / kills_left if remaining else phases.end
        shards_before = committed_shards(store) if (store / SHARD_DIR).exists() else 0
        delay, aim = rng.uniform(0, window), rng.random() < at_write
        outcome, start_ns = run_and_kill(cmd, store, delay, anchor, aim, logs / f"run{len(runs):03d}.log")
        if outcome.killed:
            outcome.moment = kill_moment(store, start_ns, shards_before)
            outcome.new_shards = committed_shards(store) - shards_before if (store / SHARD_DIR).exists() else 0
            partial = read_store(store)
            check = compare_slices(ref_content, partial, complete=False)
            outcome.visible_slices = sum(len(v) for v in partial.images.values())
            outcome.partial_shards_seen = check["bad_shards"]
            outcome.read_errors = partial.errors
        runs.append(outcome)
        aimed = " and the next write" if aim else ""
        what = f"killed {delay:.2f} s after its {anchor}{aimed}, during {outcome.moment}" if outcome.killed else (
            f"ended by itself (exit {outcome.returncode}) before its kill at {outcome.delay:.2f} s")  # fmt: skip
        say(
            f"run {len(runs):2d}: {what}; {outcome.new_shards} new shards, {outcome.visible_slices} slices visible"
            + (f", PARTIAL SHARDS {outcome.partial_shards_seen}" if outcome.partial_shards_seen else "")
            + (f", READ ERRORS {outcome.read_errors}" if outcome.read_errors else "")
        )
    say("last run: no kill")
    final_rc, _ = timed_run(cmd, store, logs / "last.log")
    chaos_seconds = time.monotonic() - t0
    final = compare_final(reference, store, ref_content)
    return ChaosResult(cmd, asdict(phases), phases.total, chaos_seconds, runs, final, final_rc)


def summary(result: ChaosResult) -> str:
    """The printed table of a session."""
    f = result.final
    moments = Counter(o.moment for o in result.runs if o.killed)
    writes = sum(n for m, n in moments.items() if "write" in m or "between" in m)
    rows = [
        ("kills landed", f"{result.kills} (of {len(result.runs)} runs; the others ended before their kill)"),
        ("kills during a write", f"{writes} (a temporary file or uncommitted shard arrays left behind)"),
        *((f"  during {m}", str(n)) for m, n in sorted(moments.items())),
        ("slices lost", str(f["lost"])),
        ("slices changed", str(f["changed"])),
        ("slices extra (duplicated)", str(f["extra"])),
        ("partial shards seen", str(sum(len(o.partial_shards_seen) for o in result.runs))),
        ("read errors after kills", str(sum(len(o.read_errors) for o in result.runs))),
        ("final slices / reference", f"{f['slices']} / {f['reference_slices']}"),
        ("final shards / reference", f"{f['shards']} / {f['reference_shards']}"),
        ("volume records, datasets.json", f"{f['records_equal']}, {f['datasets_json_equal']}"),
        ("manifest.csv (less shard, row)", str(f["manifest_csv_equal"])),
        ("report.json differences", str(len(f["report_differences"]))),
        ("medvar verify", f"exit {f['verify_rc']}: {f['verify']}"),
        ("temp files, orphans, lock held", f"{len(f['temp_files'])}, {len(f['orphans'])}, {f['lock_held']}"),
        ("reference run", f"{result.reference_seconds:.1f} s"),
        ("chaos runs + last run", f"{result.chaos_seconds:.1f} s"),
        ("result", "PASS" if not result.failures else "FAIL: " + "; ".join(result.failures)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs that must land (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus and of the kill delays (default 0)")
    parser.add_argument("--volumes", type=int, default=200, help="synthetic volumes (default 200)")
    parser.add_argument("--side", type=int, default=128, help="in-plane voxels of a synthetic volume (default 128)")
    parser.add_argument("--data", type=Path, help="use this datalist instead of a synthetic corpus")
    parser.add_argument("--workers", type=int, default=2, help="prepare's --workers (default 2)")
    parser.add_argument("--shard-size", type=int, default=32, help="prepare's --shard-size (default 32 slices)")
    parser.add_argument("--size", type=int, default=256, help="prepare's --size (default 256 pixels)")
    parser.add_argument(
        "--startup-kills", type=float, default=0.25,
        help="fraction of kills drawn over the start-up rather than over the work (default 0.25)",
    )  # fmt: skip
    parser.add_argument(
        "--at-write", type=float, default=0.5,
        help="fraction of kills that, after their delay, wait for a write in progress and land in it (default 0.5)",
    )  # fmt: skip
    parser.add_argument("--work", type=Path, help="working folder (default: a new folder under /tmp); must not exist")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if args.kills < 0:
        parser.error(f"--kills must be >= 0, got {args.kills}")
    work = args.work or Path(f"/tmp/chaos_prepare-{os.getpid()}")
    if work.exists():
        parser.error(f"{work} exists; give a new --work folder")
    work.mkdir(parents=True)
    datalist = args.data or build_corpus(work / "data", args.volumes, args.seed, args.side)
    print(f"chaos_prepare: working in {work}; datalist {datalist}")
    result = chaos(
        datalist.resolve(), work, args.kills, args.seed, args.workers, args.shard_size, args.size, args.startup_kills,
        args.at_write,
    )  # fmt: skip
    print(summary(result))
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=1) + "\n")
        print(f"chaos_prepare: wrote {args.json}")
    return 0 if not result.failures else 1


if __name__ == "__main__":
    sys.exit(main())

"""Kill `medvar prepare` anywhere, lose nothing (issue 12): the fast version of scripts/chaos_prepare.py,
the harness's own comparisons on known answers, and the regression test of what the harness found (a
SIGKILLed write left its temporary file in the store for good)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import load_script

from medvar_bundle.data import load_datalist, prepare_store
from medvar_bundle.files import TEMP_NAME, temp_prefix

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "chaos_prepare.py"


@pytest.fixture(scope="module")
def chaos_prepare():
    return load_script("chaos_prepare")


def test_help():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--kills" in out.stdout and "SIGKILL" in out.stdout


def test_sigkilled_prepare_loses_nothing(chaos_prepare, tmp_path):
    """3 SIGKILLs (workers included) at seeded random moments after start-up (each kill drawn to wait for a
    write in progress or not), on 14 volumes (71 slices in 6 shards of the clean run): nothing lost, changed
    or duplicated, no partial shard ever visible, and the finished store equals the clean run's."""
    datalist = chaos_prepare.build_corpus(tmp_path / "data", volumes=12, seed=3, side=48)
    result = chaos_prepare.chaos(
        datalist, tmp_path, kills=3, seed=3, workers=2, shard_size=8, size=64, startup_kills=0.0, say=lambda _: None
    )
    f = result.final
    assert result.kills == 3, [o.moment for o in result.runs]
    assert result.failures == [], result.failures
    assert (f["lost"], f["changed"], f["extra"]) == (0, 0, 0)
    assert all(o.partial_shards_seen == [] and o.read_errors == [] for o in result.runs)
    assert f["slices"] == f["reference_slices"] > 0
    assert f["records_equal"] and f["datasets_json_equal"] and f["manifest_csv_equal"] and f["files_equal"]
    assert f["verify_rc"] == 0 and (f["temp_files"], f["orphans"], f["lock_held"]) == ([], [], False)


def test_the_comparison_counts_lost_changed_and_extra_slices(chaos_prepare, tmp_path):
    """Known answers: one slice flipped, one volume absent, one volume committed twice."""
    datalist = chaos_prepare.build_corpus(tmp_path / "data", volumes=4, seed=1, side=48)
    prepare_store(load_datalist(datalist), tmp_path / "store", size=64, shard_size=8, progress=False)
    ref = chaos_prepare.read_store(tmp_path / "store")
    keys = [r["key"] for r in ref.records if r["num_slices"]]
    assert len(keys) == 4 and ref.errors == []
    same = chaos_prepare.compare_slices(ref, chaos_prepare.read_store(tmp_path / "store"), complete=True)
    assert same == {"lost": 0, "changed": 0, "extra": 0, "bad_shards": []}

    got = chaos_prepare.read_store(tmp_path / "store")
    got.images[keys[0]] = got.images[keys[0]].copy()
    got.images[keys[0]][1, 5, 5] ^= 1
    dropped = len(got.images.pop(keys[1]))
    got.labels.pop(keys[1])
    got.records = [r for r in got.records if r["key"] != keys[1]]
    twice = next(r for r in got.records if r["key"] == keys[2])
    got.records.append(twice)
    complete = chaos_prepare.compare_slices(ref, got, complete=True)
    assert (complete["lost"], complete["changed"], complete["extra"]) == (dropped, 1, 2 * twice["num_slices"])
    assert complete["bad_shards"] == sorted({got.shard_of[keys[0]], got.shard_of[keys[2]]})
    # after a kill, a volume not committed yet is not lost
    assert chaos_prepare.compare_slices(ref, got, complete=False)["lost"] == 0


def test_the_harness_sees_a_shard_whose_arrays_are_not_whole(chaos_prepare, tmp_path):
    """A committed shard whose images file is cut short (what a manifest written before its arrays
    leaves): SliceStore refuses it, the harness reports a read error and verify fails."""
    datalist = chaos_prepare.build_corpus(tmp_path / "data", volumes=4, seed=1, side=48)
    prepare_store(load_datalist(datalist), tmp_path / "store", size=64, shard_size=8, progress=False)
    images = sorted((tmp_path / "store" / "shards").glob("*.images.npy"))[0]
    images.write_bytes(images.read_bytes()[:-4096])
    got = chaos_prepare.read_store(tmp_path / "store")
    assert got.errors and "truncated" in got.errors[0]
    rc, line = chaos_prepare.verify(tmp_path / "store")
    assert rc == 1 and "1 of" in line


KILLED_WRITER = """
import os, signal, sys
from medvar_bundle import files
files._write_file = lambda path, payload: os.kill(os.getpid(), signal.SIGKILL)
for target in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        files.atomic_write_bytes(target, b"never renamed")
    os.waitpid(pid, 0)
"""


def test_prepare_removes_what_sigkilled_writes_left(tmp_path):
    """Regression (found by the chaos harness): a write SIGKILLed between its temporary file and the rename
    left the file for good (a whole shard's worth of disk per kill). The next prepare removes those of dead
    writers and, whoever wrote them, those of its own rank's shards; a live writer's file and another
    host's file of a shared target are kept."""
    vol = tmp_path / "v.nii.gz"
    x = np.linspace(-1, 1, 32)
    body = (x[:, None] ** 2 + x[None, :] ** 2 < 0.5)[..., None] * np.ones(4)
    nib.save(nib.Nifti1Image(np.where(body, 40.0, -1000.0).astype(np.float32), np.eye(4)), vol)
    items = [{"image": str(vol), "dataset": "ct", "modality": "CT"}]
    store = tmp_path / "store"
    prepare_store(items, store, size=32, progress=False)
    killed = ["datasets.json", "shards/r000-00001.images.npy", "reports/rank000-of-001.json"]
    subprocess.run([sys.executable, "-c", KILLED_WRITER, *(str(store / k) for k in killed)], check=True, cwd=ROOT)
    dead = {str(p.relative_to(store).parent / TEMP_NAME.match(p.name)["target"]) for p in store.rglob(".*.tmp")}
    assert dead == set(killed)  # one temporary file per killed write
    live = store / f"{temp_prefix(store / 'manifest.csv')}abcdefgh.tmp"  # this process: alive
    other = f"{os.getpid()}@not-{socket.gethostname()}.abcdefgh.tmp"
    other_shared = store / f".datasets.json.{other}"  # another machine, a target every rank writes
    other_own = store / "shards" / f".r000-00007.labels.npy.{other}"  # another machine, this rank's shard
    other_rank = store / "shards" / f".r001-00007.labels.npy.{other}"  # another machine, another rank's
    for p in (live, other_shared, other_own, other_rank):
        p.write_bytes(b"x")

    result = prepare_store(items, store, size=32, progress=False)
    assert [e["error"] for e in result.report] == ["already in store"]
    left = sorted(str(p.relative_to(store)) for p in store.rglob(".*.tmp"))
    assert left == sorted(str(p.relative_to(store)) for p in (live, other_shared, other_rank))


def test_a_kill_during_a_report_write_is_not_counted_as_a_shard_manifest_write(chaos_prepare, tmp_path):
    """Every temporary-file target starting with "r" was a shard manifest: report.json too."""
    from medvar_bundle.files import temp_prefix

    (tmp_path / "shards").mkdir()
    for target, expected in [("report.json", "report.json write"), ("r000-00002.json", "shard manifest write"),
                             ("r000-00002.images.npy", "shard array write")]:  # fmt: skip
        folder = tmp_path / "shards" if target.startswith("r0") else tmp_path
        temp = folder / f"{temp_prefix(folder / target)}x.tmp"
        temp.write_bytes(b"")
        assert chaos_prepare.kill_moment(tmp_path, 0, 0) == expected
        temp.unlink()

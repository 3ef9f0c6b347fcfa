"""One writer per store or run folder: a second prepare, tokenize or training run refuses with one
line; readers never wait; a killed writer leaves no stale lock."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from conftest import build_synthetic_store, phantom_volume

from medvar_bundle.bundle_config import run_config
from medvar_bundle.cli import main
from medvar_bundle.data import SliceStore
from medvar_bundle.files import FolderLockedError, WriterLock

HOLD = """
import sys, time
from medvar_bundle.files import WriterLock
lock = WriterLock(sys.argv[1], sys.argv[2]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_in_subprocess(folder, name) -> subprocess.Popen:
    """Another process that takes ``folder``'s ``name`` lock and keeps it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), name], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    proc = hold_in_subprocess(tmp_path, "prepare-r000")
    try:
        with pytest.raises(FolderLockedError, match=rf"{tmp_path}: another process \(pid {proc.pid}\) is writing"):
            WriterLock(tmp_path, "prepare-r000").acquire()
        with WriterLock(tmp_path, "tokenize"):  # another kind of writer is not excluded
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with WriterLock(tmp_path, "prepare-r000"):  # the kernel dropped the dead process's lock
        pass


def test_prepare_and_tokenize_refuse_a_store_being_written_but_readers_go_on(tmp_path, tokenized_store, capsys):
    store = build_synthetic_store(tmp_path, volumes=2, seed=5)
    image = tmp_path / "more.nii.gz"
    nib.save(nib.Nifti1Image(phantom_volume(np.random.default_rng(1)), np.diag([1.0, 1.0, 3.0, 1.0])), image)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": str(image), "dataset": "set0", "modality": "MR"}]}))
    slices = len(SliceStore(store))
    for name, argv in (
        ("prepare-r000", ["prepare", "--datalist", str(datalist), "--out", str(store), "--size", "64", "--quiet"]),
        ("tokenize", ["tokenize", "--tokenizer", str(tokenized_store.parent / "tokenizer.pt"), "--store", str(store),
                      "--quiet"]),
    ):  # fmt: skip
        proc = hold_in_subprocess(store, name)
        try:
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"another process (pid {proc.pid}) is writing here" in err[0]
            assert len(SliceStore(store)) == slices and SliceStore(store)[0]["image"].shape == (64, 64)  # readers
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert main(argv) == 0  # free again: tokenize runs


def test_a_second_training_run_in_one_folder_is_refused(synthetic_store, tmp_path):
    out = tmp_path / "run"
    args = {"dataset_dir": str(synthetic_store), "output_dir": str(out), "max_steps": 1, "batch_size": 4,
            "val_every": 1, "val_max_images": 4, "progress": False, "bf16": False}  # fmt: skip
    proc = hold_in_subprocess(out / "checkpoints", "train")
    try:
        started = time.monotonic()
        with pytest.raises(FolderLockedError, match="another process"):
            run_config("train_tokenizer", "train", args)
        assert time.monotonic() - started < 60 and not list((out / "checkpoints").glob("checkpoint_*.pt"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run_config("train_tokenizer", "train", args)  # then it trains, and releases the lock when done
    with WriterLock(out / "checkpoints", "train"):
        pass

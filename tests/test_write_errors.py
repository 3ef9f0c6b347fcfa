"""Full disks and I/O errors: a refused write at the k-th write, for every k of a small run, stops the
command with one line naming the file and the cause (exit 1), keeps what was committed, and the
re-run finishes with exactly what a run without the error writes."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import build_synthetic_store, phantom_volume

import medvar_bundle.files as files
from medvar_bundle.cli import main

REAL_WRITE = files._write_file


class DiskFailsAt:
    """``files._write_file`` whose k-th call (1-based) fails with ``code``; counts every call."""

    def __init__(self, k: int | None = None, code: int = errno.ENOSPC) -> None:
        self.k, self.code, self.calls, self.paths = k, code, 0, []

    def __call__(self, path, payload) -> None:
        self.calls += 1
        self.paths.append(path)
        if self.calls == self.k:
            raise OSError(self.code, os.strerror(self.code), str(path))
        REAL_WRITE(path, payload)


def store_content(store) -> dict:
    """Everything a store holds that a reader sees: registry, manifest, and every shard file's bytes."""
    out = {name: (store / name).read_bytes() for name in ("datasets.json", "manifest.csv")}
    for p in sorted((store / "shards").glob("*")):
        out[p.name] = p.read_bytes()
    return out


def one_error_line(capsys, code: int) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and os.strerror(code) in lines[0] and "cannot write" in lines[0], lines
    return lines[0]


def test_prepare_survives_a_refused_write_at_every_write(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(3)
    items = []
    for i in range(3):
        path = tmp_path / f"vol{i}.nii.gz"
        nib.save(nib.Nifti1Image(phantom_volume(rng), np.diag([1.0, 1.0, 3.0, 1.0])), path)
        items.append({"image": str(path), "dataset": f"set{i % 2}", "modality": "MR"})
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": items}))

    def prepare(out) -> int:
        argv = ["prepare", "--datalist", str(datalist), "--out", str(out), "--size", "32", "--shard-size", "8"]
        return main([*argv, "--quiet"])

    counter = DiskFailsAt()
    monkeypatch.setattr(files, "_write_file", counter)
    assert prepare(tmp_path / "clean") == 0
    clean, writes = store_content(tmp_path / "clean"), counter.calls
    assert writes >= 12  # registry, 3 shards × (images, labels, manifest, registry), reports, manifest.csv
    for k in range(1, writes + 1):
        out, code = tmp_path / f"k{k}", (errno.ENOSPC, errno.EIO)[k % 2]
        monkeypatch.setattr(files, "_write_file", DiskFailsAt(k, code))
        assert prepare(out) == 1, k
        line = one_error_line(capsys, code)
        assert str(out) in line and not list(out.rglob("*.tmp")), (k, line)
        monkeypatch.setattr(files, "_write_file", REAL_WRITE)
        assert prepare(out) == 0, k
        capsys.readouterr()
        assert store_content(out) == clean, k
        shutil.rmtree(out)


def test_tokenize_survives_a_refused_write_at_every_write(tmp_path, tokenized_store, monkeypatch, capsys):
    (tmp_path / "src").mkdir()
    store = build_synthetic_store(tmp_path / "src", volumes=2, seed=4)
    tokenizer = tokenized_store.parent / "tokenizer.pt"

    def tokenize(out) -> int:
        return main(["tokenize", "--tokenizer", str(tokenizer), "--store", str(out), "--quiet"])

    counter = DiskFailsAt()
    monkeypatch.setattr(files, "_write_file", counter)
    clean_store = shutil.copytree(store, tmp_path / "clean")
    assert tokenize(clean_store) == 0
    clean = {p.name: p.read_bytes() for p in sorted((clean_store / "shards").glob("*.tokens.npy"))}
    writes = counter.calls
    assert writes == 3  # tokens.json, then the shard's tokens and tokens.json again
    for k in range(1, writes + 1):
        out, code = shutil.copytree(store, tmp_path / f"k{k}"), (errno.ENOSPC, errno.EIO)[k % 2]
        monkeypatch.setattr(files, "_write_file", DiskFailsAt(k, code))
        assert tokenize(out) == 1
        assert str(out) in one_error_line(capsys, code)
        monkeypatch.setattr(files, "_write_file", REAL_WRITE)
        assert tokenize(out) == 0
        capsys.readouterr()
        assert {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tokens.npy"))} == clean
        assert (
            json.loads((out / "tokens.json").read_text())["shards"]
            == json.loads((clean_store / "tokens.json").read_text())["shards"]
        )


def test_generate_survives_a_refused_write_at_every_write(model_path, tmp_path, monkeypatch, capsys):
    def generate(out) -> int:
        return main(["generate", "--model", str(model_path), "--num", "2", "--out", str(out), "--quiet"])

    counter = DiskFailsAt()
    monkeypatch.setattr(files, "_write_file", counter)
    assert generate(tmp_path / "clean") == 0
    writes = counter.calls
    capsys.readouterr()
    stacks = {p.name: nib.load(p).get_fdata() for p in (tmp_path / "clean").glob("*.nii.gz")}
    assert writes == 2 * 2 + 1  # per dataset a NIfTI and a PNG grid, then summary.json
    for k in range(1, writes + 1):
        out, code = tmp_path / f"k{k}", (errno.ENOSPC, errno.EIO)[k % 2]
        monkeypatch.setattr(files, "_write_file", DiskFailsAt(k, code))
        assert generate(out) == 1
        assert str(out) in one_error_line(capsys, code)
        assert not (out / "summary.json").exists() and not list(out.glob(".*tmp"))
        monkeypatch.setattr(files, "_write_file", REAL_WRITE)
        assert generate(out) == 0
        capsys.readouterr()
        assert {p.name: nib.load(p).get_fdata() for p in out.glob("*.nii.gz")}.keys() == stacks.keys()
        for name, data in stacks.items():
            np.testing.assert_array_equal(nib.load(out / name).get_fdata(), data)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_refused_write_names_the_target_not_the_temporary_file(tmp_path, monkeypatch, code):
    monkeypatch.setattr(files, "_write_file", DiskFailsAt(1, code))
    (tmp_path / "old.json").write_text("{}")
    with pytest.raises(OSError) as info:
        files.atomic_write_json(tmp_path / "old.json", {"new": 1})
    assert info.value.errno == code and info.value.filename == str(tmp_path / "old.json")
    assert (tmp_path / "old.json").read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["old.json"]


def test_training_survives_a_refused_write_at_every_write(tmp_path, synthetic_store, monkeypatch, capsys):
    """``train-tokenizer``: a refused write of each checkpoint and of the model file stops the run with
    one line naming the file; re-running resumes from what was committed and ends with the final
    checkpoint of an undisturbed run, tensor for tensor. (Pictures and the state_dict copy go
    through the same write point as prepare's files, tested above; each training run costs seconds.)"""
    import torch

    from medvar_bundle.engines.common import latest_checkpoint

    def train(out) -> int:
        argv = ["train-tokenizer", "--store", str(synthetic_store), "--out", str(out), "--max-steps", "2"]
        return main([*argv, "--batch-size", "4", "--checkpoint-every", "1", "--val-every", "2", "--fp32", "--quiet"])

    def final(out) -> dict:
        return torch.load(latest_checkpoint(out / "checkpoints"), weights_only=True)

    counter = DiskFailsAt()
    monkeypatch.setattr(files, "_write_file", counter)
    assert train(tmp_path / "clean") == 0
    clean, writes = final(tmp_path / "clean"), counter.calls
    assert writes >= 6  # 2 checkpoints, tokenizer.pt, models/tokenizer.pt, 2 validation pictures
    names = [Path(p).name for p in counter.paths]
    targets = [name.split(".")[1] for name in names]  # ".checkpoint_1.pt.<random>.tmp" -> "checkpoint_1"
    checkpoints = [targets.index(t) + 1 for t in ("checkpoint_1", "checkpoint_2", "tokenizer")]  # first writes
    for k in checkpoints:
        out, code = tmp_path / f"k{k}", (errno.ENOSPC, errno.EIO)[k % 2]
        monkeypatch.setattr(files, "_write_file", DiskFailsAt(k, code))
        assert train(out) == 1, k
        line = one_error_line(capsys, code)
        assert str(out) in line and not list(out.rglob("*.tmp")), (k, line)
        monkeypatch.setattr(files, "_write_file", REAL_WRITE)
        assert train(out) == 0, k
        capsys.readouterr()
        resumed = final(out)
        assert resumed["trainer"]["iteration"] == 2 and (out / "tokenizer.pt").is_file(), k
        assert all(torch.equal(v, clean["network"][name]) for name, v in resumed["network"].items()), k
        moments = [(s["exp_avg"], s["exp_avg_sq"]) for s in resumed["optimizer"]["state"].values()]
        expected = [(s["exp_avg"], s["exp_avg_sq"]) for s in clean["optimizer"]["state"].values()]
        assert all(torch.equal(a, b) for m, e in zip(moments, expected) for a, b in zip(m, e)), k
        shutil.rmtree(out)

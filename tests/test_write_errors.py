"""Full disks and I/O errors: a refused write at the k-th write, for every k of a small run, stops the
command with one line naming the file and the cause (exit 1), keeps what was committed, and the
re-run finishes with exactly what a run without the error writes."""

from __future__ import annotations

import errno
import json
import os
import shutil

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
        self.k, self.code, self.calls = k, code, 0

    def __call__(self, path, payload) -> None:
        self.calls += 1
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

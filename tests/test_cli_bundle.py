"""The command line and the MONAI bundle face: --help everywhere, metadata schema, configs run."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medvar_bundle import bundle_config
from medvar_bundle.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(__file__).parent / "data" / "meta_schema_20240725.json"


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: medvar " + command in capsys.readouterr().out


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "medvar_bundle.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "prepare" in out.stdout


def test_metadata_is_valid_against_monai_schema():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_metadata",
            "--meta_file",
            str(ROOT / "configs" / "metadata.json"),
            "--filepath",
            str(SCHEMA),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "metadata is verified with no error" in out.stdout + out.stderr


def test_bundle_prepare_config_and_cli_write_the_same_store(tmp_path):
    rng = np.random.default_rng(0)
    vol = np.full((40, 40, 6), -1000, np.int16)
    vol[8:32, 10:30, :] = rng.integers(-50, 150, size=(24, 20, 6))
    nib.save(nib.Nifti1Image(vol, np.diag([0.7, 0.7, 2.0, 1.0])), tmp_path / "ct.nii.gz")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "ct.nii.gz", "dataset": "toy", "modality": "CT"}]}))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str(ROOT / "configs" / "prepare.yaml"),
            "--meta_file",
            str(ROOT / "configs" / "metadata.json"),
            "--logging_file",
            str(ROOT / "configs" / "logging.conf"),
            "--datalist",
            str(datalist),
            "--output_dir",
            str(tmp_path / "bundle_store"),
            "--size",
            "64",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        main(["prepare", "--datalist", str(datalist), "--out", str(tmp_path / "cli_store"), "--size", "64", "--quiet"])
        == 0
    )
    a = np.load(next((tmp_path / "bundle_store" / "shards").glob("*.images.npy")))
    b = np.load(next((tmp_path / "cli_store" / "shards").glob("*.images.npy")))
    assert a.shape == (6, 64, 64)
    np.testing.assert_array_equal(a, b)


def test_a_package_away_from_its_bundle_still_helps_and_says_why_it_cannot_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bundle_config, "CONFIGS", tmp_path / "nowhere" / "configs")
    with pytest.raises(SystemExit) as exc:
        main(["train-tokenizer", "--help"])
    assert exc.value.code == 0 and "default from configs/train_tokenizer.yaml" in capsys.readouterr().out
    assert main(["train-tokenizer", "--store", "s", "--out", "o"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "MEDVAR_BUNDLE_ROOT" in lines[0] and "nowhere" in lines[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "m.pt", "--out", "o", "--device", "gpu"], "not a device: 'gpu' (cpu, cuda or cuda:N)"),
        (["bench", "--device", "tpu"], "not a device: 'tpu'"),
        (["evaluate-tokenizer", "--tokenizer", "t.pt", "--store", "s", "--batch-size", "0"], "must be a positive"),
        (["evaluate-tokenizer", "--tokenizer", "t.pt", "--store", "s", "--max-images", "-1"], "must be a positive"),
        (["tokenize", "--tokenizer", "t.pt", "--store", "s", "--batch-size", "0"], "must be a positive"),
        (["preview", "--store", "s", "--out", "p.png", "--per-dataset", "0"], "must be a positive"),
        (["generate", "--model", "m.pt", "--out", "o", "--fp32", "--bf16"], "not allowed with argument --fp32"),
    ],
)
def test_bad_option_values_stop_at_parsing_with_one_line(argv, message, capsys):
    """Checked by argparse before anything runs (they once ended in tracebacks from torch or numpy)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_the_store_preview_draws_each_dataset_in_its_proportions(synthetic_store, tmp_path, monkeypatch):
    """The preview drew every dataset on square pixels: a 48 × 24 mm field was twice too tall."""
    import shutil

    from medvar_bundle import visualize

    store = shutil.copytree(synthetic_store, tmp_path / "store")
    registry = json.loads((store / "datasets.json").read_text())
    registry["set0"] |= {"spacing": [1.0, 1.0, 3.0], "matrix": [48, 24, 8]}
    (store / "datasets.json").write_text(json.dumps(registry))
    drawn, original = [], visualize.save_grid

    def spy(rows, out, row_titles=None, title=None, aspect=1.0):
        drawn.append(aspect)
        return original(rows, out, row_titles, title, aspect)

    monkeypatch.setattr(visualize, "save_grid", spy)
    assert main(["preview", "--store", str(store), "--out", str(tmp_path / "p.png")]) == 0
    assert drawn == [pytest.approx([0.5, 1.0])]


def test_preview_output_problems_are_one_line(synthetic_store, tmp_path, capsys):
    assert main(["preview", "--store", str(synthetic_store), "--out", str(tmp_path / "p.txt")]) == 2
    assert "the preview is a PNG file" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert main(["preview", "--store", str(synthetic_store), "--out", str(tmp_path / "afile" / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write {tmp_path / 'afile' / 'p.png'}" in err
    assert main(["preview", "--store", str(synthetic_store), "--out", str(tmp_path / "p.png")]) == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["prepare", "--datalist", "d.json"],
        ["train-tokenizer", "--store", "s"],
        ["train", "--store", "s"],
        ["train-baseline", "--store", "s"],
        ["train-structure", "--store", "s"],
        ["evaluate", "--real", "s", "--fake", "f"],
    ],
)
def test_an_out_under_a_file_is_one_line_before_any_work(argv, tmp_path, capsys, monkeypatch):
    """It was a NotADirectoryError traceback once TensorBoard or the store writer made the folder
    (train-structure: once the trained network was saved)."""
    from medvar_bundle import cli

    monkeypatch.setattr(cli, "run_config", lambda *a, **k: pytest.fail("the config ran"))
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / ("structure.pt" if argv[0] == "train-structure" else "run")
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medvar {argv[0]}: error: output folder {out.parent if argv[0] == 'train-structure' else out} "
                   f"is not writable: {tmp_path / 'file'} is a file"]  # fmt: skip


def test_an_out_in_a_read_only_folder_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """A folder of mode 0o555 under the output: one line naming it, nothing created. The tests run
    as root, whom the mode does not stop, so ``os.access`` answers for that folder as it would
    for anyone else."""
    import os

    from medvar_bundle import cli

    monkeypatch.setattr(cli, "run_config", lambda *a, **k: pytest.fail("the config ran"))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and access(path, mode))
    out = locked / "new" / "run"
    assert main(["train", "--store", "s", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medvar train: error: output folder {out} is not writable: {locked} is read-only"]
    assert not any(locked.iterdir())

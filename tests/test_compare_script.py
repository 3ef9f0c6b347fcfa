"""scripts/compare.py: MedVAR's samples cut to the DDPM's count keep their first slices exactly."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

from medvar_bundle.io import read_generated, write_slice_stack

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compare.py"
CHEST = {"id": 0, "modality": "CT", "spacing": [0.7, 0.7, 2.5], "matrix": [512, 512, 133], "ct_window": [-400, 1500]}
LEG = {"id": 1, "modality": "MR", "spacing": [1.95, 1.95, 2.0], "matrix": [256, 104, 150], "ct_window": None}
REGISTRY = {"chest_ct": CHEST, "leg_mr": LEG}


@pytest.fixture(scope="module")
def compare():
    return load_script("compare")


def test_help():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--ddpm-num" in out.stdout and "medvar-first" in out.stdout and "--cfg" in out.stdout
    assert "--temperature" in out.stdout and "--final-temperature" in out.stdout


def test_medvar_samples_are_kept_only_under_the_same_guidance_and_temperatures(
    compare, model_path, tmp_path, monkeypatch
):
    args = argparse.Namespace(num=2, seed=0, device="cpu", cfg=4.0, temperature=0.8, final_temperature=0.2)
    folder = compare.sample_medvar(model_path, tmp_path / "medvar", args)
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["cfg"], summary["temperature"], summary["final_temperature"]) == (4.0, 0.8, 0.2)
    drawn = []
    monkeypatch.setattr(
        compare,
        "generate",
        lambda *args, **kwargs: drawn.append((kwargs["cfg"], kwargs["temperature"], kwargs["final_temperature"])),
    )
    compare.sample_medvar(model_path, folder, args)
    assert drawn == []
    for change in ({"cfg": 1.0}, {"temperature": 1.0}, {"final_temperature": None}, {"num": 3}, {"seed": 1}):
        compare.sample_medvar(model_path, folder, argparse.Namespace(**{**vars(args), **change}))
    assert drawn == [(1.0, 0.8, 0.2), (4.0, 1.0, 0.2), (4.0, 0.8, None), (4.0, 0.8, 0.2), (4.0, 0.8, 0.2)]


def test_a_folder_keeps_the_training_options_of_its_run(compare, tmp_path):
    """A re-run resumes the folder's models: another seed (or step cap, or DDPM rate) is refused
    with one line instead of reporting the old seed's models as the new seed's."""
    args = argparse.Namespace(seed=0, max_steps=100, ddpm_lr=1e-3)
    compare.check_run(args, tmp_path)
    compare.check_run(args, tmp_path)  # the same options resume
    assert json.loads((tmp_path / "run.json").read_text()) == {"seed": 0, "max_steps": 100, "ddpm_lr": 1e-3}
    with pytest.raises(SystemExit, match="holds a run with --seed 0, not 1: give another --out"):
        compare.check_run(argparse.Namespace(**{**vars(args), "seed": 1}), tmp_path)


def test_ddpm_samples_are_drawn_again_under_other_options(compare, tmp_path, monkeypatch):
    samples = tmp_path / "samples"
    drawn = []

    def fake_sample(baseline, steps, num, folder, args):
        drawn.append((steps, num, args.ddpm_cfg))
        summary = {"parameters": 1, "seconds": 1.0, "num": num, "seed": args.seed, "cfg": args.ddpm_cfg,
                   "sampler": args.ddpm_sampler}  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(compare, "sample_ddpm", fake_sample)
    args = argparse.Namespace(ddpm_steps=[10], ddpm_num=2, seed=0, ddpm_cfg=2.0, ddpm_sampler="ddpm", ddpm_minutes=10)
    compare.sample_ddpm_all(tmp_path / "ddpm.pt", samples, args)
    compare.sample_ddpm_all(tmp_path / "ddpm.pt", samples, args)
    for change in ({"ddpm_num": 4}, {"ddpm_cfg": 1.0}):
        compare.sample_ddpm_all(tmp_path / "ddpm.pt", samples, argparse.Namespace(**{**vars(args), **change}))
    assert drawn == [(10, 2, 2.0), (10, 4, 2.0), (10, 2, 1.0)]


def test_first_slices_keeps_the_first_num_slices_of_every_stack(compare, tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "medvar"
    stacks = {name: rng.integers(0, 256, (5, 32, 32), dtype=np.uint8) for name in REGISTRY}
    for name, stack in stacks.items():
        write_slice_stack(stack, REGISTRY[name], source / f"{name}.nii.gz")
    (source / "summary.json").write_text(json.dumps({"parameters": 7, "datasets": {}}))
    out = compare.first_slices(source, 2, tmp_path / "first", REGISTRY)
    for name, stack in stacks.items():
        np.testing.assert_array_equal(read_generated(out / f"{name}.nii.gz", REGISTRY[name]), stack[:2])
    assert json.loads((out / "summary.json").read_text())["parameters"] == 7
    resampled = {name: stack[::-1].copy() for name, stack in stacks.items()}  # the source drawn again (another cfg)
    for name, stack in resampled.items():
        write_slice_stack(stack, REGISTRY[name], source / f"{name}.nii.gz")
    (source / "summary.json").write_text(json.dumps({"parameters": 7, "cfg": 1.0, "datasets": {}}))
    compare.first_slices(source, 2, out, REGISTRY)
    for name, stack in resampled.items():
        np.testing.assert_array_equal(read_generated(out / f"{name}.nii.gz", REGISTRY[name]), stack[:2])
    compare.first_slices(source, 3, out, REGISTRY)  # another --ddpm-num: cut again
    for name, stack in resampled.items():
        np.testing.assert_array_equal(read_generated(out / f"{name}.nii.gz", REGISTRY[name]), stack[:3])


def test_grid_shows_the_ddpm_chain_with_the_most_steps(compare, tmp_path):
    # sample_ddpm_all returns the largest step count first, then the others from the smallest up
    ddpm = [tmp_path / "samples" / "30min" / f"ddpm-{steps}" for steps in (100, 10, 20, 30, 50)]
    columns = compare.grid_columns(tmp_path, [5.0, 15.0, 30.0], ddpm)
    assert [title for title, _ in columns] == ["MedVAR 5 min", "MedVAR 15 min", "MedVAR 30 min", "DDPM-100 30 min"]
    assert columns[0][1] == tmp_path / "samples" / "5min" / "medvar" and columns[-1][1] == ddpm[0]
    assert [title for title, _ in compare.grid_columns(tmp_path, [5.0], [])] == ["MedVAR 5 min"]


def test_the_curve_grid_draws_each_dataset_in_its_proportions_and_leaves_missing_slices_empty(
    compare, tmp_path, monkeypatch
):
    """The README's grid drew the 500 × 203 mm lower-leg field square (2.46 times too tall), a
    dataset with one held-out slice showed a black square as its second real slice, and a dataset
    without held-out slices stopped the grid (store_slices raised)."""
    import medvar_bundle.metrics.slices as slices_module
    import medvar_bundle.visualize as visualize

    held = {"chest_ct": np.full((1, 8, 8), 50, np.uint8), "leg_mr": np.full((2, 8, 8), 90, np.uint8), "head": None}
    monkeypatch.setattr(slices_module, "split_slices", lambda store, split, name, n, seed: held[name])
    registry = REGISTRY | {"head": CHEST | {"id": 2}}
    folder = tmp_path / "medvar"
    write_slice_stack(np.full((3, 8, 8), 200, np.uint8), LEG, folder / "leg_mr.nii.gz")
    drawn = {}

    def spy(rows, out, row_titles=None, title=None, aspect=1.0):
        drawn.update(rows=rows, titles=row_titles, aspect=aspect)
        return Path(out)

    monkeypatch.setattr(visualize, "save_grid", spy)
    compare.curve_grid("store", registry, [("MedVAR 30 min", folder)], tmp_path / "grid.png")
    assert drawn["titles"] == ["chest_ct", "leg_mr", "head"]
    assert drawn["aspect"] == pytest.approx([1.0, 104 / 256, 1.0])  # rows run along y: 203 mm over 500 mm
    chest, leg, head = drawn["rows"]
    assert head == [None] * 4
    assert (chest[0] == 50).all() and chest[1:] == [None, None, None]  # one held-out slice, no chest samples
    assert all(cell is not None for cell in leg) and (leg[1] == 90).all() and leg[2].shape == (8, 8)

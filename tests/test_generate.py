"""Generation from a self-contained model file: NIfTI geometry, seeds, and bad requests."""

from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REGISTRY

from medvar_bundle.inference import generate
from medvar_bundle.model_file import MODEL_FILE, ModelMismatchError, load_model, save_model
from medvar_bundle.networks import MultiScaleVQVAE
from medvar_bundle.networks.transformer import NextScaleTransformer


def test_model_file_is_self_contained(model_path):
    model = load_model(model_path)
    assert model.datasets == REGISTRY and model.step == 3
    assert model.tokenizer.patch_nums == model.transformer.patch_nums == (1, 2, 3, 4)
    assert not model.transformer.training and not model.tokenizer.training


def test_generate_writes_spaced_nifti_stacks(model_path, tmp_path):
    summary = generate(
        model_path, None, num=5, out_dir=tmp_path, batch_size=2, seed=1, progress=False, progression=True
    )
    assert set(summary["datasets"]) == {"abdomen_ct", "brain_mr"}
    ct = nib.load(tmp_path / "abdomen_ct.nii.gz")
    assert ct.shape == (64, 64, 5) and ct.get_data_dtype() == np.int16
    # in-plane: the median field of view over 64 pixels; through-plane: the median slice spacing
    assert np.allclose(ct.header.get_zooms(), (0.8 * 512 / 64, 0.75 * 480 / 64, 5.0))
    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    hu = np.asarray(ct.dataobj)
    # every value is one of the window's 256 levels in integer HU: round(-160 + k · 400 / 255)
    levels = np.rint(-160.0 + np.arange(256) * 400.0 / 255.0)
    assert np.isin(hu, levels).all() and len(np.unique(hu)) > 10
    mr = nib.load(tmp_path / "brain_mr.nii.gz")
    assert mr.get_data_dtype() == np.uint8 and np.allclose(mr.header.get_zooms(), (3.0, 4.0, 1.5))
    for name in ("abdomen_ct.png", "brain_mr.png", "brain_mr_progression.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["seed"] == 1


def test_resample_original_restores_the_median_matrix(model_path, tmp_path):
    generate(model_path, "brain_mr", num=2, out_dir=tmp_path, resample_original=True, progress=False)
    mr = nib.load(tmp_path / "brain_mr.nii.gz")
    assert mr.shape == (192, 256, 2) and np.allclose(mr.header.get_zooms(), (1.0, 1.0, 1.5))


def test_a_slice_depends_only_on_the_seed_its_dataset_and_its_number(model_path, tmp_path):
    """brain_mr alone, in batches of 3, against brain_mr second after abdomen_ct, in batches of 2, with
    more slices: the same first 3 slices. Another seed: other slices; and the slices of one request
    differ from each other (each has its own generator)."""
    generate(model_path, ["brain_mr"], num=3, out_dir=tmp_path / "a", seed=5, batch_size=3, progress=False)
    generate(model_path, ["abdomen_ct", "brain_mr"], num=5, out_dir=tmp_path / "b", seed=5, batch_size=2,
             progress=False)  # fmt: skip
    generate(model_path, ["brain_mr"], num=3, out_dir=tmp_path / "c", seed=6, batch_size=3, progress=False)
    a, b, c = (np.asarray(nib.load(tmp_path / x / "brain_mr.nii.gz").dataobj) for x in "abc")
    assert np.array_equal(a, b[..., :3])
    assert not any(np.array_equal(a[..., i], c[..., i]) for i in range(3))
    assert not np.array_equal(a[..., 0], a[..., 1])


def test_seconds_per_image_leave_out_the_first_call(model_path, tmp_path, monkeypatch):
    """A sampler whose first call in the process costs 3 s more (as kernel selection and memory
    pools do): the warm-up batch absorbs it, the timed batch does not see it, and the slices are
    those of a run without warm-up. (3 s, 1.5 s per image of the 2, stands well clear of what a
    batch itself takes on a loaded 2-core machine: 0.43 s per image was measured there.)"""
    from medvar_bundle.sampling.medvar import NextScaleInferer

    calls, sample = [], NextScaleInferer.__call__

    def cold_first_call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(3.0)
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(NextScaleInferer, "__call__", cold_first_call)
    summary = generate(model_path, "brain_mr", num=2, out_dir=tmp_path / "warm", batch_size=2, progress=False)
    assert len(calls) == 2 and summary["warmup"] is True
    assert summary["datasets"]["brain_mr"]["seconds_per_image"] < 1.0
    calls.clear()
    cold = generate(
        model_path, "brain_mr", num=2, out_dir=tmp_path / "cold", batch_size=2, progress=False, warmup=False
    )
    assert len(calls) == 1 and cold["datasets"]["brain_mr"]["seconds_per_image"] >= 1.5
    warm, cold = (np.asarray(nib.load(tmp_path / x / "brain_mr.nii.gz").dataobj) for x in ("warm", "cold"))
    assert np.array_equal(warm, cold)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(datasets="liver"), "unknown dataset 'liver'; this model knows: abdomen_ct, brain_mr"),
        (dict(num=0), "num_samples must be a positive number"),
        (dict(cfg=-0.5), "cfg must be >= 0"),
        (dict(top_p=0.0), "top-p must be in"),
        (dict(top_k=0), "top-k must be an integer >= 1"),
    ],
)
def test_bad_requests_fail_before_any_output(model_path, tmp_path, kwargs, message):
    args = dict(datasets="brain_mr", num=2, out_dir=tmp_path / "out", progress=False) | kwargs
    with pytest.raises(ValueError) as err:
        generate(model_path, **args)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_dataset_without_geometry_fails_before_any_output_naming_it(tmp_path):
    """A dataset whose volumes all failed in prepare has no spacing or matrix: it was found after the
    other datasets' slices had been written, by a message that did not name it."""
    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE.from_preset("tiny", image_size=64)
    transformer = NextScaleTransformer(num_datasets=2, depth=1, patch_nums=tokenizer.patch_nums)
    registry = {**REGISTRY, "abdomen_ct": {**REGISTRY["abdomen_ct"], "spacing": None, "matrix": None}}
    model = save_model(tmp_path / MODEL_FILE, tokenizer, transformer, registry, step=3)
    with pytest.raises(ValueError) as err:
        generate(model, ["brain_mr", "abdomen_ct"], num=1, out_dir=tmp_path / "out", progress=False)
    assert str(err.value).startswith("dataset 'abdomen_ct' cannot be written: ") and "spacing" in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unwritable_output_is_found_before_sampling(model_path, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="not writable"):
        generate(model_path, "brain_mr", num=1, out_dir=blocker / "out", progress=False)


def test_cli_unwritable_output_is_one_line_before_the_model_loads(model_path, tmp_path, capsys, monkeypatch):
    """It was found by the engine after the warm-up batch, and printed twice (Ignite's ERROR log too)."""
    from medvar_bundle import cli

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(cli, "_run_bundle", lambda *a, **k: pytest.fail("the bundle ran"))
    assert cli.main(["generate", "--model", str(model_path), "--out", str(blocker), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"medvar generate: error: output folder {blocker} is not writable: File exists"


def test_mismatched_tokenizer_and_transformer_are_refused(tmp_path):
    tokenizer = MultiScaleVQVAE.from_preset("tiny", image_size=64)
    transformer = NextScaleTransformer(num_datasets=2, depth=1, patch_nums=tokenizer.patch_nums, vocab_size=1024)
    with pytest.raises(ModelMismatchError, match="tokenizer vocab_size=4096, transformer vocab_size=1024"):
        save_model(tmp_path / MODEL_FILE, tokenizer, transformer, REGISTRY)
    good = NextScaleTransformer(num_datasets=3, depth=1, patch_nums=tokenizer.patch_nums)
    with pytest.raises(ModelMismatchError, match=r"registry ids \[0, 1\] do not match the transformer's 3"):
        save_model(tmp_path / MODEL_FILE, tokenizer, good, REGISTRY)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset", "liver"], "unknown dataset 'liver'; this model knows: abdomen_ct, brain_mr"),
        (["--num", "-3"], "num_samples must be a positive number of slices, got -3"),
        (["--cfg", "-1"], "cfg must be >= 0, got -1.0"),
        (["--top-k", "0"], "top-k must be an integer >= 1, got 0"),
        (["--top-p", "1.5"], "top-p must be in (0, 1], got 1.5"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(model_path, tmp_path, capsys, extra, message):
    from medvar_bundle.cli import main

    assert main(["generate", "--model", str(model_path), "--out", str(tmp_path / "out"), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"medvar generate: error: {message}"


def test_cli_generate_and_truncated_model_file(model_path, tmp_path, capsys):
    from medvar_bundle.cli import main

    assert (
        main(
            [
                "generate",
                "--model",
                str(model_path),
                "--dataset",
                "abdomen_ct",
                "--num",
                "2",
                "--out",
                str(tmp_path),
                "--quiet",
            ]
        )
        == 0
    )
    assert "abdomen_ct: 2 slices" in capsys.readouterr().out
    assert nib.load(tmp_path / "abdomen_ct.nii.gz").shape == (64, 64, 2)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(model_path.read_bytes()[:1000])
    assert main(["generate", "--model", str(broken), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medvar generate: error: {broken}: not a readable MedVAR model file") and "\n" not in err

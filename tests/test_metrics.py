"""Evaluation metrics: closed forms of the distances, weight-free metrics, and the extractor
loading path with random weights saved here (no pretrained file is needed or downloaded)."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from medvar_bundle.data.store import SliceStore
from medvar_bundle.metrics import (
    cmmd,
    efficiency,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    histogram_distance,
    kid,
    load_clip,
    load_inception,
    load_radimagenet,
    memorisation_ratio,
    ms_ssim_diversity,
    power_spectrum_distance,
    real_vs_real_floor,
)
from medvar_bundle.metrics.backbones import ClipVisionTransformer, KerasResNet50, fid_inception_v3
from medvar_bundle.weights import MissingWeightsError


def smooth_slices(rng: np.random.Generator, n: int, size: int = 64) -> np.ndarray:
    """Independent smooth random uint8 slices ``(n, size, size)``."""
    noise = gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 3, 3))
    return np.clip(128 + noise / noise.std() * 40, 0, 255).astype(np.uint8)


# --- distances -----------------------------------------------------------------------------


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(500, 32))
    assert frechet_distance_from_features(features, features) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_feature_statistics_shapes_and_refusals():
    mu, sigma = feature_statistics(np.ones((3, 5)))
    assert mu.shape == (5,) and sigma.shape == (5, 5)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.ones((1, 5)))


def test_kid_is_near_zero_for_one_distribution_and_larger_for_two():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    same, same_std = kid(a, b, subsets=20, subset_size=100)
    shifted, _ = kid(a, b + 0.5, subsets=20, subset_size=100)
    assert same_std > 0
    assert abs(same) < 0.05 * shifted
    assert kid(a, b, subsets=5, subset_size=50, seed=3) == kid(a, b, subsets=5, subset_size=50, seed=3)


def test_kid_shrinks_the_subset_size_with_a_warning():
    rng = np.random.default_rng(4)
    with pytest.warns(UserWarning, match="subset_size 1000 exceeds the smaller feature set \\(40 rows\\)") as record:
        kid(rng.normal(size=(40, 8)), rng.normal(size=(60, 8)), subsets=3)
    assert len(record) == 1


def test_cmmd_is_zero_for_identical_sets_and_positive_for_shifted_ones():
    emb = np.random.default_rng(5).normal(size=(64, 32))
    assert cmmd(emb, emb) == pytest.approx(0.0, abs=1e-9)
    assert cmmd(emb, emb * 3.0) == pytest.approx(0.0, abs=1e-9)  # l2-normalised first
    assert cmmd(emb, emb + 1.0) > 0.1


def test_cmmd_math_matches_a_direct_evaluation():
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(5, 4)), rng.normal(size=(6, 4))
    xn, yn = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)

    def k(a, b):
        return np.mean([[math.exp(-np.sum((p - q) ** 2) / 200) for q in b] for p in a])

    assert cmmd(x, y) == pytest.approx(1000 * (k(xn, xn) + k(yn, yn) - 2 * k(xn, yn)), rel=1e-9)


def test_kid_matches_the_unbiased_estimator_evaluated_directly():
    rng = np.random.default_rng(12)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    xx = np.mean([k(x[i], x[j]) for i in range(6) for j in range(6) if i != j])
    yy = np.mean([k(y[i], y[j]) for i in range(6) for j in range(6) if i != j])
    xy = np.mean([k(p, q) for p in x for q in y])
    mean, std = kid(x, y, subsets=1, subset_size=6)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-9) and std == 0.0


def test_efficiency_formula_and_the_papers_table():
    assert efficiency(10.0, 9.0) == pytest.approx(10.0)  # log10(1 + 9) = 1
    assert efficiency(10.0, 99.0, gamma=1.0) == pytest.approx(20.0)
    assert efficiency(10.11, 0.13) == pytest.approx(7.54, abs=0.01)  # Table 1, MedVAR-d24
    assert efficiency(11.63, 1.55) == pytest.approx(10.63, abs=0.01)  # Table 1, DDPM-S(100)
    with pytest.raises(ValueError):
        efficiency(10.0, 0.0)


# --- weight-free metrics ---------------------------------------------------------------------


def test_ms_ssim_diversity_identical_vs_noise():
    rng = np.random.default_rng(6)
    noise = rng.integers(0, 256, size=(3, 256, 256), dtype=np.uint8)
    copies = np.repeat(noise[:1], 3, axis=0)
    assert ms_ssim_diversity(copies, pairs=4) == pytest.approx(1.0, abs=1e-4)
    assert ms_ssim_diversity(noise, pairs=4) < 0.2


def test_histogram_distance_is_zero_for_identical_sets_and_the_shift_for_a_shifted_one():
    real = np.random.default_rng(7).integers(0, 200, size=(4, 32, 32), dtype=np.uint8)
    assert histogram_distance(real, real) == 0.0
    assert histogram_distance(real, real + 10) == pytest.approx(10.0)


def test_power_spectrum_distance_sees_blur():
    real = np.random.default_rng(8).integers(0, 256, size=(4, 64, 64), dtype=np.uint8)
    blurred = gaussian_filter(real.astype(float), sigma=(0, 1.5, 1.5)).round().astype(np.uint8)
    assert power_spectrum_distance(real, real) == 0.0
    assert power_spectrum_distance(real, blurred) > 0.5


def test_memorisation_ratio_flags_copies():
    rng = np.random.default_rng(9)
    train, heldout, fresh = smooth_slices(rng, 60), smooth_slices(rng, 60), smooth_slices(rng, 60)
    assert memorisation_ratio(train[:30], train, heldout) < 0.05
    assert memorisation_ratio(fresh, train, heldout) == pytest.approx(1.0, abs=0.2)
    features = rng.normal(size=(3, 20, 8))
    assert memorisation_ratio(features[1][:5], features[1], features[2]) == 0.0


def test_real_vs_real_floor_compares_training_and_heldout_slices(synthetic_store):
    floor = real_vs_real_floor(histogram_distance, synthetic_store, "set0")
    train, heldout = (
        np.stack([item["image"].numpy() for item in SliceStore(synthetic_store, split=split, datasets=["set0"])])
        for split in ("training", "validation")
    )
    assert floor == pytest.approx(histogram_distance(train, heldout))
    sizes = real_vs_real_floor(lambda a, b: (len(a), len(b)), synthetic_store, "set0", max_slices=3)
    assert sizes == (3, 3)


# --- feature extractors: real loading path, random weights -----------------------------------


def tiny_clip() -> ClipVisionTransformer:
    return ClipVisionTransformer(image_size=28, patch_size=14, width=64, layers=2, heads=1, embed_dim=32)


@pytest.mark.parametrize(
    "load, build, dim",
    [(load_inception, fid_inception_v3, 2048), (load_radimagenet, KerasResNet50, 2048), (load_clip, tiny_clip, 32)],
    ids=["inception", "radimagenet", "clip"],
)
def test_extractor_loads_a_configured_file(tmp_path, offline_hub, load, build, dim):
    torch.manual_seed(0)
    network = build()
    path = tmp_path / "weights.pth"
    torch.save(network.state_dict(), path)
    extractor = load(path)
    slices = np.random.default_rng(10).integers(0, 256, size=(3, 256, 256), dtype=np.uint8)
    features = extractor.extract(slices, batch_size=2)
    assert features.shape == (3, dim) and features.dtype == np.float64 and np.isfinite(features).all()
    assert not any(p.requires_grad for p in extractor.parameters())
    loaded = dict(extractor.network.state_dict())
    for name, tensor in list(network.state_dict().items())[:5]:
        torch.testing.assert_close(loaded[name], tensor)


@pytest.mark.filterwarnings("ignore")  # torch.jit's deprecation and tracer notices
def test_clip_loads_openai_torchscript_from_the_hub_cache(offline_hub):
    """OpenAI's file is a TorchScript archive of the whole model; the tower is ``visual``."""

    class Clip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = tiny_clip()
            self.logit_scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.visual(x) * self.logit_scale

    torch.manual_seed(0)
    model = Clip().eval()
    offline_hub.mkdir(parents=True)
    torch.jit.trace(model, torch.randn(1, 3, 28, 28)).save(str(offline_hub / "ViT-L-14-336px.pt"))
    extractor = load_clip()
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(extractor(x), model.visual((x.expand(-1, 3, -1, -1) - extractor.mean) / extractor.std))


@pytest.mark.parametrize(
    "load, filename, option",
    [
        (load_inception, "pt_inception-2015-12-05-6726825d.pth", "--inception-weights"),
        (load_radimagenet, "RadImageNet-ResNet50_notop.pth", "--radimagenet-weights"),
        (load_clip, "ViT-L-14-336px.pt", "--clip-weights"),
    ],
    ids=["inception", "radimagenet", "clip"],
)
def test_offline_extractor_fails_with_one_line_naming_the_file(offline_hub, load, filename, option):
    with pytest.raises(MissingWeightsError) as exc:
        load()
    msg = str(exc.value)
    assert "\n" not in msg
    assert filename in msg and str(offline_hub) in msg and option in msg


def test_wrong_state_dict_is_refused(tmp_path, offline_hub):
    path = tmp_path / "wrong.pth"
    torch.save({"foo": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a RadFID feature extractor state dict"):
        load_radimagenet(path)
    with pytest.raises(ValueError, match="not a CMMD feature extractor state dict"):
        load_clip(path)
    path.write_text("<html>quota exceeded</html>")
    with pytest.raises(ValueError, match="cannot read FID/KID feature extractor weights"):
        load_inception(path)

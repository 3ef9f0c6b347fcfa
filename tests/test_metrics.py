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
    radial_power_spectrum,
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


def test_feature_statistics_known_mean_and_unbiased_covariance_and_refusal():
    """Rows (1, 2), (3, 6), (5, 10): mean (3, 6); deviations (-2, -4), (0, 0), (2, 4), so the
    unbiased (N - 1 = 2) covariance is [[8, 16], [16, 32]] / 2 = [[4, 8], [8, 16]]; one feature
    column (D = 1) still gives a (1, 1) covariance."""
    mu, sigma = feature_statistics([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
    np.testing.assert_allclose(mu, [3.0, 6.0], rtol=1e-12)
    np.testing.assert_allclose(sigma, [[4.0, 8.0], [8.0, 16.0]], rtol=1e-12)
    mu, sigma = feature_statistics([[1.0], [3.0], [5.0]])
    np.testing.assert_allclose(mu, [3.0], rtol=1e-12)
    np.testing.assert_allclose(sigma, [[4.0]], rtol=1e-12)
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


def test_cmmd_is_zero_for_identical_sets_and_known_for_two_orthogonal_directions():
    """Identical (or rescaled) sets are at exactly 0 (V-statistic on l2-normalised rows). Two sets
    whose rows point along orthogonal unit vectors u and v, at any lengths, normalise to u and v,
    ||u - v||² = 2, so CMMD = 1000 · (1 + 1 - 2 exp(-2 / (2 · 10²)))."""
    emb = np.random.default_rng(5).normal(size=(64, 32))
    assert cmmd(emb, emb) == pytest.approx(0.0, abs=1e-9)
    assert cmmd(emb, emb * 3.0) == pytest.approx(0.0, abs=1e-9)  # l2-normalised first
    u, v = np.eye(4)[0], np.eye(4)[2]
    along_u, along_v = np.outer([1.0, 2.0, 5.0], u), np.outer([0.5, 3.0], v)
    assert cmmd(along_u, along_v) == pytest.approx(1000 * (2 - 2 * math.exp(-2 / 200)), rel=1e-9)


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
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-9) and std is None


def test_kid_has_no_std_where_every_subset_is_both_whole_sets():
    """Two sets of 30 with subsets of 30: every draw is both sets, so 100 rounds give one value,
    and a std of 0 would be a precision the estimate does not have. Sets of 30 and 31 vary."""
    rng = np.random.default_rng(13)
    x, y = rng.normal(size=(31, 4)), rng.normal(size=(30, 4))
    mean, std = kid(x[:30], y, subsets=100, subset_size=30)
    assert std is None
    assert mean == pytest.approx(kid(x[:30], y, subsets=1, subset_size=30)[0], rel=1e-12)
    assert kid(x, y, subsets=100, subset_size=30)[1] > 0


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


def test_ms_ssim_diversity_of_two_flat_slices_is_the_luminance_term():
    """Slices of levels 0 and 255 are 0 and 1 at data range 1: zero variance, so every contrast-
    structure term is C2 / C2 = 1 and MS-SSIM is the luminance term of the coarsest scale to its
    weight 0.1333, l = (2·0·1 + C1) / (0² + 1² + C1) with C1 = (0.01 · 1)². With two slices every
    pair is the two distinct ones, so the mean is that value."""
    flat = np.stack([np.zeros((256, 256), np.uint8), np.full((256, 256), 255, np.uint8)])
    c1 = 0.01**2
    assert ms_ssim_diversity(flat, pairs=4) == pytest.approx((c1 / (1 + c1)) ** 0.1333, abs=1e-4)


def test_ms_ssim_diversity_scores_each_distinct_pair_once():
    """Three slices, two of them identical flat 0 and one flat 255: the unordered pairs are one
    identical pair (MS-SSIM 1) and two 0-vs-255 pairs (the luminance term l^0.1333 of the test
    above), so the exact mean is (1 + 2·l^0.1333) / 3 — whatever ``pairs`` is, once it is ≥ 3.
    With ``pairs=1`` one of the three pairs is scored, so the result is one of the two values."""
    zero, full = np.zeros((256, 256), np.uint8), np.full((256, 256), 255, np.uint8)
    stack = np.stack([zero, zero, full])
    far = (0.01**2 / (1 + 0.01**2)) ** 0.1333
    for pairs in (3, 1000):
        assert ms_ssim_diversity(stack, pairs=pairs) == pytest.approx((1 + 2 * far) / 3, abs=1e-4)
    singles = {round(ms_ssim_diversity(stack, pairs=1, seed=seed), 4) for seed in range(8)}
    assert singles <= {1.0, round(far, 4)}


def test_ms_ssim_diversity_is_torchmetrics_value_on_either_convolution_backend():
    """The diversity filters with PyTorch's own convolution instead of oneDNN's (faster for the
    one-channel window): the value is torchmetrics' MS-SSIM computed the default way, averaged
    over the three pairs of three textured slices, and the backend setting is left as it was. Its
    fp32 sums cancel less exactly on flat slices: two uniform slices of levels 153 and 102 (0.6
    and 0.4) score the luminance term (2·0.6·0.4 + C1) / (0.6² + 0.4² + C1) to the weight 0.1333
    within 1e-3. The error is the variances' fp32 rounding (121 taps of about 0.36 each, eps 6e-8,
    against C2 = 9e-4) and the kernel's summation order differs between CPUs: 7e-5 on one Xeon,
    2.8e-4 on another. A wrong exponent or term would be off by far more (the luminance itself is
    0.92)."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    rng = np.random.default_rng(3)
    smooth = gaussian_filter(rng.normal(size=(3, 192, 192)), sigma=(0, 3, 3))
    slices = np.clip(128 + 400 * smooth, 0, 255).astype(np.uint8)
    unit = torch.from_numpy(slices).float().div(255).unsqueeze(1)
    first, second = [0, 0, 1], [1, 2, 2]
    expected = multiscale_structural_similarity_index_measure(
        unit[first], unit[second], data_range=1.0, reduction="none"
    ).mean()
    enabled = torch.backends.mkldnn.enabled
    assert 0.05 < float(expected) < 0.95
    assert ms_ssim_diversity(slices) == pytest.approx(float(expected), abs=1e-5)
    assert torch.backends.mkldnn.enabled == enabled
    flat = np.stack([np.full((192, 192), 153, np.uint8), np.full((192, 192), 102, np.uint8)])
    c1 = 0.01**2
    luminance = (2 * 0.6 * 0.4 + c1) / (0.6**2 + 0.4**2 + c1)
    assert ms_ssim_diversity(flat) == pytest.approx(luminance**0.1333, abs=1e-3)


def test_histogram_distance_is_the_wasserstein_1_distance_in_levels():
    """Known W1 distances in 8-bit levels: flat sets of levels 30 and 200 are 170 apart; a set
    brightened by 10 levels (no clipping) is 10 away; a flat set of level 20 (3 slices) and one slice
    half 0, half 100 are 0.5 · 20 + 0.5 · 80 = 50 apart, whatever the set sizes (histograms are
    distributions)."""

    def flat(level: int, n: int) -> np.ndarray:
        return np.full((n, 16, 16), level, np.uint8)

    assert histogram_distance(flat(30, 2), flat(200, 2)) == pytest.approx(170.0)
    real = np.random.default_rng(7).integers(0, 200, size=(4, 32, 32), dtype=np.uint8)
    assert histogram_distance(real, real + 10) == pytest.approx(10.0)
    halves = flat(0, 1)
    halves[:, :, 8:] = 100
    assert histogram_distance(flat(20, 3), halves) == pytest.approx(50.0)


def stripes(amplitude: int, n: int = 2, size: int = 64) -> np.ndarray:
    """``n`` slices of the cosine of S/4 cycles per slice along x, 128 + amplitude · cos(πx/2):
    columns 128 + a, 128, 128 - a, 128, ... (exact in uint8)."""
    row = 128 + amplitude * np.array([1, 0, -1, 0] * (size // 4))
    return np.broadcast_to(row.astype(np.uint8), (n, size, size)).copy()


def test_radial_power_spectrum_of_a_pure_cosine():
    """A cosine of amplitude A = 100/255 (in [0, 1] units) at S/4 cycles along x puts all its power,
    Σ|FFT|²/S² = S² · mean(x²) = S² A² / 2 (Parseval), on the two frequencies (0, ±S/4), which lie on
    the ring of radius S/4: the spectrum there is log10 of that over the ring's pixel count, and
    every other radius holds no power, i.e. the 1e-12 floor, -12 decades."""
    size = 64
    spectrum = radial_power_spectrum(stripes(100, size=size))
    freq = np.fft.fftfreq(size) * size
    ring_pixels = np.sum(np.rint(np.hypot(freq[:, None], freq[None, :])) == size // 4)
    expected = np.full(size // 2, -12.0)  # radii 1 .. S/2
    expected[size // 4 - 1] = math.log10(size**2 * (100 / 255) ** 2 / 2 / ring_pixels)
    np.testing.assert_allclose(spectrum, expected, atol=1e-9)


def test_power_spectrum_distance_sees_blur():
    """A circular 3-tap box blur along x multiplies a cosine of S/4 cycles by its transfer
    (1 + 2 cos(2π/4)) / 3 = 1/3: amplitude 99 becomes 33, the power at radius S/4 drops 9-fold and
    nothing else changes, so the distance is log10(9) decades at one radius of S/2 = 32. Adding a
    flat slice to a set of one stripe slice halves the set's mean power: log10(2) / 32."""
    sharp = stripes(99).astype(np.int64)
    blurred = ((np.roll(sharp, 1, axis=2) + sharp + np.roll(sharp, -1, axis=2)) // 3).astype(np.uint8)
    np.testing.assert_array_equal(blurred, stripes(33))
    assert power_spectrum_distance(stripes(99), blurred) == pytest.approx(math.log10(9) / 32, rel=1e-9)
    one_flat = np.concatenate([stripes(99, n=1), np.full((1, 64, 64), 128, np.uint8)])
    assert power_spectrum_distance(stripes(99, n=1), one_flat) == pytest.approx(math.log10(2) / 32, rel=1e-9)


def test_memorisation_ratio_of_copies_is_zero():
    """Copied training slices are at distance 0 from the training set, so the ratio is 0 (up to
    the float64 round-off of torch.cdist's ||a||² + ||b||² - 2a·b form on 4096-d points); in a
    feature space too."""
    rng = np.random.default_rng(9)
    train, heldout = smooth_slices(rng, 60), smooth_slices(rng, 60)
    assert memorisation_ratio(train[:30], train, heldout) == pytest.approx(0.0, abs=1e-6)
    features = rng.normal(size=(3, 20, 8))
    assert memorisation_ratio(features[1][:5], features[1], features[2]) == 0.0


def test_memorisation_ratio_is_the_ratio_of_median_nearest_training_distances():
    """Flat 128² slices, area-resized to 64², are points 64 · level / 255 apart. Training levels 0,
    100, 200; held-out 10, 120, 230 are 10, 20, 30 levels from their nearest training slice (median
    20); generated 95, 100, 150 are 5, 0, 50 levels away (median 5): ratio 5 / 20 = 0.25 (means
    would give 0.92; nearest held-out instead of training slices 1.25)."""

    def flat(*levels: int) -> np.ndarray:
        return np.stack([np.full((128, 128), level, np.uint8) for level in levels])

    ratio = memorisation_ratio(flat(95, 100, 150), flat(0, 100, 200), flat(10, 120, 230))
    assert ratio == pytest.approx(5 / 20, rel=1e-9)


def test_real_vs_real_floor_compares_training_and_heldout_slices(synthetic_store):
    """The metric is called as ``metric(real, fake)`` with the dataset's training slices first and
    its validation (held-out volume) slices second, in store order; ``max_slices`` keeps that many
    slices of each split."""
    train, heldout = (
        np.stack([item["image"].numpy() for item in SliceStore(synthetic_store, split=split, datasets=["set0"])])
        for split in ("training", "validation")
    )
    first, second = real_vs_real_floor(lambda a, b: (a, b), synthetic_store, "set0")
    np.testing.assert_array_equal(first, train)
    np.testing.assert_array_equal(second, heldout)
    first, second = real_vs_real_floor(lambda a, b: (a, b), synthetic_store, "set0", max_slices=3)
    assert len(first) == len(second) == 3
    assert all(any(np.array_equal(s, t) for t in train) for s in first)
    assert all(any(np.array_equal(s, t) for t in heldout) for s in second)


# --- feature extractors: real loading path, random weights -----------------------------------


def tiny_clip() -> ClipVisionTransformer:
    return ClipVisionTransformer(image_size=28, patch_size=14, width=64, layers=2, heads=1, embed_dim=32)


class InputProbe(torch.nn.Module):
    """Stands in for a network: per image, the channel means of its input and the input's side."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), torch.full((len(x), 1), float(x.shape[-1]))], dim=1)


@pytest.mark.parametrize(
    "load, build, dim, side, mean, std",
    [
        # pytorch-fid: bilinear 299², [0, 1] → [-1, 1]
        (load_inception, fid_inception_v3, 2048, 299, (0.5,) * 3, (0.5,) * 3),
        # RadFID (Keras "caffe", then /255): no resize, minus the ImageNet mean in BGR order, no std
        (load_radimagenet, KerasResNet50, 2048, 256, (0.406, 0.456, 0.485), (1.0,) * 3),
        # CLIP: resize to the tower's input (28² for the tiny tower), OpenAI's mean and std
        (load_clip, tiny_clip, 32, 28, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ],
    ids=["inception", "radimagenet", "clip"],
)
def test_extractor_loads_a_configured_file(tmp_path, offline_hub, load, build, dim, side, mean, std):
    """The saved weights load and give (N, D) float64 features; the network receives flat slices
    of levels 0 and 255 as (0 - mean) / std and (1 - mean) / std in every channel (grey replicated,
    /255, the published per-channel constants), at the documented input side (a resize of a flat
    image stays flat, up to float32 round-off)."""
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
    extractor.network = InputProbe()
    seen = extractor.extract(np.stack([np.zeros((256, 256), np.uint8), np.full((256, 256), 255, np.uint8)]))
    mean, std = np.array(mean), np.array(std)
    np.testing.assert_allclose(seen[:, :3], [(0 - mean) / std, (1 - mean) / std], atol=1e-6)
    assert seen[:, 3].tolist() == [side, side]


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

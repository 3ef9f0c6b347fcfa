"""What a tokenizer's held-out PSNR can be held against: two references that need no training.

Per anatomy × modality group of a store's held-out split (and over all its slices), PSNR (dB, on
[0, 1] intensities, mean over slices; a slice's PSNR is capped at 60 dB, where 8-bit rounding
already puts it, so that an exactly kept slice does not make a mean infinite) and SSIM of:

- ``jpeg2000``: each slice compressed by JPEG 2000 (Pillow's OpenJPEG, the lossy 9/7 wavelet) to
  the tokenizer's bit budget, ``tokens · log2(vocabulary)`` bits per slice (680 · 12 = 8,160 bits,
  1,020 bytes at 256²), header included: what a classical codec keeps at the same rate.
- ``pca``: every ``patch`` × ``patch`` patch replaced by its projection on the first ``components``
  principal components of the *training* slices' patches (16 × 16 patches and 32 components is the
  tiny tokenizer's latent shape, 16 × 16 × 32 at 256², unquantized): what a linear encoder and
  decoder keep before any quantization.
- with ``--tokenizer``, that tokenizer (bf16 where the CPU has it, as in training) twice: its
  decoder on the encoder's features (``unquantized``) and on the quantized f̂: where it loses, in
  the encoder and decoder or in the quantizer.

    python scripts/tokenizer_references.py --store runs/demo/store [--tokenizer runs/demo/tokenizer/tokenizer.pt]
"""

from __future__ import annotations

import argparse
import io
import math
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from medvar_bundle.data.store import SliceStore
from medvar_bundle.engines.tokenizer import slice_fidelity
from medvar_bundle.evaluation.report import markdown_table
from medvar_bundle.evaluation.scores import anatomy_groups
from medvar_bundle.metrics.slices import from_tiles, to_tiles
from medvar_bundle.model_file import load_tokenizer
from medvar_bundle.runtime import autocast, fast_bf16, model_input

PSNR_CAP = 60.0
"""dB; a slice kept exactly (PSNR infinite) counts as this."""


def jpeg2000_at_budget(image: np.ndarray, budget_bytes: int) -> tuple[np.ndarray, int]:
    """A uint8 slice ``(H, W)`` through JPEG 2000 at about ``budget_bytes`` (file size, header
    included; OpenJPEG lands within a few bytes of it): the decoded slice and the bytes used."""
    buffer = io.BytesIO()
    ratio = image.size / budget_bytes  # OpenJPEG's rate: uncompressed over compressed size
    Image.fromarray(image).save(
        buffer, format="JPEG2000", quality_mode="rates", quality_layers=[ratio], irreversible=True
    )
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue()))), buffer.tell()


def to_patches(images: np.ndarray, patch: int) -> np.ndarray:
    """Slices ``(N, S, S)`` -> patches as rows ``(N · (S/patch)², patch²)``, row-major over each slice."""
    return to_tiles(images, patch).reshape(-1, patch * patch)


def from_patches(patches: np.ndarray, size: int, patch: int) -> np.ndarray:
    """Inverse of :func:`to_patches`: ``(N · (S/patch)², patch²)`` -> ``(N, S, S)``."""
    return from_tiles(patches.reshape(-1, (size // patch) ** 2, patch, patch))


def pca_basis(training: np.ndarray, patch: int, components: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(patch²,)`` and the first ``components`` principal axes ``(components, patch²)`` of
    the patches of float slices ``(N, S, S)``."""
    rows = to_patches(training, patch)
    mean = rows.mean(0)
    _, _, axes = np.linalg.svd(rows - mean, full_matrices=False)
    return mean, axes[:components]


def pca_reconstruct(images: np.ndarray, mean: np.ndarray, axes: np.ndarray, patch: int) -> np.ndarray:
    """Float slices ``(N, S, S)`` projected patch by patch onto ``axes`` around ``mean``."""
    rows = to_patches(images, patch) - mean
    return from_patches(rows @ axes.T @ axes + mean, images.shape[-1], patch)


@torch.no_grad()
def tokenizer_reconstructions(model, images: np.ndarray, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """uint8 slices ``(N, S, S)`` through a tokenizer (:class:`MultiScaleVQVAE`, eval mode):
    ``{"unquantized": decoder(encoder(x)), "quantized": decoder(f̂)}``, each ``(N, S, S)`` in [0, 1]."""
    out: dict[str, list[torch.Tensor]] = {"unquantized": [], "quantized": []}
    with autocast("cpu", fast_bf16("cpu")):
        for start in tqdm(range(0, len(images), batch_size), desc="tokenizer", unit="batch"):
            features = model.encode_features(model_input(torch.from_numpy(images[start : start + batch_size]), "cpu"))
            for name, latent in (("unquantized", features), ("quantized", model.quantizer(features).f_hat)):
                out[name].append((model.fhat_to_image(latent).float()[:, 0] + 1) / 2)
    return {name: torch.cat(parts) for name, parts in out.items()}


def _slices(store: SliceStore) -> np.ndarray:
    return np.stack([store[i]["image"].numpy() for i in range(len(store))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--store", required=True, help="slice store with training and validation splits")
    parser.add_argument("--split", default="validation", help="the split to score (default: validation)")
    parser.add_argument("--tokens", type=int, default=680, help="tokens per slice (default: 680, 256² slices)")
    parser.add_argument("--vocab", type=int, default=4096, help="codebook size (default: 4096)")
    parser.add_argument("--patch", type=int, default=16, help="PCA patch side in pixels (default: 16)")
    parser.add_argument("--components", type=int, default=32, help="PCA components per patch (default: 32)")
    parser.add_argument("--tokenizer", help="tokenizer.pt: also its reconstructions, unquantized and quantized")
    args = parser.parse_args(argv)

    try:
        held_out, training = SliceStore(args.store, split=args.split), SliceStore(args.store, split="training")
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    except (FileNotFoundError, ValueError) as error:
        print(f"tokenizer_references: {error}", file=sys.stderr)
        return 1
    if not len(held_out) or not len(training):
        print(f"tokenizer_references: {args.store}: no {args.split} or no training slices", file=sys.stderr)
        return 1
    budget = math.ceil(args.tokens * math.log2(args.vocab) / 8)
    images = _slices(held_out)
    size = images.shape[-1]
    if size % args.patch or not 1 <= args.components <= args.patch**2:
        print(
            f"tokenizer_references: --patch {args.patch} must divide the slice side {size} and --components "
            f"{args.components} lie in [1, {args.patch**2}]",
            file=sys.stderr,
        )
        return 2
    target = torch.from_numpy(images.astype(np.float32) / 255)[:, None]

    coded = [jpeg2000_at_budget(image, budget) for image in tqdm(images, desc="jpeg2000", unit="slice")]
    mean, axes = pca_basis(_slices(training).astype(np.float32) / 255, args.patch, args.components)
    projected = pca_reconstruct(images.astype(np.float32) / 255, mean, axes, args.patch).clip(0, 1)
    methods = {
        f"jpeg2000, {budget} bytes": torch.from_numpy(np.stack([c[0] for c in coded]).astype(np.float32) / 255),
        f"pca {args.patch}² × {args.components}": torch.from_numpy(projected.astype(np.float32)),
    }
    if tokenizer is not None:
        recons = tokenizer_reconstructions(tokenizer, images)
        methods.update({f"tokenizer, {name}": pred for name, pred in recons.items()})
    groups = anatomy_groups(held_out.datasets, list(held_out.datasets))
    group_of_id = {held_out.datasets[n]["id"]: g for g, names in groups.items() for n in names}
    group_of = np.array([group_of_id[int(i)] for i in held_out.dataset_ids])
    columns = [*sorted(set(group_of)), "all"]
    rows = []
    for name, pred in methods.items():
        fidelity = slice_fidelity(pred[:, None], target)
        psnr, ssim = fidelity["psnr"].numpy(), fidelity["ssim"].numpy()
        psnr = psnr.clip(max=PSNR_CAP)
        cells = [psnr[group_of == g].mean() if g != "all" else psnr.mean() for g in columns]
        rows.append([name, *(f"{c:.2f}" for c in cells), f"{ssim.mean():.3f}"])
    used = np.mean([c[1] for c in coded])
    print(f"held-out PSNR (dB) of {len(images)} {args.split} slices; JPEG 2000 used {used:.0f} bytes")
    print(markdown_table(["reference", *columns, "SSIM (all)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Zero-shot in-painting, out-painting and editing with the next-scale model (VAR §7).

The slice's real token maps (:meth:`~medvar_bundle.networks.msvqvae.MultiScaleVQVAE.encode`) are
teacher-forced everywhere except inside the mask: at scale ``k`` the mask ``(B, S, S)`` is reduced
to ``n_k × n_k`` cells, a cell is sampled when any of its pixels is masked (adaptive max-pooling),
and every other cell keeps its real token. The running f̂ is built from the mixed tokens, so the
coarse scales' context flows into the masked region. Guidance, top-k/top-p and the KV cache are
those of ordinary sampling (:func:`~medvar_bundle.sampling.medvar.generate_tokens`); conditioning on
another dataset's id than the image's re-draws the region in that dataset's style (editing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from torch import Tensor

from medvar_bundle.networks.msvqvae import MultiScaleVQVAE
from medvar_bundle.networks.transformer import NextScaleTransformer
from medvar_bundle.runtime import autocast, to_uint8

from .medvar import SamplingOptions, generate_tokens


def token_masks(mask: Tensor, patch_nums: tuple[int, ...], dilation: int = 0) -> list[Tensor]:
    """Which tokens to sample at every scale.

    Args:
        mask: ``(B, S, S)`` bool (or 0/1), True where the image is to be re-drawn.
        patch_nums: the token-map sides ``n_k``.
        dilation: grow the mask by this many tokens of the finest map (``S / n_K`` pixels each,
            a square neighbourhood) before reducing it, to give the sampled region a margin.

    Returns:
        ``[(B, n_k, n_k)]`` bool: True for every cell that overlaps the (dilated) mask.
    """
    if dilation < 0:
        raise ValueError(f"dilation must be >= 0 tokens, got {dilation}")
    m = mask.float().unsqueeze(1)
    if dilation:
        radius = dilation * mask.shape[-1] // patch_nums[-1]
        m = F.max_pool2d(m, 2 * radius + 1, stride=1, padding=radius)
    return [F.adaptive_max_pool2d(m, n)[:, 0] > 0 for n in patch_nums]


@torch.no_grad()
def inpaint_images(
    transformer: NextScaleTransformer,
    tokenizer: MultiScaleVQVAE,
    images: Tensor,
    mask: Tensor,
    dataset_id: Tensor,
    options: SamplingOptions,
    generator: torch.Generator,
    dilation: int = 0,
    bf16: bool = True,
) -> Tensor:
    """Re-draw the masked part of slices.

    Args:
        images: ``(B, 1, S, S)`` in [-1, 1], the real slices.
        mask: ``(B, S, S)`` bool, True where to re-draw.
        dataset_id: ``(B,)`` long, the condition (the image's own dataset to in-paint, another to edit).
        options, generator, bf16: as for :func:`~medvar_bundle.sampling.medvar.generate_tokens`.
        dilation: see :func:`token_masks`.

    Returns:
        uint8 ``(B, S, S)``: the decoding of the mixed tokens. Outside the mask it is the
        tokenizer's reconstruction, not the input: callers paste it back inside the mask only.
    """
    if mask.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"mask {tuple(mask.shape)} does not fit images {tuple(images.shape)}")
    with autocast(images.device, bf16):
        known = tokenizer.encode(images)
    sample = token_masks(mask.to(images.device), tokenizer.patch_nums, dilation)
    indices, _ = generate_tokens(transformer, tokenizer, dataset_id, options, generator, bf16=bf16, known=known,
                                 sample_mask=sample)  # fmt: skip
    with autocast(images.device, bf16):
        return to_uint8(tokenizer.decode(indices))[:, 0]


class MaskedNextScaleInferer(Inferer):
    """MONAI inferer of masked next-scale sampling: ``inferer(images, transformer, mask=, dataset_id=,
    generator=)`` → uint8 ``(B, S, S)`` (:func:`inpaint_images`). The tokenizer, the sampling options
    and the mask dilation are the inferer's; the transformer is the network the workflow passes in."""

    def __init__(
        self, tokenizer: MultiScaleVQVAE, options: SamplingOptions, dilation: int = 0, bf16: bool = True
    ) -> None:
        super().__init__()
        self.tokenizer, self.options, self.dilation, self.bf16 = tokenizer, options, dilation, bf16

    def __call__(
        self,
        inputs: Tensor,
        network: NextScaleTransformer,
        mask: Tensor,
        dataset_id: Tensor,
        generator: torch.Generator,
    ) -> Tensor:
        return inpaint_images(
            network, self.tokenizer, inputs, mask, dataset_id, self.options, generator, self.dilation, self.bf16
        )

"""Next-scale generation (paper Alg. 3): one transformer pass per scale, CFG ramp, top-k/top-p.

Scale ``k`` (0-based, K scales) is sampled from logits ``(1+t_k)·cond − t_k·uncond`` with
``t_k = cfg·k/(K−1)`` — no guidance at the first scale, full guidance at the last — where the
conditional and unconditional (null dataset id) halves run as one batch, and at a softmax
temperature that may ramp the same way (:attr:`SamplingOptions.final_temperature`). With the KV
cache each pass runs over only the new scale's ``n_k²`` tokens; without it (``use_cache=False``,
for checks and benchmarks) every pass recomputes all tokens so far under the block-causal mask.
Both give the same tokens for the same seed in fp32; under bf16 their logits round differently
(differences of a few hundredths), so an occasional token differs.

Randomness comes only from the ``torch.Generator`` passed in: one for the whole batch (a seed then
fixes the images of that batch composition), or one per image (each image then depends only on
its own generator, whatever else is in the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.inferers import Inferer
from torch import Tensor

from medvar_bundle.networks.msvqvae import MultiScaleVQVAE
from medvar_bundle.networks.transformer import KVCache, NextScaleTransformer
from medvar_bundle.runtime import autocast, to_uint8

from .guidance import guided_logits


@dataclass(frozen=True)
class SamplingOptions:
    """How tokens are drawn; the defaults are the paper's ablation best (Table 4).

    Attributes:
        cfg: classifier-free guidance strength at the last scale (≥ 0; 0 = purely conditional).
        top_k: keep only the k most likely codes (≥ 1; ≥ V keeps all).
        top_p: then keep the smallest set of codes whose probability reaches top_p (0 < p ≤ 1).
        temperature: logits are divided by it before truncation (> 0); with ``final_temperature``,
            the temperature of the first scale.
        final_temperature: the temperature of the last scale (> 0), reached linearly from
            ``temperature`` over the scales like the guidance ramp (None: ``temperature`` at every
            scale). A low one draws the finest scales' detail near the transformer's most likely
            codes while the coarse layout keeps its diversity.
    """

    cfg: float = 4.0
    top_k: int = 900
    top_p: float = 0.95
    temperature: float = 1.0
    final_temperature: float | None = None

    def __post_init__(self) -> None:
        if not self.cfg >= 0:
            raise ValueError(f"cfg must be >= 0, got {self.cfg}")
        if int(self.top_k) != self.top_k or self.top_k < 1:
            raise ValueError(f"top-k must be an integer >= 1, got {self.top_k}")
        object.__setattr__(self, "top_k", int(self.top_k))  # 900.0 from a config override: topk needs an int
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.final_temperature is not None and not self.final_temperature > 0:
            raise ValueError(f"final temperature must be > 0, got {self.final_temperature}")

    def guidance_at(self, k: int, num_scales: int) -> float:
        """The guidance ``t_k`` of scale ``k`` (0-based) of ``num_scales``: 0 at the first, ``cfg`` at the last."""
        return self.cfg * _ramp(k, num_scales)

    def temperature_at(self, k: int, num_scales: int) -> float:
        """The softmax temperature of scale ``k`` (0-based) of ``num_scales``."""
        if self.final_temperature is None:
            return self.temperature
        return self.temperature + (self.final_temperature - self.temperature) * _ramp(k, num_scales)


def _ramp(k: int, num_scales: int) -> float:
    """How far scale ``k`` lies from the first scale (0) to the last (1)."""
    return k / max(num_scales - 1, 1)


Generators = torch.Generator | Sequence[torch.Generator]
"""One generator for a batch, or one per image."""


def sample_top_k_top_p(
    logits: Tensor, top_k: int, top_p: float, generator: Generators, temperature: float = 1.0
) -> Tensor:
    """Draw one code per position: logits ``(B, l, V)`` -> ids ``(B, l)`` long.

    Top-k first, then top-p (nucleus) on what remains; at least the most likely code survives.
    With a sequence of ``B`` generators, image ``b``'s codes are drawn from ``generator[b]`` only.
    """
    B, L, V = logits.shape
    logits = logits.float() / temperature
    if top_k < V:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a code when the codes more likely than it already reach top_p
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop_sorted[..., 0] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    if isinstance(generator, torch.Generator):
        return torch.multinomial(probs.view(B * L, V), 1, generator=generator).view(B, L)
    if len(generator) != B:
        raise ValueError(f"{len(generator)} generators for a batch of {B} images")
    return torch.stack([torch.multinomial(p, 1, generator=g)[:, 0] for p, g in zip(probs, generator)])


@torch.no_grad()
def generate_tokens(
    transformer: NextScaleTransformer,
    tokenizer: MultiScaleVQVAE,
    dataset_id: Tensor,
    options: SamplingOptions,
    generator: Generators,
    use_cache: bool = True,
    bf16: bool = True,
    return_stages: bool = False,
    known: list[Tensor] | None = None,
    sample_mask: list[Tensor] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Sample K token maps for a batch of dataset ids, or only part of them (masked sampling).

    Args:
        transformer, tokenizer: matching networks (same V, C_vae and scales), in eval mode.
        dataset_id: ``(B,)`` long; ``transformer.null_id`` samples unconditionally.
        options: guidance and truncation.
        generator: the only source of randomness (on the transformer's device): one, or one per image.
        use_cache: KV cache (one pass over the new tokens per scale) or full recomputation.
        bf16: bf16 autocast for the transformer (the quantizer's f̂ stays fp32).
        return_stages: also return the running f̂ ``(B, C_vae, H, W)`` after every scale.
        known: with ``sample_mask``, real token maps ``[(B, n_k, n_k)]`` (an image's
            :meth:`~MultiScaleVQVAE.encode`): where ``sample_mask`` is False the real token is taken
            instead of the sampled one, so the running f̂ and the next scale's input hold the real
            context (VAR's zero-shot in-painting, §7).
        sample_mask: ``[(B, n_k, n_k)]`` bool, True where tokens are sampled.

    Returns:
        Token maps ``[(B, n_k, n_k)]`` and the list of running f̂ (empty unless ``return_stages``).
    """
    if (known is None) != (sample_mask is None):
        raise ValueError("masked sampling needs both the known token maps and the sample mask")
    device = dataset_id.device
    patch_nums, K = transformer.patch_nums, len(transformer.patch_nums)
    B = dataset_id.shape[0]
    guided = options.cfg > 0
    ids = torch.cat([dataset_id, torch.full_like(dataset_id, transformer.null_id)]) if guided else dataset_id
    cache = KVCache() if use_cache else None
    f_hat = torch.zeros(B, tokenizer.quantizer.embed_dim, patch_nums[-1], patch_nums[-1], device=device)
    indices, stages, chunks = [], [], []
    start = 0
    with autocast(device, bf16):
        cond = transformer.condition(ids)
        x = transformer.start_tokens(cond)
        for k, n in enumerate(patch_nums):
            chunks.append(x)
            if use_cache:
                logits = transformer.forward_scale(x, cond, cache)
            else:
                logits = transformer.forward_prefix(torch.cat(chunks, dim=1), cond)[:, start:]
            start += n * n
            logits = guided_logits(logits[:B], logits[B:], options.guidance_at(k, K)) if guided else logits
            temperature = options.temperature_at(k, K)
            idx = sample_top_k_top_p(logits, options.top_k, options.top_p, generator, temperature).view(B, n, n)
            if sample_mask is not None:
                idx = torch.where(sample_mask[k], idx, known[k])
            indices.append(idx)
            f_hat, next_input = tokenizer.next_autoregressive_input(k, f_hat, tokenizer.quantizer.embed(idx))
            if return_stages:
                stages.append(f_hat)
            if k < K - 1:
                x = transformer.embed_inputs(next_input.flatten(2).transpose(1, 2), start)
                x = x.repeat(2, 1, 1) if guided else x
    return indices, stages


@torch.no_grad()
def generate_images(
    transformer: NextScaleTransformer,
    tokenizer: MultiScaleVQVAE,
    dataset_id: Tensor,
    options: SamplingOptions,
    generator: Generators,
    bf16: bool = True,
    progression: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Sample slices: uint8 images ``(B, S, S)`` and, with ``progression``, the coarse-to-fine
    decodings of f̂ after every scale ``(B, K, S, S)`` uint8 (else None)."""
    indices, stages = generate_tokens(
        transformer, tokenizer, dataset_id, options, generator, bf16=bf16, return_stages=progression
    )
    with autocast(dataset_id.device, bf16):
        images = to_uint8(tokenizer.decode(indices))[:, 0]
        steps = (
            torch.stack([to_uint8(tokenizer.fhat_to_image(f))[:, 0] for f in stages], dim=1) if progression else None
        )
    return images, steps


class NextScaleInferer(Inferer):
    """MONAI inferer of next-scale generation: dataset ids → slices, one transformer pass per scale.

    ``inferer(dataset_id, transformer, generator=g, progression=False)`` (``g`` one generator or one
    per image) returns uint8 slices
    ``(B, S, S)`` and, with ``progression``, the decodings after every scale ``(B, K, S, S)``
    (:func:`generate_images`). The tokenizer that decodes the tokens and the sampling options are
    the inferer's; the transformer is the network the MONAI workflow passes in.
    """

    def __init__(self, tokenizer: MultiScaleVQVAE, options: SamplingOptions, bf16: bool = True) -> None:
        super().__init__()
        self.tokenizer, self.options, self.bf16 = tokenizer, options, bf16

    def __call__(
        self,
        inputs: Tensor,
        network: NextScaleTransformer,
        generator: Generators,
        progression: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        return generate_images(network, self.tokenizer, inputs, self.options, generator, self.bf16, progression)

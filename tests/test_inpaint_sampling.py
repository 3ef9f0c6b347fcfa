"""Masked next-scale sampling: which tokens are sampled, which are kept, and what the context does."""

from __future__ import annotations

import copy

import pytest
import torch

from medvar_bundle.runtime import to_uint8
from medvar_bundle.sampling.inpaint import MaskedNextScaleInferer, inpaint_images, token_masks
from medvar_bundle.sampling.medvar import SamplingOptions, generate_tokens

OPTIONS = SamplingOptions(cfg=2.0, top_k=50, top_p=0.9)


def brute_force_cells(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Cell (i, j) of an n×n grid over an S×S mask covers [i·S/n, (i+1)·S/n); True when a masked
    pixel [r, r+1) × [c, c+1) overlaps it."""
    S = mask.shape[-1]
    out = torch.zeros(n, n, dtype=torch.bool)
    for r, c in mask.nonzero().tolist():
        rows = [i for i in range(n) if r < (i + 1) * S / n and r + 1 > i * S / n]
        cols = [j for j in range(n) if c < (j + 1) * S / n and c + 1 > j * S / n]
        for i in rows:
            for j in cols:
                out[i, j] = True
    return out


def test_token_masks_are_any_overlap_cells():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(64, 64, generator=g) > 0.995  # a few scattered pixels, many on cell borders of n = 3, 5, 6
    patch_nums = (1, 2, 3, 5, 6, 16)
    cells = token_masks(mask[None], patch_nums)
    for got, n in zip(cells, patch_nums):
        assert torch.equal(got[0], brute_force_cells(mask, n)), n
    # a pixel on the border of two 3-cells (pixel 21 spans [21, 22), cells split at 21.33) marks both
    edge = torch.zeros(1, 64, 64, dtype=torch.bool)
    edge[0, 21, 0] = True
    assert token_masks(edge, (3,))[0][0, :, 0].tolist() == [True, True, False]


def test_dilation_is_in_finest_tokens():
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 32, 32] = True  # pixel in finest cell (8, 8) of 16×16 (4 px per token)
    finest = [token_masks(mask, (16,), dilation=d)[0][0] for d in (0, 1, 2)]
    for d, cells in enumerate(finest):
        rows, cols = cells.nonzero().unbind(1)
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == (8 - d, 8 + d, 8 - d, 8 + d)
        assert cells.sum() == (2 * d + 1) ** 2
    with pytest.raises(ValueError, match="dilation"):
        token_masks(mask, (16,), dilation=-1)


def test_tokens_outside_the_mask_are_the_real_ones(models):
    tokenizer, transformer = models
    torch.manual_seed(3)
    images = torch.rand(2, 1, 64, 64) * 2 - 1
    known = tokenizer.encode(images)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[:, 10:30, 20:50] = True
    sample = token_masks(mask, tokenizer.patch_nums)
    ids = torch.tensor([0, 1])
    got, _ = generate_tokens(transformer, tokenizer, ids, OPTIONS, torch.Generator().manual_seed(1), bf16=False,
                             known=known, sample_mask=sample)  # fmt: skip
    changed = 0
    for g, k, s in zip(got, known, sample):
        assert torch.equal(g[~s], k[~s])
        changed += int((g[s] != k[s]).sum())
    assert changed > 0.5 * sum(int(s.sum()) for s in sample)  # random weights: almost every sampled token is new
    # the KV cache and full recomputation agree on masked sampling too
    again, _ = generate_tokens(transformer, tokenizer, ids, OPTIONS, torch.Generator().manual_seed(1), use_cache=False,
                               bf16=False, known=known, sample_mask=sample)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(got, again))


def test_full_mask_is_plain_generation_and_empty_mask_is_reconstruction(models):
    tokenizer, transformer = models
    torch.manual_seed(4)
    images = torch.rand(2, 1, 64, 64) * 2 - 1
    ids = torch.tensor([2, 0])
    plain, _ = generate_tokens(transformer, tokenizer, ids, OPTIONS, torch.Generator().manual_seed(7), bf16=False)
    everything = inpaint_images(transformer, tokenizer, images, torch.ones(2, 64, 64, dtype=torch.bool), ids, OPTIONS,
                                torch.Generator().manual_seed(7), bf16=False)  # fmt: skip
    assert torch.equal(everything, to_uint8(tokenizer.decode(plain))[:, 0])
    nothing = inpaint_images(transformer, tokenizer, images, torch.zeros(2, 64, 64, dtype=torch.bool), ids, OPTIONS,
                             torch.Generator().manual_seed(7), bf16=False)  # fmt: skip
    assert torch.equal(nothing, to_uint8(tokenizer.decode(tokenizer.encode(images)))[:, 0])


def test_context_outside_the_mask_steers_the_sampled_tokens(models):
    """Same seed, same mask, different real tokens outside: the tokens sampled inside change,
    because the running f̂ (the next scale's input) holds the real context."""
    tokenizer, transformer = models
    tokenizer = copy.deepcopy(tokenizer)
    with torch.no_grad():  # a codebook of unit scale (VAR's init is ±1/V, which makes every f̂ almost 0)
        tokenizer.quantizer.embedding.weight.normal_()
    g = torch.Generator().manual_seed(5)
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[:, :16, :16] = True  # a corner: at scales 1..3 (n = 2, 3, 4) only cell (0, 0) is sampled
    sample = token_masks(mask, tokenizer.patch_nums)
    assert [int(s.sum()) for s in sample] == [1, 1, 1, 1]
    ids = torch.tensor([1])

    def sampled(known, seed):
        out, _ = generate_tokens(transformer, tokenizer, ids, OPTIONS, torch.Generator().manual_seed(seed), bf16=False,
                                 known=known, sample_mask=sample)  # fmt: skip
        return out[-1][sample[-1]]

    known_a = [torch.randint(4096, (1, n, n), generator=g) for n in tokenizer.patch_nums]
    known_b = [torch.randint(4096, (1, n, n), generator=g) for n in tokenizer.patch_nums]
    differ = [not torch.equal(sampled(known_a, seed), sampled(known_b, seed)) for seed in range(8)]
    assert sum(differ) >= 3, differ  # were the context ignored, the same seed would draw the same token every time


def test_inferer_and_argument_checks(models):
    tokenizer, transformer = models
    inferer = MaskedNextScaleInferer(tokenizer, OPTIONS, dilation=1, bf16=False)
    images = torch.zeros(1, 1, 64, 64)
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 30, 30] = True
    g = torch.Generator().manual_seed(0)
    out = inferer(images, transformer, mask=mask, dataset_id=torch.tensor([0]), generator=g)
    assert out.shape == (1, 64, 64) and out.dtype == torch.uint8
    with pytest.raises(ValueError, match="does not fit"):
        inferer(images, transformer, mask=mask[:, :32], dataset_id=torch.tensor([0]), generator=torch.Generator())
    with pytest.raises(ValueError, match="both"):
        generate_tokens(transformer, tokenizer, torch.tensor([0]), OPTIONS, torch.Generator(), known=[images])


def test_sampling_with_every_token_known_sees_the_training_logits_at_the_paper_scales(monkeypatch):
    """At the paper's 10 scales (256², 680 tokens), feeding a slice's own tokens through the sampler
    (every token known, none sampled, KV cache) gives, scale by scale, the logits of the teacher-forced
    training ``forward()``: sampling sees what training saw. A mismatch in the f̂ recursion, the
    positions or the cache would show here."""
    from medvar_bundle.networks import MultiScaleVQVAE
    from medvar_bundle.networks.quantizer import PAPER_PATCH_NUMS
    from medvar_bundle.networks.transformer import NextScaleTransformer

    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE.from_preset("tiny", image_size=256, vocab_size=512).eval()
    assert tokenizer.patch_nums == PAPER_PATCH_NUMS
    with torch.no_grad():
        tokenizer.quantizer.embedding.weight.normal_()
    transformer = NextScaleTransformer(num_datasets=2, depth=2, width=64, heads=4, patch_nums=PAPER_PATCH_NUMS,
                                       vocab_size=512).eval()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randint(512, (2, n, n), generator=g) for n in PAPER_PATCH_NUMS]
    ids = torch.tensor([0, 1])
    with torch.no_grad():
        trained = transformer(ids, tokenizer.teacher_forcing_input(tokens))
    seen = []
    forward_scale = transformer.forward_scale

    def recording(x, cond, cache):
        seen.append(forward_scale(x, cond, cache))
        return seen[-1]

    monkeypatch.setattr(transformer, "forward_scale", recording)
    never = [torch.zeros_like(t, dtype=torch.bool) for t in tokens]
    out, _ = generate_tokens(transformer, tokenizer, ids, SamplingOptions(cfg=0.0), torch.Generator().manual_seed(0),
                             bf16=False, known=tokens, sample_mask=never)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(out, tokens))
    sampled = torch.cat(seen, dim=1)
    assert sampled.shape == trained.shape == (2, 680, 512)
    assert torch.allclose(sampled, trained, atol=1e-4, rtol=1e-4), (sampled - trained).abs().max()

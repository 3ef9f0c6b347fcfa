"""Next-scale transformer and sampler: mask, presets, KV cache, CFG, truncation, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvar_bundle.networks.transformer import NextScaleTransformer, block_causal_mask, scale_of_positions
from medvar_bundle.sampling.guidance import guided_logits
from medvar_bundle.sampling.medvar import SamplingOptions, generate_images, generate_tokens, sample_top_k_top_p

PATCH_NUMS = (1, 2, 3, 4)


def test_block_causal_mask_known_answer():
    # scales (1, 2): positions 0 | 1 2 3 4
    mask = block_causal_mask((1, 2))
    expected = torch.tensor(
        [[1, 0, 0, 0, 0]] + [[1, 1, 1, 1, 1]] * 4,
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    assert scale_of_positions((1, 2, 3)).tolist() == [0] + [1] * 4 + [2] * 9


def test_future_scales_do_not_change_past_logits(models):
    _, transformer = models
    torch.manual_seed(1)
    inputs = torch.randn(2, 29, 32)
    ids = torch.tensor([0, 2])
    base = transformer(ids, inputs)
    changed = inputs.clone()
    changed[:, 13:] += 1.0  # inputs of the last scale (positions 14..29)
    out = transformer(ids, changed)
    assert torch.allclose(base[:, :14], out[:, :14], atol=1e-6)
    assert not torch.allclose(base[:, 14:], out[:, 14:], atol=1e-3)
    # and a token sees the other tokens of its own scale
    within = inputs.clone()
    within[:, 4] += 1.0  # position 5: first token of the third scale (positions 5..13)
    assert not torch.allclose(base[:, 6], transformer(ids, within)[:, 6], atol=1e-4)


def closed_form_parameters(
    depth: int, num_datasets: int, vocab: int = 4096, c_vae: int = 32, tokens: int = 680, scales: int = 10
) -> int:
    """VAR's parameter count: per block qkv 3D² + q/v biases 2D + per-head scales H + proj D² + D
    + MLP 8D² + 5D + AdaLN 6D² + 6D; plus embeddings, input projection, head AdaLN and head."""
    D, H = 64 * depth, depth
    block = 18 * D * D + 14 * D + H
    rest = (num_datasets + 1) * D + D + (c_vae + 1) * D + tokens * D + scales * D + 2 * D * D + 2 * D + (D + 1) * vocab
    return depth * block + rest


@pytest.mark.parametrize(
    "preset, nominal, tolerance",
    # The paper quotes VAR's sizes rounded: d24 has 1.03B parameters in VAR's own layout too,
    # 3.2 % above the quoted "1.0B"; the other three are within 0.3 %.
    [("d16", 310e6, 0.03), ("d20", 600e6, 0.03), ("d24", 1.0e9, 0.035), ("d30", 2.0e9, 0.03)],
)
def test_preset_parameter_counts(preset, nominal, tolerance):
    with torch.device("meta"):
        model = NextScaleTransformer.from_preset(preset, num_datasets=8)
    n = sum(p.numel() for p in model.parameters())
    assert model.config["width"] == 64 * model.config["depth"] and model.config["heads"] == model.config["depth"]
    assert n == closed_form_parameters(model.config["depth"], 8)
    assert abs(n / nominal - 1) < tolerance, f"{preset}: {n / 1e6:.1f}M parameters"
    # VAR's stochastic depth: 0 at the first block rising linearly to 0.1 · depth / 24 at the last
    rates = [block.drop_path.p for block in model.blocks]
    depth = model.config["depth"]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1 * depth / 24)
    assert np.allclose(np.diff(rates), 0.1 * depth / 24 / (depth - 1))


def test_logits_shape_and_condition_dropout(models):
    _, transformer = models
    inputs = torch.randn(4, 29, 32)
    assert transformer(torch.tensor([0, 1, 2, 3]), inputs).shape == (4, 30, 4096)
    transformer.train()
    try:
        torch.manual_seed(0)
        a = transformer(torch.tensor([0, 0, 0, 0] * 64), inputs.repeat(64, 1, 1))
    finally:
        transformer.eval()
    null = transformer(torch.full((1,), transformer.null_id), inputs[:1])
    dropped = (a[:, 0] - null[0, 0]).abs().amax(dim=1) < 1e-4
    # cond_drop 0.1 of 256 samples: about 26 replaced by the null id
    assert 10 <= int(dropped.sum()) <= 45


@pytest.mark.parametrize(
    "options", [SamplingOptions(cfg=3, top_k=100, top_p=0.9), SamplingOptions(cfg=0, top_k=4096, top_p=1.0)]
)
def test_kv_cache_gives_the_tokens_of_full_recomputation(models, options):
    tokenizer, transformer = models
    ids = torch.tensor([0, 1, 2, 3])  # 3 is the null id: unconditional
    cached, _ = generate_tokens(
        transformer, tokenizer, ids, options, torch.Generator().manual_seed(5), use_cache=True, bf16=False
    )
    full, _ = generate_tokens(
        transformer, tokenizer, ids, options, torch.Generator().manual_seed(5), use_cache=False, bf16=False
    )
    assert [t.shape for t in cached] == [(4, n, n) for n in PATCH_NUMS]
    for a, b in zip(cached, full):
        assert torch.equal(a, b)


def test_kv_cache_under_bf16_agrees_with_recomputation(models):
    """bf16 rounds the two paths' different matmul shapes differently, so a token whose two best
    codes are nearly tied can flip; nearly all tokens still agree."""
    tokenizer, transformer = models
    ids = torch.arange(4).repeat(4)
    options = SamplingOptions(cfg=3, top_k=100, top_p=0.9)
    cached, _ = generate_tokens(transformer, tokenizer, ids, options, torch.Generator().manual_seed(5), use_cache=True)
    full, _ = generate_tokens(transformer, tokenizer, ids, options, torch.Generator().manual_seed(5), use_cache=False)
    assert torch.equal(cached[0], full[0])
    agree = torch.cat([(a == b).flatten() for a, b in zip(cached, full)]).float().mean()
    assert agree > 0.9


def test_cfg_zero_is_conditional_sampling(models):
    tokenizer, transformer = models
    c, u = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    assert torch.equal(guided_logits(c, u, 0.0), c)
    assert torch.allclose(guided_logits(c, u, 2.0), 3 * c - 2 * u)
    ids = torch.tensor([0, 1])
    plain = SamplingOptions(cfg=0, top_k=4096, top_p=1.0)
    guided = SamplingOptions(cfg=4, top_k=4096, top_p=1.0)
    a, _ = generate_tokens(transformer, tokenizer, ids, plain, torch.Generator().manual_seed(1), bf16=False)
    b, _ = generate_tokens(transformer, tokenizer, ids, guided, torch.Generator().manual_seed(1), bf16=False)
    # the ramp starts at t = 0: the first scale is drawn from the same conditional logits...
    assert torch.equal(a[0], b[0])
    # ...and guidance changes the later ones
    assert not all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))


def test_top_k_one_is_greedy_and_deterministic(models):
    tokenizer, transformer = models
    ids = torch.tensor([0, 1, 2])
    greedy = SamplingOptions(cfg=1, top_k=1, top_p=1.0)
    a, _ = generate_tokens(transformer, tokenizer, ids, greedy, torch.Generator().manual_seed(1), bf16=False)
    b, _ = generate_tokens(transformer, tokenizer, ids, greedy, torch.Generator().manual_seed(999), bf16=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_whole_float_top_k_from_a_config_override_samples(models):
    """`--top_k 1.0` reaches SamplingOptions as a float: it must sample as top-k 1, not stop in topk()."""
    tokenizer, transformer = models
    ids = torch.tensor([0, 1])
    options = SamplingOptions(cfg=1, top_k=1.0, top_p=1.0)
    assert type(options.top_k) is int
    a, _ = generate_tokens(transformer, tokenizer, ids, options, torch.Generator().manual_seed(1), bf16=False)
    b, _ = generate_tokens(transformer, tokenizer, ids, SamplingOptions(cfg=1, top_k=1, top_p=1.0),
                           torch.Generator().manual_seed(2), bf16=False)  # fmt: skip
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_temperature_ramps_linearly_to_the_final_one_known_answer():
    ramp = SamplingOptions(temperature=0.6, final_temperature=0.1)
    assert [ramp.temperature_at(k, 6) for k in range(6)] == pytest.approx([0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    assert ramp.temperature_at(0, 1) == 0.6  # one scale: the first temperature
    assert [SamplingOptions(temperature=0.6).temperature_at(k, 6) for k in (0, 5)] == [0.6, 0.6]


def test_the_sampler_draws_each_scale_at_its_ramped_temperature(models, monkeypatch):
    """Each scale's codes are drawn at the temperature of the ramp; a final temperature equal to the
    first is the constant temperature, token for token."""
    import medvar_bundle.sampling.medvar as sampler

    tokenizer, transformer = models
    ids = torch.tensor([0, 1])
    seen = []
    draw = sampler.sample_top_k_top_p

    def spy(logits, top_k, top_p, generator, temperature=1.0):
        seen.append(temperature)
        return draw(logits, top_k, top_p, generator, temperature)

    monkeypatch.setattr(sampler, "sample_top_k_top_p", spy)
    ramp = SamplingOptions(cfg=1, top_k=100, top_p=0.95, temperature=1.0, final_temperature=0.4)
    generate_tokens(transformer, tokenizer, ids, ramp, torch.Generator().manual_seed(3), bf16=False)
    assert seen == pytest.approx([1.0, 0.8, 0.6, 0.4])  # four scales
    constant = SamplingOptions(cfg=1, top_k=100, top_p=0.95, temperature=0.7)
    same = SamplingOptions(cfg=1, top_k=100, top_p=0.95, temperature=0.7, final_temperature=0.7)
    a, _ = generate_tokens(transformer, tokenizer, ids, constant, torch.Generator().manual_seed(3), bf16=False)
    b, _ = generate_tokens(transformer, tokenizer, ids, same, torch.Generator().manual_seed(3), bf16=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_top_k_top_p_truncation_known_answer():
    # probabilities 0.5, 0.3, 0.15, 0.05: top-p 0.7 keeps the first two; top-k 1 keeps the first
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().view(1, 1, 4).expand(1, 4000, 4)
    draws = sample_top_k_top_p(logits, top_k=4, top_p=0.7, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws.flatten(), minlength=4)
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03
    greedy = sample_top_k_top_p(logits, top_k=1, top_p=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.all(greedy == 0)


def test_same_seed_same_images_and_progression(models):
    tokenizer, transformer = models
    ids = torch.tensor([1, 1])
    options = SamplingOptions(cfg=2, top_k=50, top_p=0.95)
    a, steps = generate_images(transformer, tokenizer, ids, options, torch.Generator().manual_seed(7), progression=True)
    b, _ = generate_images(transformer, tokenizer, ids, options, torch.Generator().manual_seed(7))
    c, _ = generate_images(transformer, tokenizer, ids, options, torch.Generator().manual_seed(8))
    assert a.dtype == torch.uint8 and a.shape == (2, 64, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert steps.shape == (2, len(PATCH_NUMS), 64, 64)
    assert torch.equal(steps[:, -1], a)  # the last stage is the final image


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cfg=-1), "cfg must be >= 0"),
        (dict(top_k=0), "top-k must be an integer >= 1"),
        (dict(top_p=0.0), "top-p must be in (0, 1]"),
        (dict(top_p=1.5), "top-p must be in (0, 1]"),
        (dict(temperature=0), "temperature must be > 0"),
        (dict(final_temperature=0), "final temperature must be > 0"),
    ],
)
def test_bad_sampling_options(kwargs, message):
    with pytest.raises(
        ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    ):
        SamplingOptions(**kwargs)


def test_token_loss_weights_known_answer():
    from medvar_bundle.networks.transformer import token_loss_weights

    w = token_loss_weights((1, 2), "scale")
    assert torch.allclose(w, torch.tensor([0.5, 0.125, 0.125, 0.125, 0.125]))
    assert torch.allclose(token_loss_weights((1, 2), "token"), torch.full((5,), 0.2))
    assert torch.isclose(token_loss_weights(PATCH_NUMS).sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="loss weighting must be one of"):
        token_loss_weights((1, 2), "pixel")

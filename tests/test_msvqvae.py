"""Known-answer tests for the multi-scale VQ-VAE tokenizer (:mod:`medvar_bundle.networks`).

Expected values come from the paper / VAR's definitions (scale schedule, Φ blend and sharing,
Alg. 1 on a hand-built codebook, teacher forcing by hand) rather than from earlier runs. Models
are tiny and images 64² (latent 4, scales (1, 2, 3, 4)) except where 256² itself is the point;
torch runs single-threaded here, which is faster than two threads on a shared two-core box.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medvar_bundle.networks import (
    PAPER_PATCH_NUMS,
    MultiScaleQuantizer,
    MultiScaleVQVAE,
    Phi,
    derive_patch_nums,
    tokenizer_preset,
)


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(b: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Synthetic slices (b, 1, size, size) in [-1, 1]: a shaded disk on a -1 background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for _ in range(b):
        cx, cy = (torch.rand(2, generator=g) * 0.6 - 0.3).tolist()
        r = 0.3 + 0.4 * torch.rand(1, generator=g).item()
        disk = ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2).float()
        out.append(-1 + 1.2 * disk + 0.5 * disk * xx)
    return torch.stack(out)[:, None]


def _area(x: torch.Tensor, n: int) -> torch.Tensor:
    """Area downsampling written out: output cell i averages input rows floor(iH/n)..ceil((i+1)H/n)-1."""
    H = x.shape[-1]
    spans = [(i * H // n, -(-(i + 1) * H // n)) for i in range(n)]
    return torch.stack(
        [torch.stack([x[..., a:b, c:d].mean(dim=(-2, -1)) for c, d in spans], dim=-1) for a, b in spans], dim=-2
    )


def _tiny(image_size: int = 64, **overrides) -> MultiScaleVQVAE:
    torch.manual_seed(0)
    return MultiScaleVQVAE.from_preset("tiny", image_size=image_size, **overrides)


def _identity_phis(q: MultiScaleQuantizer) -> None:
    """Make every Φ the identity: conv(x) = x, so x·0.5 + conv(x)·0.5 = x."""
    with torch.no_grad():
        for phi in q.phis:
            phi.conv.weight.zero_()
            phi.conv.bias.zero_()
            for c in range(q.embed_dim):
                phi.conv.weight[c, c, 1, 1] = 1.0


@pytest.fixture(scope="module")
def model64() -> MultiScaleVQVAE:
    return _tiny().eval()


# ---- scale schedule, Φ -----------------------------------------------------------------------


def test_patch_nums_paper_and_derived():
    assert derive_patch_nums(16) == PAPER_PATCH_NUMS == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    # 128² -> latent 8: n·8/16 = .5 1 1.5 2 2.5 3 4 5 6.5 8, rounded half up, repeats dropped.
    assert derive_patch_nums(8) == (1, 2, 3, 4, 5, 7, 8)
    assert derive_patch_nums(4) == (1, 2, 3, 4)
    for latent in range(1, 40):
        p = derive_patch_nums(latent)
        assert p[-1] == latent and p[0] >= 1 and all(a < b for a, b in zip(p, p[1:]))
    m = MultiScaleVQVAE.from_preset("tiny", image_size=128)
    assert m.patch_nums == (1, 2, 3, 4, 5, 7, 8) and m.num_tokens == 168


def test_phi_blend_and_partial_sharing():
    q = MultiScaleQuantizer(vocab_size=8, embed_dim=4)
    # VAR: ticks linspace(1/12, 11/12, 4); scale k takes the tick nearest k/9.
    assert q.phi_index == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3) and len(q.phis) == 4
    phi = Phi(4)
    with torch.no_grad():
        phi.conv.weight.zero_()
        phi.conv.bias.fill_(2.0)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(phi(x), 0.5 * x + 0.5 * 2.0)


# ---- Alg. 1 on a hand-built codebook ---------------------------------------------------------


def _hand_built():
    """Quantizer with scales (1, 2) and identity Φ, and features made of its own codes.

    f = c0 + d_pos on a 2×2 latent with Σ d = 0: scale 0 sees the mean c0 (code 0), scale 1 sees
    the rest d_pos (codes 1..4), so f̂ = f exactly and the residual vanishes.
    """
    q = MultiScaleQuantizer(vocab_size=8, embed_dim=4, patch_nums=(1, 2))
    _identity_phis(q)
    c0 = torch.tensor([1.0, -2.0, 0.5, 3.0])
    d = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, -2.0, 0], [-2.0, -2.0, 2.0, 0]])
    with torch.no_grad():
        q.embedding.weight.copy_(torch.cat([c0[None], d, torch.full((3, 4), 50.0)]))
    f = (c0[:, None] + d.T).reshape(1, 4, 2, 2)
    return q, f, c0, d


def test_alg1_on_hand_built_codebook():
    q, f, c0, d = _hand_built()
    out = q.eval()(f)
    assert out.indices[0].tolist() == [[[0]]]
    assert out.indices[1].tolist() == [[[1, 2], [3, 4]]]
    torch.testing.assert_close(out.f_hat, f, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.residual, torch.zeros_like(f), rtol=0, atol=1e-6)
    # Scale 0: f̂ = c0 everywhere, mse = mean(d²), weighted (1 + β); scale 1: f̂ = f, zero loss.
    expected = (1 + 0.25) * d.square().mean() / 2
    torch.testing.assert_close(out.vq_loss, expected)


def test_vq_loss_gradient_splits_commitment_and_codebook():
    q, f, c0, d = _hand_built()
    f = (f + 0.05 * torch.randn_like(f)).requires_grad_()  # small enough to keep the same codes
    out = q(f)
    assert out.indices[1].tolist() == [[[1, 2], [3, 4]]]
    out.vq_loss.backward()
    # Only β·mse(f, sg(f̂_k)) reaches f: grad = β · 2/N · Σ_k (f − f̂_k) / K with f̂_0 = c0, f̂_1 = c0 + d.
    fhat0 = c0[None, :, None, None].expand_as(f)
    fhat1 = (c0[:, None] + d.T).reshape(1, 4, 2, 2)
    expected = 0.25 * 2 / f.numel() * ((f - fhat0) + (f - fhat1)).detach() / 2
    torch.testing.assert_close(f.grad, expected, rtol=1e-4, atol=1e-6)


def test_each_scale_quantizes_the_area_downsampled_residual():
    torch.manual_seed(0)
    q = MultiScaleQuantizer(vocab_size=64, embed_dim=8, patch_nums=(1, 2, 3, 4)).eval()
    with torch.no_grad():
        q.embedding.weight.normal_()
    f = torch.randn(2, 8, 4, 4)
    out = q(f)
    f_hat = torch.zeros_like(f)
    for k, n in enumerate(q.patch_nums):
        r = _area(f - f_hat, n)  # the residual before scale k, on scale k's grid
        expected = q.nearest_codes(r.permute(0, 2, 3, 1).reshape(-1, 8)).view(2, n, n)
        assert torch.equal(out.indices[k], expected), f"scale {k}"
        f_hat = f_hat + q.scale_contribution(k, q.embed(expected)).detach()


def test_usage_ema_and_stats_on_hand_built_codebook():
    q, f, _, _ = _hand_built()
    q.train()(f)  # hits: scale 0 -> code 0; scale 1 -> codes 1, 2, 3, 4
    stats = q.usage_stats()
    assert stats["usage/scale_0"] == pytest.approx(1 / 8) and stats["perplexity/scale_0"] == pytest.approx(1)
    assert stats["usage/scale_1"] == pytest.approx(4 / 8) and stats["perplexity/scale_1"] == pytest.approx(4)
    assert stats["usage"] == pytest.approx(5 / 8) and stats["perplexity"] == pytest.approx(5)
    freq = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0]) / 5
    d = q.usage_decay
    torch.testing.assert_close(q.ema_usage, d * torch.full((8,), 1 / 8) + (1 - d) * freq)
    before = q.ema_usage.clone()
    q.eval()(f)  # eval forwards report usage but leave the EMA alone
    assert torch.equal(q.ema_usage, before)


def test_straight_through_gradient_is_identity():
    q, f, _, _ = _hand_built()
    f = (f + 0.3 * torch.randn_like(f)).requires_grad_()
    w = torch.randn_like(f)
    (q(f).f_hat * w).sum().backward()
    assert torch.equal(f.grad, w)


# ---- lookups, dead codes ---------------------------------------------------------------------


def test_l2_norm_lookup_picks_max_cosine():
    codes = torch.tensor([[10.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    z = torch.tensor([[1.0, 0.1]])  # nearest in distance: code 3; largest cosine: code 0
    for l2_norm, expected in ((True, 0), (False, 3)):
        q = MultiScaleQuantizer(vocab_size=4, embed_dim=2, patch_nums=(1,), l2_norm=l2_norm)
        with torch.no_grad():
            q.embedding.weight.copy_(codes)
        assert q.nearest_codes(z).tolist() == [expected]

    q = MultiScaleQuantizer(vocab_size=64, embed_dim=8, l2_norm=True)
    with torch.no_grad():
        q.embedding.weight.normal_()
    z = torch.randn(200, 8) * torch.rand(200, 1) * 5
    cosine = F.cosine_similarity(z[:, None, :], q.embedding.weight[None], dim=-1)
    assert torch.equal(q.nearest_codes(z), cosine.argmax(1))


def test_reinit_replaces_exactly_the_dead_codes():
    V = 16
    q = MultiScaleQuantizer(vocab_size=V, embed_dim=4, patch_nums=(1, 2, 3), dead_threshold=0.5)
    with torch.no_grad():
        q.embedding.weight.normal_()
        q.ema_usage.fill_(1 / V)
        q.ema_usage[[3, 7, 11]] = torch.tensor([0.0, 0.2, 0.49]) / V  # below 0.5 / V: dead
        q.ema_usage[5] = 0.51 / V  # just above: alive
    before = q.embedding.weight.detach().clone()
    features = torch.randn(1, 4, 1, 3)  # three feature vectors for three dead codes
    rows = features.permute(0, 2, 3, 1).reshape(-1, 4)

    assert q.reinit_dead_codes(features) == 3
    after = q.embedding.weight.detach()
    dead = torch.zeros(V, dtype=torch.bool)
    dead[[3, 7, 11]] = True
    assert torch.equal(after[~dead], before[~dead])
    picked = [int((rows == after[i]).all(1).nonzero()[0]) for i in (3, 7, 11)]  # each is a feature row
    assert sorted(picked) == [0, 1, 2]  # drawn without replacement
    torch.testing.assert_close(q.ema_usage[dead], torch.full((3,), 1 / V))
    assert q.reinit_dead_codes(features) == 0


def _kmeans_quantizer(decay: float):
    """One 2×2 scale, identity Φ, V = 4: codes a, b near two pairs of feature vectors, c and d far."""
    q = MultiScaleQuantizer(vocab_size=4, embed_dim=2, patch_nums=(2,), codebook_decay=decay)
    _identity_phis(q)
    codes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 50.0], [50.0, 50.0]])
    with torch.no_grad():
        q.embedding.weight.copy_(codes)
        q.cluster_sum.copy_(codes / 4)
    rows = torch.tensor([[1.0, 0.0], [0.0, 3.0], [9.0, 1.0], [12.0, -2.0]])  # two pick code 0, two code 1
    return q, codes, rows.T.reshape(1, 2, 2, 2)


def test_kmeans_codebook_moves_each_code_to_the_ema_mean_of_its_residuals():
    d = 0.9
    q, codes, f = _kmeans_quantizer(d)
    q.train()(f)
    # one step by hand: size = d/V + (1-d)·hits/N, sum = d·code/V + (1-d)·Σ rows/N, code = sum/size
    size = d / 4 + (1 - d) * torch.tensor([2, 2, 0, 0]) / 4
    total = torch.stack([torch.tensor([1.0, 3.0]), torch.tensor([21.0, -1.0]), torch.zeros(2), torch.zeros(2)])
    expected = (d * codes / 4 + (1 - d) * total / 4) / size[:, None]
    torch.testing.assert_close(q.embedding.weight.detach(), expected)
    torch.testing.assert_close(q.cluster_size, size)
    for _ in range(300):  # the same batch again and again: each picked code converges to its members' mean
        q(f)
    torch.testing.assert_close(q.embedding.weight[:2].detach(), torch.tensor([[0.5, 1.5], [10.5, -0.5]]))
    torch.testing.assert_close(q.embedding.weight[2:].detach(), codes[2:])  # never picked: unchanged
    before = q.embedding.weight.detach().clone()
    q.eval()(f)
    assert torch.equal(q.embedding.weight.detach(), before)  # eval forwards leave the codes alone


def test_kmeans_codebook_gets_no_gradient_and_rejects_a_bad_decay():
    q, _, f = _kmeans_quantizer(0.9)
    q.train()(f.requires_grad_()).vq_loss.backward()
    assert q.embedding.weight.grad is None  # an optimizer step leaves it to the k-means update
    assert q.phis[0].conv.weight.grad is not None and f.grad is not None
    assert "quantizer.cluster_sum" in _tiny(codebook_decay=0.95).state_dict()
    assert "quantizer.cluster_sum" not in _tiny().state_dict()  # gradient codebooks keep the old format
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="codebook_decay"):
            MultiScaleQuantizer(vocab_size=4, embed_dim=2, patch_nums=(2,), codebook_decay=bad)


def _kmeans_rank(rank: int, init_file: str, f: torch.Tensor, out_file: str) -> None:
    """One of two gloo processes: a k-means quantizer's training forward on its half of ``f``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    q = MultiScaleQuantizer(vocab_size=16, embed_dim=4, patch_nums=(1, 2, 4), codebook_decay=0.9).train()
    q(f.chunk(2)[rank])
    if rank == 0:
        torch.save(q.state_dict(), out_file)
    dist.destroy_process_group()


def test_kmeans_codebook_under_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    f = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    single = MultiScaleQuantizer(vocab_size=16, embed_dim=4, patch_nums=(1, 2, 4), codebook_decay=0.9).train()
    initial = single.embedding.weight.detach().clone()
    single(f)
    torch.multiprocessing.spawn(
        _kmeans_rank, args=(str(tmp_path / "init"), f, str(tmp_path / "rank0.pt")), nprocs=2, join=True
    )
    ranked = torch.load(tmp_path / "rank0.pt", weights_only=True)
    for key in ("embedding.weight", "cluster_size", "cluster_sum", "ema_usage"):
        torch.testing.assert_close(ranked[key], single.state_dict()[key], atol=1e-6, rtol=0, msg=key)
    assert not torch.equal(ranked["embedding.weight"], initial)  # the codes moved


def test_reinit_restarts_a_kmeans_codes_cluster_at_its_new_value():
    q, _, f = _kmeans_quantizer(0.9)
    with torch.no_grad():
        q.ema_usage.copy_(torch.tensor([0.25, 0.25, 0.0, 0.25]))  # code 2 dead
    assert q.reinit_dead_codes(torch.tensor([[7.0, 7.0]])) == 1
    torch.testing.assert_close(q.embedding.weight[2].detach(), torch.tensor([7.0, 7.0]))
    assert q.cluster_size[2] == pytest.approx(1 / 4)
    torch.testing.assert_close(q.cluster_sum[2], torch.tensor([7.0, 7.0]) / 4)


# ---- the whole tokenizer ---------------------------------------------------------------------


def test_680_tokens_at_256():
    m = _tiny(256).eval()
    assert m.patch_nums == PAPER_PATCH_NUMS and m.num_tokens == 680
    indices = m.encode(_images(1, 256))
    assert [tuple(i.shape) for i in indices] == [(1, n, n) for n in PAPER_PATCH_NUMS]
    flat = m.tokens_flat(indices)
    assert flat.shape == (1, 680) and flat.dtype == torch.long
    assert m.config["vocab_size"] == 4096 and 0 <= int(flat.min()) and int(flat.max()) < 4096
    assert flat[0, 0] == indices[0][0, 0, 0] and torch.equal(flat[0, 1:5], indices[1][0].flatten())
    assert all(torch.equal(a, b) for a, b in zip(m.split_tokens(flat), indices))
    # config rebuilds the same model
    clone = MultiScaleVQVAE(**m.config)
    clone.load_state_dict(m.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(clone.eval().encode(_images(1, 256)), indices))


def test_decode_of_own_codes_reproduces_fhat_exactly(model64):
    x = _images(2)
    quant = model64.quantizer(model64.encode_features(x))
    indices = model64.encode(x)
    assert all(torch.equal(a, b) for a, b in zip(indices, quant.indices))
    assert torch.equal(model64.indices_to_fhat(indices), quant.f_hat)
    recon, _ = model64(x)
    assert torch.equal(model64.decode(indices), recon.clamp(-1, 1))
    running = model64.indices_to_fhat(indices, all_scales=True)
    assert len(running) == 4 and torch.equal(running[-1], quant.f_hat)


def test_residual_after_last_scale_is_f_minus_fhat(model64):
    f = model64.encode_features(_images(2))
    quant = model64.quantizer(f)
    torch.testing.assert_close(quant.residual, f - quant.f_hat, rtol=0, atol=1e-5)
    assert not torch.equal(quant.residual, torch.zeros_like(f))


def test_teacher_forcing_input_by_hand():
    m = _tiny(256)
    q = m.quantizer
    g = torch.Generator().manual_seed(1)
    indices = [torch.randint(0, 4096, (2, n, n), generator=g) for n in m.patch_nums]
    tf = m.teacher_forcing_input(indices)
    assert tf.shape == (2, 679, 32) and tf.dtype == torch.float32
    with torch.no_grad():
        # f̂ after scale 0: a 1×1 code upsampled is constant over 16×16, then Φ_0; area to 2×2.
        def phi0(x):  # scales 0 and 1 share Φ_0: 3×3 conv blended 0.5/0.5 with its input
            return 0.5 * x + 0.5 * q.phis[0].conv(x)

        code = q.embedding.weight[indices[0][:, 0, 0]]
        f1 = phi0(code[:, :, None, None].expand(2, 32, 16, 16))
        expected = f1.reshape(2, 32, 2, 8, 2, 8).mean(dim=(3, 5)).flatten(2).transpose(1, 2)
        torch.testing.assert_close(tf[:, :4], expected, rtol=1e-5, atol=1e-6)
        # f̂ after scale 1 adds Φ_0 of the bicubic-upsampled 2×2 codes; area to 3×3 (overlapping cells).
        codes = q.embedding.weight[indices[1]].permute(0, 3, 1, 2)
        f2 = f1 + phi0(F.interpolate(codes, size=(16, 16), mode="bicubic", align_corners=False))
        expected = _area(f2, 3).flatten(2).transpose(1, 2)
        torch.testing.assert_close(tf[:, 4:13], expected, rtol=1e-5, atol=1e-6)

        # The sampler's step function rebuilds the same inputs and the same final f̂.
        f_hat, blocks = torch.zeros(2, 32, 16, 16), []
        for k, idx in enumerate(indices):
            f_hat, nxt = m.next_autoregressive_input(k, f_hat, q.embed(idx))
            if k < len(indices) - 1:
                blocks.append(nxt.flatten(2).transpose(1, 2))
        assert nxt is f_hat and torch.equal(f_hat, m.indices_to_fhat(indices))
        torch.testing.assert_close(torch.cat(blocks, 1), tf, rtol=0, atol=1e-6)


def test_gradients_reach_encoder_and_codebook():
    m = _tiny().train()
    x = _images(2)
    recon, losses = m(x)
    (recon - x).abs().mean().backward(retain_graph=True)
    assert m.encoder.conv_in.weight.grad.abs().sum() > 0  # through the straight-through estimator
    assert m.quantizer.embedding.weight.grad is None  # codes learn from the VQ loss only
    m.zero_grad(set_to_none=True)
    losses["vq"].backward()
    assert m.quantizer.embedding.weight.grad.abs().sum() > 0
    assert m.quantizer.phis[0].conv.weight.grad.abs().sum() > 0
    assert m.encoder.conv_in.weight.grad.abs().sum() > 0  # commitment term


def test_loss_falls_on_fixed_batch():
    m = _tiny(ch_mult=(1, 1, 1), num_res_blocks=1).train()
    x = _images(4)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    history = []
    for _ in range(30):
        recon, losses = m(x)
        loss = (recon - x).abs().mean() + (recon - x).square().mean() + losses["vq"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert sum(history[-5:]) / 5 < 0.5 * history[0]


def test_bf16_autocast_keeps_lookup_in_fp32():
    torch.manual_seed(0)
    q = MultiScaleQuantizer()  # V = 4096, C = 32, paper scales
    with torch.no_grad():
        q.embedding.weight.normal_()
    f, z = torch.randn(2, 32, 16, 16), torch.randn(500, 32)
    ref = q(f)
    nearest = torch.cdist(z, q.embedding.weight.detach(), compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(f)
        assert torch.equal(q.nearest_codes(z), nearest)
    assert all(torch.equal(a, b) for a, b in zip(out.indices, ref.indices))
    assert out.f_hat.dtype == torch.float32 and torch.equal(out.f_hat, ref.f_hat)


def test_bf16_channels_last_training_step_runs():
    m = _tiny().train().to(memory_format=torch.channels_last)
    x = _images(2).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, losses = m(x)
        loss = (recon.float() - x).abs().mean() + losses["vq"]
    loss.backward()
    assert recon.shape == x.shape and torch.isfinite(loss)
    assert torch.isfinite(m.encoder.conv_in.weight.grad).all()
    assert set(m.quantizer.usage_stats()) >= {"usage", "perplexity", "usage/scale_3", "perplexity/scale_0"}


def test_parameter_counts_and_presets():
    def count(name: str) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in MultiScaleVQVAE.from_preset(name).parameters())

    assert abs(count("paper") - 100e6) <= 10e6
    assert 1e6 < count("tiny") < 10e6
    assert tokenizer_preset("paper")["ch"] == 160
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        tokenizer_preset("huge")


def test_mid_attention_option():
    plain, attn = _tiny(), _tiny(mid_attn=True)
    c = 32 * 4  # bottleneck width ch·ch_mult[-1]
    per_block = 2 * c + (c * 3 * c + 3 * c) + (c * c + c)  # GroupNorm, qkv 1×1, proj 1×1
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(attn) - count(plain) == 2 * per_block  # one in the encoder, one in the decoder
    recon, losses = attn.eval()(_images(1))
    assert recon.shape == (1, 1, 64, 64) and torch.isfinite(losses["vq"])


def test_bad_input_shape_is_refused(model64):
    with pytest.raises(ValueError, match=r"\(B, 1, 64, 64\)"):
        model64.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleVQVAE.from_preset("tiny", image_size=100)


# ---- training on crops: the crop's own scale schedule ------------------------------------------


def test_crop_schedule_scales_the_sides_and_borrows_the_phi_of_equal_footprint():
    q = MultiScaleQuantizer(patch_nums=PAPER_PATCH_NUMS)
    assert q.schedule(16) == (PAPER_PATCH_NUMS, tuple(range(10)))
    # a 128² crop of a 256² slice: sides as derive_patch_nums(8); side m covers what side 2m covers at 256²
    assert q.schedule(8) == (derive_patch_nums(8), (1, 3, 5, 6, 7, 8, 9))
    assert q.schedule(4) == ((1, 2, 3, 4), (3, 6, 8, 9))
    for bad in (0, 17):
        with pytest.raises(ValueError, match=r"latent side .* must be in \[1, 16\]"):
            q.schedule(bad)


def test_a_crop_is_quantized_with_its_schedule_and_counts_in_its_scales_rows():
    torch.manual_seed(0)
    q = MultiScaleQuantizer(vocab_size=64, embed_dim=8, patch_nums=(1, 2, 3, 4, 5, 6, 8)).eval()
    with torch.no_grad():
        q.embedding.weight.normal_()
    f = torch.randn(2, 8, 4, 4)  # the latent of a crop half the side of the full 8² latent
    sides, scales = q.schedule(4)
    assert sides == (1, 2, 3, 4) and scales == (1, 3, 5, 6)
    out = q(f)
    f_hat = torch.zeros_like(f)
    for k, n, idx in zip(scales, sides, out.indices, strict=True):
        r = _area(f - f_hat, n)
        assert torch.equal(idx, q.nearest_codes(r.permute(0, 2, 3, 1).reshape(-1, 8)).view(2, n, n))
        f_hat = f_hat + q.scale_contribution(k, q.embed(idx), size=4)
    torch.testing.assert_close(out.f_hat, f_hat)
    assert q.last_hits[list(scales)].sum(1).tolist() == [2 * n * n for n in sides]
    assert q.last_hits[[0, 2, 4]].sum() == 0


def test_the_tokenizer_trains_on_crops_but_tokenizes_whole_slices(model64):
    recon, losses = _tiny().train()(_images(2, 32))
    assert recon.shape == (2, 1, 32, 32) and losses["vq"].ndim == 0
    for bad in (torch.zeros(1, 1, 24, 24), torch.zeros(1, 1, 128, 128), torch.zeros(1, 1, 32, 48)):
        with pytest.raises(ValueError, match="a multiple of 16"):
            model64(bad)
    with pytest.raises(ValueError, match=r"\(B, 1, 64, 64\)"):
        model64.encode(_images(1, 32))

"""Residual multi-scale vector quantizer with one codebook shared by all scales (paper §4.3, Alg. 1).

Re-implementation of VAR's multi-scale residual quantizer for MedVAR. Shape letters used below:
``B`` batch, ``C`` code dimension (``embed_dim``, Cvae = 32), ``H = W`` latent size (16 for 256²
images), ``V`` vocabulary size, ``K`` number of scales, ``n_k = patch_nums[k]`` (k counted from 0).

Per scale k the running residual is area-downsampled to ``n_k × n_k``, every vector is replaced by
its nearest code, the codes are bicubic-upsampled back to ``H × W``, refined by a partially shared
3×3 conv Φ and the result is added to f̂ and subtracted from the residual. The nearest-code search
and all of f̂'s arithmetic run in fp32 even under mixed-precision autocast.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

PAPER_PATCH_NUMS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
"""Token-map sides of the paper's K = 10 scales for a 16×16 latent (256² images): 680 tokens."""


def derive_patch_nums(latent_size: int) -> tuple[int, ...]:
    """Scale the paper's schedule for a 16×16 latent to a ``latent_size × latent_size`` latent.

    Each side ``n`` becomes ``round_half_up(n · latent_size / 16)`` (at least 1); repeated sides are
    dropped, so the result is strictly increasing and ends with ``latent_size``. Latent 16 gives
    exactly :data:`PAPER_PATCH_NUMS`, 8 gives ``(1, 2, 3, 4, 5, 7, 8)``, 4 gives ``(1, 2, 3, 4)``.
    """
    if latent_size < 1:
        raise ValueError(f"latent_size must be >= 1, got {latent_size}")
    scaled = (max(1, math.floor(n * latent_size / 16 + 0.5)) for n in PAPER_PATCH_NUMS)
    return tuple(dict.fromkeys(scaled))


def _fp32(device: torch.device):
    """Context that switches autocast off, so the ops inside run in the dtype of their inputs."""
    return torch.autocast(device_type=device.type, enabled=False)


class Phi(nn.Module):
    """Scale refinement Φ: a 3×3 conv blended with its input, ``x·(1−r) + conv(x)·r`` (r = 0.5).

    ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, dim: int, resi_ratio: float = 0.5):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.resi_ratio = resi_ratio

    def forward(self, x: Tensor) -> Tensor:
        return x * (1 - self.resi_ratio) + self.conv(x) * self.resi_ratio


class QuantizerOutput(NamedTuple):
    """What :meth:`MultiScaleQuantizer.forward` returns.

    f_hat: (B, C, H, W) fp32 quantized latent, straight-through: its value is exactly f̂ and its
        gradient goes to the encoder features unchanged.
    indices: K LongTensors of shape (B, n_k, n_k), the token maps r_1..r_K.
    residual: (B, C, H, W) what is left of f after the last scale (≈ f − f̂), detached.
    vq_loss: scalar codebook + β·commitment loss, averaged over the scales.
    scale_inputs: K detached fp32 tensors (B, C, n_k, n_k): the residual each scale looked its
        codes up for (r_k of Alg. 1 before quantization), what re-initialised codes should fit.
    """

    f_hat: Tensor
    indices: list[Tensor]
    residual: Tensor
    vq_loss: Tensor
    scale_inputs: list[Tensor]


class MultiScaleQuantizer(nn.Module):
    """Residual multi-scale VQ with one shared codebook and partially shared Φ refinements.

    Args:
        vocab_size: V, number of codes.
        embed_dim: C, code dimension (equals the encoder's output channels).
        patch_nums: strictly increasing token-map sides; the last equals the latent side H.
        beta: commitment weight β of the VQ loss.
        l2_norm: look codes up by cosine similarity (l2-normalised vectors) instead of by
            Euclidean distance; the embedding added to f̂ is the raw code in both cases.
        num_phi: number of Φ convs shared across the scales (VAR: 4).
        phi_resi_ratio: blend ratio r of every Φ.
        usage_decay: decay of the per-code usage EMA updated by every training forward.
        dead_threshold: a code is dead when its EMA usage frequency falls below
            ``dead_threshold / V``, i.e. this fraction of uniform usage. With the defaults
            (0.98, 0.1) a code re-initialised at uniform usage and never picked again counts as
            dead after ~114 training steps (log 0.1 / log 0.98).
        codebook_decay: 0 (the default, VAR's way): the codes learn by gradient descent on the
            codebook term of the VQ loss. In (0, 1): online k-means instead (the EMA codebook of
            VQ-VAE, van den Oord et al. 2017, appendix): after every training forward each code
            moves to the mean of the residuals r_k that picked it, averaged over the batches with
            this decay (``cluster_size``, ``cluster_sum`` buffers); the codebook gets no gradient.
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        embed_dim: int = 32,
        patch_nums: tuple[int, ...] = PAPER_PATCH_NUMS,
        beta: float = 0.25,
        l2_norm: bool = False,
        num_phi: int = 4,
        phi_resi_ratio: float = 0.5,
        usage_decay: float = 0.98,
        dead_threshold: float = 0.1,
        codebook_decay: float = 0.0,
    ):
        super().__init__()
        patch_nums = tuple(int(n) for n in patch_nums)
        if not patch_nums or patch_nums[0] < 1 or any(a >= b for a, b in zip(patch_nums, patch_nums[1:])):
            raise ValueError(f"patch_nums must be positive and strictly increasing, got {patch_nums}")
        if not 0.0 <= codebook_decay < 1.0:
            raise ValueError(f"codebook_decay must be in [0, 1), got {codebook_decay}")
        self.vocab_size, self.embed_dim, self.patch_nums = vocab_size, embed_dim, patch_nums
        self.beta, self.l2_norm = beta, l2_norm
        self.usage_decay, self.dead_threshold, self.codebook_decay = usage_decay, dead_threshold, codebook_decay

        self.embedding = nn.Embedding(vocab_size, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / vocab_size, 1.0 / vocab_size)  # as VAR
        self.phis = nn.ModuleList(Phi(embed_dim, phi_resi_ratio) for _ in range(num_phi))
        # VAR's PhiPartiallyShared: scale k uses the tick nearest to k/(K-1) (numpy, to keep its tie-breaks).
        ticks = np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)
        K = len(patch_nums)
        self.phi_index = tuple(int(np.argmin(np.abs(ticks - k / max(K - 1, 1)))) for k in range(K))

        # EMA of each code's share of all lookups (training only); uniform at the start, so no
        # code is dead before it has had a chance.
        self.register_buffer("ema_usage", torch.full((vocab_size,), 1.0 / vocab_size))
        # Hits per scale and code in the last forward (training or eval).
        self.register_buffer("last_hits", torch.zeros(K, vocab_size), persistent=False)
        if codebook_decay:
            # k-means statistics: EMAs of each code's share of the lookups and of the sum of the
            # residuals that picked it (per lookup); a code is their ratio.
            self.register_buffer("cluster_size", torch.full((vocab_size,), 1.0 / vocab_size))
            self.register_buffer("cluster_sum", self.embedding.weight.detach() / vocab_size)

    @property
    def num_tokens(self) -> int:
        """Tokens per image, ``sum_k n_k²`` (680 for the paper's scales)."""
        return sum(n * n for n in self.patch_nums)

    def nearest_codes(self, z: Tensor) -> Tensor:
        """Index of the nearest code for each row of ``z`` (N, C) -> (N,) long, computed in fp32.

        Euclidean distance, or the largest cosine similarity when ``l2_norm`` is set.
        """
        with _fp32(z.device):
            z = z.float()
            codes = self.embedding.weight.detach().float()
            if self.l2_norm:
                return (F.normalize(z, dim=1) @ F.normalize(codes, dim=1).T).argmax(dim=1)
            dist_sq = z.square().sum(1, keepdim=True) + codes.square().sum(1) - 2 * z @ codes.T
            return dist_sq.argmin(dim=1)

    def embed(self, idx: Tensor) -> Tensor:
        """Code vectors of a token map: (B, n, n) long -> (B, C, n, n) (no gradient to k-means codes)."""
        codes = self.embedding.weight.detach() if self.codebook_decay else self.embedding.weight
        return F.embedding(idx, codes).permute(0, 3, 1, 2)

    def scale_contribution(self, k: int, h: Tensor, size: int | None = None) -> Tensor:
        """Φ_k(upsample(h)): scale k's term of f̂, (B, C, n, n) -> (B, C, size, size).

        ``size`` is the latent side (default: ``patch_nums[-1]``; smaller for a crop, see
        :meth:`schedule`). Bicubic upsampling to it, skipped when ``h`` is already there.
        Runs in fp32 under autocast too, so f̂ is the same however it is assembled.
        """
        size = self.patch_nums[-1] if size is None else size
        with _fp32(h.device):
            h = h.float()
            if h.shape[-1] != size:
                h = F.interpolate(h, size=(size, size), mode="bicubic")
            return self.phis[self.phi_index[k]](h)

    def schedule(self, side: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Token-map sides for a latent of ``side`` and the scale whose Φ each of them uses.

        ``side`` = ``patch_nums[-1]`` gives ``(patch_nums, (0, …, K−1))``. A smaller side is the
        latent of a crop (training on crops): every side ``n_k`` is scaled by ``side / H`` as
        :func:`derive_patch_nums` does, and each crop side ``m`` borrows the Φ of the full-size scale
        whose tokens cover as many pixels (``n_k`` nearest to ``m·H/side``; the first on a tie).
        With H = 16 and side 8: sides (1, 2, 3, 4, 5, 7, 8), scales (1, 3, 5, 6, 7, 8, 9).

        Raises:
            ValueError: ``side`` is not in ``[1, H]``.
        """
        H = self.patch_nums[-1]
        if side == H:
            return self.patch_nums, tuple(range(len(self.patch_nums)))
        if not 1 <= side < H:
            raise ValueError(f"latent side {side} must be in [1, {H}]")
        sides = tuple(dict.fromkeys(max(1, math.floor(n * side / H + 0.5)) for n in self.patch_nums))
        full = np.asarray(self.patch_nums, dtype=float)
        return sides, tuple(int(np.argmin(np.abs(full - m * H / side))) for m in sides)

    def forward(self, f: Tensor) -> QuantizerOutput:
        """Quantize encoder features f (B, C, H, W) scale by scale (Alg. 1), in fp32."""
        out, hits, sums = self._quantize(f)
        self._record(hits, sums)
        return out

    @torch.no_grad()
    def scale_inputs(self, f: Tensor) -> list[Tensor]:
        """The K residuals (B, C, n_k, n_k) each scale looks its codes up for (fp32).

        The usage statistics are left untouched: this is for re-initialising codes, not a lookup.
        """
        return self._quantize(f)[0].scale_inputs

    def _quantize(self, f: Tensor) -> tuple[QuantizerOutput, Tensor, Tensor | None]:
        """Alg. 1 on features f (B, C, H, W), H = ``patch_nums[-1]`` or a crop's smaller latent
        (scales from :meth:`schedule`): the output, the hits (K, V) of every scale (a crop's
        scales count in the rows of the scales whose Φ they use) and, when training a k-means
        codebook, the sum (V, C) over all scales of the residuals that picked each code (else None)."""
        B, C, H, W = f.shape
        if H != W or H > self.patch_nums[-1] or C != self.embed_dim:
            raise ValueError(
                f"expected features (B, {self.embed_dim}, {self.patch_nums[-1]}, {self.patch_nums[-1]}) "
                f"or a square crop of them, got {tuple(f.shape)}"
            )
        sides, scales = self.schedule(H)
        with _fp32(f.device):
            f = f.float()
            residual = f.detach()
            f_hat = torch.zeros_like(residual)
            indices, inputs, vq_loss = [], [], f.new_zeros(())
            hits = f.new_zeros(len(self.patch_nums), self.vocab_size)
            # the residual sums feed only a k-means codebook's training update (see _record)
            sums = f.new_zeros(self.vocab_size, C) if self.codebook_decay and self.training else None
            for k, n in zip(scales, sides):
                r = residual if n == H else F.interpolate(residual, size=(n, n), mode="area")
                inputs.append(r)
                rows = r.permute(0, 2, 3, 1).reshape(-1, C)
                idx = self.nearest_codes(rows)
                hits[k] += idx.bincount(minlength=self.vocab_size).float()
                if sums is not None:
                    sums.index_add_(0, idx, rows)
                idx = idx.view(B, n, n)
                h = self.scale_contribution(k, self.embed(idx), H)
                f_hat = f_hat + h
                residual = residual - h.detach()
                vq_loss = vq_loss + F.mse_loss(f_hat.detach(), f) * self.beta + F.mse_loss(f_hat, f.detach())
                indices.append(idx)
            # Straight-through: the value is exactly f̂ (f − f.detach() is exactly 0), the gradient is f's.
            f_hat_st = f_hat.detach() + (f - f.detach())
        return QuantizerOutput(f_hat_st, indices, residual, vq_loss / len(sides), inputs), hits, sums

    @torch.no_grad()
    def _record(self, hits: Tensor, sums: Tensor | None) -> None:
        """Keep the hits (K, V) of this batch; in training, fold them into the usage EMA and, for
        a k-means codebook, the residual sums (V, C) into the cluster statistics and move the codes.

        Under torch.distributed hits and sums are summed over ranks, so every rank holds the same
        EMAs and codes. A code whose share has decayed below 1e-12 of uniform use (unpicked for
        ~2,750 steps at decay 0.99; dead-code re-draws usually come first) keeps its value, where its
        two statistics would otherwise underflow to 0 / 0.
        """
        self.last_hits.copy_(hits)
        if not self.training:
            return
        total = hits.sum(0)[:, None] if sums is None else torch.cat([hits.sum(0)[:, None], sums], 1)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        total = total / total[:, 0].sum()  # per lookup
        self.ema_usage.mul_(self.usage_decay).add_(total[:, 0], alpha=1 - self.usage_decay)
        if sums is not None:
            self.cluster_size.mul_(self.codebook_decay).add_(total[:, 0], alpha=1 - self.codebook_decay)
            self.cluster_sum.mul_(self.codebook_decay).add_(total[:, 1:], alpha=1 - self.codebook_decay)
            kept = self.cluster_size > 1e-12 / self.vocab_size
            self.embedding.weight[kept] = self.cluster_sum[kept] / self.cluster_size[kept, None]

    def dead_codes(self) -> Tensor:
        """Boolean mask (V,) of codes whose EMA usage is below ``dead_threshold / V``."""
        return self.ema_usage < self.dead_threshold / self.vocab_size

    @torch.no_grad()
    def reinit_dead_codes(self, features: Tensor) -> int:
        """Re-initialise every dead code from random feature vectors of the current batch.

        Args:
            features: encoder features (B, C, H, W) or vectors (N, C), e.g.
                ``model.encode_features(x)``. Rows are drawn without replacement when there are
                enough, with replacement otherwise.

        Returns:
            The number of codes re-initialised. Their usage EMA restarts at uniform usage, which
            gives them time to be picked before they can count as dead again. Under
            torch.distributed rank 0's new codebook and EMA are broadcast to all ranks (every rank
            must call this at the same step).
        """
        dead = self.dead_codes().nonzero().squeeze(1)
        if dead.numel():
            rows = features.permute(0, 2, 3, 1).reshape(-1, self.embed_dim) if features.dim() == 4 else features
            rows = rows.detach().float()
            if rows.shape[0] >= dead.numel():
                pick = torch.randperm(rows.shape[0], device=rows.device)[: dead.numel()]
            else:
                pick = torch.randint(rows.shape[0], (dead.numel(),), device=rows.device)
            self.embedding.weight[dead] = rows[pick].to(self.embedding.weight)
            self.ema_usage[dead] = 1.0 / self.vocab_size
            if dist.is_available() and dist.is_initialized():
                dist.broadcast(self.embedding.weight, src=0)
                dist.broadcast(self.ema_usage, src=0)
            if self.codebook_decay:  # a new cluster of uniform share, centred on its new code
                self.cluster_size[dead] = 1.0 / self.vocab_size
                self.cluster_sum[dead] = self.embedding.weight[dead] / self.vocab_size
        return int(dead.numel())

    def usage_stats(self) -> dict[str, float]:
        """Codebook health of the last forward batch.

        Keys: ``usage/scale_{k}`` (fraction of the V codes hit at scale k, k from 0),
        ``perplexity/scale_{k}`` (exp of the entropy of the code histogram; V at uniform use),
        ``usage`` and ``perplexity`` over all scales together, and ``dead_fraction`` (share of
        codes the usage EMA calls dead).
        """

        hits = torch.cat([self.last_hits, self.last_hits.sum(0, keepdim=True)])  # (K + 1, V), last row: all
        p = hits / hits.sum(1, keepdim=True).clamp_min(1)
        perplexity = (-(p * p.clamp_min(1e-12).log()).sum(1)).exp()
        usage = (hits > 0).float().mean(1)
        values = torch.cat([usage, perplexity, self.dead_codes().float().mean()[None]]).tolist()  # one sync
        K = len(self.patch_nums)
        stats = {f"usage/scale_{k}": values[k] for k in range(K)}
        stats.update({f"perplexity/scale_{k}": values[K + 1 + k] for k in range(K)})
        stats.update(usage=values[K], perplexity=values[2 * K + 1], dead_fraction=values[-1])
        return stats

"""Medical multi-scale VQ-VAE tokenizer (paper §4.3, §5.1): VAR's VQ-VAE rebuilt for one channel.

Input images are ``(B, 1, S, S)`` float slices with intensities in **[-1, 1]** (a uint8 slice
``u`` from the slice store maps to ``u / 127.5 - 1``); reconstructions live in the same range.
The convolutional encoder downsamples by ``2 ** (len(ch_mult) - 1)`` (16 with the default five
levels) to a ``(B, C, H, W)`` latent, ``C = embed_dim = 32``, ``H = W = S / 16``. The residual
multi-scale quantizer (:mod:`.quantizer`) turns the latent into K token maps ``(B, n_k, n_k)``
(680 tokens at 256²) and the decoder maps the quantized latent f̂ back to an image.

Scale indices ``k`` count from 0 everywhere in this module (the paper counts from 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvar_bundle.networks.quantizer import MultiScaleQuantizer, derive_patch_nums

IN_CHANNELS = 1
"""Medical slices are single-channel."""

TOKENIZER_PRESETS: dict[str, dict] = {
    # 5.2M parameters, for CPU demos and tests: 4×4 pixels folded into channels, then two ×2
    # downsamplings (×16 in all), so no convolution runs at full resolution; a training step at
    # 256², batch 8, takes ~0.9 s here against ~4–5 s for VAR's layout at ch=32.
    "tiny": dict(patch_size=4, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2),
    # 97.4M parameters: VAR's vae_ch160v4096z32 layout without its attention blocks.
    "paper": dict(ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2),
}


def tokenizer_preset(name: str) -> dict:
    """Constructor keyword arguments of the named preset (``"tiny"`` or ``"paper"``), a fresh copy."""
    if name not in TOKENIZER_PRESETS:
        raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {sorted(TOKENIZER_PRESETS)}")
    return dict(TOKENIZER_PRESETS[name])


class FastGroupNorm(nn.GroupNorm):
    """GroupNorm that runs on a contiguous tensor in the autocast dtype, returning the input's layout.

    On CPU, PyTorch's GroupNorm on ``channels_last`` tensors (and in fp32 under autocast) takes a
    slow path whose backward dominated a tokenizer training step (55 % of it); normalising a
    contiguous bf16 copy and converting back made the whole step 1.75× faster. The kernel still
    accumulates its statistics in fp32.
    """

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        with torch.autocast(device, enabled=False):
            y = F.group_norm(
                x.contiguous().to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype), self.eps
            )
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (``channels`` must be a multiple of 32)."""
    return FastGroupNorm(num_groups=32, num_channels=channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """(GroupNorm → SiLU → 3×3 conv) × 2 plus a skip, 1×1-projected when widths differ.

    ``(B, c_in, h, w) -> (B, c_out, h, w)``.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the ``h·w`` positions, with a residual. ``(B, c, h, w)`` kept."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)  # (B, hw, c) each
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Stride-2 3×3 conv with right/bottom padding: ``(B, c, h, w) -> (B, c, h/2, w/2)``."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest ×2 then 3×3 conv: ``(B, c, h, w) -> (B, c, 2h, 2w)``."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c: int, attn: bool) -> nn.Sequential:
    """Bottleneck: ResnetBlock, optional self-attention, ResnetBlock."""
    return nn.Sequential(ResnetBlock(c, c), AttnBlock(c) if attn else nn.Identity(), ResnetBlock(c, c))


class Encoder(nn.Module):
    """Image ``(B, 1, S, S)`` -> features ``(B, z_channels, S/(p·2^L), S/(p·2^L))``, ``L = len(ch_mult) - 1``.

    A patch size ``p`` > 1 first folds p×p pixels into channels (``PixelUnshuffle``), so that no
    convolution runs at full resolution. Level i has ``num_res_blocks`` blocks of width
    ``ch·ch_mult[i]``; every level but the last ends with a downsample.
    """

    def __init__(
        self,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        z_channels: int,
        mid_attn: bool,
        patch_size: int = 1,
    ):
        super().__init__()
        self.unshuffle = nn.PixelUnshuffle(patch_size) if patch_size > 1 else nn.Identity()
        self.conv_in = nn.Conv2d(IN_CHANNELS * patch_size**2, ch, 3, padding=1)
        blocks: list[nn.Module] = []
        c = ch
        for i, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(c, ch * mult))
                c = ch * mult
            if i != len(ch_mult) - 1:
                blocks.append(Downsample(c))
        self.down = nn.Sequential(*blocks)
        self.mid = _mid(c, mid_attn)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(self.unshuffle(x))))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``(B, z_channels, h, w)`` -> image ``(B, 1, h·p·2^L, w·p·2^L)``, mirror of :class:`Encoder`.

    Levels run from the widest to ``ch``, each with ``num_res_blocks + 1`` blocks and, but the
    last, an upsample; a patch size ``p`` > 1 ends with ``PixelShuffle``.
    """

    def __init__(
        self,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        z_channels: int,
        mid_attn: bool,
        patch_size: int = 1,
    ):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = _mid(c, mid_attn)
        blocks: list[nn.Module] = []
        for i in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c, ch * ch_mult[i]))
                c = ch * ch_mult[i]
            if i != 0:
                blocks.append(Upsample(c))
        self.up = nn.Sequential(*blocks)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, IN_CHANNELS * patch_size**2, 3, padding=1)
        self.shuffle = nn.PixelShuffle(patch_size) if patch_size > 1 else nn.Identity()

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.shuffle(self.conv_out(F.silu(self.norm_out(h))))


class MultiScaleVQVAE(nn.Module):
    """Single-channel multi-scale residual VQ-VAE (encoder, shared-codebook quantizer, decoder).

    Args:
        image_size: side S of the square input images; must be divisible by ``patch_size·2^(len(ch_mult)-1)``.
        patch_size: pixels folded into channels before the first convolution (1: none, VAR's layout).
        ch, ch_mult, num_res_blocks: widths ``ch·ch_mult[i]`` (multiples of 32) and depth per level.
        mid_attn: self-attention in the encoder's and decoder's bottleneck (off by default).
        vocab_size, embed_dim: codebook size V and code dimension C (= latent channels, Cvae).
        patch_nums: token-map sides, strictly increasing and ending at the latent side; derived
            from the latent side by :func:`derive_patch_nums` when omitted (paper's 10 at 256²).
        beta, l2_norm, usage_decay, dead_threshold, codebook_decay: see :class:`MultiScaleQuantizer`.

    ``config`` holds the keyword arguments that rebuild the model: ``MultiScaleVQVAE(**m.config)``.
    """

    def __init__(
        self,
        image_size: int = 256,
        ch: int = 160,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        mid_attn: bool = False,
        patch_size: int = 1,
        vocab_size: int = 4096,
        embed_dim: int = 32,
        patch_nums: tuple[int, ...] | None = None,
        beta: float = 0.25,
        l2_norm: bool = False,
        usage_decay: float = 0.98,
        dead_threshold: float = 0.1,
        codebook_decay: float = 0.0,
    ):
        super().__init__()
        ch_mult = tuple(ch_mult)
        factor = patch_size * 2 ** (len(ch_mult) - 1)
        if image_size % factor:
            raise ValueError(f"image_size {image_size} is not divisible by the downsampling factor {factor}")
        latent_size = image_size // factor
        patch_nums = derive_patch_nums(latent_size) if patch_nums is None else tuple(patch_nums)
        if patch_nums[-1] != latent_size:
            raise ValueError(f"the last of patch_nums {patch_nums} must be the latent side {latent_size}")
        self.config = dict(
            image_size=image_size, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, mid_attn=mid_attn,
            patch_size=patch_size, vocab_size=vocab_size, embed_dim=embed_dim, patch_nums=patch_nums, beta=beta,
            l2_norm=l2_norm,
            usage_decay=usage_decay, dead_threshold=dead_threshold, codebook_decay=codebook_decay,
        )  # fmt: skip
        self.image_size, self.patch_nums = image_size, patch_nums
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, embed_dim, mid_attn, patch_size)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, embed_dim, mid_attn, patch_size)
        self.quantizer = MultiScaleQuantizer(
            vocab_size=vocab_size, embed_dim=embed_dim, patch_nums=patch_nums, beta=beta, l2_norm=l2_norm,
            usage_decay=usage_decay, dead_threshold=dead_threshold, codebook_decay=codebook_decay,
        )  # fmt: skip

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MultiScaleVQVAE:
        """Build the named preset (``"tiny"``, ``"paper"``), with keyword overrides."""
        return cls(**{**tokenizer_preset(name), **overrides})

    @property
    def num_tokens(self) -> int:
        """Tokens per image, ``sum_k n_k²`` (680 at 256²)."""
        return self.quantizer.num_tokens

    # ---- image <-> latent ------------------------------------------------------------------

    def encode_features(self, x: Tensor, crops: bool = False) -> Tensor:
        """Continuous encoder features f: images (B, 1, S, S) in [-1, 1] -> (B, C, H, W); with
        ``crops``, also square crops (B, 1, s, s), s < S a multiple of the downsampling factor."""
        S, s, factor = self.image_size, x.shape[-1], self.image_size // self.patch_nums[-1]
        allowed = s == S or (crops and s < S and s % factor == 0)
        if x.dim() != 4 or tuple(x.shape[1:]) != (IN_CHANNELS, s, s) or not allowed:
            raise ValueError(
                f"expected images (B, {IN_CHANNELS}, {S}, {S})"
                + (f" or crops (B, {IN_CHANNELS}, s, s) with s < {S} a multiple of {factor}" if crops else "")
                + f" in [-1, 1], got {tuple(x.shape)}"
            )
        return self.encoder(x)

    def fhat_to_image(self, f_hat: Tensor) -> Tensor:
        """Decode a quantized latent f̂ (B, C, H, W) to images (B, 1, S, S) clamped to [-1, 1]."""
        return self.decoder(f_hat).clamp(-1, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Reconstruct images for training.

        Args:
            x: (B, 1, S, S) in [-1, 1], or a crop (B, 1, s, s) with s < S a multiple of the
                downsampling factor, quantized with the crop's scale schedule
                (:meth:`MultiScaleQuantizer.schedule`); channels_last and bf16 autocast are fine
                (the quantizer runs in fp32 regardless).

        Returns:
            The unclamped reconstruction (same shape as ``x``) and ``{"vq": codebook + β·commitment
            loss}``. Pixel/perceptual losses are the caller's; codebook usage of this batch is in
            ``self.quantizer.usage_stats()``.
        """
        quant = self.quantizer(self.encode_features(x, crops=True))
        return self.decoder(quant.f_hat), {"vq": quant.vq_loss}

    # ---- images <-> tokens -----------------------------------------------------------------

    @torch.no_grad()
    def encode(self, x: Tensor) -> list[Tensor]:
        """Token maps of images (B, 1, S, S) in [-1, 1]: K LongTensors (B, n_k, n_k) (Alg. 1)."""
        return self.quantizer(self.encode_features(x)).indices

    def indices_to_fhat(self, indices: list[Tensor], all_scales: bool = False) -> Tensor | list[Tensor]:
        """f̂ = Σ_k Φ_k(upsample(embed(r_k))) in fp32 (Alg. 2 without the decoder).

        Returns f̂ (B, C, H, W) after the last scale, or with ``all_scales`` the K running sums
        after each scale.
        """
        q = self.quantizer
        B, H = indices[0].shape[0], self.patch_nums[-1]
        f_hat = torch.zeros(B, q.embed_dim, H, H, device=indices[0].device)
        running = []
        for k, idx in enumerate(indices):
            f_hat = f_hat + q.scale_contribution(k, q.embed(idx))
            running.append(f_hat)
        return running if all_scales else f_hat

    def decode(self, indices: list[Tensor]) -> Tensor:
        """Images (B, 1, S, S) in [-1, 1] from K token maps (B, n_k, n_k) (Alg. 2)."""
        return self.fhat_to_image(self.indices_to_fhat(indices))

    # ---- helpers for the next-scale transformer --------------------------------------------

    def tokens_flat(self, indices: list[Tensor]) -> Tensor:
        """Concatenate token maps scale by scale, row-major within a scale: -> (B, sum_k n_k²)."""
        return torch.cat([idx.flatten(1) for idx in indices], dim=1)

    def split_tokens(self, flat: Tensor) -> list[Tensor]:
        """Inverse of :meth:`tokens_flat`: (B, sum_k n_k²) -> K maps (B, n_k, n_k)."""
        if flat.dim() != 2 or flat.shape[1] != self.num_tokens:
            raise ValueError(f"expected tokens (B, {self.num_tokens}), got {tuple(flat.shape)}")
        chunks = flat.split([n * n for n in self.patch_nums], dim=1)
        return [c.reshape(-1, n, n) for c, n in zip(chunks, self.patch_nums)]

    def teacher_forcing_input(self, indices: list[Tensor]) -> Tensor:
        """Transformer input for scales 1..K-1 under teacher forcing (VAR's ``idxBl_to_var_input``).

        Block k (k = 0..K-2) is the running f̂ after scale k, area-downsampled to scale k+1's grid
        and flattened row-major.

        Returns:
            (B, sum_{k>=1} n_k², C) fp32; (B, 679, 32) at 256².
        """
        running = self.indices_to_fhat(indices, all_scales=True)
        blocks = [
            F.interpolate(f_hat, size=(n, n), mode="area").flatten(2).transpose(1, 2)
            for f_hat, n in zip(running[:-1], self.patch_nums[1:])
        ]
        return torch.cat(blocks, dim=1)

    def next_autoregressive_input(self, k: int, f_hat: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """One sampling step: add scale k's sampled codes to f̂ and build scale k+1's input.

        Args:
            k: scale just sampled (0-based).
            f_hat: (B, C, H, W) running f̂ after scales < k (zeros before scale 0).
            h: (B, C, n_k, n_k) embeddings of scale k's tokens, ``self.quantizer.embed(idx)``.

        Returns:
            The new f̂ (B, C, H, W) and the next input: f̂ area-downsampled to
            (B, C, n_{k+1}, n_{k+1}), or f̂ itself after the last scale.
        """
        f_hat = f_hat + self.quantizer.scale_contribution(k, h)
        if k == len(self.patch_nums) - 1:
            return f_hat, f_hat
        n = self.patch_nums[k + 1]
        return f_hat, F.interpolate(f_hat, size=(n, n), mode="area")


class Reconstruction(nn.Module):
    """The tokenizer as an image-to-image network: ``(B, 1, S, S)`` in [-1, 1] → its quantized
    reconstruction ``(B, 1, S, S)``, fp32, clamped to [-1, 1].

    What ``configs/metadata.json``'s ``network_data_format`` describes, so MONAI's
    ``verify_net_in_out`` (which feeds one tensor and reads one back) can check the image side of
    the bundle; the tokenizer's own ``forward`` also returns its loss dictionary for training.
    """

    def __init__(self, tokenizer: MultiScaleVQVAE) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, x: Tensor) -> Tensor:
        return self.tokenizer(x)[0].float().clamp(-1, 1)

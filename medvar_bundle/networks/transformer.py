"""MedVAR next-scale transformer (paper §4.4, §5.1; VAR's ``VAR`` class rebuilt for dataset ids).

A decoder-only stack over the ``L = sum_k n_k²`` tokens of all K scales (680 at 256²). Position
``0`` (the whole first scale, ``n_1 = 1``) is the dataset-id embedding; the positions of scale
``k+1`` hold the tokenizer's running f̂ after scale ``k``, area-downsampled to scale ``k+1``'s grid
(:meth:`~medvar_bundle.networks.msvqvae.MultiScaleVQVAE.teacher_forcing_input`), projected from
``C_vae = 32`` to the width ``D``. Every position predicts the code id of its own token, so the
logits ``(B, L, V)`` line up with the flat tokens of
:meth:`~medvar_bundle.networks.msvqvae.MultiScaleVQVAE.tokens_flat`.

Attention is block-causal (a token sees every token of its own and of coarser scales); queries and
keys are l2-normalised and scaled by a learnable, clamped per-head temperature. The dataset-id
embedding (with one extra *null* id for classifier-free guidance) conditions every block through
AdaLN (scale, shift and gate from the condition).

Sizes follow VAR: width ``D = 64·depth``, ``depth`` heads, MLP ×4. Scale indices count from 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvar_bundle.networks.quantizer import PAPER_PATCH_NUMS

TRANSFORMER_PRESETS: dict[str, dict] = {
    # CPU presets: the demo and tests.
    "tiny": dict(depth=4),
    "small": dict(depth=8),
    # The paper's sizes (310M / 600M / 1.0B / 2.0B parameters with V = 4096), with VAR's
    # drop-path 0.1 · depth / 24 at the last block (the paper does not state it).
    **{f"d{depth}": dict(depth=depth, drop_path=0.1 * depth / 24) for depth in (16, 20, 24, 30)},
}
"""Constructor keyword arguments per preset name; width and heads follow from ``depth``. The CPU
presets train without drop-path (too few steps for a regulariser to help)."""

MAX_LOG_ATTN_SCALE = math.log(100.0)
"""Upper clamp of the per-head log attention temperature (VAR's ``max_scale_mul``)."""


def transformer_preset(name: str) -> dict:
    """Constructor keyword arguments of the named preset, a fresh copy."""
    if name not in TRANSFORMER_PRESETS:
        raise ValueError(f"unknown transformer preset {name!r}; choose one of {sorted(TRANSFORMER_PRESETS)}")
    return dict(TRANSFORMER_PRESETS[name])


def scale_of_positions(patch_nums: tuple[int, ...]) -> Tensor:
    """Scale index of every flat token position: ``(L,)`` long, e.g. ``[0, 1, 1, 1, 1, 2, ...]``."""
    return torch.cat([torch.full((n * n,), k, dtype=torch.long) for k, n in enumerate(patch_nums)])


def block_causal_mask(patch_nums: tuple[int, ...]) -> Tensor:
    """Attention mask ``(L, L)`` bool, True where query ``i`` may attend to key ``j``: scale(j) ≤ scale(i)."""
    scale = scale_of_positions(patch_nums)
    return scale[None, :] <= scale[:, None]


LOSS_WEIGHTINGS = ("scale", "token")


def token_loss_weights(patch_nums: tuple[int, ...], weighting: str = "scale") -> Tensor:
    """Weights ``(L,)`` (summing to 1) of the per-token cross-entropies in the training loss.

    ``"scale"``: every scale counts the same (each token of scale k weighs ``1 / (K·n_k²)``), i.e.
    the per-scale mean cross-entropies summed over scales, divided by K. ``"token"``: every token
    counts the same (VAR's choice), so the last scale (256 of 680 tokens) dominates and the coarse
    scales that fix the anatomy's layout (1 + 4 + 9 tokens) get 2 % of the gradient.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    sizes = torch.tensor([n * n for n in patch_nums], dtype=torch.float32)
    per_scale = (
        1.0 / (len(patch_nums) * sizes) if weighting == "scale" else torch.full_like(sizes, 1.0 / sizes.sum().item())
    )
    return per_scale[scale_of_positions(patch_nums)]


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, per block: ``(B, heads, L_seen, head_dim)`` each.

    Sampling fills it one scale at a time, so each scale's forward pass runs over only its new
    tokens (:meth:`NextScaleTransformer.forward_scale`).
    """

    keys: list[Tensor | None] = field(default_factory=list)
    values: list[Tensor | None] = field(default_factory=list)

    def extend(self, block: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's ``k``, ``v`` for ``block`` and return all keys and values seen so far."""
        while len(self.keys) <= block:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[block] is not None:
            k = torch.cat([self.keys[block], k], dim=2)
            v = torch.cat([self.values[block], v], dim=2)
        self.keys[block], self.values[block] = k, v
        return k, v


class DropPath(nn.Module):
    """Stochastic depth: zero a whole residual branch per sample with probability ``p`` (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class SelfAttention(nn.Module):
    """Multi-head self-attention with l2-normalised q/k and a learnable clamped per-head temperature.

    ``(B, l, D) -> (B, l, D)``. The attention logits are ``exp(s_h)·cos(q, k)`` with
    ``s_h ≤ log 100`` (initialised at ``log 4``).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.log_scale = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: KVCache | None = None, block: int = 0) -> Tensor:
        """``mask`` ``(l_q, l_k)`` bool (None: attend to everything); with ``cache``, keys and
        values of earlier calls are prepended."""
        B, L, D = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = F.normalize(q, dim=-1) * self.log_scale.clamp(max=MAX_LOG_ATTN_SCALE).exp()
        k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.extend(block, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class AdaLNBlock(nn.Module):
    """Transformer block whose LayerNorms take scale/shift and whose branches take a gate from the condition.

    ``x (B, l, D), cond (B, D) -> (B, l, D)``:
    ``x += gate1 · attn(LN(x)·(1+scale1) + shift1)``, ``x += gate2 · mlp(LN(x)·(1+scale2) + shift2)``.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = round(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: Tensor, cond: Tensor, mask: Tensor | None = None, cache: KVCache | None = None, block: int = 0
    ) -> Tensor:
        gate1, gate2, scale1, scale2, shift1, shift2 = self.ada(cond).unsqueeze(1).chunk(6, dim=2)
        x = x + self.drop_path(self.attn(self.norm1(x) * (1 + scale1) + shift1, mask, cache, block) * gate1)
        return x + self.drop_path(self.mlp(self.norm2(x) * (1 + scale2) + shift2) * gate2)


class NextScaleTransformer(nn.Module):
    """Dataset-conditioned next-scale prediction over a multi-scale tokenizer's token maps.

    Args:
        num_datasets: number of dataset ids ``0..num_datasets-1``; id ``num_datasets`` is the null
            condition (unconditional / classifier-free guidance).
        depth: number of blocks; width ``64·depth`` and ``depth`` heads unless given.
        vocab_size, embed_dim, patch_nums: must match the tokenizer (V, C_vae, scales).
        cond_drop: probability, in training, of replacing a sample's dataset id by the null id.
        drop_path: stochastic-depth rate of the last block (linearly rising from 0 over depth).

    ``config`` holds the keyword arguments that rebuild the model: ``NextScaleTransformer(**m.config)``.
    """

    def __init__(
        self,
        num_datasets: int,
        depth: int = 16,
        width: int | None = None,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        vocab_size: int = 4096,
        embed_dim: int = 32,
        patch_nums: tuple[int, ...] = PAPER_PATCH_NUMS,
        cond_drop: float = 0.1,
        drop_path: float = 0.0,
    ):
        super().__init__()
        width = 64 * depth if width is None else width
        heads = depth if heads is None else heads
        patch_nums = tuple(int(n) for n in patch_nums)
        if num_datasets < 1:
            raise ValueError(f"num_datasets must be at least 1, got {num_datasets}")
        self.config = dict(
            num_datasets=num_datasets, depth=depth, width=width, heads=heads, mlp_ratio=mlp_ratio,
            vocab_size=vocab_size, embed_dim=embed_dim, patch_nums=patch_nums, cond_drop=cond_drop,
            drop_path=drop_path,
        )  # fmt: skip
        self.num_datasets, self.null_id = num_datasets, num_datasets
        self.vocab_size, self.patch_nums, self.cond_drop = vocab_size, patch_nums, cond_drop
        self.num_tokens = sum(n * n for n in patch_nums)
        first = patch_nums[0] ** 2

        std = math.sqrt(1 / width / 3)
        self.cond_embed = nn.Embedding(num_datasets + 1, width)
        self.start_pos = nn.Parameter(torch.empty(1, first, width))
        self.input_proj = nn.Linear(embed_dim, width)
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_tokens, width))
        self.scale_embed = nn.Embedding(len(patch_nums), width)
        self.blocks = nn.ModuleList(
            AdaLNBlock(width, heads, mlp_ratio, drop_path * i / max(depth - 1, 1)) for i in range(depth)
        )
        self.head_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.head_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.head = nn.Linear(width, vocab_size)

        self.register_buffer("scale_ids", scale_of_positions(patch_nums), persistent=False)
        self.register_buffer("mask", block_causal_mask(patch_nums), persistent=False)
        self._init_weights(std, depth)

    @classmethod
    def from_preset(cls, name: str, num_datasets: int, **overrides) -> NextScaleTransformer:
        """Build a named preset (``tiny``, ``small``, ``d16``, ``d20``, ``d24``, ``d30``) with overrides."""
        return cls(num_datasets=num_datasets, **{**transformer_preset(name), **overrides})

    @torch.no_grad()
    def _init_weights(self, std: float, depth: int) -> None:
        """VAR's initialisation: truncated-normal linears and embeddings; output projections
        shrunk by ``sqrt(2·depth)``; AdaLN gates near zero (1e-5) so every block starts close to
        the identity; a small head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        for p in (self.start_pos, self.pos_embed):
            nn.init.trunc_normal_(p, std=std)
        width = self.start_pos.shape[-1]
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.mlp[-1].weight.div_(math.sqrt(2 * depth))
            ada = block.ada[-1].weight
            ada[: 2 * width].mul_(1e-5)  # gates
            ada[2 * width :].mul_(0.5)  # scales and shifts
        self.head_ada[-1].weight.mul_(0.5)
        self.head.weight.mul_(0.02)

    # ---- pieces shared by training and sampling ---------------------------------------------

    def condition(self, dataset_id: Tensor) -> Tensor:
        """Dataset ids ``(B,)`` long (``null_id`` allowed) -> condition vectors ``(B, D)``."""
        return self.cond_embed(dataset_id)

    def start_tokens(self, cond: Tensor) -> Tensor:
        """The first scale's input ``(B, n_1², D)``: the condition plus its own position embeddings."""
        return (
            cond.unsqueeze(1)
            + self.start_pos
            + self.pos_embed[:, : self.start_pos.shape[1]]
            + self.scale_embed(self.scale_ids[: self.start_pos.shape[1]])
        )

    def embed_inputs(self, features: Tensor, start: int) -> Tensor:
        """Project f̂ inputs ``(B, l, C_vae)`` occupying flat positions ``start..start+l`` to ``(B, l, D)``."""
        end = start + features.shape[1]
        return self.input_proj(features) + self.pos_embed[:, start:end] + self.scale_embed(self.scale_ids[start:end])

    def logits(self, h: Tensor, cond: Tensor) -> Tensor:
        """Final AdaLN and head: hidden states ``(B, l, D)`` -> logits ``(B, l, V)`` in fp32."""
        scale, shift = self.head_ada(cond).unsqueeze(1).chunk(2, dim=2)
        return self.head(self.head_norm(h) * (1 + scale) + shift).float()

    # ---- training -------------------------------------------------------------------------

    def forward(self, dataset_id: Tensor, inputs: Tensor) -> Tensor:
        """Teacher-forced logits for every token of every scale.

        Args:
            dataset_id: ``(B,)`` long in ``0..num_datasets`` (``num_datasets`` = null). In training
                mode each id is replaced by the null id with probability ``cond_drop``.
            inputs: ``(B, L - n_1², C_vae)`` teacher-forcing input (679×32 at 256²).

        Returns:
            Logits ``(B, L, V)`` fp32; position ``i`` predicts flat token ``i``.
        """
        if self.training and self.cond_drop > 0:
            drop = torch.rand(dataset_id.shape, device=dataset_id.device) < self.cond_drop
            dataset_id = torch.where(drop, torch.full_like(dataset_id, self.null_id), dataset_id)
        cond = self.condition(dataset_id)
        first = self.start_pos.shape[1]
        x = torch.cat([self.start_tokens(cond), self.embed_inputs(inputs, first)], dim=1)
        for block in self.blocks:
            x = block(x, cond, self.mask)
        return self.logits(x, cond)

    # ---- sampling -------------------------------------------------------------------------

    def forward_scale(self, x: Tensor, cond: Tensor, cache: KVCache) -> Tensor:
        """Run only one scale's new tokens ``(B, n_k², D)`` through the blocks against the cached
        coarser scales, extending ``cache``; returns their logits ``(B, n_k², V)``.

        No mask is needed: the new tokens may see all cached tokens and each other.
        """
        for i, block in enumerate(self.blocks):
            x = block(x, cond, None, cache, i)
        return self.logits(x, cond)

    def forward_prefix(self, x: Tensor, cond: Tensor) -> Tensor:
        """Recompute all tokens so far ``(B, l, D)`` with the block-causal mask (no cache): logits ``(B, l, V)``."""
        mask = self.mask[: x.shape[1], : x.shape[1]]
        for block in self.blocks:
            x = block(x, cond, mask)
        return self.logits(x, cond)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: weight decay on the weight matrices only — none on biases,
        embeddings, position/scale embeddings or the attention temperatures."""
        decay, no_decay = [], []
        no_decay_ids = {id(p) for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.dim() < 2 or id(p) in no_decay_ids or name in ("start_pos", "pos_embed") or name.endswith("log_scale"):
                no_decay.append(p)
            else:
                decay.append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

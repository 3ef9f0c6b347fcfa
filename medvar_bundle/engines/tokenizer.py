"""Components of the tokenizer's training (``configs/train_tokenizer.yaml`` composes them).

The config builds a MONAI ``SupervisedTrainer`` whose ``iteration_update`` is
:class:`TokenizerIteration` and a ``SupervisedEvaluator`` whose ``iteration_update`` is
:class:`TokenizerEvaluation`, scored by :class:`TokenizerFigures`; :class:`SaveTokenizer` writes
the run's files after each validation. ``medvar train-tokenizer`` runs the same config.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.transforms import RandSpatialCrop
from monai.utils import convert_to_tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm import tqdm

from ..data.resumable import derived_seed
from ..data.store import SliceStore
from ..files import atomic_torch_save
from ..losses import pixel_losses
from ..model_file import TOKENIZER_FILE, save_tokenizer
from ..networks.msvqvae import MultiScaleVQVAE
from ..runtime import autocast, model_input, to_uint8
from ..visualize import save_reconstructions, save_usage_heatmap
from .common import evenly_spaced, reseed, warmup_cosine

logger = logging.getLogger(__name__)


def slice_fidelity(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per slice ``(B,)`` of reconstructions against originals ``(B, 1, H, W)`` in [0, 1]: ``psnr``
    (dB, over the whole slice), ``ssim`` and ``body_psnr`` (dB, over the pixels above 0 in the
    original: ``prepare`` sets everything outside the body to 0, so this is the body less what its
    CT window or MR scaling maps to black, such as lung air; NaN for a slice without any). A slice
    that is mostly background has its whole-slice PSNR raised by the black around the body, which
    a tokenizer reproduces almost exactly."""
    psnr = peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    body = target > 0
    pixels = body.sum(dim=(1, 2, 3))
    squared = ((pred - target) ** 2 * body).sum(dim=(1, 2, 3)) / pixels.clamp(min=1)
    body_psnr = torch.where(pixels > 0, -10 * torch.log10(squared), torch.nan)
    ssim = structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none")
    return {"psnr": psnr, "ssim": ssim, "body_psnr": body_psnr}


class TokenizerFigures(Metric):
    """Reconstruction fidelity and codebook health, accumulated over batches (an Ignite metric).

    ``update`` takes the evaluator's output ``{"pred", "label", "indices"}``: reconstructions and
    originals ``(B, 1, H, W)`` in [0, 1] and the K token maps ``(B, n_k, n_k)``. ``compute`` gives
    ``psnr`` (dB) and ``ssim`` averaged over slices, ``body_psnr`` (dB, inside the body, averaged
    over the slices with body, None without any; see :func:`slice_fidelity`); ``codebook_usage``
    (fraction of the V codes used by any token of any scale); ``perplexity`` (exp of the entropy of
    the code histogram); ``per_scale_usage`` (codes used / codes that scale could use); ``counts`` (``(K, V)`` hits,
    for the heatmap); ``num_images``.
    """

    def __init__(self, vocab_size: int, num_scales: int, output_transform: Callable = lambda x: x) -> None:
        self.vocab_size, self.num_scales = vocab_size, num_scales
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self.counts = torch.zeros(self.num_scales, self.vocab_size, dtype=torch.long)
        self.sums = {"psnr": 0.0, "ssim": 0.0, "body_psnr": 0.0}
        self.n = self.n_body = 0

    def completed(self, engine: Engine, name: str) -> None:
        """Scalars go to ``engine.state.metrics``; ``per_scale_usage`` and ``counts`` to
        ``engine.state.metric_details`` (metric trackers such as MLflow log only scalars)."""
        for key, value in self.compute().items():
            target = engine.state.metrics if isinstance(value, (int, float)) else engine.state.metric_details
            target[key] = value

    def iteration_completed(self, engine: Engine) -> None:
        """Ignite unpacks mappings into ``(y_pred, y)``; this metric takes the whole output dictionary."""
        self.update(self._output_transform(engine.state.output))

    def update(self, output: dict) -> None:
        self.add(slice_fidelity(output["pred"], output["label"]), output["indices"])

    def add(self, fidelity: dict[str, torch.Tensor], indices: Sequence[torch.Tensor]) -> None:
        """Accumulate B slices: their :func:`slice_fidelity` and their K token maps ``(B, n_k, n_k)``."""
        for k, idx in enumerate(indices):
            self.counts[k] += torch.bincount(idx.flatten().cpu(), minlength=self.vocab_size)
        body = fidelity["body_psnr"][~fidelity["body_psnr"].isnan()]
        self.sums["psnr"] += float(fidelity["psnr"].sum())
        self.sums["ssim"] += float(fidelity["ssim"].sum())
        self.sums["body_psnr"] += float(body.sum())
        self.n += fidelity["psnr"].shape[0]
        self.n_body += body.shape[0]

    def compute(self) -> dict:
        total = self.counts.sum(0).double()
        p = total / total.sum()
        entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
        possible = torch.clamp(self.counts.sum(1), max=self.vocab_size).clamp(min=1)
        return {
            "psnr": self.sums["psnr"] / max(self.n, 1),
            "ssim": self.sums["ssim"] / max(self.n, 1),
            "body_psnr": self.sums["body_psnr"] / self.n_body if self.n_body else None,
            "codebook_usage": float((total > 0).double().mean()),
            "perplexity": math.exp(entropy),
            "per_scale_usage": [float(u) for u in ((self.counts > 0).sum(1) / possible)],
            "counts": self.counts.numpy(),
            "num_images": self.n,
        }


class TokenizerEvaluation:
    """The evaluator's ``iteration_update``: encode and decode a batch of store slices.

    ``batch["image"]``: slices in [0, 255] ``(B, H, W)`` or ``(B, 1, H, W)``. Returns the
    :class:`TokenizerFigures` input: ``pred`` and ``label`` in [0, 1] (fp32) and ``indices``.
    """

    def __init__(self, bf16: bool = True) -> None:
        self.bf16 = bf16

    @torch.no_grad()
    def __call__(self, engine: Engine, batch: dict) -> dict:
        model = engine.network
        model.eval()
        x = model_input(batch["image"], engine.state.device)
        with autocast(engine.state.device, self.bf16):
            indices = model.encode(x)
            recon = model.decode(indices)
        return {"pred": (recon.float().clamp(-1, 1) + 1) / 2, "label": (x.float() + 1) / 2, "indices": indices}


@torch.no_grad()
def evaluate_tokenizer(
    model: MultiScaleVQVAE,
    store: SliceStore,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    bf16: bool = True,
    max_images: int | None = None,
    progress: bool = False,
    groups: dict[str, Sequence[str]] | None = None,
) -> dict:
    """:class:`TokenizerFigures` of ``model`` on the slices of ``store`` (an evenly spaced subset
    of at most ``max_images`` slices with ``max_images``).

    ``groups`` (name → dataset names, e.g. the anatomy × modality groups) adds ``"groups"``: the
    same figures per group, from the same single pass over the slices.
    """
    order = evenly_spaced(len(store), max_images)
    vocab, scales = model.config["vocab_size"], len(model.patch_nums)
    figures = TokenizerFigures(vocab, scales)
    group_ids = {g: [store.datasets[n]["id"] for n in names] for g, names in (groups or {}).items()}
    group_figures = {g: TokenizerFigures(vocab, scales) for g in group_ids}
    step = TokenizerEvaluation(bf16)
    engine = SimpleNamespace(network=model, state=SimpleNamespace(device=torch.device(device)))
    for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="evaluate", unit="batch"):
        chosen = order[start : start + batch_size]
        output = step(engine, {"image": torch.stack([store[int(i)]["image"] for i in chosen])})
        fidelity = slice_fidelity(output["pred"], output["label"])  # once per slice, for the groups too
        figures.add(fidelity, output["indices"])
        for g, ids in group_ids.items():
            rows = torch.from_numpy(np.isin(store.dataset_ids[chosen], ids)).to(output["pred"].device)
            if rows.any():
                subset = {key: value[rows] for key, value in fidelity.items()}
                group_figures[g].add(subset, [idx[rows] for idx in output["indices"]])
    result = figures.compute()
    if groups is not None:
        result["groups"] = {g: f.compute() for g, f in group_figures.items() if f.n}
    return result


def picture_slices(store: SliceStore, n: int) -> np.ndarray:
    """Indices of at most ``n`` slices that show every dataset of ``store``: ``n`` shared out over
    the datasets in id order (the first ones get one more when it does not divide), and each
    dataset's ``k`` slices the ones nearest positions ``1/(k+1) … k/(k+1)`` along its volumes' body
    axis (:attr:`SliceStore.positions`): the middle of a volume for one slice, never an edge slice
    with little in it. Fewer when a dataset has fewer slices than its share."""
    ids = np.unique(store.dataset_ids)
    picks: list[int] = []
    for rank, dataset in enumerate(ids):
        members = np.flatnonzero(store.dataset_ids == dataset)
        k = n // len(ids) + (rank < n % len(ids))
        targets = np.arange(1, k + 1) / (k + 1)
        nearest = members[np.abs(store.positions[members][None, :] - targets[:, None]).argmin(axis=1)]
        picks += list(dict.fromkeys(nearest.tolist()))  # in target order, each slice once
    return np.asarray(picks[:n], dtype=np.int64)


def save_validation_pictures(
    model: MultiScaleVQVAE, store: SliceStore, counts: np.ndarray, out_dir: Path, device, bf16: bool, n: int = 8
) -> None:
    """``reconstructions.png`` (originals above reconstructions of :func:`picture_slices`, their
    datasets named in the title) and ``codebook_usage.png``."""
    pick = picture_slices(store, n)
    batch = torch.stack([store[int(i)]["image"] for i in pick])
    x = model_input(batch, device)
    with torch.no_grad(), autocast(device, bf16):
        recon = model.decode(model.encode(x))
    names = {entry["id"]: name for name, entry in store.datasets.items()}
    title = "columns: " + ", ".join(names[int(store.dataset_ids[i])] for i in pick)
    save_reconstructions(batch.numpy(), to_uint8(recon)[:, 0].cpu().numpy(), out_dir / "reconstructions.png", title)
    save_usage_heatmap(
        counts, out_dir / "codebook_usage.png", [f"scale {k + 1} ({p}²)" for k, p in enumerate(model.patch_nums)]
    )


def multiscale_rows(scale_inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Candidate vectors for re-initialised codes, drawn evenly from every scale.

    ``scale_inputs`` are the K residuals ``(B, C, n_k, n_k)`` the quantizer looked codes up for
    (:attr:`~medvar_bundle.networks.quantizer.QuantizerOutput.scale_inputs`): a new code is
    useful only if it lies where some scale's residual lies, and the residuals of the fine scales
    are much smaller than the features themselves. The rows of every scale are repeated up to
    the row count of the finest one, so coarse scales are not drowned out. Returns ``(K·N, C)``.
    """
    finest = scale_inputs[-1].shape[0] * scale_inputs[-1].shape[-2] * scale_inputs[-1].shape[-1]
    rows = []
    for r in scale_inputs:
        r = r.detach().float().permute(0, 2, 3, 1).reshape(-1, r.shape[1])
        rows.append(r.repeat(math.ceil(finest / r.shape[0]), 1)[:finest])
    return torch.cat(rows)


def stage_cosine(step: int, ae_warmup: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier after ``step`` completed steps: a cosine from 1 down to
    ``min_lr_ratio`` over the autoencoder warm-up, then a fresh one over the quantized steps
    (one cosine over the whole run when ``ae_warmup`` is 0)."""
    if step < ae_warmup:
        return warmup_cosine(step, 0, ae_warmup, min_lr_ratio)
    return warmup_cosine(step - ae_warmup, 0, max_steps - ae_warmup, min_lr_ratio)


class RandomCrops:
    """One random ``size × size`` crop out of every image of a batch.

    ``(B, C, H, W) -> (B, C, size, size)`` (memory layout kept), with MONAI's
    :class:`~monai.transforms.RandSpatialCrop`, a new position per image; ``set_random_state``
    seeds it (the tokenizer's iteration does at every step, so a resumed run cuts the same crops).
    """

    def __init__(self, size: int) -> None:
        self.crop = RandSpatialCrop(roi_size=(size, size), random_size=False)

    def set_random_state(self, seed: int | None = None) -> RandomCrops:
        self.crop.set_random_state(seed=seed)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return torch.stack([convert_to_tensor(self.crop(img), track_meta=False) for img in x]).contiguous(
            memory_format=layout
        )


class TokenizerIteration:
    """One optimizer step of the tokenizer: the ``SupervisedTrainer``'s ``iteration_update``.

    ``batch["image"]``: store slices in [0, 255]. The loss is ``l1_weight·L1 + l2_weight·L2 +
    vq_weight·VQ`` (+ ``lpips_weight·LPIPS`` with ``perceptual``, + ``gan_weight`` × the PatchGAN
    generator term from step ``gan_start`` with ``discriminator``); gradients are clipped to
    ``grad_clip``; the trainer's ``optimizer`` steps (the learning rate is the
    ``LrScheduleHandler``'s). For the first ``ae_warmup`` steps the quantizer is bypassed (a plain
    autoencoder, on ``cropper``'s random crops if given); at the last warm-up step every code is
    re-drawn from the learned (whole-slice) features, then every ``dead_code_every`` steps the dead
    ones are. The first ``quantized_crop_steps`` quantized steps train on the cropper's crops too,
    each quantized with the crop's own scale schedule (a 128² crop of a 256² slice: 7 scales of
    sides 1–8, see :meth:`~medvar_bundle.networks.quantizer.MultiScaleQuantizer.schedule`), at about
    40 % of a whole slice's cost; the steps after them see whole slices.
    Every step first seeds torch's generator and the cropper from ``(seed, step, rank)``
    (:func:`~medvar_bundle.engines.common.reseed`), so a resumed run draws what an uninterrupted one did.

    Returns a one-element list (the shape of a decollated MONAI output, which ``from_engine(keys,
    first=True)`` and MONAI's tracking handlers read) holding the step's figures: ``loss``, ``l1``,
    ``l2``, ``vq``, ``grad_norm``, ``lr`` and, once quantizing, codebook usage (overall and per
    scale); ``lpips``, ``g``, ``d``, ``reinit_codes`` when they apply.
    """

    def __init__(
        self,
        bf16: bool = True,
        l1_weight: float = 1.0,
        l2_weight: float = 1.0,
        vq_weight: float = 1.0,
        grad_clip: float = 1.0,
        dead_code_every: int = 50,
        ae_warmup: int = 0,
        cropper: RandomCrops | None = None,
        quantized_crop_steps: int = 0,
        perceptual: torch.nn.Module | None = None,
        lpips_weight: float = 0.0,
        discriminator: torch.nn.Module | None = None,
        disc_optimizer: torch.optim.Optimizer | None = None,
        gan_weight: float = 0.0,
        gan_start: int = 1000,
        seed: int = 0,
    ) -> None:
        self.bf16, self.grad_clip, self.seed = bf16, grad_clip, seed
        self.l1_weight, self.l2_weight, self.vq_weight = l1_weight, l2_weight, vq_weight
        self.dead_code_every, self.ae_warmup, self.cropper = dead_code_every, ae_warmup, cropper
        self.crop_until = ae_warmup + quantized_crop_steps if cropper is not None else 0
        self.perceptual, self.lpips_weight = perceptual, lpips_weight
        self.disc, self.disc_opt, self.gan_weight, self.gan_start = discriminator, disc_optimizer, gan_weight, gan_start

    def __call__(self, engine: Engine, batch: dict) -> dict:
        model, optimizer, dev, bf16 = engine.network, engine.optimizer, engine.state.device, self.bf16
        model.train()
        x = slices = model_input(batch["image"], dev)
        step = engine.state.iteration
        rank = dist.get_rank() if dist.is_initialized() else 0
        reseed(self.seed, step, rank)
        warming_up = step <= self.ae_warmup
        if step <= self.crop_until:
            x = self.cropper.set_random_state(derived_seed(self.seed, step, rank))(x)
        with autocast(dev, bf16):
            if warming_up:  # plain autoencoder: the quantizer is bypassed
                recon, losses = model.decoder(model.encoder(x)), {"vq": torch.zeros((), device=dev)}
            else:
                recon, losses = model(x)
        terms = pixel_losses(recon, x)
        loss = self.l1_weight * terms["l1"] + self.l2_weight * terms["l2"] + self.vq_weight * losses["vq"].float()
        logs = {"l1": terms["l1"].item(), "l2": terms["l2"].item(), "vq": losses["vq"].detach().item()}
        if self.perceptual is not None:
            terms["lpips"] = self.perceptual(recon, x)
            loss = loss + self.lpips_weight * terms["lpips"]
            logs["lpips"] = terms["lpips"].item()
        use_gan = self.disc is not None and step >= self.gan_start
        if use_gan:
            with autocast(dev, bf16):
                g_loss = -self.disc(recon)[-1].float().mean()
            loss = loss + self.gan_weight * g_loss
            logs["g"] = g_loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip))
        logs["lr"] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        if use_gan:
            with autocast(dev, bf16):
                real, fake = self.disc(x)[-1].float(), self.disc(recon.detach())[-1].float()
                d_loss = 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_opt.step()
            logs["d"] = d_loss.item()
        last_warmup = warming_up and step == self.ae_warmup
        if last_warmup or (not warming_up and self.dead_code_every and step % self.dead_code_every == 0):
            # at the end of the warm-up every code is re-drawn from the learned (full-slice) features
            with torch.no_grad(), autocast(dev, bf16):
                inputs = model.quantizer.scale_inputs(model.encode_features(slices))
            if last_warmup:
                model.quantizer.ema_usage.zero_()
            logs["reinit_codes"] = model.quantizer.reinit_dead_codes(multiscale_rows(inputs))
        if not warming_up:
            logs.update({k: float(v) for k, v in model.quantizer.usage_stats().items()})  # overall and per scale
        logs["loss"] = loss.item()
        return [logs]


def crop_sampler(size: int, image_size: int, downsampling: int) -> RandomCrops | None:
    """:class:`RandomCrops` of ``size``² for the warm-up, or None for ``size`` 0 (whole slices).

    Raises:
        ValueError: ``size`` is not a multiple of the tokenizer's ``downsampling`` factor in
            ``[0, image_size]``.
    """
    if size < 0 or size % downsampling or size > image_size:
        raise ValueError(
            f"warmup_crop {size} must be a multiple of the downsampling factor {downsampling}, at most {image_size}"
        )
    return RandomCrops(size) if size else None


class SaveTokenizer:
    """A validation record: the tokenizer files and pictures of the run folder ``output_dir``.

    Writes ``tokenizer.pt`` (the portable file of :func:`~medvar_bundle.model_file.save_tokenizer`,
    with the validation row under ``"validation"``), ``models/tokenizer.pt`` (the plain
    state_dict, for MONAI's ``CheckpointLoader``) and ``validation/reconstructions.png`` and
    ``validation/codebook_usage.png`` drawn from ``store``.
    """

    def __init__(self, network: MultiScaleVQVAE, output_dir: str | os.PathLike, store: SliceStore, bf16: bool = True):
        self.network, self.out, self.store, self.bf16 = network, Path(output_dir), store, bf16

    def __call__(self, row: dict, metrics: dict) -> None:
        device = next(self.network.parameters()).device
        pictures = self.out / "validation"
        save_validation_pictures(self.network, self.store, metrics["counts"], pictures, device, self.bf16)
        save_tokenizer(self.network, self.out / TOKENIZER_FILE, row["step"], {"validation": row})
        atomic_torch_save(self.out / "models" / TOKENIZER_FILE, self.network.state_dict())

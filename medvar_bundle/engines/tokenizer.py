"""Training and evaluation of the multi-scale VQ-VAE tokenizer, on MONAI/Ignite engines.

`medvar train-tokenizer` and ``python -m monai.bundle run training --config_file
configs/train_tokenizer.yaml`` both call :func:`train_tokenizer`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.handlers import StatsHandler, TensorBoardStatsHandler
from monai.networks.nets import PatchDiscriminator
from monai.transforms import RandSpatialCrop
from monai.utils import convert_to_tensor, set_determinism
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.tensorboard import SummaryWriter
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm import tqdm

from ..data.store import SliceStore, atomic_torch_save, atomic_write_json
from ..losses import PerceptualLoss, load_lpips, pixel_losses
from ..networks.msvqvae import MultiScaleVQVAE
from ..visualize import save_reconstructions, save_usage_heatmap
from .common import autocast, evenly_spaced, model_input, slice_augmentation, step_trainer, store_loader, to_uint8, warmup_cosine

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.pt"


def save_tokenizer(model: MultiScaleVQVAE, path: str | os.PathLike, step: int, extra: dict | None = None) -> Path:
    """Write a self-contained tokenizer file: ``{"config", "state_dict", "step", ...}`` (atomic)."""
    return atomic_torch_save(path, {"config": model.config, "state_dict": model.state_dict(), "step": int(step), **(extra or {})})


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu") -> MultiScaleVQVAE:
    """Rebuild a tokenizer saved by :func:`save_tokenizer` (eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer file not found")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
        raise ValueError(f"{path}: not a MedVAR tokenizer file (no config/state_dict)")
    model = MultiScaleVQVAE(**blob["config"])
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()


@torch.no_grad()
def evaluate_tokenizer(
    model: MultiScaleVQVAE,
    store: SliceStore,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    bf16: bool = True,
    max_images: int | None = None,
    progress: bool = False,
) -> dict:
    """Reconstruction fidelity and codebook health of ``model`` on the slices of ``store``.

    Returns:
        ``psnr`` (dB) and ``ssim`` on [0, 1] intensities, averaged over slices; ``codebook_usage``
        (fraction of the V codes used by any token of any scale on this store); ``perplexity``
        (exp of the entropy of the code histogram); ``per_scale_usage`` (codes used / codes that
        scale could use) and ``counts`` (``(K, V)`` hits, for the heatmap); ``num_images``.
        With ``max_images``, an evenly spaced subset of the store's slices is used.
    """
    model.eval()
    order = evenly_spaced(len(store), max_images)
    n = len(order)
    vocab, scales = model.config["vocab_size"], len(model.patch_nums)
    counts = torch.zeros(scales, vocab, dtype=torch.long)
    psnr_sum = ssim_sum = 0.0
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc="evaluate", unit="batch"):
        batch = torch.stack([store[int(i)]["image"] for i in order[start : start + batch_size]])
        x = model_input(batch, device)
        with autocast(device, bf16):
            indices = model.encode(x)
            recon = model.decode(indices)
        for k, idx in enumerate(indices):
            counts[k] += torch.bincount(idx.flatten().cpu(), minlength=vocab)
        target = (x.float() + 1) / 2
        pred = ((recon.float().clamp(-1, 1)) + 1) / 2
        psnr = peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none")
        psnr_sum += float(psnr.sum())
        ssim_sum += float(ssim.sum())
    total = counts.sum(0).double()
    p = total / total.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    possible = torch.clamp(counts.sum(1), max=vocab).clamp(min=1)
    return {
        "psnr": psnr_sum / max(n, 1),
        "ssim": ssim_sum / max(n, 1),
        "codebook_usage": float((total > 0).double().mean()),
        "perplexity": math.exp(entropy),
        "per_scale_usage": [float(u) for u in ((counts > 0).sum(1) / possible)],
        "counts": counts.numpy(),
        "num_images": n,
    }


def save_validation_pictures(model: MultiScaleVQVAE, store: SliceStore, counts: np.ndarray, out_dir: Path, device, bf16: bool, n: int = 8) -> None:
    """``reconstructions.png`` (originals above reconstructions) and ``codebook_usage.png``."""
    pick = np.linspace(0, len(store) - 1, num=min(n, len(store))).astype(int)
    batch = torch.stack([store[int(i)]["image"] for i in pick])
    x = model_input(batch, device)
    with torch.no_grad(), autocast(device, bf16):
        recon = model.decode(model.encode(x))
    save_reconstructions(batch.numpy(), to_uint8(recon)[:, 0].cpu().numpy(), out_dir / "reconstructions.png")
    save_usage_heatmap(counts, out_dir / "codebook_usage.png", [f"scale {k + 1} ({p}²)" for k, p in enumerate(model.patch_nums)])


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


def random_crops(size: int, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function cutting one random ``size × size`` crop out of every image of a batch.

    ``(B, C, H, W) -> (B, C, size, size)`` (memory layout kept), with MONAI's
    :class:`~monai.transforms.RandSpatialCrop` seeded by ``seed``, a new position per image.
    """
    crop = RandSpatialCrop(roi_size=(size, size), random_size=False)
    crop.set_random_state(seed=seed)

    def cut(x: torch.Tensor) -> torch.Tensor:
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return torch.stack([convert_to_tensor(crop(img), track_meta=False) for img in x]).contiguous(memory_format=layout)

    return cut


def _hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())


def train_tokenizer(
    dataset_dir: str | Sequence[str],
    output_dir: str,
    max_steps: int = 2000,
    batch_size: int = 8,
    device: str = "cpu",
    preset: str = "tiny",
    model_overrides: dict | None = None,
    lr: float = 2e-4,
    min_lr_ratio: float = 1.0,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    l1_weight: float = 1.0,
    l2_weight: float = 1.0,
    vq_weight: float = 1.0,
    lpips_weight: float = 0.0,
    lpips_net: str = "alex",
    lpips_backbone: str | None = None,
    gan_weight: float = 0.0,
    gan_start: int = 1000,
    dead_code_every: int = 50,
    augment: bool = False,
    ae_warmup: int = 0,
    warmup_crop: int = 0,
    checkpoint_every: int = 200,
    val_every: int = 500,
    val_max_images: int | None = 256,
    bf16: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train the tokenizer on the ``training`` split of one or several slice stores.

    Checkpoints (network, optimizer, trainer state) go to ``output_dir/checkpoints`` every
    ``checkpoint_every`` steps and at the end; a run started on a folder with checkpoints resumes
    from the latest one (same step count and optimizer state; same data order from an epoch
    boundary, see :func:`~medvar_bundle.engines.common.store_loader`). Validation on the
    ``validation`` split (PSNR, SSIM, codebook usage, perplexity, PNGs) runs every ``val_every``
    steps and at the end; its figures go to TensorBoard, ``output_dir/metrics.jsonl`` and
    ``output_dir/validation/``. The final model is ``output_dir/tokenizer.pt``. ``augment`` adds
    random flips, small affine transforms and gamma contrast (:func:`slice_augmentation`).
    The learning rate follows a cosine from ``lr`` down to ``min_lr_ratio · lr`` at ``max_steps``
    (1.0: constant); with a warm-up, the warm-up and the quantized steps each have their own
    (:func:`stage_cosine`). ``ae_warmup`` > 0 trains encoder and decoder as a plain autoencoder
    (quantizer bypassed) for that many steps, then re-draws the whole codebook from the learned
    features and quantizes; validation starts after the warm-up.
    ``warmup_crop`` > 0 trains that warm-up on one random ``warmup_crop``² crop of every slice
    (:func:`random_crops`): the convolutions are the same at any size, a 128² crop costs a quarter
    of a 256² slice, so the warm-up sees four times as many slices in the same time.

    Returns:
        Path of ``tokenizer.pt``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    set_determinism(seed=seed)
    perceptual = PerceptualLoss(load_lpips(lpips_net, lpips_backbone)).to(dev) if lpips_weight > 0 else None

    augmentation = slice_augmentation(seed) if augment else None
    loader = store_loader(dataset_dir, "training", batch_size, num_workers=num_workers, seed=seed, transform=augmentation)
    val_store = SliceStore(dataset_dir, split="validation")
    if len(val_store) == 0:
        logger.warning("no 'validation' split in %s: validating on the training split", dataset_dir)
        val_store = SliceStore(dataset_dir, split="training")
    image_size = int(loader.dataset[0]["image"].shape[-1])

    model = MultiScaleVQVAE.from_preset(preset, image_size=image_size, **(model_overrides or {})).to(dev)
    model = model.to(memory_format=torch.channels_last)
    factor = image_size // model.patch_nums[-1]
    if warmup_crop < 0 or warmup_crop % factor or warmup_crop > image_size:
        raise ValueError(
            f"warmup_crop {warmup_crop} must be a multiple of the downsampling factor {factor}, at most {image_size}"
        )
    cropper = random_crops(warmup_crop, seed) if warmup_crop else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.5, 0.9), weight_decay=weight_decay)
    schedule = functools.partial(stage_cosine, ae_warmup=ae_warmup, max_steps=max_steps, min_lr_ratio=min_lr_ratio)
    scheduler = LambdaLR(optimizer, schedule)
    disc = disc_opt = None
    if gan_weight > 0:
        disc = PatchDiscriminator(spatial_dims=2, num_layers_d=3, channels=64, in_channels=1, out_channels=1).to(dev)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=lr, betas=(0.5, 0.9))

    def step(engine: Engine, batch: dict) -> dict:
        model.train()
        x = slices = model_input(batch["image"], dev)
        warming_up = engine.state.iteration <= ae_warmup
        with autocast(dev, bf16):
            if warming_up:  # plain autoencoder: the quantizer is bypassed
                if cropper is not None:
                    x = cropper(x)
                recon, losses = model.decoder(model.encoder(x)), {"vq": torch.zeros((), device=dev)}
            else:
                recon, losses = model(x)
        terms = pixel_losses(recon, x)
        loss = l1_weight * terms["l1"] + l2_weight * terms["l2"] + vq_weight * losses["vq"].float()
        logs = {"l1": terms["l1"].item(), "l2": terms["l2"].item(), "vq": losses["vq"].detach().item()}
        if perceptual is not None:
            terms["lpips"] = perceptual(recon, x)
            loss = loss + lpips_weight * terms["lpips"]
            logs["lpips"] = terms["lpips"].item()
        use_gan = disc is not None and engine.state.iteration >= gan_start
        if use_gan:
            with autocast(dev, bf16):
                g_loss = -disc(recon)[-1].float().mean()
            loss = loss + gan_weight * g_loss
            logs["g"] = g_loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        logs["lr"] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        if use_gan:
            with autocast(dev, bf16):
                d_loss = _hinge_d_loss(disc(x)[-1].float(), disc(recon.detach())[-1].float())
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
            logs["d"] = d_loss.item()
        last_warmup = warming_up and engine.state.iteration == ae_warmup
        if last_warmup or (not warming_up and dead_code_every and engine.state.iteration % dead_code_every == 0):
            # at the end of the warm-up every code is re-drawn from the learned (full-slice) features
            with torch.no_grad(), autocast(dev, bf16):
                inputs = model.quantizer.scale_inputs(model.encode_features(slices))
            if last_warmup:
                model.quantizer.ema_usage.zero_()
            logs["reinit_codes"] = model.quantizer.reinit_dead_codes(multiscale_rows(inputs))
        if not warming_up:
            logs.update({k: float(v) for k, v in model.quantizer.usage_stats().items()})  # overall and per scale
        logs["loss"] = loss.item()
        return logs

    state = {"network": model, "optimizer": optimizer, "scheduler": scheduler}
    if disc is not None:
        state.update(discriminator=disc, disc_optimizer=disc_opt)
    trainer, checkpointer = step_trainer(step, loader, model, optimizer, dev, max_steps, state, out / "checkpoints", checkpoint_every)

    def scalars(output: dict) -> dict:
        return {k: v for k, v in output.items() if isinstance(v, (int, float))}

    StatsHandler(iteration_log=lambda e, i: i % 50 == 0, output_transform=lambda o: o["loss"], name=logger.name).attach(trainer)
    writer = SummaryWriter(log_dir=str(out / "tensorboard"))
    TensorBoardStatsHandler(summary_writer=writer, output_transform=scalars, iteration_log=True, epoch_log=False).attach(trainer)

    def validate(engine: Engine) -> None:
        metrics = evaluate_tokenizer(model, val_store, batch_size, dev, bf16, max_images=val_max_images)
        save_validation_pictures(model, val_store, metrics["counts"], out / "validation", dev, bf16)
        row = {"step": engine.state.iteration, **{k: v for k, v in metrics.items() if k != "counts"}}
        with open(out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        for k in ("psnr", "ssim", "codebook_usage", "perplexity"):
            writer.add_scalar(f"val/{k}", metrics[k], engine.state.iteration)
        logger.info("step %d: val psnr %.2f dB, ssim %.4f, usage %.1f%%, perplexity %.0f", row["step"], row["psnr"], row["ssim"], 100 * row["codebook_usage"], row["perplexity"])
        save_tokenizer(model, out / TOKENIZER_FILE, engine.state.iteration, {"validation": row})

    # during the warm-up the codebook is not in use yet: validating it would measure nothing
    trainer.add_event_handler(Events.ITERATION_COMPLETED(event_filter=lambda e, i: i % val_every == 0 and i > ae_warmup), validate)

    if progress:
        ProgressBar(persist=True).attach(trainer, output_transform=lambda o: {"loss": o["loss"]})

    if trainer.state.iteration < max_steps:
        trainer.run()
    if trainer.state.iteration % val_every or not (out / TOKENIZER_FILE).exists():
        validate(trainer)
    checkpointer(trainer)
    writer.close()
    return out / TOKENIZER_FILE

"""Training of the next-scale transformer on a token store, on MONAI/Ignite engines (paper §5.1).

`medvar train` and ``python -m monai.bundle run training --config_file configs/train.yaml`` both
call :func:`train_transformer`; ``configs/multi_gpu_train.yaml`` runs it under torchrun with
DistributedDataParallel.

One trainer iteration is one optimizer step: the loader yields ``batch_size · grad_accum`` token
rows per process, split into ``grad_accum`` micro-batches of ``batch_size`` whose gradients are
accumulated (and, under DDP, all-reduced once, after the last). Every step count (``max_steps``,
warm-up, checkpoints, validation) counts optimizer steps.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.handlers import StatsHandler, TensorBoardStatsHandler
from monai.utils import set_determinism
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Subset
from torch.utils.tensorboard import SummaryWriter

from ..data.tokens import TOKENS_META, TokenStore, file_digest
from ..model_file import MODEL_FILE, load_tokenizer, save_model
from ..networks.msvqvae import MultiScaleVQVAE
from ..networks.transformer import NextScaleTransformer, scale_of_positions, token_loss_weights
from ..runtime import autocast
from .common import evenly_spaced, process_group, reseed, step_trainer, store_loader, warmup_cosine

logger = logging.getLogger(__name__)

LR_REFERENCE_BATCH = 256
"""The base learning rate is given per this many images of global batch (VAR's linear scaling)."""


def resolve_tokenizer(store: TokenStore, tokenizer: str | os.PathLike | None = None) -> Path:
    """The tokenizer file that made the tokens of ``store``: ``tokenizer``, or when None the path
    recorded in the store's ``tokens.json``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file's sha256 is not the one recorded with the tokens.
    """
    recorded = store.meta
    path = Path(tokenizer if tokenizer is not None else recorded["tokenizer"])
    if not path.is_file():
        where = (
            ""
            if tokenizer is not None
            else f" (recorded in {store.roots[0] / TOKENS_META}; pass the tokenizer explicitly)"
        )
        raise FileNotFoundError(f"{path}: tokenizer file not found{where}")
    if file_digest(path) != recorded["tokenizer_sha256"]:
        stores = ", ".join(str(r) for r in store.roots)
        raise ValueError(
            f"{path} is not the tokenizer that made the tokens of {stores} ({recorded['tokenizer']}); "
            "pass that one or re-tokenize with `medvar tokenize --force`"
        )
    return path


def teacher_forced_loss(
    tokenizer: MultiScaleVQVAE, transformer: nn.Module, tokens: Tensor, dataset_id: Tensor, bf16: bool
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of the transformer's teacher-forced prediction of every token.

    Args:
        tokenizer: the frozen tokenizer; it builds the f̂ inputs (no gradient).
        transformer: a :class:`NextScaleTransformer`, possibly wrapped in DDP.
        tokens: ``(B, L)`` long flat token ids, coarse to fine (L = 680 at 256²).
        dataset_id: ``(B,)`` long.
        bf16: run the transformer under bf16 autocast.

    Returns:
        Per-token cross-entropy ``(B, L)`` fp32 in nats, and the logits ``(B, L, V)`` fp32.
    """
    with torch.no_grad():
        inputs = tokenizer.teacher_forcing_input(tokenizer.split_tokens(tokens))
    with autocast(tokens.device, bf16):
        logits = transformer(dataset_id, inputs)
    return F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none"), logits


class TokenStats:
    """Running sums of teacher-forced cross-entropy and token accuracy, per scale.

    ``sums`` ``(3, K)`` float64 holds, per scale, the CE sum (nats), the count of tokens whose
    arg-max prediction is right, and the token count; under DDP it can be all-reduced as is.
    """

    def __init__(self, patch_nums: Sequence[int], device: torch.device | str) -> None:
        self.scale_ids = scale_of_positions(tuple(patch_nums)).to(device)
        self.sums = torch.zeros(3, len(patch_nums), dtype=torch.float64, device=device)

    def add(self, ce: Tensor, logits: Tensor, tokens: Tensor) -> None:
        """Add a batch: per-token CE ``(B, L)``, logits ``(B, L, V)``, target ids ``(B, L)``."""
        correct = (logits.detach().argmax(-1) == tokens).double()
        for row, values in enumerate((ce.detach().double(), correct, torch.ones_like(correct))):
            self.sums[row].index_add_(0, self.scale_ids, values.sum(0))

    def summary(self) -> dict:
        """``ce`` (nats/token) and ``acc`` over all tokens; ``ce_first``/``ce_last`` and
        ``acc_first``/``acc_last`` of the first and last scale; ``ce_per_scale``/``acc_per_scale``."""
        ce_sum, correct, count = self.sums.cpu().unbind(0)
        per_ce, per_acc = (ce_sum / count).tolist(), (correct / count).tolist()
        return {
            "ce": float(ce_sum.sum() / count.sum()), "acc": float(correct.sum() / count.sum()),
            "ce_first": per_ce[0], "ce_last": per_ce[-1], "acc_first": per_acc[0], "acc_last": per_acc[-1],
            "ce_per_scale": per_ce, "acc_per_scale": per_acc,
        }  # fmt: skip


@torch.no_grad()
def evaluate_transformer(
    tokenizer: MultiScaleVQVAE,
    transformer: NextScaleTransformer,
    store: TokenStore,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    bf16: bool = True,
    max_images: int | None = None,
    num_workers: int = 0,
) -> dict:
    """Teacher-forced cross-entropy and token accuracy of ``transformer`` on the slices of ``store``
    (eval mode, so no conditional dropout); an evenly spaced subset with ``max_images``.

    Returns:
        :meth:`TokenStats.summary` plus ``num_images``.
    """
    transformer.eval()
    indices = evenly_spaced(len(store), max_images).tolist()
    stats = TokenStats(transformer.patch_nums, device)
    for batch in DataLoader(Subset(store, indices), batch_size=batch_size, num_workers=num_workers):
        tokens, ids = batch["tokens"].to(device), batch["dataset_id"].to(device)
        ce, logits = teacher_forced_loss(tokenizer, transformer, tokens, ids, bf16)
        stats.add(ce, logits, tokens)
    return {**stats.summary(), "num_images": len(indices)}


def train_transformer(
    dataset_dir: str | Sequence[str],
    output_dir: str,
    tokenizer: str | None = None,
    max_steps: int = 2000,
    batch_size: int = 16,
    device: str = "cpu",
    preset: str = "tiny",
    model_overrides: dict | None = None,
    lr: float = 1e-4,
    warmup_steps: int = 100,
    min_lr_ratio: float = 0.01,
    weight_decay: float = 0.05,
    betas: Sequence[float] = (0.9, 0.95),
    grad_clip: float = 2.0,
    grad_accum: int = 1,
    cond_drop: float = 0.1,
    checkpoint_every: int = 200,
    val_every: int = 500,
    val_max_images: int | None = 1024,
    bf16: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = True,
    distributed: bool = False,
    loss_weighting: str = "scale",
    max_seconds: float | None = None,
) -> Path:
    """Train the next-scale transformer on the tokens of one or several (tokenized) slice stores.

    Teacher forcing: the loss is the cross-entropy of all L tokens (680 at 256²), weighted by
    :func:`~medvar_bundle.networks.transformer.token_loss_weights` — by default every scale's mean
    cross-entropy counts the same (``loss_weighting="scale"``; ``"token"`` weighs every token the
    same, as VAR) — and averaged over images. AdamW (``betas``, ``weight_decay`` on weight matrices only) at a peak
    learning rate ``lr · global_batch / 256``, ``global_batch = batch_size · world_size ·
    grad_accum``, after a linear warm-up of ``warmup_steps`` and down a cosine to
    ``min_lr_ratio · peak`` at ``max_steps`` (:func:`warmup_cosine`); bf16 autocast; gradient
    norm clipped to ``grad_clip``. The network is ``preset`` with ``model_overrides`` and
    ``cond_drop``; vocabulary, code dimension and scales always come from the tokenizer.

    Args:
        dataset_dir: store folder(s) tokenized by ``tokenizer``; training uses their ``training``
            split, validation their ``validation`` split (the training split if there is none).
        output_dir: run folder: ``checkpoints/``, ``tensorboard/``, ``metrics.jsonl``, ``model.pt``.
        tokenizer: ``tokenizer.pt``; default: the file recorded in the store's ``tokens.json``.
            Its sha256 must be the one recorded there.
        batch_size: images per micro-batch and process.
        distributed: run under DDP (as does an already initialised process group); a group is
            initialised from torchrun's environment if needed (NCCL on CUDA, gloo on CPU). Only
            rank 0 logs, writes TensorBoard, checkpoints and ``model.pt``.
        max_seconds: wall-clock training budget in seconds, counted from the start of this call
            (:func:`~medvar_bundle.engines.common.attach_time_budget`): training stops after the step
            that spends it, then the end-of-training validation, save and checkpoint run as after
            ``max_steps``. None: no budget.

    Checkpoints (network, optimizer, LR scheduler, trainer state) go to ``output_dir/checkpoints``
    every ``checkpoint_every`` steps and at the end; a run started on a folder with checkpoints
    resumes from the latest one with the same step count and optimizer state (same data order
    from an epoch boundary, see :func:`~medvar_bundle.engines.common.store_loader`; each step's
    random draws depend on the seed and the step only). The cosine follows the ``max_steps`` of
    the current call, so a finished run can be extended. Validation (CE and token accuracy, per
    scale too) runs every ``val_every`` steps and at the end, on at most ``val_max_images``
    slices; it is appended to ``metrics.jsonl``, logged to TensorBoard, and each time
    ``model.pt`` (:func:`~medvar_bundle.model_file.save_model`: tokenizer, transformer, the
    stores' dataset registry, step, ``extra={"validation": ...}``) is rewritten.

    Returns:
        Path of ``output_dir/model.pt``.
    """
    started = time.monotonic()
    out = Path(output_dir)
    with process_group(distributed, device) as (rank, world_size, dev):
        main = rank == 0
        set_determinism(seed=seed)
        loader = store_loader(
            dataset_dir, "training", batch_size * grad_accum, num_workers=num_workers, seed=seed,
            num_replicas=world_size, rank=rank, dataset_class=TokenStore,
        )  # fmt: skip
        store: TokenStore = loader.dataset
        tok = load_tokenizer(resolve_tokenizer(store, tokenizer), dev).requires_grad_(False)
        val_store = TokenStore(dataset_dir, split="validation")
        if len(val_store) == 0:
            logger.warning("no 'validation' split in %s: validating on the training split", dataset_dir)
            val_store = TokenStore(dataset_dir, split="training")
        registry = store.datasets

        from_tokenizer = {key: tok.config[key] for key in ("vocab_size", "embed_dim", "patch_nums")}
        transformer = NextScaleTransformer.from_preset(
            preset, num_datasets=len(registry), **{**(model_overrides or {}), "cond_drop": cond_drop, **from_tokenizer}
        ).to(dev)
        model: nn.Module = transformer
        if dist.is_initialized():
            # the only buffers (mask, scale ids) are constants: no syncing in forward
            model = DistributedDataParallel(
                transformer, device_ids=[dev.index] if dev.type == "cuda" else None, forward_sync_buffers=False
            )
        global_batch = batch_size * world_size * grad_accum
        optimizer = torch.optim.AdamW(
            transformer.param_groups(weight_decay), lr=lr * global_batch / LR_REFERENCE_BATCH, betas=tuple(betas)
        )
        schedule = functools.partial(
            warmup_cosine, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio
        )
        scheduler = LambdaLR(optimizer, schedule)
        weights = token_loss_weights(transformer.patch_nums, loss_weighting).to(dev)
        if main:
            logger.info(
                "transformer %.1fM parameters; global batch %d (%d × %d processes × %d accumulated), peak lr %.3g",
                sum(p.numel() for p in transformer.parameters()) / 1e6, global_batch, batch_size, world_size,
                grad_accum, optimizer.param_groups[0]["initial_lr"],
            )  # fmt: skip

        def step(engine: Engine, batch: dict) -> dict:
            model.train()
            reseed(seed, engine.state.iteration, rank)
            stats = TokenStats(transformer.patch_nums, dev)
            objective = 0.0
            optimizer.zero_grad(set_to_none=True)
            micro_batches = zip(
                batch["tokens"].to(dev).split(batch_size), batch["dataset_id"].to(dev).split(batch_size)
            )
            for i, (tokens, ids) in enumerate(micro_batches):
                sync = i == grad_accum - 1 or model is transformer  # DDP all-reduces after the last micro-batch
                with nullcontext() if sync else model.no_sync():
                    ce, logits = teacher_forced_loss(tok, model, tokens, ids, bf16)
                    loss = (ce * weights).sum(1).mean()
                    (loss / grad_accum).backward()
                objective += loss.item() / grad_accum
                stats.add(ce, logits, tokens)
            grad_norm = float(nn.utils.clip_grad_norm_(transformer.parameters(), grad_clip))
            lr_now = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            if dist.is_initialized():
                dist.all_reduce(stats.sums)  # figures of the global batch
            figures = {k: v for k, v in stats.summary().items() if not k.endswith("_per_scale")}
            return {"loss": objective, **figures, "lr": lr_now, "grad_norm": grad_norm}

        trainer, checkpointer = step_trainer(
            step, loader, model, optimizer, dev, max_steps,
            {"network": transformer, "optimizer": optimizer, "scheduler": scheduler},
            out / "checkpoints", checkpoint_every, max_seconds, started,
        )  # fmt: skip

        if main:
            out.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(log_dir=str(out / "tensorboard")) if main else None

        def validate(engine: Engine) -> None:
            metrics = evaluate_transformer(
                tok, transformer, val_store, batch_size, dev, bf16, val_max_images, num_workers
            )
            row = {"step": engine.state.iteration, **metrics}
            with open(out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            for key in ("ce", "acc", "ce_first", "ce_last", "acc_first", "acc_last"):
                writer.add_scalar(f"val/{key}", metrics[key], row["step"])
            logger.info(
                "step %d: val CE %.4f nats/token, accuracy %.2f%% (first scale CE %.3f, last scale CE %.3f)",
                row["step"], row["ce"], 100 * row["acc"], row["ce_first"], row["ce_last"],
            )  # fmt: skip
            save_model(out / MODEL_FILE, tok, transformer, registry, row["step"], {"validation": row})

        if main:
            StatsHandler(
                iteration_log=lambda e, i: i % 50 == 0, output_transform=lambda o: o["loss"], name=logger.name
            ).attach(trainer)
            TensorBoardStatsHandler(
                summary_writer=writer, output_transform=lambda o: o, iteration_log=True, epoch_log=False
            ).attach(trainer)
            trainer.add_event_handler(Events.ITERATION_COMPLETED(every=val_every), validate)
            if progress:
                ProgressBar(persist=True).attach(trainer, output_transform=lambda o: {"loss": o["loss"]})

        if trainer.state.iteration < max_steps:
            trainer.run()
        if main and (trainer.state.iteration % val_every or not (out / MODEL_FILE).exists()):
            validate(trainer)
        checkpointer(trainer)
        if main:
            writer.close()
        if dist.is_initialized():
            dist.barrier()  # model.pt is complete when any rank returns
    return out / MODEL_FILE

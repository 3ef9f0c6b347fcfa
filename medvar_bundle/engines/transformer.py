"""Components of the next-scale transformer's training (``configs/train.yaml`` composes them; paper §5.1).

The config builds a MONAI ``SupervisedTrainer`` whose ``iteration_update`` is
:class:`TransformerIteration` and a ``SupervisedEvaluator`` whose ``iteration_update`` is
:class:`TransformerEvaluation`, scored by :class:`TransformerFigures`; :class:`SaveModel` writes the
run's model files after each validation. ``medvar train`` runs the same config, and
``configs/multi_gpu_train.yaml`` wraps the network in DistributedDataParallel under torchrun.

One trainer iteration is one optimizer step: the loader yields ``batch_size · grad_accum`` token
rows per process, split into ``grad_accum`` micro-batches of ``batch_size`` whose gradients are
accumulated (and, under DDP, all-reduced once, after the last). Every step count (``max_steps``,
warm-up, checkpoints, validation) counts optimizer steps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ignite.engine import Engine
from ignite.metrics import Metric
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..data.tokens import TOKENS_META, TokenStore, file_digest
from ..files import atomic_torch_save, atomic_write_json
from ..model_file import MODEL_FILE, TOKENIZER_FILE, save_model
from ..networks.msvqvae import MultiScaleVQVAE
from ..networks.transformer import NextScaleTransformer, scale_of_positions
from ..runtime import autocast
from .common import reseed
from .handlers import is_main_process

logger = logging.getLogger(__name__)


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


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside a :class:`DistributedDataParallel` wrapper, or ``network`` itself."""
    return network.module if isinstance(network, DistributedDataParallel) else network


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
    # rows of V contiguous logits: cross-entropy over the class dim 1 of a (B, V, L) view would copy
    # the logits and run log-softmax along a strided axis (18 % of a demo training step on CPU, docs/transformer.md)
    ce = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none")
    return ce.view_as(tokens), logits


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


class TransformerFigures(Metric):
    """Teacher-forced cross-entropy and token accuracy over the validation slices (an Ignite metric).

    ``update`` takes the evaluator's output ``{"ce", "logits", "tokens"}`` (per-token CE ``(B, L)``,
    logits ``(B, L, V)``, target ids ``(B, L)``) and adds it to a :class:`TokenStats` on ``device``.
    ``compute`` gives :meth:`TokenStats.summary` plus ``num_images``. The figures go into the
    evaluator's ``state.metrics`` each under its own name (Ignite's ``"flatten"`` mode), so the
    evaluator's key metric can be any of them (``ce``).
    """

    def __init__(
        self, patch_nums: Sequence[int], device: torch.device | str = "cpu", output_transform: Callable = lambda x: x
    ) -> None:
        self.patch_nums, self.stats_device = tuple(patch_nums), device
        super().__init__(output_transform=output_transform, metrics_result_mode="flatten")

    def reset(self) -> None:
        self.stats = TokenStats(self.patch_nums, self.stats_device)
        self.n = 0

    def iteration_completed(self, engine: Engine) -> None:
        """Ignite unpacks mappings into ``(y_pred, y)``; this metric takes the whole output dictionary."""
        self.update(self._output_transform(engine.state.output))

    def update(self, output: dict) -> None:
        self.stats.add(output["ce"], output["logits"], output["tokens"])
        self.n += output["tokens"].shape[0]

    def compute(self) -> dict:
        return {**self.stats.summary(), "num_images": self.n}


class TransformerEvaluation:
    """The evaluator's ``iteration_update``: teacher-forced prediction of a batch of token rows.

    ``batch``: ``{"tokens": (B, L) long, "dataset_id": (B,) long}``. The network (unwrapped from
    DDP) runs in eval mode, so without conditional dropout. Returns the :class:`TransformerFigures`
    input ``{"ce", "logits", "tokens"}``.
    """

    def __init__(self, tokenizer: MultiScaleVQVAE, bf16: bool = True) -> None:
        self.tokenizer, self.bf16 = tokenizer, bf16

    @torch.no_grad()
    def __call__(self, engine: Engine, batch: dict) -> dict:
        transformer = unwrap(engine.network)
        transformer.eval()
        tokens, ids = batch["tokens"].to(engine.state.device), batch["dataset_id"].to(engine.state.device)
        ce, logits = teacher_forced_loss(self.tokenizer, transformer, tokens, ids, self.bf16)
        return {"ce": ce, "logits": logits, "tokens": tokens}


class TransformerIteration:
    """One optimizer step of the transformer: the ``SupervisedTrainer``'s ``iteration_update``.

    ``batch``: ``{"tokens": (grad_accum · batch_size, L) long, "dataset_id": (grad_accum · batch_size,)
    long}``, split into ``grad_accum`` micro-batches of ``batch_size``. Teacher forcing: the loss
    of an image is its per-token cross-entropy weighted by ``loss_weights`` ``(L,)``
    (:func:`~medvar_bundle.networks.transformer.token_loss_weights`), averaged over images; the
    gradients of the micro-batches are accumulated (under DDP all-reduced once, after the last),
    their norm is clipped to ``grad_clip`` on the raw module's parameters, and the trainer's
    ``optimizer`` steps (the learning rate is the ``LrScheduleHandler``'s). Torch's global
    generator is reseeded from ``(seed, step, rank)`` first, so conditional dropout draws the same
    in a resumed run as in an uninterrupted one.

    Returns the step's figures: ``loss`` (the objective), ``ce``, ``acc``, ``ce_first``,
    ``ce_last``, ``acc_first``, ``acc_last`` of the global batch, ``lr`` (of this step) and
    ``grad_norm`` (before clipping).
    """

    def __init__(
        self,
        tokenizer: MultiScaleVQVAE,
        loss_weights: Tensor,
        batch_size: int,
        grad_accum: int = 1,
        grad_clip: float = 2.0,
        bf16: bool = True,
        seed: int = 0,
    ) -> None:
        self.tokenizer, self.loss_weights = tokenizer, loss_weights
        self.batch_size, self.grad_accum, self.grad_clip = batch_size, grad_accum, grad_clip
        self.bf16, self.seed = bf16, seed

    def __call__(self, engine: Engine, batch: dict) -> dict:
        model, optimizer, dev = engine.network, engine.optimizer, engine.state.device
        transformer = unwrap(model)
        model.train()
        reseed(self.seed, engine.state.iteration, dist.get_rank() if dist.is_initialized() else 0)
        stats = TokenStats(transformer.patch_nums, dev)
        objective = 0.0
        optimizer.zero_grad(set_to_none=True)
        micro_batches = zip(
            batch["tokens"].to(dev).split(self.batch_size), batch["dataset_id"].to(dev).split(self.batch_size)
        )
        for i, (tokens, ids) in enumerate(micro_batches):
            sync = i == self.grad_accum - 1 or model is transformer  # DDP all-reduces after the last micro-batch
            with nullcontext() if sync else model.no_sync():
                ce, logits = teacher_forced_loss(self.tokenizer, model, tokens, ids, self.bf16)
                loss = (ce * self.loss_weights).sum(1).mean()
                (loss / self.grad_accum).backward()
            objective += loss.item() / self.grad_accum
            stats.add(ce, logits, tokens)
        grad_norm = float(nn.utils.clip_grad_norm_(transformer.parameters(), self.grad_clip))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        if dist.is_initialized():
            dist.all_reduce(stats.sums)  # figures of the global batch
        figures = {k: v for k, v in stats.summary().items() if not k.endswith("_per_scale")}
        return {"loss": objective, **figures, "lr": lr, "grad_norm": grad_norm}


class SaveModel:
    """A validation record: the model files of the run folder ``output_dir``.

    Writes ``model.pt`` (the self-contained file of :func:`~medvar_bundle.model_file.save_model`:
    tokenizer, transformer, the dataset registry ``datasets``, the step and the validation row under
    ``extra["validation"]``) and, for MONAI's ``CheckpointLoader``, ``models/model.pt`` (the
    transformer's state_dict), ``models/tokenizer.pt`` (the tokenizer's) and
    ``models/datasets.json`` (the registry).
    """

    def __init__(
        self,
        network: NextScaleTransformer,
        tokenizer: MultiScaleVQVAE,
        datasets: dict,
        output_dir: str | os.PathLike,
    ) -> None:
        self.network, self.tokenizer, self.datasets, self.out = network, tokenizer, datasets, Path(output_dir)

    def __call__(self, row: dict, metrics: dict) -> None:
        save_model(self.out / MODEL_FILE, self.tokenizer, self.network, self.datasets, row["step"], {"validation": row})
        atomic_torch_save(self.out / "models" / MODEL_FILE, self.network.state_dict())
        atomic_torch_save(self.out / "models" / TOKENIZER_FILE, self.tokenizer.state_dict())
        atomic_write_json(self.out / "models" / "datasets.json", self.datasets)


def log_setup(network: nn.Module, batch_size: int, world_size: int, grad_accum: int, peak_lr: float) -> None:
    """Log (main process only) the transformer's size, the global batch and the peak learning rate."""
    if is_main_process():
        logger.info(
            "transformer %.1fM parameters; global batch %d (%d × %d processes × %d accumulated), peak lr %.3g",
            sum(p.numel() for p in network.parameters()) / 1e6, batch_size * world_size * grad_accum, batch_size,
            world_size, grad_accum, peak_lr,
        )  # fmt: skip

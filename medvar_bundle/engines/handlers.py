"""Ignite handlers the training configs compose where MONAI's own fall short.

Every class here has ``attach(engine)``, so a config lists it in ``train#handlers`` beside MONAI's
``StatsHandler``, ``TensorBoardStatsHandler`` and ``LrScheduleHandler``. Why each one exists:

- :class:`AtomicSaver` (the save handler of :class:`ResumableCheckpoint`): Ignite's ``DiskSaver``
  writes past the bundle's one write point, so a full disk would not name the checkpoint.
- :class:`ResumableCheckpoint`: MONAI's ``CheckpointSaver`` writes non-atomically (a kill during a
  save leaves a broken file) and ``CheckpointLoader`` does not fit the step budget back to a
  resumed run; this handler saves atomically, resumes from the newest checkpoint at attach time
  and makes a resumed run stop at the ``max_steps`` of the current call.
- :class:`StopAtStep`: the trainers count optimizer steps, not epochs.
- :class:`TimeBudget`: Ignite's ``TimeLimit`` decides per process; under DDP the ranks must stop
  at the same step, so rank 0's clock decides for all.
- :class:`StepValidation`: MONAI's ``ValidationHandler`` with a first step (the tokenizer's
  warm-up has no codebook to validate), a last validation when training ends between two
  intervals, and records written at the trainer's step (MONAI's evaluator handlers only know the
  trainer's epoch).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import ValidationHandler
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from ..files import WriterLock, atomic_torch_save, atomic_write_bytes, load_weights, one_line
from .common import checkpoints, latest_checkpoint

logger = logging.getLogger(__name__)


def is_main_process() -> bool:
    """True outside a process group and on rank 0 inside one (the rank that logs and writes files)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def _release_and_raise(engine: Engine, error: BaseException, lock: WriterLock) -> None:
    """Ignite re-raises a run's error only when nothing handles ``EXCEPTION_RAISED``: free the lock, re-raise."""
    lock.release()
    raise error


class AtomicSaver(BaseSaveHandler):
    """Ignite's save handler for :class:`~ignite.handlers.Checkpoint` writing through the bundle's one
    write point (:func:`~medvar_bundle.files.atomic_torch_save`): atomic, and a full disk or I/O
    error names the checkpoint file, so the command stops with one line.

    With ``n_saved``, each save also deletes the folder's ``checkpoint_<step>.pt`` files older than
    the newest ``n_saved``: Ignite's ``Checkpoint`` only removes the files of its own process, so
    without it every resumed run would leave its predecessor's checkpoints behind.
    """

    def __init__(self, dirname: str | os.PathLike, n_saved: int | None = None) -> None:
        self.dirname = Path(dirname)
        self.n_saved = n_saved

    def __call__(self, checkpoint, filename: str, metadata: dict | None = None) -> None:
        atomic_torch_save(self.dirname / filename, checkpoint)
        if self.n_saved is not None:
            for old in checkpoints(self.dirname)[: -self.n_saved]:
                old.unlink(missing_ok=True)

    def remove(self, filename: str) -> None:
        (self.dirname / filename).unlink(missing_ok=True)


def _warn_on_schedule_change(scheduler: LRScheduler | None, step: int) -> None:
    """Warn when a resumed run's :class:`~torch.optim.lr_scheduler.LambdaLR` puts the learning rate
    at ``step`` elsewhere than the checkpointed run left it (a larger ``max_steps`` puts a finished
    run back in the middle of a longer cosine): from the scheduler's next step on, the run follows
    the new schedule, a jump an extended run may not expect. (The peak rate, ``base_lrs``, is the
    checkpoint's.) Other schedulers are not checked."""
    if not isinstance(scheduler, LambdaLR):
        return
    left = [group["lr"] for group in scheduler.optimizer.param_groups]
    now = [base * rule(scheduler.last_epoch) for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    if any(abs(a - b) > 1e-3 * max(abs(a), abs(b)) for a, b in zip(left, now)):
        logger.warning(
            "resumed at step %d under another learning-rate schedule (max_steps, warm-up or min_lr_ratio changed): "
            "the rate goes from %.3g to the new schedule's %.3g; train into a new output folder to start it afresh",
            step, left[0], now[0],
        )  # fmt: skip


class ResumableCheckpoint:
    """Atomic ``checkpoint_<step>.pt`` files every ``save_interval`` steps and at the end; resume.

    At attach time the newest checkpoint of ``save_dir`` (if any) is loaded into ``save_dict`` and
    the trainer (its step count), all with ``weights_only=True``; the trainer keeps the epoch budget
    it was built with (``max_epochs`` of this run's config, not of the checkpointed run), so a
    finished run can be extended. A run resumed part-way through an epoch continues that epoch's
    data order where it stopped when the loader's sampler can (a ``ResumableSampler``). A resumed
    run whose ``LambdaLR`` (``save_dict["scheduler"]``) puts the rate elsewhere than the checkpoint
    left it is warned of the jump. Only the main process writes. The checkpoint keys are those of
    ``save_dict`` plus ``trainer``.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: objects with ``state_dict``/``load_state_dict`` (network, optimizer, scheduler);
            None values (a component the config disabled) are left out.
        save_interval: steps between two checkpoints.
        max_steps: optimizer steps of the whole run.
        n_saved: checkpoints kept.
    """

    def __init__(
        self, save_dir: str | os.PathLike, save_dict: dict, save_interval: int, max_steps: int, n_saved: int = 2
    ) -> None:
        self.save_dir = Path(save_dir)
        self.save_dict = {key: obj for key, obj in save_dict.items() if obj is not None}
        self.save_interval = save_interval
        self.max_steps = max_steps
        self.n_saved = n_saved

    def attach(self, engine: Engine) -> None:
        objects = {**self.save_dict, "trainer": engine}
        resume = latest_checkpoint(self.save_dir)
        if resume is not None:
            epochs = engine.state.max_epochs  # this run's budget, not the checkpointed run's
            checkpoint = load_weights(resume, "checkpoint")  # a damaged file: its own one-line error
            try:
                Checkpoint.load_objects(to_load=objects, checkpoint=checkpoint)
            except (RuntimeError, KeyError) as exc:  # another network, optimizer or run setup
                lines = str(exc).strip().splitlines() or [type(exc).__name__]
                detail = one_line(lines[1] if len(lines) > 1 else lines[0], 200)  # the first mismatch
                raise ValueError(
                    f"{resume} was saved by a run with other settings ({detail}); resume with that run's settings, "
                    "or train into a new output folder"
                ) from None
            logger.info("resumed from %s at step %d", resume, engine.state.iteration)
            _continue_epoch(engine)
            _warn_on_schedule_change(self.save_dict.get("scheduler"), engine.state.iteration)
            # a run resumed at its last step must not look finished to Ignite (it would start over)
            engine.state.max_epochs = max(epochs, engine.state.epoch + int(engine.state.iteration >= self.max_steps))
        if not is_main_process():
            return
        lock = WriterLock(self.save_dir, "train")  # one training run per folder; taken when it starts
        engine.add_event_handler(Events.STARTED, lambda _: lock.acquire())
        engine.add_event_handler(Events.COMPLETED, lambda _: lock.release())
        engine.add_event_handler(Events.EXCEPTION_RAISED, _release_and_raise, lock)
        saver = Checkpoint(
            objects,
            AtomicSaver(self.save_dir, self.n_saved),
            n_saved=self.n_saved,
            global_step_transform=lambda e, _: e.state.iteration,
        )
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval), saver)
        engine.add_event_handler(Events.COMPLETED, saver)


def _continue_epoch(engine: Engine) -> None:
    """Start the data of a run resumed part-way through an epoch at the first batch it has not trained on.

    Ignite counts the resumed epoch from the checkpointed iteration but draws it from a new
    data-loader iterator; a :class:`~medvar_bundle.data.resumable.ResumableSampler` skips the
    batches already done, so the resumed run sees the data order of an uninterrupted one.
    """
    done = engine.state.iteration % engine.state.epoch_length
    if not done:
        return
    loader = engine.data_loader
    if not hasattr(loader.sampler, "start_at"):
        logger.warning("%s cannot start an epoch part-way: the resumed epoch restarts its data order", loader.sampler)
        return
    loader.sampler.start_at(done * loader.batch_size)


class StopAtStep:
    """Terminate the trainer once it has done ``max_steps`` optimizer steps (also when resumed past them)."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration >= self.max_steps:
            engine.terminate()


class TimeBudget:
    """Terminate the trainer once ``max_seconds`` of wall-clock time have passed since ``start``.

    Checked at every ``ITERATION_COMPLETED``: the step that crosses the budget completes (its
    handlers still run), then the trainer stops as after its last step, so the end-of-training
    validation and checkpoint follow. Under a process group rank 0's clock decides for every rank
    (one small broadcast per step).

    Args:
        max_seconds: the budget (> 0); None attaches nothing.
        start: the moment the budget starts, a reading of ``clock`` (default: when this is built).
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self, max_seconds: float | None, start: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_seconds is not None and not max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
        self.max_seconds = max_seconds
        self.clock = clock
        self.start = clock() if start is None else start

    def attach(self, engine: Engine) -> None:
        if self.max_seconds is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        spent = [self.clock() - self.start >= self.max_seconds]
        if dist.is_initialized():
            dist.broadcast_object_list(spent, src=0)
        if spent[0]:
            logger.info("time budget of %.0f s spent at step %d: stopping", self.max_seconds, engine.state.iteration)
            engine.terminate()


def validation_row(step: int, metrics: dict) -> dict:
    """``{"step": step, ...}`` with every JSON-able metric (per-scale lists too; arrays left out)."""
    return {"step": step, **{k: v for k, v in metrics.items() if _json_able(v)}}


def _json_able(value) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def _rows(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``; a torn or blank line (an append cut short) is left out."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsLog:
    """One validation record: a ``metrics.jsonl`` row, TensorBoard scalars ``val/<name>`` and a log line.

    Called by :class:`StepValidation` with the row (:func:`validation_row`) and the metrics;
    ``message`` is formatted with the row.
    """

    def __init__(self, path: str | os.PathLike, summary_writer=None, scalars: Sequence[str] = (), message: str = ""):
        self.path = Path(path)
        self.writer = summary_writer
        self.scalars = scalars
        self.message = message

    def __call__(self, row: dict, metrics: dict) -> None:
        # a resumed run validates again the steps after its checkpoint: their old rows give way
        kept = [old for old in _rows(self.path) if old.get("step", -1) < row["step"]]
        atomic_write_bytes(self.path, "".join(f"{json.dumps(r)}\n" for r in [*kept, row]).encode())
        if self.writer is not None:
            for key in self.scalars:
                self.writer.add_scalar(f"val/{key}", row[key], row["step"])
        if self.message:
            logger.info(self.message.format(**row))


class StepValidation(ValidationHandler):
    """MONAI's :class:`~monai.handlers.ValidationHandler` at the trainer's steps, with records.

    Runs ``validator`` every ``interval`` steps after ``start_after`` and once more when training
    ends on a step that was not validated (unless the run resumed at its last step and
    ``output_file`` records that very step: a finished run resumed; a run killed between its last
    checkpoint and the file's write validates again, and so does a fresh run into a folder with an
    old file). After each run every callable of ``records`` gets
    ``(row, metrics)``: the trainer-step row of :func:`validation_row` and the evaluator's
    ``state.metrics`` merged with its ``state.metric_details``. Only the main process validates.
    """

    def __init__(
        self,
        validator,
        interval: int,
        records: Sequence[Callable[[dict, dict], None]] = (),
        start_after: int = 0,
        output_file: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(interval=interval, validator=validator, epoch_level=False)
        self.records = records
        self.start_after = start_after
        self.output_file = None if output_file is None else Path(output_file)
        self.last_step: int | None = None
        self.first_step: int | None = None  # the trainer's step when this process started

    def attach(self, engine: Engine) -> None:
        if not is_main_process():
            return
        every = Events.ITERATION_COMPLETED(event_filter=lambda e, i: i % self.interval == 0 and i > self.start_after)
        engine.add_event_handler(every, self)
        engine.add_event_handler(Events.STARTED, lambda e: setattr(self, "first_step", e.state.iteration))
        engine.add_event_handler(Events.COMPLETED, self.at_end)

    def __call__(self, engine: Engine) -> None:
        self.validator.run(engine.state.epoch)
        metrics = {**self.validator.state.metrics, **self.validator.state.metric_details}
        row = validation_row(engine.state.iteration, metrics)
        for record in self.records:
            record(row, metrics)
        self.last_step = engine.state.iteration

    def at_end(self, engine: Engine) -> None:
        step = engine.state.iteration
        if self.last_step == step:
            return
        resumed_finished = self.first_step == step and self.output_file is not None
        if not resumed_finished or saved_step(self.output_file) != step:
            self(engine)


def saved_step(path: Path) -> int | None:
    """The ``step`` a model file records (memory-mapped: its weights are not read), or None when the
    file is missing or unreadable."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError):
        return None

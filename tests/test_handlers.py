"""The training handlers across a kill and a resume: the final model file, old checkpoints, metric rows."""

from __future__ import annotations

import json
import logging
import math
from functools import partial

import pytest
import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from torch.utils.data import DataLoader

from medvar_bundle.data.resumable import ResumableSampler, SeededSamples
from medvar_bundle.engines.common import checkpoints, warmup_cosine
from medvar_bundle.engines.handlers import MetricsLog, ResumableCheckpoint, StepValidation, StopAtStep
from medvar_bundle.files import atomic_torch_save

MAX_STEPS = 8


class Killed(Exception):
    """Stands for the process dying at that point."""


def run(
    out, kill_at_validation: int | None = None, n_saved: int = 2, save_interval: int = 2, interval: int = 4,
    max_steps: int = MAX_STEPS,
):  # fmt: skip
    """A tiny trainer with the bundle's handlers, 4 steps an epoch: validation every ``interval``
    steps writes ``out/model.pt`` (``{"step"}``), as the training configs' records do; the
    learning rate follows the configs' cosine over ``max_steps``. Returns the steps validated."""
    net = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_cosine, warmup_steps=0, max_steps=max_steps,
                                                                min_lr_ratio=0.05))  # fmt: skip
    data = SeededSamples(list(range(8)))
    loader = DataLoader(data, batch_size=2, sampler=ResumableSampler(data, num_replicas=1, rank=0, seed=0))

    def step(engine, batch):
        opt.zero_grad()
        net(torch.ones(1, 1)).sum().backward()
        opt.step()
        scheduler.step()
        return {"loss": 0.0}

    evaluator = SupervisedEvaluator(
        device="cpu", val_data_loader=DataLoader([0], batch_size=1), network=net, iteration_update=lambda e, b: {}
    )
    validated = []

    def record(row, metrics):
        if row["step"] == kill_at_validation:
            raise Killed
        atomic_torch_save(out / "model.pt", {"step": row["step"]})
        validated.append(row["step"])

    handlers = [
        ResumableCheckpoint(
            out / "checkpoints",
            {"network": net, "optimizer": opt, "scheduler": scheduler},
            save_interval,
            max_steps,
            n_saved,
        ),
        StopAtStep(max_steps),
        StepValidation(evaluator, interval=interval, records=[record], output_file=out / "model.pt"),
    ]
    trainer = SupervisedTrainer(
        device="cpu", max_epochs=math.ceil(max_steps / 4), train_data_loader=loader, network=net, optimizer=opt,
        loss_function=None, iteration_update=step, train_handlers=handlers, decollate=False,
    )  # fmt: skip
    trainer.run()
    return validated


def test_a_run_killed_during_its_last_validation_validates_again_when_resumed(tmp_path):
    """The checkpoint of the last step is written before its validation: a kill in between left the
    model file of the step before for good (the resumed run stopped at once and skipped validation)."""
    with pytest.raises(Killed):
        run(tmp_path, kill_at_validation=MAX_STEPS)
    assert torch.load(tmp_path / "model.pt", weights_only=True)["step"] == 4
    assert run(tmp_path) == [MAX_STEPS]
    assert torch.load(tmp_path / "model.pt", weights_only=True)["step"] == MAX_STEPS
    assert run(tmp_path) == []  # a finished run resumed: nothing to do


def test_a_fresh_run_into_a_folder_with_an_old_model_file_of_the_same_step_validates(tmp_path):
    atomic_torch_save(tmp_path / "model.pt", {"step": MAX_STEPS, "run": "old"})
    assert run(tmp_path, interval=16) == [MAX_STEPS]  # no validation on the way: only the end one writes
    assert "run" not in torch.load(tmp_path / "model.pt", weights_only=True)


def test_a_resumed_run_keeps_only_n_saved_checkpoints(tmp_path):
    with pytest.raises(Killed):
        run(tmp_path, kill_at_validation=4, n_saved=2, save_interval=1)
    assert [p.name for p in checkpoints(tmp_path / "checkpoints")] == ["checkpoint_3.pt", "checkpoint_4.pt"]
    run(tmp_path, n_saved=2, save_interval=1)
    assert [p.name for p in checkpoints(tmp_path / "checkpoints")] == ["checkpoint_7.pt", "checkpoint_8.pt"]


def test_metrics_log_replaces_the_rows_of_steps_a_resumed_run_validates_again(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step, loss in [(2, 0.5), (4, 0.4), (6, 0.3), (4, 0.35), (6, 0.25)]:  # resumed from the checkpoint of step 2
        log({"step": step, "loss": loss}, {})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 2, "loss": 0.5}, {"step": 4, "loss": 0.35}, {"step": 6, "loss": 0.25}]
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 8, "lo')  # an append cut short by a full disk
    log({"step": 8, "loss": 0.2}, {})
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[-1] == '{"step": 8, "loss": 0.2}'


def test_extending_a_finished_run_warns_of_the_learning_rate_jump(tmp_path, caplog):
    """A larger max_steps puts a finished run (its rate at the cosine's floor) back in the middle of
    a longer cosine: the resumed run says so; resuming with the same schedule says nothing."""
    run(tmp_path)
    with caplog.at_level(logging.WARNING, logger="medvar_bundle.engines.handlers"):
        run(tmp_path)
    assert "learning-rate schedule" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="medvar_bundle.engines.handlers"):
        run(tmp_path, max_steps=2 * MAX_STEPS)
    floor = 0.1 * warmup_cosine(MAX_STEPS, 0, MAX_STEPS, 0.05)  # where the finished run left the rate
    middle = 0.1 * warmup_cosine(MAX_STEPS, 0, 2 * MAX_STEPS, 0.05)
    assert f"rate goes from {floor:.3g} to the new schedule's {middle:.3g}" in caplog.text

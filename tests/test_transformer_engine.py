"""Transformer training (configs/train.yaml on MONAI/Ignite engines): loss, model files,
DDP (configs/multi_gpu_train.yaml), `monai.bundle run`, CLI."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TOKEN_VOCAB
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.handlers import CheckpointLoader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medvar_bundle.bundle_config import config_path, run_config
from medvar_bundle.cli import main
from medvar_bundle.data.tokens import TokenStore
from medvar_bundle.engines.common import latest_checkpoint, warmup_cosine
from medvar_bundle.model_file import load_model
from medvar_bundle.networks.transformer import NextScaleTransformer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
VOCAB = TOKEN_VOCAB
NET = {"network_def#depth": 1, "network_def#width": 64, "network_def#heads": 4}
# 16 training slices, batch 4: an epoch is 4 steps
ARGS = dict(batch_size=4, warmup_steps=2, progress=False, **NET)
# one exact fp32 step: peak lr 1e-3 at a global batch of 4 (Adam's first step moves every weight by about the lr)
EXACT = dict(ARGS, max_steps=1, lr=0.064, bf16=False, cond_drop=0.0, warmup_steps=1, val_every=100)
# networks this small run fastest on one thread, above all on a shared 2-core machine
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def store(tokenized_store) -> Path:
    """conftest's tokenized store (V = 64)."""
    return tokenized_store


def train_transformer(store: str, out: str, **overrides) -> Path:
    """Run configs/train.yaml with config-id overrides; the path of the model file."""
    run_config("train", "train", {"dataset_dir": store, "output_dir": out, **overrides})
    return Path(out) / "model.pt"


def _state(path) -> dict:
    return load_model(path).transformer.state_dict()


def test_loss_falls_and_model_file_is_self_contained(store, tmp_path):
    out = tmp_path / "run"
    path = train_transformer(
        str(store),
        str(out),
        max_steps=30,
        lr=1.0,
        checkpoint_every=10,
        val_every=15,
        **dict(ARGS, **{"network_def#depth": 2}),
    )
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    loss = [e.value for e in events.Scalars("loss")]
    assert len(loss) == 30 and loss[0] == pytest.approx(math.log(VOCAB), abs=0.1)
    assert sum(loss[-5:]) / 5 < 0.6 * sum(loss[:5]) / 5, loss
    lr = [e.value for e in events.Scalars("lr")]
    peak = 1.0 * 4 / 256  # lr per 256 images × global batch
    assert lr[:2] == pytest.approx([0.5 * peak, peak]) and lr[-1] == pytest.approx(
        warmup_cosine(29, 2, 30, 0.01) * peak
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [15, 30] and len(rows[0]["ce_per_scale"]) == 4 and rows[0]["num_images"] == 16
    assert latest_checkpoint(out / "checkpoints").name == "checkpoint_30.pt"

    model = load_model(path)  # tokenizer, transformer and registry: nothing else needed
    assert path == out / "model.pt" and model.step == 30 and model.extra["validation"]["step"] == 30
    assert model.datasets == TokenStore(store).datasets and model.transformer.num_datasets == 2
    assert model.transformer.config["depth"] == 2 and model.tokenizer.config["vocab_size"] == VOCAB

    # models/: plain state_dicts and the registry, for MONAI's CheckpointLoader on the config's network_def
    saved = torch.load(out / "models" / "model.pt", weights_only=True)
    parser = ConfigParser(ConfigParser.load_config_file(config_path("train")))
    parser.update({"dataset_dir": str(store), **NET, "network_def#depth": 2})
    fresh = parser.get_parsed_content("network_def")
    assert isinstance(fresh, NextScaleTransformer) and len(saved) == len(fresh.state_dict())
    loader = Engine(lambda engine, batch: None)
    CheckpointLoader(load_path=str(out / "models" / "model.pt"), load_dict={"model": fresh}).attach(loader)
    loader.run([0], max_epochs=1)
    assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())  # every tensor came in
    assert all(torch.equal(v, saved[k]) for k, v in model.transformer.state_dict().items())
    tokenizer = torch.load(out / "models" / "tokenizer.pt", weights_only=True)
    assert tokenizer.keys() == model.tokenizer.state_dict().keys()
    assert all(torch.equal(v, tokenizer[k]) for k, v in model.tokenizer.state_dict().items())
    assert json.loads((out / "models" / "datasets.json").read_text()) == model.datasets


def test_warmup_cosine_schedule():
    assert [warmup_cosine(s, 4, 10, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(7, 4, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(10, 4, 10, 0.1) == pytest.approx(0.1) == warmup_cosine(50, 4, 10, 0.1)


def _bundle_run(config_files: list[str], store: Path, out: Path, *extra: str, launcher: tuple[str, ...] = ()) -> None:
    files = [str(CONFIGS / f) for f in config_files]
    net = [str(a) for key, value in NET.items() for a in (f"--{key}", value)]
    cmd = [
        sys.executable, *launcher, "-m", "monai.bundle", "run", "--config_file", str(files),
        "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"),
        "--dataset_dir", str(store), "--output_dir", str(out), "--progress", "False", *net, *extra,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_one_ddp_step_equals_the_single_process_step(store, tmp_path):
    """torchrun with multi_gpu_train.yaml (2 gloo processes × 2 slices) takes the same optimizer step
    as one process on the same global batch of 4, and as 2 accumulated micro-batches of 2."""
    single = train_transformer(str(store), str(tmp_path / "single"), **EXACT)
    accumulated = train_transformer(str(store), str(tmp_path / "accum"), **dict(EXACT, batch_size=2, grad_accum=2))
    _bundle_run(
        ["train.yaml", "multi_gpu_train.yaml"], store, tmp_path / "ddp",
        "--max_steps", "1", "--batch_size", "2", "--lr", str(EXACT["lr"]), "--bf16", "False", "--cond_drop", "0.0",
        "--warmup_steps", "1", "--val_every", "100",
        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
    )  # fmt: skip
    initial = _state(train_transformer(str(store), str(tmp_path / "init"), **dict(EXACT, lr=0.0)))
    reference = _state(single)
    assert max(float((reference[k] - initial[k]).abs().max()) for k in reference) > 5e-4  # the step moved the weights
    for other in (_state(accumulated), _state(tmp_path / "ddp" / "model.pt")):
        for key, weight in reference.items():
            torch.testing.assert_close(other[key], weight, atol=1e-6, rtol=0, msg=key)
    assert latest_checkpoint(tmp_path / "ddp" / "checkpoints").name == "checkpoint_1.pt"


def test_monai_bundle_run_trains_with_the_default_run_id(store, tmp_path):
    out = tmp_path / "run"
    _bundle_run(
        ["train.yaml"],
        store,
        out,
        "--max_steps",
        "2",
        "--batch_size",
        "4",
        "--val_every",
        "2",
        "--checkpoint_every",
        "2",
    )
    model = load_model(out / "model.pt")
    assert model.step == 2 and model.transformer.config["width"] == 64
    assert latest_checkpoint(out / "checkpoints").name == "checkpoint_2.pt"


def test_cli_trains(store, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--store", str(store), "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--quiet"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == f"medvar train: wrote {out / 'model.pt'}"
    assert load_model(out / "model.pt").transformer.config["depth"] == 4  # the tiny preset


@pytest.mark.parametrize("case", ["missing store", "no tokens", "other tokenizer", "bad value", "out under a file"])
def test_cli_bad_input_is_one_line(case, store, synthetic_store, tmp_path, capsys):
    args = ["train", "--store", str(store), "--out", str(tmp_path / "run"), "--quiet"]
    if case == "out under a file":  # was a NotADirectoryError traceback from TensorBoard's writer
        (tmp_path / "file").write_text("not a folder")
        args[4], expected = str(tmp_path / "file" / "run"), f"{tmp_path / 'file'} is a file"
    elif case == "missing store":
        args[2], expected = str(tmp_path / "nowhere"), "not a slice store"
    elif case == "no tokens":
        args[2], expected = str(synthetic_store), "no tokens; run `medvar tokenize"
    elif case == "other tokenizer":
        blob = torch.load(store.parent / "tokenizer.pt", weights_only=False)
        torch.save({**blob, "step": 1}, tmp_path / "other.pt")
        args += ["--tokenizer", str(tmp_path / "other.pt")]
        expected = "is not the tokenizer that made the tokens"
    else:
        args += ["--grad-accum", "0"]
        expected = "--grad-accum must be >= 1"
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medvar train: error: ") and expected in err[0], err
    assert not (tmp_path / "run").exists()


def test_resuming_a_run_of_another_preset_is_one_line(store, tmp_path, capsys):
    """The checkpoint of a tiny run loaded into a small network was a 97-line state-dict traceback."""
    out = tmp_path / "run"
    assert main(["train", "--store", str(store), "--out", str(out), "--max-steps", "1", "--batch-size", "4",
                 "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    args = ["train", "--store", str(store), "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--quiet",
            "--preset", "small"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medvar train: error: {out / 'checkpoints'}"), err
    assert "was saved by a run with other settings" in err[0] and "new output folder" in err[0]


def test_resuming_from_a_damaged_checkpoint_names_the_damage_not_the_settings(store, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--store", str(store), "--out", str(out), "--max-steps", "1", "--batch-size", "4", "--quiet"]
    assert main(args) == 0
    (checkpoint,) = (out / "checkpoints").glob("checkpoint_*.pt")
    checkpoint.write_text("not a checkpoint")
    capsys.readouterr()
    assert main([*args[:5], "--max-steps", "2", *args[7:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{checkpoint}: not a readable checkpoint file" in err[0], err
    assert "other settings" not in err[0]

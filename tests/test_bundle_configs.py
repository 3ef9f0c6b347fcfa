"""The configs are MONAI bundle workflows: the zoo properties hold, nested overrides reach the run,
and MONAI's own tools load every tensor of the weights a run writes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from ignite.engine import Engine
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.handlers import CheckpointLoader

from medvar_bundle.bundle_config import CONFIGS, run_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = [
    ("train_tokenizer", "synthetic_store"),
    ("train", "tokenized_store"),
    ("train_ddpm", "synthetic_store"),
]
SMALL_TOKENIZER = {"network_def#ch": 32, "network_def#num_res_blocks": 1, "network_def#vocab_size": 64}


def _workflow(config: Path, workflow_type: str, **overrides) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=str(config), meta_file=str(CONFIGS / "metadata.json"), workflow_type=workflow_type, **overrides
    )
    workflow.initialize()
    return workflow


@pytest.mark.parametrize("name, store", TRAIN_CONFIGS)
def test_training_configs_have_the_zoo_train_properties(name, store, request, tmp_path):
    store = request.getfixturevalue(store)
    workflow = _workflow(CONFIGS / f"{name}.yaml", "train", dataset_dir=str(store), output_dir=str(tmp_path))
    assert workflow.check_properties() in (None, [])
    assert isinstance(workflow.parser.get_parsed_content("train#trainer").optimizer, torch.optim.Optimizer)


def test_the_property_check_can_fail(synthetic_store, tmp_path):
    config = yaml.safe_load((CONFIGS / "train_tokenizer.yaml").read_text())
    del config["train"]["inferer"]
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(config))
    workflow = _workflow(broken, "train", dataset_dir=str(synthetic_store), output_dir=str(tmp_path / "run"))
    with pytest.raises(Exception, match="inferer"):
        missing = workflow.check_properties()
        assert not missing, f"missing properties: {missing}"


def test_inference_config_has_the_zoo_infer_properties(model_path, tmp_path):
    workflow = _workflow(CONFIGS / "inference.yaml", "infer", model_file=str(model_path), output_dir=str(tmp_path))
    assert workflow.check_properties() in (None, [])


def test_a_nested_override_changes_the_run(synthetic_store, tmp_path):
    """``train#trainer#max_epochs`` beats the step budget: 16 training slices in batches of 4 are 4 steps an epoch."""
    out = tmp_path / "run"
    overrides = dict(dataset_dir=str(synthetic_store), output_dir=str(out), max_steps=50, batch_size=4, val_every=100,
                     checkpoint_every=100, val_max_images=4, progress=False, **SMALL_TOKENIZER)  # fmt: skip
    run_config("train_tokenizer", "train", {**overrides, "train#trainer#max_epochs": 1})
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("checkpoint_*.pt"))
    assert checkpoints == ["checkpoint_4.pt"]
    two = {**overrides, "output_dir": str(tmp_path / "two"), "train#handlers#2#max_steps": 2}
    run_config("train_tokenizer", "train", two)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").glob("checkpoint_*.pt")) == ["checkpoint_2.pt"]


def test_checkpoint_loader_and_ckpt_export_load_every_tokenizer_tensor(synthetic_store, tmp_path):
    out = tmp_path / "run"
    run_config(
        "train_tokenizer", "train",
        dict(dataset_dir=str(synthetic_store), output_dir=str(out), max_steps=2, batch_size=4, val_every=2,
             checkpoint_every=2, val_max_images=4, progress=False, **SMALL_TOKENIZER),
    )  # fmt: skip
    saved = torch.load(out / "models" / "tokenizer.pt", weights_only=True)
    parser = ConfigParser(ConfigParser.load_config_file(CONFIGS / "train_tokenizer.yaml"))
    parser["image_size"] = 64
    for key, value in SMALL_TOKENIZER.items():
        parser[key] = value
    fresh = parser.get_parsed_content("network_def")
    differ = [k for k, v in fresh.state_dict().items() if not torch.equal(v, saved[k])]
    assert differ, "a fresh network should differ from the trained one"
    engine = Engine(lambda e, b: None)
    CheckpointLoader(load_path=str(out / "models" / "tokenizer.pt"), load_dict={"model": fresh}).attach(engine)
    engine.run([0], max_epochs=1)
    loaded = fresh.state_dict()
    assert len(saved) == len(loaded) and all(torch.equal(loaded[k], saved[k]) for k in saved)

    exported = tmp_path / "tokenizer.ts"
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(exported),
         "--ckpt_file", str(out / "models" / "tokenizer.pt"), "--config_file", "configs/train_tokenizer.yaml",
         "--meta_file", "configs/metadata.json", "--image_size", "64", "--use_trace", "True",
         *[arg for key, value in SMALL_TOKENIZER.items() for arg in (f"--{key}", str(value))],
         "--input_shape", "[1, 1, 64, 64]", "--converter_kwargs", "{'strict': False}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    scripted = torch.jit.load(str(exported))
    weights = dict(scripted.state_dict())
    assert all(torch.equal(weights[k], saved[k]) for k in saved if k in weights)
    assert sum(k in weights for k in saved) == len(saved)


@pytest.mark.slow
def test_mlflow_tracking_records_parameters_and_metrics_of_a_short_run(synthetic_store, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train_tokenizer.yaml",
         "--meta_file", "configs/metadata.json", "--dataset_dir", str(synthetic_store), "--output_dir", str(out),
         "--max_steps", "3", "--batch_size", "4", "--val_every", "3", "--val_max_images", "4", "--progress", "False",
         *[arg for key, value in SMALL_TOKENIZER.items() for arg in (f"--{key}", str(value))],
         "--tracking", "mlflow"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs(e.experiment_id)]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    data = runs[0].data
    assert {"max_epochs", "epoch_length"} <= set(data.params)
    assert {"train_loss", "lr_group_0", "psnr", "ssim", "codebook_usage", "perplexity"} <= set(data.metrics)
    losses = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert sorted(m.step for m in losses) == [1, 2, 3]
    row = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert data.metrics["psnr"] == pytest.approx(row["psnr"])


@pytest.mark.slow
def test_verify_net_in_out_checks_the_image_network(model_path):
    """MONAI's verify_net_in_out feeds metadata.json's input format (here at the test model's 64²) to
    ``autoencoder_def`` and checks the output's channels and dtype."""
    command = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "autoencoder_def",
               "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.yaml",
               "--model_file", str(model_path), "--device", "cpu",
               "--_meta_#network_data_format#inputs#image#spatial_shape", "[64, 64]"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "verified with no error" in done.stdout + done.stderr
    wrong = subprocess.run(
        [*command, "--_meta_#network_data_format#outputs#pred#num_channels", "3"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert wrong.returncode != 0 and "output channel number" in wrong.stderr

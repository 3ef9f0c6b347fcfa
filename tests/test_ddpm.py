"""DDPM baseline: preset sizes, respaced sampling, training with configs/train_ddpm.yaml, baseline file,
models/ state_dict, bundle run, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader
from monai.networks.schedulers import DDPMScheduler
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from medvar_bundle.bundle_config import run_config
from medvar_bundle.cli import main
from medvar_bundle.data import SliceStore
from medvar_bundle.engines.common import latest_checkpoint
from medvar_bundle.model_file import load_baseline, save_baseline
from medvar_bundle.networks.ddpm import DDPM_PRESETS, ConditionalDDPM
from medvar_bundle.networks.transformer import NextScaleTransformer
from medvar_bundle.runtime import to_model_range
from medvar_bundle.sampling.ddpm import sample

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# a UNet small enough for 64×64 slices on one thread: two levels, attention at 32²
NET = {
    "channels": (16, 32),
    "attention_levels": (False, True),
    "num_res_blocks": 1,
    "norm_num_groups": 8,
    "num_head_channels": 16,
}
# 16 training slices, batch 4: an epoch is 4 steps. fp32: on CPUs without native bf16 (this project's AMD EPYC
# machines) a bf16 convolution runs about 18x slower than fp32, so only the bundle-run test below takes the bf16 path
ARGS = dict(batch_size=4, warmup_steps=2, progress=False, bf16=False,
            **{f"network_def#{k}": v for k, v in NET.items()})  # fmt: skip
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_baseline(store: str, out: str, **overrides) -> Path:
    """Run configs/train_ddpm.yaml with config-id overrides; the path of the baseline file."""
    run_config("train_ddpm", "train", {"dataset_dir": store, "output_dir": out, **overrides})
    return Path(out) / "baseline.pt"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _count(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


@pytest.mark.parametrize(
    "preset, target",
    [
        ("tiny", lambda: _count(lambda: NextScaleTransformer.from_preset("tiny", num_datasets=9))),
        ("small", lambda: _count(lambda: NextScaleTransformer.from_preset("small", num_datasets=9))),
        ("ddpm-s", lambda: 330e6),
        ("ddpm-l", lambda: 600e6),
    ],
)
def test_preset_sizes_match_their_counterparts(preset, target):
    """tiny/small match MedVAR's transformer presets, ddpm-s/ddpm-l the paper's DDPM-S/-L, within 5 %."""
    count = _count(lambda: ConditionalDDPM.from_preset(preset, num_datasets=9))
    assert abs(count / target() - 1) < 0.05, (preset, count)


class GaussianDenoiser(nn.Module):
    """The exact ε-predictor for data x0 ~ N(0, σ²) per pixel: E[ε | x_t] = √(1−ᾱ_t)·x_t / (ᾱ_t·σ² + 1 − ᾱ_t)."""

    def __init__(self, sigma: float, image_size: int = 64) -> None:
        super().__init__()
        self.sigma, self.image_size, self.null_id = sigma, image_size, 1
        self.scheduler = DDPMScheduler(num_train_timesteps=1000)

    def forward(self, x, timesteps, dataset_id):
        abar = self.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * x.float() / (abar * self.sigma**2 + 1 - abar)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_respaced_chain_with_the_exact_denoiser_reaches_the_data_distribution(scheduler):
    """Every chain step is a step between the training timesteps the network is told: the sample
    spread approaches σ as steps grow (100 steps) and is already far from noise at 10 steps —
    MONAI's DDPMScheduler without respacing would step 999 → 998 → … and return mostly noise (≈ 0.7)."""
    sigma = 0.3

    def spread(steps: int) -> float:
        out = sample(
            GaussianDenoiser(sigma),
            scheduler,
            steps,
            torch.zeros(4, dtype=torch.long),
            torch.Generator().manual_seed(0),
        )
        return float(to_model_range(out).std())

    few, many = spread(10), spread(100)
    assert 0.4 * sigma < few < many and abs(many / sigma - 1) < 0.15, (few, many)
    # one step denoises from the last training timestep (the chain once kept t = 0 and returned the noise, ≈ 0.7)
    assert spread(1) < sigma, spread(1)


def test_sampling_is_seeded_and_returns_uint8_slices():
    torch.manual_seed(0)
    model = ConditionalDDPM(num_datasets=2, image_size=64, **NET).eval()
    ids = torch.tensor([0, 1, 2])  # 2 = the null id

    def draw(seed, name="ddim", cfg=0.0):
        return sample(model, name, 10, ids, torch.Generator().manual_seed(seed), cfg=cfg, bf16=False)

    first = draw(0)
    assert first.shape == (3, 64, 64) and first.dtype == torch.uint8
    assert torch.equal(first, draw(0)) and not torch.equal(first, draw(1))
    assert torch.equal(draw(0, "ddpm", cfg=2.0), draw(0, "ddpm", cfg=2.0)) and not torch.equal(draw(0, "ddpm"), draw(0))
    with pytest.raises(ValueError, match="unknown sampler"):
        draw(0, "euler")


def _losses(run: Path) -> list[float]:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [e.value for e in events.Scalars("loss")]


def test_loss_falls_and_baseline_file_is_self_contained(synthetic_store, tmp_path):
    out = tmp_path / "run"
    path = train_baseline(
        str(synthetic_store), str(out), max_steps=20, lr=3e-3, checkpoint_every=10, val_every=10, **ARGS
    )
    loss = _losses(out)
    assert len(loss) == 20 and sum(loss[-5:]) / 5 < 0.5 * sum(loss[:5]) / 5, loss
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20] and rows[0]["num_images"] == 16 and rows[1]["loss"] < 0.5
    assert set(rows[0]) == {"step", "loss", "num_images"}
    assert latest_checkpoint(out / "checkpoints").name == "checkpoint_20.pt"

    baseline = load_baseline(path)  # network, schedule and registry: nothing else needed
    assert path == out / "baseline.pt" and baseline.step == 20 and baseline.extra["validation"] == rows[1]
    assert baseline.datasets == SliceStore(synthetic_store).datasets and baseline.model.num_datasets == 2
    assert baseline.model.image_size == 64 and baseline.model.config["channels"] == NET["channels"]
    with pytest.raises(ValueError, match="do not match the network's 2 dataset ids"):
        save_baseline(tmp_path / "bad.pt", baseline.model, {"only": {"id": 0}})
    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable DDPM baseline file"):
        load_baseline(tmp_path / "foreign.pt")

    # models/: the network's plain state_dict (weights only) and the dataset registry
    weights = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    network = ConditionalDDPM(**baseline.model.config)
    assert len(weights) == len(network.state_dict())
    loader = Engine(lambda engine, batch: None)
    CheckpointLoader(load_path=str(out / "models" / "model.pt"), load_dict={"model": network}).attach(loader)
    loader.run([0], max_epochs=1)
    assert all(torch.equal(v, weights[k]) for k, v in network.state_dict().items())  # every tensor came in
    assert all(torch.equal(v, baseline.model.state_dict()[k].cpu()) for k, v in weights.items())
    assert json.loads((out / "models" / "datasets.json").read_text()) == baseline.datasets


def test_bundle_run_trains_with_the_default_run_id(synthetic_store, tmp_path):
    out = tmp_path / "run"
    net = [arg for k, v in NET.items() for arg in (f"--network_def#{k}", str(list(v) if isinstance(v, tuple) else v))]
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "train_ddpm.yaml"),
        "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"),
        "--dataset_dir", str(synthetic_store), "--output_dir", str(out), *net,
        "--max_steps", "2", "--batch_size", "4", "--val_every", "2", "--checkpoint_every", "2",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-3000:]
    baseline = load_baseline(out / "baseline.pt")
    assert baseline.step == 2 and baseline.model.config["channels"] == NET["channels"]
    assert baseline.model.config["attention_levels"] == NET["attention_levels"]
    assert latest_checkpoint(out / "checkpoints").name == "checkpoint_2.pt"


def test_cli_trains_the_tiny_preset(synthetic_store, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train-baseline",
                "--store",
                str(synthetic_store),
                "--out",
                str(out),
                "--max-steps",
                "1",
                "--batch-size",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == f"medvar train-baseline: wrote {out / 'baseline.pt'}"
    assert load_baseline(out / "baseline.pt").model.config["channels"] == DDPM_PRESETS["tiny"]["channels"]


@pytest.mark.parametrize("case", ["missing store", "unknown preset", "bad value", "negative warm-up"])
def test_cli_bad_input_is_one_line(case, synthetic_store, tmp_path, capsys):
    args = ["train-baseline", "--store", str(synthetic_store), "--out", str(tmp_path / "run"), "--quiet"]
    if case == "missing store":
        args[2], expected = str(tmp_path / "nowhere"), "not a slice store"
    elif case == "unknown preset":
        args += ["--preset", "huge"]
        expected = "unknown DDPM preset 'huge'"
    elif case == "bad value":
        args += ["--cond-drop", "1.5"]
        expected = "--cond-drop must be in [0, 1)"
    else:
        args += ["--warmup", "-1"]
        expected = "--warmup must be >= 0"
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medvar train-baseline: error: ") and expected in err[0], err
    assert not (tmp_path / "run").exists()

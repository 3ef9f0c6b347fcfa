"""Tokenizer training on MONAI/Ignite engines, resume after SIGKILL, evaluation and tokenization."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medvar_bundle.cli import main
from medvar_bundle.data import SliceStore
from medvar_bundle.data.tokens import TokenStore, tokenize_store
from medvar_bundle.engines.common import latest_checkpoint, to_model_range
from medvar_bundle.engines.tokenizer import load_tokenizer, train_tokenizer

from conftest import build_synthetic_store

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ARGS = dict(batch_size=4, checkpoint_every=2, val_every=3, val_max_images=8, progress=False, lr=1e-3)


@pytest.fixture(scope="module")
def trained(synthetic_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    path = train_tokenizer(str(synthetic_store), str(out), max_steps=6, **TRAIN_ARGS)
    return out, path


def test_training_writes_tokenizer_checkpoints_metrics_and_pictures(trained):
    out, path = trained
    assert path == out / "tokenizer.pt"
    model = load_tokenizer(path)
    assert model.image_size == 64 and model.patch_nums[-1] == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    for r in rows:
        assert 0 < r["psnr"] < 100 and 0 <= r["codebook_usage"] <= 1 and r["perplexity"] >= 1
    assert latest_checkpoint(out / "checkpoints").name == "checkpoint_6.pt"
    assert (out / "validation" / "reconstructions.png").stat().st_size > 0
    assert (out / "validation" / "codebook_usage.png").stat().st_size > 0
    assert any((out / "tensorboard").iterdir())


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_resume_after_sigkill_continues_the_same_run(synthetic_store, tmp_path):
    """A run killed after its step-4 checkpoint resumes at step 4 and ends exactly as an
    uninterrupted run: same step count, weights and optimizer state."""
    kwargs = dict(TRAIN_ARGS, val_every=100)
    reference = train_tokenizer(str(synthetic_store), str(tmp_path / "ref"), max_steps=8, **kwargs)

    out = tmp_path / "killed"
    code = (
        "import sys, time; from medvar_bundle.engines.tokenizer import train_tokenizer\n"
        f"train_tokenizer({str(synthetic_store)!r}, {str(out)!r}, max_steps=10**6, **{kwargs!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints" / "checkpoint_4.pt").exists():
            assert proc.poll() is None, "training process died"
            assert time.time() < deadline, "no checkpoint_4.pt within 240 s"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    last = latest_checkpoint(out / "checkpoints")
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["trainer"]["iteration"]
    assert killed_at >= 4
    if killed_at > 8:
        pytest.fail(f"the run was killed too late (step {killed_at}) to compare with the 8-step reference")
    resumed = train_tokenizer(str(synthetic_store), str(out), max_steps=8, **kwargs)
    final = torch.load(latest_checkpoint(out / "checkpoints"), map_location="cpu", weights_only=False)
    assert final["trainer"]["iteration"] == 8
    ref_ckpt = torch.load(latest_checkpoint(tmp_path / "ref" / "checkpoints"), map_location="cpu", weights_only=False)
    steps = {s["step"] for s in final["optimizer"]["state"].values()}
    assert steps == {torch.tensor(8.0)} or {float(s) for s in steps} == {8.0}
    for key, ref in _weights(reference).items():
        torch.testing.assert_close(_weights(resumed)[key], ref, msg=f"{key} differs after resume")
    for k, state in ref_ckpt["optimizer"]["state"].items():
        torch.testing.assert_close(final["optimizer"]["state"][k]["exp_avg"], state["exp_avg"])


def test_offline_lpips_stops_training_with_one_clear_line(synthetic_store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    code = main(["train-tokenizer", "--store", str(synthetic_store), "--out", str(tmp_path / "run"), "--lpips-weight", "1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "alexnet-owt-7be5be79.pth" in err[0] and "--lpips-weight 0" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_evaluate_tokenizer_prints_one_json_line(trained, synthetic_store, capsys):
    _, path = trained
    assert main(["evaluate-tokenizer", "--tokenizer", str(path), "--store", str(synthetic_store), "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    metrics = json.loads(lines[0])
    assert {"psnr", "ssim", "codebook_usage", "perplexity"} <= set(metrics)
    assert metrics["num_images"] == len(SliceStore(synthetic_store))


def test_tokenize_writes_resumable_uint16_tokens_matching_encode(trained, synthetic_store, tmp_path):
    _, path = trained
    store = build_synthetic_store(tmp_path, volumes=2, seed=3)
    first = tokenize_store(path, store, batch_size=5, progress=False)
    assert first["shards_written"] == 1 and first["tokens_per_image"] == sum(p * p for p in load_tokenizer(path).patch_nums)
    again = tokenize_store(path, store, progress=False)
    assert again["shards_written"] == 0 and again["shards_skipped"] == 1
    tokens = np.load(next((store / "shards").glob("*.tokens.npy")))
    assert tokens.dtype == np.uint16 and tokens.shape == (len(SliceStore(store)), first["tokens_per_image"])
    model = load_tokenizer(path)
    ts, ss = TokenStore(store), SliceStore(store)
    x = to_model_range(torch.stack([ss[i]["image"] for i in range(3)])).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.tokens_flat(model.encode(x))
    assert torch.equal(torch.stack([ts[i]["tokens"] for i in range(3)]), expected)
    assert [ts[i]["dataset_id"] for i in range(len(ts))] == [ss[i]["dataset_id"] for i in range(len(ss))]


def test_tokenize_refuses_tokens_of_another_tokenizer(trained, tmp_path, capsys):
    _, path = trained
    store = build_synthetic_store(tmp_path, volumes=2, seed=4)
    tokenize_store(path, store, progress=False)
    other = tmp_path / "other.pt"
    blob = torch.load(path, weights_only=False)
    blob["step"] += 1
    torch.save(blob, other)
    assert main(["tokenize", "--tokenizer", str(other), "--store", str(store), "--quiet"]) == 2
    assert "another tokenizer" in capsys.readouterr().err
    assert main(["tokenize", "--tokenizer", str(other), "--store", str(store), "--quiet", "--force"]) == 0


def test_bundle_training_config_runs_the_same_trainer(synthetic_store, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(ROOT / "configs" / "train_tokenizer.yaml"),
         "--meta_file", str(ROOT / "configs" / "metadata.json"), "--logging_file", str(ROOT / "configs" / "logging.conf"),
         "--dataset_dir", str(synthetic_store), "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
         "--batch_size", "4", "--val_every", "2", "--checkpoint_every", "2"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert load_tokenizer(tmp_path / "run" / "tokenizer.pt").image_size == 64
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "checkpoint_2.pt"

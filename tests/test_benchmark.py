"""`medvar bench` (MedVAR vs DDPM sampling speed) and the training time budget of both engines."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from test_ddpm import NET as DDPM_NET
from test_transformer_engine import NET as TRANSFORMER_NET
from test_transformer_engine import VOCAB, store  # noqa: F401  (the tokenized 64² store fixture)
from torch.utils.flop_counter import sdpa_flop_count

from medvar_bundle import benchmark, cli
from medvar_bundle.bundle_config import run_config
from medvar_bundle.engines.handlers import TimeBudget
from medvar_bundle.model_file import load_baseline, load_model

# a pair small enough for 64² slices: one-block transformer, narrow tokenizer, two-level UNet
PAIR = benchmark.BenchPair(
    "test", "tiny", "tiny", "tiny", transformer_overrides={"depth": 1},
    tokenizer_overrides={"ch": 32, "num_res_blocks": 1, "vocab_size": VOCAB}, ddpm_overrides=DDPM_NET,
)  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medvar")
    cli.add_bench_parser(parser.add_subparsers(dest="command"))
    return parser


def test_bench_runs_end_to_end_and_scales_ddpm_linearly(monkeypatch):
    monkeypatch.setattr(benchmark, "matmul_peak", lambda dtype, device: 1e12)  # the 4096² matmuls take seconds here
    result = benchmark.run_benchmark([PAIR], steps=[10, 100], ddpm_timed_steps=1, repeats=1, image_size=64)
    json.dumps(result)
    row = result["pairs"][0]
    medvar, ddpm = result["medvar_s_per_image"], result["ddpm_s_per_image"]
    assert result["pair"] == "test" and "untrained" in result["weights"] and "scaled linearly" in result["ddpm_timing"]
    assert medvar == row["medvar"]["s_per_image"] > 0 and set(ddpm) == {"10", "100"}
    assert ddpm["100"] == pytest.approx(10 * ddpm["10"]) == pytest.approx(100 * row["ddpm"]["s_per_step"])
    assert result["speedup"]["10"] == pytest.approx(ddpm["10"] / medvar)
    assert result["speedup_vs_ddpm100"] == pytest.approx(ddpm["100"] / medvar)
    assert row["ddpm"]["flops_per_image"]["100"] == 100 * row["ddpm"]["flops_per_step"] > 0
    assert row["medvar"]["flops_per_image"] > 0 and 0 < row["ddpm"]["peak_fraction"] == pytest.approx(
        row["ddpm"]["tflops"]
    )
    assert "MedVAR vs DDPM at 100 steps" in benchmark.format_report(result)


def test_ddpm_time_per_step_is_a_timed_chain_over_its_steps(monkeypatch):
    """A fake clock where every denoising step takes 0.5 s: the warm-up step is not counted, the
    per-step time is exact, and N steps are N times it."""
    clock = [0.0]
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(benchmark, "_device_of", lambda model: torch.device("cpu"))

    def fake_chain(model, steps, batch, bf16):
        clock[0] += 0.5 * steps

    monkeypatch.setattr(benchmark, "_sample_ddpm", fake_chain)
    per_step = benchmark.ddpm_seconds_per_step(None, timed_steps=3, batch=2, bf16=True)
    assert per_step == 0.5
    assert benchmark.linear_in_steps(per_step / 2, [10, 20, 100]) == {"10": 2.5, "20": 5.0, "100": 25.0}


def test_flop_counter_counts_cpu_flash_attention():
    q, k = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 24, 8)
    with benchmark.flop_counter() as counter:
        F.scaled_dot_product_attention(q, k, k)
    assert counter.get_total_flops() == sdpa_flop_count(q.shape, k.shape, k.shape) > 0


def test_bench_command_line(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(
        benchmark, "run_benchmark", lambda *args: calls.append(args) or {"pair": "tiny", "speedup_vs_ddpm100": 3.0}
    )
    argv = ["bench", "--json", "--pairs", "tiny", "d16", "--steps", "10", "100", "--fp32", "--ddpm-timed-steps", "1"]
    args = _bench_parser().parse_args(argv)
    assert args.func(args) == 0
    assert calls == [([benchmark.PAIRS["tiny"], benchmark.PAIRS["d16"]], [10, 100], 1, "cpu", False, 1, 3)]
    assert json.loads(capsys.readouterr().out) == {"pair": "tiny", "speedup_vs_ddpm100": 3.0}
    defaults = _bench_parser().parse_args(["bench"])
    assert (
        defaults.pairs == ["tiny", "small"]
        and defaults.steps == [10, 20, 30, 50, 100]
        and defaults.ddpm_timed_steps == 2
    )
    for bad in (["--steps", "0"], ["--pairs", "d99"], ["--batch", "-1"]):
        with pytest.raises(SystemExit):
            _bench_parser().parse_args(["bench", *bad])


def test_time_budget_stops_the_engine_after_the_step_that_spends_it():
    """Fake clock: each iteration takes 1 s; a 3.5 s budget stops the run after iteration 4, and
    the run still completes normally (COMPLETED fires, so end-of-training handlers run)."""
    clock = [0.0]
    trainer = Engine(lambda engine, batch: clock.__setitem__(0, clock[0] + 1.0))
    TimeBudget(3.5, start=0.0, clock=lambda: clock[0]).attach(trainer)
    completed = []
    trainer.add_event_handler(Events.COMPLETED, lambda e: completed.append(e.state.iteration))
    trainer.run(range(100), max_epochs=1)
    assert trainer.state.iteration == 4 and completed == [4]

    untimed = Engine(lambda engine, batch: None)
    TimeBudget(None).attach(untimed)
    assert untimed.run(range(5), max_epochs=1).iteration == 5
    with pytest.raises(ValueError, match="max_seconds must be > 0"):
        TimeBudget(0)


def test_both_engines_stop_at_the_budget_then_validate_and_save(store, tmp_path):  # noqa: F811
    """A budget spent before the first step ends stops each trainer after step 1 of 100; the
    final validation and model file follow as at max_steps."""
    common = dict(
        batch_size=4, max_steps=100, warmup_steps=2, val_every=50, checkpoint_every=50, progress=False, max_seconds=1e-6
    )
    run_config("train", "train", {"dataset_dir": str(store), "output_dir": str(tmp_path / "medvar"), **common,
                                  **TRANSFORMER_NET})  # fmt: skip
    ddpm_net = {f"network_def#{key}": value for key, value in DDPM_NET.items()}
    run_config("train_ddpm", "train", {"dataset_dir": str(store), "output_dir": str(tmp_path / "ddpm"), **common,
                                       **ddpm_net})  # fmt: skip
    model, baseline = load_model(tmp_path / "medvar" / "model.pt"), load_baseline(tmp_path / "ddpm" / "baseline.pt")
    assert model.step == 1 and baseline.step == 1
    for run in ("medvar", "ddpm"):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1] and (tmp_path / run / "checkpoints" / "checkpoint_1.pt").is_file()

"""`medvar bench` (MedVAR vs DDPM sampling speed) and the training time budget of both engines."""

import argparse
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from test_ddpm import NET as DDPM_NET
from test_transformer_engine import NET as TRANSFORMER_NET
from test_transformer_engine import VOCAB, store  # noqa: F401  (the tokenized 64² store fixture)

from medvar_bundle import benchmark, cli
from medvar_bundle.bundle_config import run_config
from medvar_bundle.engines.handlers import TimeBudget
from medvar_bundle.model_file import load_baseline, load_model
from medvar_bundle.sampling.medvar import SamplingOptions, generate_images

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


def test_bench_runs_end_to_end_with_known_times_and_flop_counts(monkeypatch):
    """The real networks run on a fake clock on which a MedVAR batch costs 0.25 s per image and a
    DDPM step 0.05 s per image; batch 2, peak mocked at 2 TFLOP/s. Known answers: MedVAR 0.25 s per
    image, 4 images/s (the warm-up run is not timed, the repeats are averaged); DDPM 0.05 s per
    step, so 0.5 s at 10 steps, 1.5 s at 30 and 5 s at 100 (which is not among the timed step
    counts); speedups 0.5 / 0.25 = 2, 1.5 / 0.25 = 6 and 5 / 0.25 = 20. FLOPs are of one image: a
    DDPM step is one guided UNet evaluation, 2 rows, so twice the count of one row, and N steps N
    times that; MedVAR's is the count of ``generate_images`` of one image. TFLOP/s are FLOPs per
    image / s per image / 1e12, and the peak fraction the same over 2e12."""
    clock = [0.0]
    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(benchmark, "matmul_peak", lambda dtype, device: 2e12)  # the 4096² matmuls take seconds here
    sample_medvar, sample_ddpm = benchmark._sample_medvar, benchmark._sample_ddpm

    def medvar_at_a_quarter_second_per_image(transformer, tokenizer, batch, bf16, use_cache, decode):
        sample_medvar(transformer, tokenizer, batch, bf16, use_cache, decode)
        clock[0] += 0.25 * batch

    def ddpm_at_50_ms_per_image_and_step(model, steps, batch, bf16):
        sample_ddpm(model, steps, batch, bf16)
        clock[0] += 0.05 * steps * batch

    monkeypatch.setattr(benchmark, "_sample_medvar", medvar_at_a_quarter_second_per_image)
    monkeypatch.setattr(benchmark, "_sample_ddpm", ddpm_at_50_ms_per_image_and_step)
    result = benchmark.run_benchmark([PAIR], steps=[10, 30], batch=2, ddpm_timed_steps=2, repeats=2, image_size=64)
    json.dumps(result)
    row = result["pairs"][0]
    medvar, ddpm = row["medvar"], row["ddpm"]
    assert result["pair"] == "test" and "untrained" in result["weights"] and "scaled linearly" in result["ddpm_timing"]
    assert result["matmul_peak_tflops"] == 2.0
    assert medvar["s_per_image"] == pytest.approx(0.25) and medvar["images_per_s"] == pytest.approx(4.0)
    assert ddpm["s_per_step"] == pytest.approx(0.05)
    assert ddpm["s_per_image"] == pytest.approx({"10": 0.5, "30": 1.5})
    assert ddpm["images_per_s"] == pytest.approx({"10": 2.0, "30": 1 / 1.5})
    assert row["speedup"] == pytest.approx({"10": 2.0, "30": 6.0}) and row["speedup_vs_ddpm100"] == pytest.approx(20.0)
    assert result["medvar_s_per_image"] == pytest.approx(0.25) and result["speedup_vs_ddpm100"] == pytest.approx(20.0)
    assert result["ddpm_s_per_image"] == pytest.approx({"10": 0.5, "30": 1.5})

    transformer, tokenizer, unet = benchmark.build_pair(PAIR, 64, "cpu")
    one = torch.zeros(1, dtype=torch.long)
    with torch.no_grad(), benchmark.flop_counter() as counter:
        unet(torch.zeros(1, 1, 64, 64), one, one)
    unet_row = counter.get_total_flops()
    with benchmark.flop_counter() as counter:
        generate_images(transformer, tokenizer, one, SamplingOptions(**benchmark.sampling_options()), torch.Generator())
    image = counter.get_total_flops()
    assert ddpm["flops_per_step"] == 2 * unet_row
    assert ddpm["flops_per_image"] == {"10": 10 * 2 * unet_row, "30": 30 * 2 * unet_row}
    assert medvar["flops_per_image"] == image
    assert ddpm["tflops"] == pytest.approx(2 * unet_row / 0.05 / 1e12)
    assert ddpm["peak_fraction"] == pytest.approx(2 * unet_row / 0.05 / 2e12)
    assert medvar["tflops"] == pytest.approx(image / 0.25 / 1e12)
    assert medvar["peak_fraction"] == pytest.approx(image / 0.25 / 2e12)
    assert "MedVAR vs DDPM at 100 steps: 20.0x faster" in benchmark.format_report(result)


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
    """First principles: attention of B·H heads, Lq queries, Lk keys, head size E is two batched
    matmuls, QKᵀ and (softmax)·V, each 2·B·H·Lq·Lk·E FLOPs: 2·(2·2·4·16·24·8) = 98304 here (torch's
    own table has no entry for the CPU flash kernel, so it alone would count 0). A (5, 7) @ (7, 3)
    matmul in the same counter adds 2·5·7·3."""
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 24, 8), torch.randn(2, 4, 24, 8)
    with benchmark.flop_counter() as counter:
        F.scaled_dot_product_attention(q, k, v)
        torch.randn(5, 7) @ torch.randn(7, 3)
    assert counter.get_total_flops() == 2 * (2 * 2 * 4 * 16 * 24 * 8) + 2 * 5 * 7 * 3


def test_flop_counter_counts_cpu_flash_attention_backward():
    """The flash backward of the same attention is five such matmuls: it recomputes S = QKᵀ, then
    dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q. Forward and backward: 7·(2·2·4·16·24·8) FLOPs."""
    q, k, v = (torch.randn(2, 4, n, 8, requires_grad=True) for n in (16, 24, 24))
    with benchmark.flop_counter() as counter:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    assert counter.get_total_flops() == 7 * (2 * 2 * 4 * 16 * 24 * 8)


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

"""Sampling speed of MedVAR against the DDPM baseline at matched parameter counts (paper §6, Table 1).

`medvar bench` builds, per *pair*, a MedVAR sampler (next-scale transformer + tokenizer) and the
DDPM baseline whose UNet matches the transformer in parameters, with **untrained weights** (speed
does not depend on them), and times both in one process on the same device, dtype and batch:

- MedVAR: the whole image path of :func:`~medvar_bundle.sampling.medvar.generate_images` — one
  transformer pass per scale with the KV cache, classifier-free guidance (the conditional and
  null halves as one batch of 2B), top-k 900 / top-p 0.95 — plus the tokenizer's decoder; the mean
  of ``repeats`` runs after one warm-up run.
- DDPM: a few denoising steps of :func:`~medvar_bundle.sampling.ddpm.sample` (ancestral DDPM,
  guidance on, so also 2B rows per UNet evaluation), after a one-step warm-up. Every step is one
  UNet evaluation of the same cost, so the time of N steps is the measured time per step times N
  (the chain's fixed cost — initial noise, scheduler set-up, uint8 conversion — is negligible and
  is thereby counted per step).

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` (matrix products,
convolutions and attention, including CPU flash attention, which torch's table lacks) for one
image: MedVAR's whole sampling with decoding, and one DDPM step. FLOP/s are compared with the
measured peak of a large matmul in the same dtype (:func:`matmul_peak`).

``scripts/bench_sampler.py`` (MedVAR alone: KV cache vs recomputation, bf16 vs fp32) reuses the
timing and counting functions of this module. Only the standard library is imported at module
level, so that `medvar`'s parser can offer ``bench`` without loading torch and MONAI; each
function imports what it runs.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medvar_bundle.networks.ddpm import ConditionalDDPM
    from medvar_bundle.networks.msvqvae import MultiScaleVQVAE
    from medvar_bundle.networks.transformer import NextScaleTransformer


@functools.cache
def sampling_options() -> dict:
    """MedVAR's guidance, top-k and top-p when timed: ``configs/inference.yaml``'s (the paper's best, Table 4);
    read once, so no timed run parses the config."""
    from medvar_bundle.bundle_config import config_component

    return {key: config_component("inference", key) for key in ("cfg", "top_k", "top_p")}


DDPM_SAMPLER = "ddpm"
DDPM_CFG = 4.0
"""Guidance strength of the timed DDPM chain (any value > 0 costs the same: two UNet rows per image)."""

DDPM_STEPS = (10, 20, 30, 50, 100)
"""The paper's DDPM step counts (Table 1)."""

NUM_DATASETS = 9
"""Dataset ids of the timed networks: the paper's nine anatomy–modality combinations."""

UNTRAINED = "untrained (timing only; speed does not depend on the weights)"


@dataclass(frozen=True)
class BenchPair:
    """A MedVAR sampler and the DDPM baseline matched to its transformer in parameters.

    Attributes:
        name: the pair's name in reports.
        transformer, tokenizer, ddpm: preset names of the three networks.
        transformer_overrides, tokenizer_overrides, ddpm_overrides: constructor overrides of the
            presets (small networks for tests).
    """

    name: str
    transformer: str
    tokenizer: str
    ddpm: str
    transformer_overrides: dict = field(default_factory=dict)
    tokenizer_overrides: dict = field(default_factory=dict)
    ddpm_overrides: dict = field(default_factory=dict)


PAIRS: dict[str, BenchPair] = {
    # CPU presets (6.1M and 40.8M transformers) with the CPU tokenizer, as in the demo.
    "tiny": BenchPair("tiny", "tiny", "tiny", "tiny"),
    "small": BenchPair("small", "small", "tiny", "small"),
    # The paper's pairs: MedVAR-d16 (310M) vs DDPM-S (330M), MedVAR-d20 (600M) vs DDPM-L (600M).
    "d16": BenchPair("d16", "d16", "paper", "ddpm-s"),
    "d20": BenchPair("d20", "d20", "paper", "ddpm-l"),
}
DEFAULT_PAIRS = ("tiny", "small")
"""What `medvar bench` times by default: a few minutes on a 2-core CPU."""


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matmul_peak(dtype: torch.dtype, n: int = 4096, repeats: int = 5, device: torch.device | str = "cpu") -> float:
    """Measured FLOP/s of an n×n×n matmul in ``dtype`` on ``device`` (the best of ``repeats``)."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """A silent :class:`FlopCounterMode` that also counts CPU flash attention, forward and backward
    (``aten._scaled_dot_product_flash_attention_for_cpu[_backward]``, absent from torch's table)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flops,
        },
    )


def _sample_medvar(
    transformer: NextScaleTransformer, tokenizer: MultiScaleVQVAE, batch: int, bf16: bool, use_cache: bool, decode: bool
) -> None:
    """Sample one batch of tokens for dataset 0 (and decode them to images with ``decode``)."""
    import torch

    from medvar_bundle.runtime import autocast
    from medvar_bundle.sampling.medvar import SamplingOptions, generate_tokens

    device = _device_of(transformer)
    ids = torch.zeros(batch, dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(0)
    options = SamplingOptions(**sampling_options())
    indices, _ = generate_tokens(transformer, tokenizer, ids, options, generator, use_cache, bf16)
    if decode:
        with torch.no_grad(), autocast(device, bf16):
            tokenizer.decode(indices)


def time_sampling(transformer, tokenizer, batch: int, bf16: bool, use_cache: bool, repeats: int, decode: bool) -> float:
    """Mean seconds per batch of MedVAR sampling (after one warm-up run), on the transformer's device."""
    device = _device_of(transformer)
    _sample_medvar(transformer, tokenizer, batch, bf16, use_cache, decode)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        _sample_medvar(transformer, tokenizer, batch, bf16, use_cache, decode)
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def flops_per_image(transformer, tokenizer, use_cache: bool, bf16: bool = False, decode: bool = False) -> int:
    """FLOPs (matmuls, convolutions, attention: :func:`flop_counter`) of sampling one image's tokens
    — the transformer and the tokenizer's f̂ updates — plus its decoding with ``decode``; counted at
    batch 1 (the cost is linear in the batch). The count does not depend on ``bf16`` (autocast only casts)."""
    with flop_counter() as counter:
        _sample_medvar(transformer, tokenizer, 1, bf16, use_cache, decode)
    return counter.get_total_flops()


def _sample_ddpm(model: ConditionalDDPM, steps: int, batch: int, bf16: bool) -> None:
    """Run a ``steps``-step guided DDPM chain for a batch of dataset 0."""
    import torch

    from medvar_bundle.sampling.ddpm import sample

    device = _device_of(model)
    ids = torch.zeros(batch, dtype=torch.long, device=device)
    sample(model, DDPM_SAMPLER, steps, ids, torch.Generator(device).manual_seed(0), DDPM_CFG, bf16)


def ddpm_seconds_per_step(model: ConditionalDDPM, timed_steps: int, batch: int, bf16: bool) -> float:
    """Seconds per denoising step of a batch: a ``timed_steps``-step chain timed after a one-step warm-up."""
    device = _device_of(model)
    _sample_ddpm(model, 1, batch, bf16)
    synchronize(device)
    start = time.perf_counter()
    _sample_ddpm(model, timed_steps, batch, bf16)
    synchronize(device)
    return (time.perf_counter() - start) / timed_steps


def ddpm_flops_per_step(model: ConditionalDDPM, bf16: bool = False) -> int:
    """FLOPs of one denoising step of one image (one guided UNet evaluation: 2 rows)."""
    with flop_counter() as counter:
        _sample_ddpm(model, 1, 1, bf16)
    return counter.get_total_flops()


def linear_in_steps(seconds_per_step: float, steps: Sequence[int]) -> dict[str, float]:
    """Seconds of a chain of N steps for every N in ``steps``, ``N · seconds_per_step``, keyed ``str(N)``."""
    return {str(n): n * seconds_per_step for n in steps}


def build_pair(
    pair: BenchPair, image_size: int, device: torch.device | str
) -> tuple[NextScaleTransformer, MultiScaleVQVAE, ConditionalDDPM]:
    """The pair's three networks, freshly initialised (seed 0), in eval mode on ``device``
    (convolutional ones ``channels_last``); the transformer takes its vocabulary, code size and
    scales from the tokenizer."""
    import torch

    from medvar_bundle.networks.ddpm import ConditionalDDPM
    from medvar_bundle.networks.msvqvae import MultiScaleVQVAE
    from medvar_bundle.networks.transformer import NextScaleTransformer

    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE.from_preset(pair.tokenizer, **{"image_size": image_size, **pair.tokenizer_overrides})
    from_tokenizer = {key: tokenizer.config[key] for key in ("vocab_size", "embed_dim", "patch_nums")}
    transformer = NextScaleTransformer.from_preset(
        pair.transformer, NUM_DATASETS, **{**pair.transformer_overrides, **from_tokenizer}
    )
    ddpm = ConditionalDDPM.from_preset(pair.ddpm, NUM_DATASETS, **{"image_size": image_size, **pair.ddpm_overrides})
    return (
        transformer.to(device).eval(),
        tokenizer.to(device, memory_format=torch.channels_last).eval(),
        ddpm.to(device, memory_format=torch.channels_last).eval(),
    )


def _throughput(flops: int, batch: int, seconds: float, peak: float) -> dict:
    return {"tflops": flops * batch / seconds / 1e12, "peak_fraction": flops * batch / seconds / peak}


def bench_pair(
    pair: BenchPair,
    steps: Sequence[int],
    batch: int,
    device: torch.device | str,
    bf16: bool,
    ddpm_timed_steps: int,
    repeats: int,
    image_size: int,
    peak: float,
) -> dict:
    """Time one pair (see the module docstring); every time is per image of a batch of ``batch``.

    Returns:
        ``medvar`` and ``ddpm`` (presets, parameters, seconds and images per second, FLOPs, FLOP/s
        and fraction of ``peak``), ``speedup`` (DDPM seconds / MedVAR seconds per step count,
        keyed ``str(N)``) and ``speedup_vs_ddpm100`` (against 100 steps, whether or not in ``steps``).
    """
    transformer, tokenizer, ddpm = build_pair(pair, image_size, device)
    medvar_batch = time_sampling(transformer, tokenizer, batch, bf16, use_cache=True, repeats=repeats, decode=True)
    medvar_flops = flops_per_image(transformer, tokenizer, use_cache=True, bf16=bf16, decode=True)
    step_batch = ddpm_seconds_per_step(ddpm, ddpm_timed_steps, batch, bf16)
    step_flops = ddpm_flops_per_step(ddpm, bf16)
    medvar_s = medvar_batch / batch
    ddpm_s = linear_in_steps(step_batch / batch, steps)
    medvar = {
        "transformer": pair.transformer, "tokenizer": pair.tokenizer,
        "transformer_parameters": _parameters(transformer), "tokenizer_parameters": _parameters(tokenizer),
        "scales": len(tokenizer.patch_nums), "s_per_image": medvar_s, "images_per_s": 1 / medvar_s,
        "flops_per_image": medvar_flops, **_throughput(medvar_flops, batch, medvar_batch, peak),
    }  # fmt: skip
    baseline = {
        "preset": pair.ddpm, "parameters": _parameters(ddpm), "sampler": DDPM_SAMPLER, "timed_steps": ddpm_timed_steps,
        "s_per_step": step_batch / batch, "s_per_image": ddpm_s, "images_per_s": {n: 1 / s for n, s in ddpm_s.items()},
        "flops_per_step": step_flops, "flops_per_image": {str(n): n * step_flops for n in steps},
        **_throughput(step_flops, batch, step_batch, peak),
    }  # fmt: skip
    return {
        "name": pair.name, "medvar": medvar, "ddpm": baseline,
        "speedup": {n: s / medvar_s for n, s in ddpm_s.items()},
        "speedup_vs_ddpm100": linear_in_steps(step_batch / batch, [100])["100"] / medvar_s,
    }  # fmt: skip


def run_benchmark(
    pairs: Sequence[BenchPair],
    steps: Sequence[int] = DDPM_STEPS,
    batch: int = 1,
    device: str = "cpu",
    bf16: bool = True,
    ddpm_timed_steps: int = 2,
    repeats: int = 3,
    image_size: int = 256,
) -> dict:
    """Time every pair in turn (:func:`bench_pair`) after measuring the matmul peak of the dtype.

    Returns:
        One JSON-ready object: the settings, ``matmul_peak_tflops``, ``pairs`` (one entry per
        pair, in order) and, copied from the pair with the largest transformer, ``pair``,
        ``medvar_s_per_image``, ``medvar_images_per_s``, ``ddpm_s_per_image``,
        ``ddpm_images_per_s`` (keyed by step count ``str(N)``), ``speedup`` (same keys) and
        ``speedup_vs_ddpm100``; ``seconds`` is the wall time of the whole run.
    """
    import torch

    started = time.perf_counter()
    peak = matmul_peak(torch.bfloat16 if bf16 else torch.float32, device=device)
    rows = [bench_pair(p, steps, batch, device, bf16, ddpm_timed_steps, repeats, image_size, peak) for p in pairs]
    largest = max(rows, key=lambda r: r["medvar"]["transformer_parameters"])
    return {
        "weights": UNTRAINED, "device": str(device), "dtype": "bf16" if bf16 else "fp32", "batch": batch,
        "image_size": image_size, "threads": torch.get_num_threads(), "steps": list(steps),
        "ddpm_timing": f"{ddpm_timed_steps} denoising steps timed per model after a one-step warm-up, scaled linearly "
        "by the step count (every step is one UNet evaluation of the same cost)",
        "medvar_timing": f"mean of {repeats} runs after a warm-up run: KV cache, CFG, tokenizer decoding included",
        **sampling_options(), "ddpm_sampler": DDPM_SAMPLER, "ddpm_cfg": DDPM_CFG,
        "matmul_peak_tflops": peak / 1e12, "pairs": rows, "pair": largest["name"],
        "medvar_s_per_image": largest["medvar"]["s_per_image"],
        "medvar_images_per_s": largest["medvar"]["images_per_s"],
        "ddpm_s_per_image": largest["ddpm"]["s_per_image"], "ddpm_images_per_s": largest["ddpm"]["images_per_s"],
        "speedup": largest["speedup"], "speedup_vs_ddpm100": largest["speedup_vs_ddpm100"],
        "seconds": time.perf_counter() - started,
    }  # fmt: skip


def format_report(result: dict) -> str:
    """The human-readable table of a :func:`run_benchmark` result."""
    lines = [
        f"medvar bench: {result['device']}, {result['dtype']}, batch {result['batch']}, {result['image_size']}², "
        f"{result['threads']} threads; weights {result['weights']}",
        f"MedVAR: cfg {result['cfg']}, top-k {result['top_k']}, top-p {result['top_p']}; {result['medvar_timing']}",
        f"DDPM ({result['ddpm_sampler']}, cfg {result['ddpm_cfg']}): {result['ddpm_timing']}",
        f"matmul peak ({result['dtype']}): {result['matmul_peak_tflops']:.2f} TFLOP/s",
    ]
    for row in result["pairs"]:
        m, d = row["medvar"], row["ddpm"]
        lines += [
            "",
            f"pair {row['name']}: MedVAR {m['transformer']} ({m['transformer_parameters'] / 1e6:.1f}M transformer + "
            f"{m['tokenizer_parameters'] / 1e6:.1f}M tokenizer {m['tokenizer']}) "
            f"vs DDPM {d['preset']} ({d['parameters'] / 1e6:.1f}M)",
            f"  {'model':<16} {'s/image':>9} {'images/s':>9} {'speedup':>8} {'TFLOP/s':>8} {'of peak':>8}",
            f"  {'MedVAR (' + str(m['scales']) + ' scales)':<16} "
            f"{m['s_per_image']:>9.3f} {m['images_per_s']:>9.2f} {'':>8} "
            f"{m['tflops']:>8.3f} {100 * m['peak_fraction']:>7.1f}%",
        ]
        lines += [
            f"  {'DDPM (' + n + ' steps)':<16} {s:>9.3f} {d['images_per_s'][n]:>9.3f} {row['speedup'][n]:>7.1f}x "
            f"{d['tflops']:>8.3f} {100 * d['peak_fraction']:>7.1f}%"
            for n, s in d["s_per_image"].items()
        ]
        lines.append(f"  MedVAR vs DDPM at 100 steps: {row['speedup_vs_ddpm100']:.1f}x faster")
    lines.append(f"\nbenchmark wall time {result['seconds']:.0f} s")
    return "\n".join(lines)

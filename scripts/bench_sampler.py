"""Benchmark next-scale sampling at 256²: seconds/image and images/s for a transformer preset
(d16 by default), batch 1 and 16, bf16 vs fp32, KV cache vs full recomputation, and the FLOP/s
reached against this machine's measured bf16 matmul peak.

Untrained weights (speed does not depend on them); CFG on (the conditional and unconditional
halves run as one batch of 2B, as in real use), top-k 900, top-p 0.95. The transformer is timed
alone (tokens) and with the tokenizer's decoder (images); FLOPs are counted with
``torch.utils.flop_counter`` over the sampling of one image's tokens (matmuls, convolutions and
attention; the tokenizer's decoder is not counted). The timing and counting functions live in
:mod:`medvar_bundle.benchmark`, which `medvar bench` (MedVAR vs the DDPM baseline) uses too.

    .venv/bin/python scripts/bench_sampler.py [--preset d16] [--batches 1 16] [--repeats 1] [--json]
"""

from __future__ import annotations

import argparse
import json

import torch

from medvar_bundle.benchmark import flops_per_image, matmul_peak, sampling_options, time_sampling
from medvar_bundle.bundle_run import positive_int
from medvar_bundle.networks.msvqvae import TOKENIZER_PRESETS, MultiScaleVQVAE
from medvar_bundle.networks.transformer import TRANSFORMER_PRESETS, NextScaleTransformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", default="d16", choices=sorted(TRANSFORMER_PRESETS), help="transformer preset (default d16, 310M)"
    )
    parser.add_argument(
        "--tokenizer-preset",
        default="paper",
        choices=sorted(TOKENIZER_PRESETS),
        help="tokenizer preset used for decoding (default paper)",
    )
    parser.add_argument("--batches", nargs="+", type=positive_int, default=[1, 16])
    parser.add_argument("--repeats", type=positive_int, default=1)
    parser.add_argument(
        "--skip-fp32-batches", nargs="*", type=int, default=[16], help="batches timed in bf16 only (fp32 is slow)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE.from_preset(args.tokenizer_preset).eval().to(memory_format=torch.channels_last)
    transformer = NextScaleTransformer.from_preset(args.preset, num_datasets=3).eval()
    params = sum(p.numel() for p in transformer.parameters())
    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    flops = {cache: flops_per_image(transformer, tokenizer, cache) for cache in (True, False)}
    rows = []
    for batch in args.batches:
        for bf16 in (True, False):
            if not bf16 and batch in args.skip_fp32_batches:
                continue
            for cache in (True, False):
                if not cache and not bf16:
                    continue  # recomputation in fp32 adds nothing the bf16 ratio does not show
                seconds = time_sampling(transformer, tokenizer, batch, bf16, cache, args.repeats, decode=False)
                row = dict(
                    batch=batch, dtype="bf16" if bf16 else "fp32", kv_cache=cache, s_per_batch=seconds,
                    s_per_image=seconds / batch, images_per_s=batch / seconds, flops_per_image=flops[cache],
                    tflops=flops[cache] * batch / seconds / 1e12,
                    peak_fraction=flops[cache] * batch / seconds / (peak_bf16 if bf16 else peak_fp32),
                )  # fmt: skip
                if cache:
                    total = time_sampling(transformer, tokenizer, batch, bf16, cache, args.repeats, decode=True)
                    row["s_per_image_with_decode"] = total / batch
                rows.append(row)
    result = dict(
        preset=args.preset, parameters=params, tokenizer=args.tokenizer_preset, threads=torch.get_num_threads(),
        matmul_peak_tflops={"bf16": peak_bf16 / 1e12, "fp32": peak_fp32 / 1e12}, **sampling_options(), rows=rows,
        weights="untrained (timing only)",
    )  # fmt: skip
    for batch in args.batches:
        by = {(r["dtype"], r["kv_cache"]): r["s_per_image"] for r in rows if r["batch"] == batch}
        if ("bf16", True) in by and ("bf16", False) in by:
            result[f"kv_cache_speedup_batch{batch}"] = by[("bf16", False)] / by[("bf16", True)]
        if ("bf16", True) in by and ("fp32", True) in by:
            result[f"bf16_speedup_batch{batch}"] = by[("fp32", True)] / by[("bf16", True)]
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{args.preset}: {params / 1e6:.1f}M parameters, 256x256, {result['threads']} threads, untrained weights, "
        f"cfg {result['cfg']}, top-k {result['top_k']}, top-p {result['top_p']}"
    )
    print(f"matmul peak: bf16 {peak_bf16 / 1e12:.2f} TFLOP/s, fp32 {peak_fp32 / 1e12:.2f} TFLOP/s")
    print(
        f"{'batch':>5} {'dtype':>5} {'cache':>5} {'s/image':>8} {'img/s':>7} "
        f"{'+decode s/img':>13} {'TFLOP/s':>8} {'of peak':>8}"
    )
    for r in rows:
        dec = f"{r['s_per_image_with_decode']:.3f}" if "s_per_image_with_decode" in r else "-"
        print(
            f"{r['batch']:>5} {r['dtype']:>5} {str(r['kv_cache']):>5} "
            f"{r['s_per_image']:>8.3f} {r['images_per_s']:>7.3f} "
            f"{dec:>13} {r['tflops']:>8.3f} {100 * r['peak_fraction']:>7.1f}%"
        )
    for key in sorted(k for k in result if "speedup" in k):
        print(f"{key}: {result[key]:.2f}x")


if __name__ == "__main__":
    main()

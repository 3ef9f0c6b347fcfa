"""Benchmark the tokenizer: encode+decode images/s at 256², tiny and paper presets, fp32 vs bf16.

Untrained weights (speed does not depend on them). channels_last memory format throughout.

    .venv/bin/python scripts/bench_tokenizer.py [--batch 8] [--repeats 3] [--presets tiny paper]
"""

from __future__ import annotations

import argparse
import time

import torch

from medvar_bundle.networks.msvqvae import MultiScaleVQVAE


@torch.no_grad()
def images_per_second(model: MultiScaleVQVAE, batch: int, bf16: bool, repeats: int) -> float:
    x = (torch.rand(batch, 1, model.image_size, model.image_size) * 2 - 1).contiguous(memory_format=torch.channels_last)

    def once() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.decode(model.encode(x))

    once()  # warm-up (oneDNN primitive creation)
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["tiny", "paper"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, 256x256, encode+decode")
    print(f"{'preset':>8} {'params':>8} {'fp32 img/s':>11} {'bf16 img/s':>11} {'bf16/fp32':>10}")
    for name in args.presets:
        model = MultiScaleVQVAE.from_preset(name).eval().to(memory_format=torch.channels_last)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        fp32 = images_per_second(model, args.batch, False, args.repeats)
        bf16 = images_per_second(model, args.batch, True, args.repeats)
        print(f"{name:>8} {params:>7.1f}M {fp32:>11.2f} {bf16:>11.2f} {bf16 / fp32:>9.2f}x")


if __name__ == "__main__":
    main()

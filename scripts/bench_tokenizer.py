"""Benchmark the tokenizer at 256²: encode+decode images/s (fp32 vs bf16) and, with --train,
seconds per bf16 training step (forward, L1 + VQ loss, backward, AdamW).

Untrained weights (speed does not depend on them). channels_last memory format throughout.
``--var-layout`` adds VAR's full-resolution layout at the tiny preset's width (ch 32, 4 stride-2
downsamplings) for comparison with the patch-folding tiny preset.

    .venv/bin/python scripts/bench_tokenizer.py [--batch 8] [--repeats 3] [--presets tiny paper]
        [--train] [--var-layout]
"""

from __future__ import annotations

import argparse
import time

import torch

from medvar_bundle.bundle_run import positive_int
from medvar_bundle.networks.msvqvae import TOKENIZER_PRESETS, MultiScaleVQVAE


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


def train_step_seconds(model: MultiScaleVQVAE, batch: int, repeats: int) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = (torch.rand(batch, 1, model.image_size, model.image_size) * 2 - 1).contiguous(memory_format=torch.channels_last)

    def once() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            recon, losses = model(x)
        loss = (recon.float() - x).abs().mean() + losses["vq"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    once()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--presets", nargs="+", choices=sorted(TOKENIZER_PRESETS), default=["tiny", "paper"])
    parser.add_argument("--train", action="store_true", help="also time a bf16 training step")
    parser.add_argument("--var-layout", action="store_true", help="also run VAR's layout at ch 32 (no patch folding)")
    args = parser.parse_args()
    configs = {name: MultiScaleVQVAE.from_preset(name) for name in args.presets}
    if args.var_layout:
        configs["var-ch32"] = MultiScaleVQVAE(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, 256x256")
    print(
        f"{'model':>9} {'params':>8} {'fp32 img/s':>11} {'bf16 img/s':>11} {'bf16/fp32':>10}"
        + (f" {'train s/step':>13}" if args.train else "")
    )
    for name, model in configs.items():
        model = model.eval().to(memory_format=torch.channels_last)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        fp32 = images_per_second(model, args.batch, False, args.repeats)
        bf16 = images_per_second(model, args.batch, True, args.repeats)
        row = f"{name:>9} {params:>7.1f}M {fp32:>11.2f} {bf16:>11.2f} {bf16 / fp32:>9.2f}x"
        if args.train:
            row += f" {train_step_seconds(model, args.batch, args.repeats):>13.2f}"
        print(row)


if __name__ == "__main__":
    main()

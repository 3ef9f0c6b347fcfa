"""Kill the trainers at random steps, resume them, and check that they end bit for bit where an
uninterrupted run ends.

For each trainer (the tokenizer, the transformer, the DDPM baseline) in the settings ``make demo``
and ``scripts/compare.py`` use (step counts scaled down), this runs:

1. a reference: ``max_steps`` steps, uninterrupted;
2. the same run in the same settings, SIGKILLed ``--kills`` times: each time it starts (resuming
   from its newest checkpoint, ``checkpoint_every`` steps apart) and is killed from inside, by a
   config overlay, right after a step drawn at random beyond the one it resumed from; then it
   runs to the end.

Every checkpoint of the two runs is compared with ``torch.equal``: weights, optimizer moments,
step counters, scheduler and trainer state. A kill lands between checkpoints, so each resume
repeats steps (the data order part-way through an epoch, per-sample augmentation, crops,
dead-code re-draws, dropout and diffusion noise must all come out the same).

    python scripts/chaos_train.py --store runs/demo/store --tokenizer runs/demo/tokenizer/tokenizer.pt \\
        --out runs/chaos_train --kills 5 --json runs/chaos_train/summary.json

The store must be tokenized by ``--tokenizer`` for the transformer (``make demo`` does both).
Exit status 1 when any final state differs.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from medvar_bundle.bundle_run import positive_int
from medvar_bundle.engines.common import CHECKPOINT_PATTERN, latest_checkpoint

KILL_OVERLAY = """\
# Merged after a training config: SIGKILL this process (no clean-up at all) once step kill_at_step is done.
+imports:
  - $import os
  - $import signal
  - $from ignite.engine import Events
kill_at_step: 1
+initialize:
  - "$@train#trainer.add_event_handler(Events.ITERATION_COMPLETED(once=@kill_at_step),
    lambda engine: os.kill(os.getpid(), signal.SIGKILL))"
"""

# the settings of `make demo` (tokenizer, transformer) and scripts/compare.py (DDPM), step counts scaled down
DEMO_SETTINGS = {
    "tokenizer": dict(
        config="train_tokenizer", batch_size=4, lr=1e-3, min_lr_ratio=0.05, augment=True, warmup_crop=128,
        ae_warmup=12, dead_code_every=5, max_steps=24, val_every=10, checkpoint_every=5,
        **{"network_def#codebook_decay": 0.99},
    ),
    "transformer": dict(
        config="train", preset="tiny", batch_size=8, lr=0.096, warmup_steps=5, max_steps=24, val_every=10,
        checkpoint_every=5,
    ),
    "ddpm": dict(
        config="train_ddpm", preset="tiny", batch_size=8, lr=1e-3, warmup_steps=5, max_steps=24, val_every=10,
        checkpoint_every=5,
    ),
}  # fmt: skip


def run_training(config: str, overrides: dict, kill_at: int | None, overlay: Path) -> int:
    """Run ``configs/<config>.yaml`` in a new process with ``overrides``; with ``kill_at``, the
    process SIGKILLs itself after that step. Returns the process's exit status (-9 when killed).

    Raises:
        RuntimeError: the run failed by itself (neither killed nor finished), with its stderr's last line.
    """
    extra = [str(overlay)] if kill_at is not None else []
    settings = dict(overrides, progress=False, **({"kill_at_step": kill_at} if kill_at is not None else {}))
    code = (
        "from medvar_bundle.bundle_config import run_config\n"
        f"run_config({config!r}, 'train', {settings!r}, extra_configs={extra!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode not in (0, -signal.SIGKILL):
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{config} run in {overrides['output_dir']} failed ({proc.returncode}): {last}")
    return proc.returncode


def differences(a, b, path: str = "") -> list[str]:
    """Where two checkpoints differ: key paths whose tensors are not ``torch.equal`` (or whose
    values, types or key sets differ), recursively through dicts, lists and tuples."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
        return [] if same and a.shape == b.shape and torch.equal(a, b) else [path or "."]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}/{i}")]
    return [] if type(a) is type(b) and a == b else [path or "."]


def checkpoint_step(folder: Path) -> int:
    """The step of the newest checkpoint in ``folder``, read from its name (0 when there is none)."""
    newest = latest_checkpoint(folder)
    return 0 if newest is None else int(CHECKPOINT_PATTERN.search(newest.name).group(1))


def kill_and_resume(
    config: str, overrides: dict, out: Path, kill_steps: list[int], overlay: Path
) -> tuple[list[tuple[int, int]], float]:
    """Run ``config`` into ``out``, SIGKILLed after each of ``kill_steps`` (ascending), then to the end.

    Returns the ``(resumed from, killed after)`` steps of each kill and the seconds it all took.
    """
    start, events = time.monotonic(), []
    for kill_at in kill_steps:
        resumed_from = checkpoint_step(out / "checkpoints")
        status = run_training(config, {**overrides, "output_dir": str(out)}, kill_at, overlay)
        if status != -signal.SIGKILL:
            raise RuntimeError(f"{config}: the run meant to die after step {kill_at} ended with status {status}")
        events.append((resumed_from, kill_at))
    run_training(config, {**overrides, "output_dir": str(out)}, None, overlay)
    return events, time.monotonic() - start


def compare_runs(reference: Path, resumed: Path) -> list[str]:
    """Differences between the final checkpoints of two run folders (``[]``: bit-identical)."""
    a, b = latest_checkpoint(reference / "checkpoints"), latest_checkpoint(resumed / "checkpoints")
    if a is None or b is None or a.name != b.name:
        return [f"final checkpoints {a} and {b} are not of the same step"]
    load = lambda p: torch.load(p, map_location="cpu", weights_only=True)  # noqa: E731
    return differences(load(a), load(b))


def chaos_trainer(name: str, overrides: dict, out: Path, kill_steps: list[int], overlay: Path) -> dict:
    """The reference run and the run killed after each of ``kill_steps`` of one trainer, in
    :data:`DEMO_SETTINGS` updated by ``overrides``, compared; a summary row."""
    overrides = {**DEMO_SETTINGS[name], **overrides}
    config = overrides.pop("config")
    shutil.rmtree(out / name, ignore_errors=True)
    start = time.monotonic()
    run_training(config, {**overrides, "output_dir": str(out / name / "reference")}, None, overlay)
    reference_seconds = time.monotonic() - start
    events, seconds = kill_and_resume(config, overrides, out / name / "killed", kill_steps, overlay)
    diff = compare_runs(out / name / "reference", out / name / "killed")
    every = overrides["checkpoint_every"]
    return {
        "trainer": name, "steps": overrides["max_steps"], "checkpoint_every": every,
        "kills": len(events), "kills_between_checkpoints": sum(k % every != 0 for _, k in events),
        "steps_repeated": sum(k - checkpoint_after(r, k, every) for r, k in events),
        "events": events, "differences": diff, "bit_identical": not diff,
        "reference_seconds": round(reference_seconds, 1), "killed_seconds": round(seconds, 1),
    }  # fmt: skip


def checkpoint_after(resumed_from: int, killed_at: int, every: int) -> int:
    """The newest checkpoint step a run resumed at ``resumed_from`` and killed after ``killed_at`` leaves."""
    return max(resumed_from, killed_at // every * every)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--store", required=True, help="a prepared slice store, tokenized by --tokenizer")
    parser.add_argument("--tokenizer", help="the tokenizer file that made the store's tokens (for the transformer)")
    parser.add_argument("--out", default="runs/chaos_train", help="work folder (replaced per trainer)")
    parser.add_argument("--trainers", nargs="+", choices=list(DEMO_SETTINGS), default=list(DEMO_SETTINGS))
    parser.add_argument("--kills", type=positive_int, default=5, help="SIGKILLs per trainer")
    parser.add_argument("--steps", type=positive_int, help="steps per run (default: 24)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill steps (the runs use seed 0)")
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args(argv)
    if "transformer" in args.trainers and not args.tokenizer:
        parser.error("--tokenizer is required for the transformer")
    for name in args.trainers:
        steps = args.steps or DEMO_SETTINGS[name]["max_steps"]
        if args.kills >= steps:
            parser.error(f"--kills {args.kills}: a run of {steps} steps can be killed after {steps - 1} at most")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overlay = out / "kill_at_step.yaml"
    overlay.write_text(KILL_OVERLAY)
    rows, rng = [], random.Random(args.seed)
    for name in args.trainers:
        overrides = {"dataset_dir": args.store, "max_steps": args.steps or DEMO_SETTINGS[name]["max_steps"]}
        if name == "transformer":
            overrides["tokenizer"] = args.tokenizer
        kill_steps = sorted(rng.sample(range(1, overrides["max_steps"]), args.kills))
        print(f"{name}: reference run, then a run killed after steps {kill_steps} ...", flush=True)
        rows.append(chaos_trainer(name, overrides, out, kill_steps, overlay))
        r = rows[-1]
        verdict = "bit-identical" if r["bit_identical"] else "DIFFERS: " + ", ".join(r["differences"][:5])
        print(
            f"{name}: {r['kills']} kills {r['events']} (resumed from, killed after), {r['steps_repeated']} steps "
            f"repeated; final state {verdict}"
            f" ({r['reference_seconds']} s reference, {r['killed_seconds']} s killed runs)",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["bit_identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark `medvar prepare`: volumes per minute and peak RSS on synthetic 512×512×300 CT volumes.

Each configuration runs in a fresh Python process (so peak RSS is its own); the main process's and
the worker processes' peak RSS are reported separately (ru_maxrss of self and of children).

    .venv/bin/python scripts/bench_prepare.py [--volumes 4] [--shape 512 512 300] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medvar_bundle.bundle_run import positive_int

CHILD = r"""
import json, resource, sys, time
from medvar_bundle.data import load_datalist, prepare_store
items = load_datalist(sys.argv[1])
t0 = time.perf_counter()
res = prepare_store(items, sys.argv[2], workers=int(sys.argv[3]), progress=False)
dt = time.perf_counter() - t0
print(json.dumps({
    "seconds": dt,
    "ok": res.counts["ok"],
    "slices": sum(d["num_slices"] for d in res.registry.values()),
    "rss_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rss_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}))
"""


def ct_phantom(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """int16 HU: air −1000, an elliptic body cylinder of soft tissue (40 ± 20) with a bone ring (700)."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    r = (x / 0.8) ** 2 + (y / 0.6) ** 2
    plane = np.where(r < 1, 40.0, -1000.0)
    plane[(r > 0.8) & (r < 0.9)] = 700.0
    vol = np.repeat(plane[:, :, None], shape[2], axis=2)
    vol += rng.normal(0, 20, size=shape) * (vol > -1000)
    return vol.astype(np.int16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=positive_int, default=4, help="number of volumes per run (default 4)")
    parser.add_argument(
        "--shape", type=int, nargs=3, default=[512, 512, 300], help="volume shape (default 512 512 300)"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts to compare (default 0 2)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="medvar-bench-"))
    try:
        t0 = time.perf_counter()
        vol = ct_phantom(tuple(args.shape))
        first = tmp / "ct_000.nii.gz"
        nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 1.5, 1.0])), first)
        entries = [{"image": first.name, "dataset": "bench_ct", "modality": "CT"}]
        for i in range(1, args.volumes):
            shutil.copy(first, tmp / f"ct_{i:03d}.nii.gz")
            entries.append({"image": f"ct_{i:03d}.nii.gz", "dataset": "bench_ct", "modality": "CT"})
        (tmp / "datalist.json").write_text(json.dumps({"training": entries}))
        print(
            f"wrote {args.volumes} synthetic CT volumes {tuple(args.shape)} int16 .nii.gz "
            f"in {time.perf_counter() - t0:.0f} s"
        )

        print(
            f"{'workers':>7} {'volumes/min':>12} {'s/volume':>9} {'slices':>7} "
            f"{'peak RSS main MiB':>18} {'peak RSS worker MiB':>20}"
        )
        for w in args.workers:
            store = tmp / f"store_w{w}"
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(tmp / "datalist.json"), str(store), str(w)],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{w:>7} {60 * r['ok'] / r['seconds']:>12.2f} {r['seconds'] / r['ok']:>9.2f} {r['slices']:>7} "
                f"{r['rss_main_mib']:>18.0f} {r['rss_worker_mib'] if w else float('nan'):>20.0f}"
            )
            shutil.rmtree(store)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""The Makefile's demo knobs, read with ``make -n`` (commands printed, nothing run)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry_run(*variables: str, target: str = "demo") -> subprocess.CompletedProcess:
    """``make -n TARGET VARIABLES``, without the calling make's flags or a knob set in the environment."""
    knobs = ("MAKE", "MFLAGS", "TOKENIZER_", "CFG", "TEMPERATURE", "COMPARE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(knobs)}
    return subprocess.run(["make", "-n", "-C", str(ROOT), target, *variables], capture_output=True, text=True, env=env)


def tokenizer_steps(output: str) -> dict[str, int]:
    """The step flags of the printed ``medvar train-tokenizer`` command."""
    command = " ".join(output.split("train-tokenizer", 1)[1].split("evaluate-tokenizer", 1)[0].split())
    flags = re.findall(r"--(max-steps|ae-warmup|quantized-crop-steps) (\d+)", command)
    return {flag: int(value) for flag, value in flags}


@pytest.mark.parametrize("times", [1, 3])
def test_tokenizer_times_multiplies_the_three_step_counts(times):
    done = dry_run(f"TOKENIZER_TIMES={times}")
    assert done.returncode == 0, done.stderr
    assert tokenizer_steps(done.stdout) == {
        "max-steps": 2700 * times, "ae-warmup": 1500 * times, "quantized-crop-steps": 1000 * times,
    }  # fmt: skip


def test_a_step_count_given_by_name_wins_over_the_multiplier():
    done = dry_run("TOKENIZER_TIMES=3", "TOKENIZER_STEPS=9000")
    assert tokenizer_steps(done.stdout) == {"max-steps": 9000, "ae-warmup": 4500, "quantized-crop-steps": 3000}


@pytest.mark.parametrize("times", ["2.5", "0", "x"])
def test_a_multiplier_that_is_not_a_positive_whole_number_stops_with_one_line(times):
    done = dry_run(f"TOKENIZER_TIMES={times}")
    assert done.returncode != 0
    assert f"TOKENIZER_TIMES must be a positive whole number, got '{times}'" in done.stderr
    assert "train-tokenizer" not in done.stdout


@pytest.mark.parametrize("target", ["demo", "compare"])
def test_sampling_knobs_reach_medvar_sampling_in_demo_and_compare(target):
    done = dry_run("CFG=2", "TEMPERATURE=0.7", "FINAL_TEMPERATURE=0.3", target=target)
    command = " ".join(done.stdout.replace("\\\n", " ").split())
    sampler = "medvar generate" if target == "demo" else "compare.py"
    knobs = "--cfg 2 --temperature 0.7 --final-temperature 0.3"
    assert re.search(rf"{re.escape(sampler)} [^;\n]*{knobs}", command), command
    constant = " ".join(dry_run("FINAL_TEMPERATURE=", target=target).stdout.split())
    assert "--temperature 0.6" in constant and "--final-temperature" not in constant


@pytest.mark.parametrize("seed, out", [("0", "runs/demo/compare "), ("1", "runs/demo/compare_seed1 ")])
def test_each_compare_seed_writes_its_own_folder(seed, out):
    """compare.py resumes what its folder holds: a second seed in the first seed's folder would
    report the first seed's models."""
    command = " ".join(dry_run(f"COMPARE_SEED={seed}", target="compare").stdout.replace("\\\n", " ").split())
    assert f"--out {out}" in command and f"--seed {seed} " in command


def test_a_failed_held_out_evaluation_stops_the_demo():
    """`evaluate-tokenizer | tee FILE` had tee's exit status under /bin/sh: a failed evaluation went on
    with a broken heldout_metrics.json. The output goes to a .part file, renamed once it succeeded."""
    lines = [" ".join(line.split()) for line in dry_run().stdout.replace("\\\n", " ").splitlines()]
    (evaluation,) = [line for line in lines if "evaluate-tokenizer" in line]
    assert "|" not in evaluation and evaluation.endswith("> runs/demo/tokenizer/heldout_metrics.json.part")
    moved = lines.index(evaluation) + 1
    assert lines[moved] == "mv runs/demo/tokenizer/heldout_metrics.json.part runs/demo/tokenizer/heldout_metrics.json"

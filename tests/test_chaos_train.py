"""Each trainer, SIGKILLed from inside after a step that is neither a checkpoint nor an epoch end,
resumes and ends bit for bit (``torch.equal``) where an uninterrupted run ends: weights, optimizer
moments and step counts, scheduler and trainer state. The settings are the demo's
(``scripts/chaos_train.py`` ``DEMO_SETTINGS``: augmentation, crops, autoencoder warm-up, dead-code
re-draws for the tokenizer), scaled to the 64² synthetic store of 16 training slices."""

from pathlib import Path

import pytest
import torch
from conftest import load_script

from medvar_bundle.engines.common import latest_checkpoint

chaos = load_script("chaos_train")

SMALL = dict(bf16=False, val_every=100, val_max_images=4, checkpoint_every=3)
CASES = {
    # batch 4: 4 steps an epoch; checkpoints at 3 and 6; killed after 5 and 7, resumed at 3 and 6 (mid-epoch)
    "tokenizer": dict(SMALL, max_steps=9, warmup_crop=32, ae_warmup=4, dead_code_every=2),
    # batch 8: 2 steps an epoch; killed after 4, resumed at 3 (mid-epoch)
    "transformer": dict(
        SMALL, max_steps=6, **{"network_def#depth": 1, "network_def#width": 64, "network_def#heads": 4}
    ),
    "ddpm": dict(
        SMALL,
        max_steps=6,
        **{
            "network_def#channels": (16, 32),
            "network_def#attention_levels": (False, True),
            "network_def#num_res_blocks": 1,
            "network_def#norm_num_groups": 8,
            "network_def#num_head_channels": 16,
        },
    ),  # fmt: skip
}
KILLS = {"tokenizer": [5, 7], "transformer": [4], "ddpm": [4]}
# (resumed from, killed after): every resume starts mid-epoch and repeats the steps after its checkpoint
EVENTS = {"tokenizer": [(0, 5), (3, 7)], "transformer": [(0, 4)], "ddpm": [(0, 4)]}


@pytest.fixture(scope="module")
def overlay(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("overlay") / "kill_at_step.yaml"
    path.write_text(chaos.KILL_OVERLAY)
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_a_run_killed_between_checkpoints_mid_epoch_resumes_bit_for_bit(
    name, synthetic_store, tokenized_store, overlay, tmp_path
):
    store = tokenized_store if name == "transformer" else synthetic_store
    overrides = {"dataset_dir": str(store), **CASES[name]}
    if name == "transformer":
        overrides["tokenizer"] = str(store.parent / "tokenizer.pt")
    row = chaos.chaos_trainer(name, overrides, tmp_path, KILLS[name], overlay)
    assert row["events"] == EVENTS[name] and row["steps_repeated"] > 0
    assert row["differences"] == [], f"{name}: state after resume differs at {row['differences'][:8]}"
    final = torch.load(latest_checkpoint(tmp_path / name / "killed" / "checkpoints"), weights_only=True)
    assert final["trainer"]["iteration"] == CASES[name]["max_steps"]


def test_differences_names_what_differs():
    a = {"net": {"w": torch.zeros(2), "b": torch.ones(1)}, "opt": [{"step": 3}], "trainer": {"iteration": 4}}
    b = {"net": {"w": torch.tensor([0.0, 1e-7]), "b": torch.ones(1)}, "opt": [{"step": 3}], "trainer": {"iteration": 5}}
    assert chaos.differences(a, a) == []
    assert chaos.differences(a, b) == ["/net/w", "/trainer/iteration"]
    assert chaos.differences({"x": torch.ones(1)}, {"x": torch.ones(1, dtype=torch.float64)}) == ["/x"]
    assert chaos.differences({"x": 1}, {"y": 1}) == [": keys ['x', 'y']"]

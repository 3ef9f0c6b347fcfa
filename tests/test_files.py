"""Model files load as weights only: a file that carries pickled code is refused before anything runs."""

import os

import pytest
import torch

from medvar_bundle.cli import main
from medvar_bundle.files import load_weights
from medvar_bundle.model_file import load_tokenizer


class Payload:
    """Unpickling this object would run ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil_file(tmp_path):
    """A torch file shaped like a model file whose ``config`` value runs a shell command when unpickled."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "model.pt"
    torch.save({"format": "medvar-tokenizer", "config": Payload(marker), "state_dict": {}}, path)
    return path, marker


def test_weights_load_and_round_trip(tmp_path):
    weights = {"w": torch.arange(6.0).reshape(2, 3), "meta": {"step": 3, "names": ["a"]}}
    torch.save(weights, tmp_path / "ok.pt")
    loaded = load_weights(tmp_path / "ok.pt", "model")
    torch.testing.assert_close(loaded["w"], weights["w"])
    assert loaded["meta"] == weights["meta"]


def test_pickled_code_is_refused_with_one_line_and_never_runs(evil_file):
    path, marker = evil_file
    with pytest.raises(ValueError) as err:
        load_weights(path, "model")
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "refused" in message and "system" in message
    assert not marker.exists()
    with pytest.raises(ValueError, match="refused"):
        load_tokenizer(path)
    assert not marker.exists()


def test_generate_refuses_the_file_with_one_line_and_exit_2(evil_file, tmp_path, capsys):
    path, marker = evil_file
    assert main(["generate", "--model", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "refused" in lines[0], lines
    assert not marker.exists()


def test_a_truncated_file_is_one_readable_line(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable checkpoint file") as err:
        load_weights(path, "checkpoint")
    assert "\n" not in str(err.value)

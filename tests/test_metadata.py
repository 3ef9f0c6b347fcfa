"""configs/metadata.json: valid against MONAI's schema offline, and in agreement with pyproject.toml."""

import json
import re
from pathlib import Path

import monai.apps.utils
import pytest
from monai.bundle import verify_metadata

ROOT = Path(__file__).resolve().parents[1]
META = ROOT / "configs" / "metadata.json"
SCHEMA = Path(__file__).parent / "data" / "meta_schema_20240725.json"
# MONAI warns that a schema file given without a hash is not integrity-checked; the copy is in the repository.
pytestmark = pytest.mark.filterwarnings("ignore:No hash value provided")


def _metadata() -> dict:
    return json.loads(META.read_text())


def _pyproject() -> str:
    return (ROOT / "pyproject.toml").read_text()


def _dependencies() -> dict[str, str]:
    """``[project] dependencies`` of pyproject.toml: normalised name → pinned version ('' when unpinned)."""
    block = re.search(r"^dependencies = \[(.*?)^\]", _pyproject(), re.M | re.S).group(1)
    deps = {}
    for spec in re.findall(r'"([^"]+)"', block):
        name, _, pin = re.match(r"([A-Za-z0-9_.-]+)(==([^,;\s]+))?", spec).groups()
        deps[name.lower().replace("_", "-")] = pin or ""
    return deps


@pytest.fixture
def offline(monkeypatch):
    """Any download MONAI attempts fails, so a missing schema copy cannot pass by fetching one."""

    def refuse(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(monai.apps.utils, "_download_with_progress", refuse)


def test_metadata_verifies_offline_against_the_schema_copy(offline):
    verify_metadata(meta_file=str(META), filepath=str(SCHEMA))


def test_verification_rejects_a_malformed_format(offline, tmp_path):
    meta = _metadata()
    meta["network_data_format"]["inputs"]["image"]["value_range"] = "[-1, 1]"
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="Failed validating"):
        verify_metadata(meta_file=str(bad), filepath=str(SCHEMA))


def test_metadata_version_is_the_package_version_and_has_a_changelog_entry():
    meta = _metadata()
    version = re.search(r'^version = "([^"]+)"', _pyproject(), re.M).group(1)
    assert meta["version"] == version
    assert version in meta["changelog"]


def test_required_packages_are_declared_dependencies_with_matching_pins():
    meta, deps = _metadata(), _dependencies()
    assert set(meta["required_packages_version"]) <= set(deps)
    for name, version in meta["required_packages_version"].items():
        assert deps[name] in ("", version), f"{name}: pyproject pins {deps[name]}, metadata says {version}"
    assert deps["torch"] in ("", meta["pytorch_version"])


def test_network_formats_describe_the_real_interfaces():
    meta = _metadata()
    image = meta["network_data_format"]["inputs"]["image"]
    assert (image["dtype"], image["value_range"], image["num_channels"], image["spatial_shape"]) == (
        "float32",
        [-1, 1],
        1,
        [256, 256],
    )
    files = meta["network_data_format"]["post_processed_outputs"]
    assert (files["ct"]["dtype"], files["mr"]["dtype"]) == ("int16", "uint8")
    assert meta["eval_metrics"] and all(isinstance(v, (int, float)) for v in meta["eval_metrics"].values())

"""The MONAI Label app (apps/medvar_label) answers an infer request over HTTP, in-process, on a real volume."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import real_demo_data

from medvar_bundle.data.sources import load_datalist

APP = Path(__file__).resolve().parents[1] / "apps" / "medvar_label"
DEVICE = "cuda"
"""What MONAI Label's clients send as the device when none is chosen, with a GPU or not (its
``name_to_device`` maps it to the CPU on a machine without one)."""


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_path):
    """A test client of MONAI Label's FastAPI server running our app over a studies folder holding the
    held-out MNI152 T1 of the demo corpus, with a random tiny model (its brain_mr dataset); and the paths."""
    from fastapi.testclient import TestClient
    from monailabel.config import settings

    root = tmp_path_factory.mktemp("monailabel")
    items = load_datalist(real_demo_data(root / "data", corpora=["brain"]))
    image = next(i["image"] for i in items if i["dataset"] == "brain_t1" and i["split"] == "validation")
    studies = root / "studies"
    studies.mkdir()
    shutil.copy(image, studies / "mni.nii.gz")
    settings.MONAI_LABEL_APP_DIR, settings.MONAI_LABEL_STUDIES = str(APP), str(studies)
    settings.MONAI_LABEL_APP_CONF = {"model": str(model_path), "dataset": "brain_mr"}
    from monailabel.app import app
    from monailabel.interfaces.utils.app import clear_cache

    with TestClient(app) as client:
        yield client, studies / "mni.nii.gz", root
    clear_cache()


def test_app_lists_the_inpainting_task(server):
    client, _, _ = server
    info = client.get("/info/").json()
    task = info["models"]["medvar_inpaint"]
    assert task["type"] == "others" and task["dimension"] == 3 and task["config"]["dataset"] == "brain_mr"


def test_infer_request_returns_the_inpainted_volume(server):
    client, image, root = server
    src = nib.load(image)
    drawn = np.zeros(src.shape, np.uint8)
    drawn[80:100, 100:120, 90:93] = 1
    nib.save(nib.Nifti1Image(drawn, src.affine), root / "drawn.nii.gz")
    runs = set(Path(tempfile.gettempdir()).glob("medvar-inpaint-*"))
    with open(root / "drawn.nii.gz", "rb") as f:
        reply = client.post("/infer/medvar_inpaint?image=mni&output=image", files={"label": ("drawn.nii.gz", f)},
                            data={"params": json.dumps({"seed": 3, "device": DEVICE})})  # fmt: skip
    assert reply.status_code == 200, reply.text
    (root / "reply.nii.gz").write_bytes(reply.content)
    out = nib.load(root / "reply.nii.gz")
    assert out.shape == src.shape and np.array_equal(out.affine, src.affine)
    assert out.get_data_dtype() == src.get_data_dtype()
    before, after, region = np.asarray(src.dataobj), np.asarray(out.dataobj), drawn.astype(bool)
    assert np.array_equal(after[~region], before[~region])
    assert np.count_nonzero(after[region] != before[region]) > 0.5 * region.sum()
    # nothing of the run is left behind on the server (the reply file is removed once sent)
    assert set(Path(tempfile.gettempdir()).glob("medvar-inpaint-*")) == runs


def test_infer_without_a_drawn_label_is_refused(server):
    from monailabel.interfaces.exception import MONAILabelException

    client, _, _ = server
    with pytest.raises(MONAILabelException, match="needs the label you drew"):
        client.post("/infer/medvar_inpaint?image=mni&output=image", data={"params": "{}"})

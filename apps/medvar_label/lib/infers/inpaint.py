"""MONAI Label infer task: the image and the label the user drew in → the in-painted image out.

The label is the mask (voxels > 0 are re-drawn); the task runs the bundle's ``configs/prepare.yaml``
+ ``configs/inpaint.yaml`` (:func:`medvar_bundle.inpaint.inpaint`), so the preprocessing, the
sampling defaults and the exact-outside-the-mask guarantee are those of ``medvar inpaint``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.utils.others.generic import name_to_device

from medvar_bundle.inpaint import inpaint

logger = logging.getLogger(__name__)

PARAMS = ("dataset", "edit_dataset", "outpaint", "seed", "cfg", "top_k", "top_p", "dilation", "feather")
"""Request parameters passed on to the bundle config (the ids of ``configs/inpaint.yaml``)."""


class MedVARInpaint(InferTask):
    """In-paint (``outpaint``: out-paint; ``edit_dataset``: edit) the drawn region of the image.

    Args:
        model_file: the MedVAR model file (``models/medvar.pt`` of the bundle).
        dataset: default dataset of the images (a name in the model's registry); a request's
            ``dataset`` parameter overrides it.
        device: where the networks run (``cpu``, ``cuda``).
    """

    def __init__(self, model_file: str, dataset: str | None = None, device: str = "cpu") -> None:
        super().__init__(
            type=InferType.OTHERS,
            labels=None,
            dimension=3,
            description="MedVAR zero-shot in-painting: re-draws the labelled region of the image; every voxel "
            "outside it keeps its value",
            config={"dataset": dataset or "", "edit_dataset": "", "outpaint": False, "seed": 0},
        )
        self.model_file, self.device = model_file, device

    def is_valid(self) -> bool:
        return os.path.isfile(self.model_file)

    def get_path(self, validate: bool = True) -> str | None:
        return self.model_file if not validate or self.is_valid() else None

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """``request``: ``image`` (a path), ``label`` (the drawn mask, a path on the image's grid) and
        optional parameters :data:`PARAMS`. Returns the in-painted NIfTI's path and ``inpaint.json``."""
        if not request.get("label"):
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, "MedVAR in-painting needs the label you drew")
        params = {**self.config(), **{k: request[k] for k in PARAMS if k in request}}
        dataset = params.pop("dataset")
        if not dataset:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, "no dataset: pass the image's dataset name")
        params = {k: v for k, v in params.items() if v != ""}
        # clients send a GPU's display name, or "cuda" on machines without one (batch infer's default)
        device = name_to_device(request.get("device") or self.device)
        # the server deletes the returned file once sent; the run's folder (PNG, JSON) goes at once
        with tempfile.TemporaryDirectory(prefix="medvar-inpaint-") as out:
            try:
                summary = inpaint(self.model_file, request["image"], request["label"], dataset, out,
                                  device=device, progress=False, **params)  # fmt: skip
            except ValueError as err:
                raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(err)) from None
            volume = open(summary["files"]["volume"], "rb")
            with volume, tempfile.NamedTemporaryFile(suffix="_inpainted.nii.gz", delete=False) as result:
                shutil.copyfileobj(volume, result)
        summary["files"] = {"volume": result.name}
        logger.info("MedVAR in-painting: %s", result.name)
        return result.name, summary

"""MONAI Label app serving MedVAR's zero-shot in-painting.

    monailabel start_server --app apps/medvar_label --studies IMAGES \
        --conf model models/medvar.pt --conf dataset head_ct

Conf keys: ``model`` (the model file; default ``models/medvar.pt`` of the bundle this app lives in),
``dataset`` (the images' dataset name in the model's registry), ``device`` (``cpu`` or ``cuda``).
See ``docs/monailabel.md``.
"""

from __future__ import annotations

import os

from lib.infers import MedVARInpaint
from monailabel.interfaces.app import MONAILabelApp

BUNDLE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class MedVARApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.model_file = conf.get("model") or os.path.join(BUNDLE, "models", "medvar.pt")
        self.dataset, self.device = conf.get("dataset"), conf.get("device", "cpu")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MedVAR",
            description="Zero-shot in-painting, out-painting and editing of CT/MR volumes with a next-scale model",
            version="1.0",
        )

    def init_infers(self) -> dict:
        return {"medvar_inpaint": MedVARInpaint(self.model_file, self.dataset, self.device)}

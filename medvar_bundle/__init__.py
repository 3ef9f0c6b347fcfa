"""MedVAR bundle: next-scale autoregressive generation of CT/MRI slices (MONAI bundle)."""

import logging
import warnings

__version__ = "0.8.9"

# MONAI announces at every DICOM read that the optional GPU decoder (nvImageCodec) is absent;
# pydicom's own decoders are used instead, which is what we want on CPU machines.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")

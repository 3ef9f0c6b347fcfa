from .inpaint import MedVARInpaint

__all__ = ["MedVARInpaint"]

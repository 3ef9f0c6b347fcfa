"""Data path: volumes → harmonised 256×256 uint8 axial slices → slice store."""

from .prepare import PrepareResult, prepare_store
from .sources import DatalistError, discover, load_datalist
from .store import SliceStore

__all__ = [
    "DatalistError",
    "PrepareResult",
    "SliceStore",
    "discover",
    "load_datalist",
    "prepare_store",
]

"""Open Inference Protocol (V2) tensor datatypes and their numpy equivalents: the one table."""

from __future__ import annotations

from typing import Final

import numpy as np

__all__ = [
    "BYTES",
    "DATATYPE_TO_NUMPY",
    "V2_DATATYPES",
    "datatype_of",
    "numpy_dtype",
]

BYTES: Final = "BYTES"

# Fixed-size datatypes, little-endian on the wire. BYTES has no fixed size: it maps to object
# arrays of ``bytes``.
DATATYPE_TO_NUMPY: Final[dict[str, np.dtype[np.generic]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    BYTES: np.dtype(object),
}

V2_DATATYPES: Final = frozenset(DATATYPE_TO_NUMPY)

_NUMPY_TO_DATATYPE: Final[dict[np.dtype[np.generic], str]] = {
    dtype.newbyteorder("="): name for name, dtype in DATATYPE_TO_NUMPY.items() if name != BYTES
}


def numpy_dtype(datatype: str) -> np.dtype[np.generic]:
    """The numpy dtype for a V2 datatype name; ``KeyError`` for an unknown name."""
    return DATATYPE_TO_NUMPY[datatype]


def datatype_of(dtype: np.dtype[np.generic]) -> str:
    """The V2 datatype name for a numpy dtype (strings and objects are BYTES)."""
    if dtype.kind in ("O", "U", "S"):
        return BYTES
    try:
        return _NUMPY_TO_DATATYPE[dtype.newbyteorder("=")]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None

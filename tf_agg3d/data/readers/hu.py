"""Scanner pixel values -> the int16 HU every reader returns."""

from __future__ import annotations

import numpy as np

from tf_agg3d.data.errors import DataError

_INT16_MIN, _INT16_MAX = np.iinfo(np.int16).min, np.iinfo(np.int16).max


def to_int16(path: str, array: np.ndarray) -> np.ndarray:
    """`array` as int16: floats rounded, values clipped to the int16 range.

    Raises:
      DataError: naming `path`, for complex values or NaN / infinite voxels.
    """
    if array.dtype == np.int16:
        return array
    if np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(path, "complex pixel type; expected real HU values")
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(array.size - np.count_nonzero(finite))
            raise DataError(path, f"{bad} of {array.size} voxels are NaN or infinite")
        array = np.rint(array)
    return np.clip(array, _INT16_MIN, _INT16_MAX).astype(np.int16)

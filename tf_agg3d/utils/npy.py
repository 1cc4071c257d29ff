"""`.npy` arrays at local paths and URLs: atomic saves, and loads checked against the header.

Arrays are never pickled, and a file whose data size disagrees with its header (truncated, or a
damaged header claiming 10^12 voxels) is refused before anything is allocated.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np

from tf_agg3d.utils.atomic_write import atomic_write_bytes
from tf_agg3d.utils.files import read_bytes
from tf_agg3d.utils.filesystems import is_url


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    """Saves an array in `.npy` format (never pickled) atomically."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of the `.npy` header at the start of `f`.

    Raises:
      ValueError: not a `.npy` header (bad magic, unparsable, pickled objects).
    """
    version = np.lib.format.read_magic(f)
    try:
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - numpy's header parser lets tokenizer errors out
        raise ValueError(f"cannot parse the .npy header ({type(err).__name__}: {err})") from None
    if dtype.hasobject:
        raise ValueError("a pickled object array")
    return shape, fortran, dtype, f.tell()


def _check_npy_size(shape, dtype, data_bytes: int) -> None:
    expected = math.prod(int(n) for n in shape) * dtype.itemsize
    if data_bytes != expected:
        raise ValueError(
            f"{data_bytes} data bytes, the header's shape {list(shape)} {dtype} needs "
            f"{expected} (truncated?)"
        )


def load_npy(path: str, mmap: bool = False) -> np.ndarray:
    """Loads a `.npy` written by :func:`atomic_save_npy`; `mmap` only for local files.

    The header is checked against the data before anything is allocated, so a truncated file
    or a damaged header (a shape of 10^12 voxels) is a ValueError, never a huge allocation.

    Raises:
      ValueError: not a `.npy` file, or its data size is not the one its header gives.
    """
    if mmap and not is_url(path):
        with open(path, "rb") as f:
            shape, fortran, dtype, offset = npy_header(f)
        _check_npy_size(shape, dtype, os.path.getsize(path) - offset)
        order = "F" if fortran else "C"
        return np.memmap(
            path, dtype=dtype, mode="r", shape=tuple(shape), order=order, offset=offset
        )
    data = read_bytes(path)
    buf = io.BytesIO(data)
    shape, _, dtype, offset = npy_header(buf)
    _check_npy_size(shape, dtype, len(data) - offset)
    buf.seek(0)
    return np.load(buf, allow_pickle=False)

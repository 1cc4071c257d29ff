"""DeepLesion PNG slices -> one HU volume per series folder, stacked by slice number.

Gap slices, the HU window and the checks against DL_info.csv: docs/deeplesion.md ("Volume").
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from tf_agg3d.data.deeplesion.dl_info import DLRow
from tf_agg3d.data.errors import DataError

IMAGES_DIR = "Images_png"
PNG_OFFSET = 32768
SLICE_RE = re.compile(r"^(\d+)\.png$")


def list_slices(folder: str) -> dict[int, str]:
    """Slice number -> path of the ``<NNN>.png`` files of a series folder (other names ignored).

    Raises:
      DataError: the folder does not exist or holds no slice PNG.
    """
    if not os.path.isdir(folder):
        raise DataError(folder, "series folder is missing")
    slices = {}
    for name in os.listdir(folder):
        match = SLICE_RE.match(name)
        if match:
            number = int(match.group(1))
            if number in slices:
                raise DataError(
                    os.path.join(folder, name),
                    f"slice {number} also stored as {os.path.basename(slices[number])}",
                )
            slices[number] = os.path.join(folder, name)
    if not slices:
        raise DataError(folder, "series folder holds no <NNN>.png slice")
    return slices


def read_slice(path: str) -> np.ndarray:
    """One DeepLesion slice as int32 HU [H, W] (rows, columns).

    Raises:
      DataError: unreadable, or not a single-channel 16-bit PNG (8-bit, RGB, ... cannot hold
        DeepLesion's HU + 32768).
    """
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown error"
        raise DataError(path, f"cannot read PNG ({first})") from None
    channels = image.GetNumberOfComponentsPerPixel()
    if channels != 1 or image.GetPixelID() != sitk.sitkUInt16 or image.GetDimension() != 2:
        raise DataError(
            path,
            f"expected a single-channel 16-bit PNG (HU + {PNG_OFFSET}), got "
            f"{image.GetPixelIDTypeAsString()} with {channels} channel(s)",
        )
    return sitk.GetArrayFromImage(image).astype(np.int32) - PNG_OFFSET


@dataclasses.dataclass(frozen=True)
class SeriesVolume:
    """A series stacked by slice number.

    Attributes:
      hu: float32 [D, H, W] HU clipped to the window, slice ``first + k`` at index k.
      first_slice, last_slice: lowest and highest slice numbers present.
      filled_slices: numbers in [first, last] absent from the folder and from every row's
        range, filled with ``fill_hu``.
    """

    hu: np.ndarray
    first_slice: int
    last_slice: int
    filled_slices: tuple[int, ...]


def _ranges_text(numbers: Sequence[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9' (short messages for long lists of missing slices)."""
    parts, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ", ".join(parts)


def read_series_volume(
    folder: str,
    rows: Sequence[DLRow],
    hu_window: tuple[float, float],
    fill_hu: float,
    slices: dict[int, str] | None = None,
) -> SeriesVolume:
    """Reads and stacks a series folder.

    Args:
      folder: ``Images_png/<series>``.
      rows: its DL_info.csv rows (their Slice_range and Image_size are checked).
      hu_window: (low, high) HU the values are clipped to.
      fill_hu: value of gap slices.
      slices: :func:`list_slices` of the folder when already known.

    Raises:
      DataError: a slice a row's Slice_range needs is missing, a PNG is not 16-bit
        single-channel, slices differ in size or disagree with Image_size.
    """
    slices = slices if slices is not None else list_slices(folder)
    for row in rows:
        first, last = row.slice_range
        missing = [n for n in range(first, last + 1) if n not in slices]
        if missing:
            names = _ranges_text(missing)
            raise DataError(
                folder,
                f"missing slice PNG(s) {names} (<NNN>.png) needed by Slice_range {first}, {last} "
                f"of {row.path} line {row.line}",
            )
    first, last = min(slices), max(slices)
    lo, hi = (float(v) for v in hu_window)
    planes: list[np.ndarray | None] = []
    shape = None
    filled = []
    for number in range(first, last + 1):
        path = slices.get(number)
        if path is None:
            planes.append(None)
            filled.append(number)
            continue
        plane = read_slice(path)
        if shape is None:
            shape = plane.shape
            for row in rows:
                if tuple(row.image_size) not in (shape, shape[::-1]):
                    raise DataError(
                        path,
                        f"slice is {shape[1]} x {shape[0]} pixels but Image_size on {row.path} "
                        f"line {row.line} says {row.image_size[0]}, {row.image_size[1]}",
                    )
        elif plane.shape != shape:
            raise DataError(path, f"slice is {plane.shape}, the series' first slice {shape}")
        planes.append(np.clip(plane, lo, hi).astype(np.float32))
    hu = np.empty((len(planes), *shape), np.float32)
    for k, plane in enumerate(planes):
        hu[k] = fill_hu if plane is None else plane
    return SeriesVolume(hu, first, last, tuple(filled))

"""One DeepLesion series -> one cache entry: resampling, black-border clipping, the sidecar.

The frame, the border rule and the sidecar keys are in docs/deeplesion.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from tf_agg3d.config import PreprocessConfig
from tf_agg3d.data.deeplesion.dl_info import DLRow
from tf_agg3d.data.deeplesion.lesions import (
    DeepLesionOptions,
    series_lesions,
    series_spacing,
    series_split,
)
from tf_agg3d.data.deeplesion.slices import list_slices, read_series_volume
from tf_agg3d.data.errors import DataError
from tf_agg3d.data.preprocessing.grid import isotropic_grid, resample
from tf_agg3d.data.scan import Geometry


def border_box(
    volume: np.ndarray,
    spheres: Sequence[tuple[np.ndarray, float]],
    body_hu: float,
    min_voxels: int,
    margin_vox: int,
) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) (z, y, x) that clips the black in-plane borders of a [D, H, W] volume.

    Args:
      volume: HU on the isotropic grid.
      spheres: (centre (z, y, x) voxels, diameter voxels) that must stay inside.
      body_hu: voxels above this are not black.
      min_voxels: a row / column needs this many such voxels to count.
      margin_vox: margin added around the non-black box.

    Returns:
      (start, stop) int arrays; z is never clipped; the whole plane when nothing is above
      `body_hu`.
    """
    shape = np.asarray(volume.shape)
    body = volume > body_hu
    start, stop = np.zeros(3, int), shape.copy()
    for axis in (1, 2):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(body.sum(axis=other) >= min_voxels)
        if idx.size:
            start[axis] = max(idx[0] - margin_vox, 0)
            stop[axis] = min(idx[-1] + 1 + margin_vox, shape[axis])
    for centre, diameter in spheres:
        r = 0.5 * diameter
        start = np.minimum(start, np.floor(np.asarray(centre) - r).astype(int))
        stop = np.maximum(stop, np.ceil(np.asarray(centre) + r).astype(int) + 1)
    start[0], stop[0] = 0, shape[0]
    return np.maximum(start, 0), np.minimum(stop, shape)


def _r4(v: float) -> float:
    return float(round(float(v), 4))


def preprocess_series(
    folder: str,
    rows: Sequence[DLRow],
    config: PreprocessConfig,
    options: DeepLesionOptions,
    seriesuid: str | None = None,
) -> tuple[np.ndarray, dict]:
    """Turns one DeepLesion series folder and its rows into a cache volume and sidecar.

    Args:
      folder: ``Images_png/<series>``.
      rows: all DL_info.csv rows of the series (noisy ones included: their slice ranges are
        part of the data; `options.keep_noisy` decides whether they become lesions).
      config: spacing_mm, hu_window, fill_hu, crop_margin_mm (the border margin).
      options: lesion conversion and border clipping settings.
      seriesuid: default: the folder name.

    Returns:
      (volume int16 [D, H, W], sidecar dict of README "Conventions" + the DeepLesion keys of
      docs/deeplesion.md).

    Raises:
      DataError: any problem with the rows or the slices.
    """
    uid = seriesuid or os.path.basename(os.path.normpath(folder))
    if not rows:
        raise DataError(folder, f"series {uid} has no DL_info.csv row")
    spacing_xyz = series_spacing(rows)
    split = series_split(rows)
    slices = list_slices(folder)
    first = min(slices)
    lesions = series_lesions(rows, first, options)
    lo_hu, hi_hu = (float(v) for v in config.hu_window)
    stack = read_series_volume(folder, rows, (lo_hu, hi_hu), float(config.fill_hu), slices)
    height, width = stack.hu.shape[1:]
    for row in rows:
        x1, y1, x2, y2 = row.bbox
        cx, cy = 0.5 * (x1 + x2), 0.5 * (y1 + y2)
        if not (-0.5 <= cx <= width - 0.5 and -0.5 <= cy <= height - 0.5):
            raise DataError(
                row.path,
                f"box centre (x {cx:g}, y {cy:g}) lies outside the {width} x {height} slices",
                line=row.line,
                field="Bounding_boxes",
            )
    geometry = Geometry(np.zeros(3), np.asarray(spacing_xyz, np.float64), np.eye(3))
    image = sitk.GetImageFromArray(stack.hu)
    image.SetSpacing(tuple(float(v) for v in spacing_xyz))
    spacing = float(config.spacing_mm)
    grid = isotropic_grid(geometry, stack.hu.shape, spacing)
    full = resample(image, grid, sitk.sitkLinear, sitk.sitkFloat32)
    del image, stack
    centres = [grid.world_to_voxel(np.asarray(les.xyz)[None])[0] for les in lesions]
    spheres = [(c, les.diameter_mm / spacing) for c, les in zip(centres, lesions, strict=True)]
    margin = int(math.ceil(config.crop_margin_mm / spacing))
    start, stop = border_box(full, spheres, options.body_hu, options.border_min_voxels, margin)
    crop = full[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
    volume = np.rint(np.clip(crop, lo_hu, hi_hu)).astype(np.int16)
    sub = grid.sub(start, stop)
    nodules = []
    for centre, les in zip(centres, lesions, strict=True):
        z, y, x = (_r4(v) for v in centre - start)
        nodules.append(
            {
                "z": z,
                "y": y,
                "x": x,
                "d": _r4(les.diameter_mm),
                "large": bool(les.large),
                "lesion_type": int(les.lesion_type),
                "xyz_mm": [_r4(v) for v in les.xyz],
                "long_diameter_mm": _r4(les.long_diameter_mm),
                "rows": list(les.lines),
            }
        )
    meta = {
        "affine": sub.affine().tolist(),
        "shape": [int(n) for n in volume.shape],
        "nodules": nodules,
        "excluded": [],
        "origin": [0.0, 0.0, 0.0],
        "spacing": [float(v) for v in spacing_xyz],
        "direction": [float(v) for v in np.eye(3).ravel()],
        "seriesuid": uid,
        "subset": None,
        "lung_mask": "none",
        "hu_window": [lo_hu, hi_hu],
        "fill_hu": int(config.fill_hu),
        "source": str(folder),
        "dataset": "deeplesion",
        "split": int(split),
        "first_slice": int(first),
        "last_slice": int(max(slices)),
        "filled_slices": [int(n) for n in range(first, max(slices) + 1) if n not in slices],
        "pixel_spacing_mm": [float(spacing_xyz[0]), float(spacing_xyz[1])],
        "slice_interval_mm": float(spacing_xyz[2]),
        "border_clip": {
            "start_zyx": [int(v) for v in start],
            "stop_zyx": [int(v) for v in stop],
            "grid_shape_zyx": [int(v) for v in grid.size_zyx],
        },
        "lesion_options": dataclasses.asdict(options),
    }
    return volume, meta

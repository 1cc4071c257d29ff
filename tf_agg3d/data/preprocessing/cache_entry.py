"""One CT scan -> one cache entry: resample to 1 mm, keep the dilated lungs, crop, window HU.

The steps follow the paper (and DeepLung before it):

1. Resample to ``config.spacing_mm`` isotropic with SimpleITK (linear for the image, nearest
   neighbour for the mask) on a grid that keeps the scan's origin and direction, so the cache
   affine is ``origin + direction @ diag(spacing_mm)`` with the (z, y, x) -> (x, y, z) swap
   (:mod:`~tf_agg3d.data.preprocessing.grid`).
2. Lung mask: the LUNA16 `seg-lungs-LUNA16` mask when given, else a threshold segmentation
   (:func:`~tf_agg3d.data.preprocessing.lungs.threshold_lung_mask`; the sidecar then says
   ``lung_mask = "threshold"``).
3. Crop to the mask's bounding box plus ``crop_margin_mm`` (grown to contain every annotated
   sphere), and set every voxel farther than ``lung_dilation_mm`` from the lungs to ``fill_hu``.
4. Clip HU to ``hu_window`` (DeepLung's [-1200, 600]); store int16 HU. The model windows and
   normalises itself, so the cache keeps HU rather than [0, 1] values.

Annotations are converted from world mm to cache voxels through the same affine.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import SimpleITK as sitk

from tf_agg3d.config import PreprocessConfig
from tf_agg3d.data.errors import DataError
from tf_agg3d.data.luna16.csv_io import excluded_diameter
from tf_agg3d.data.preprocessing.grid import Grid, isotropic_grid, resample
from tf_agg3d.data.preprocessing.lungs import dilate, mask_bbox, threshold_lung_mask
from tf_agg3d.data.scan import Scan, world_to_voxel

log = logging.getLogger(__name__)


def _annotation_xyzd(item) -> tuple[np.ndarray, float, str]:
    """(xyz [3], diameter, description) from an Annotation-like object or a 4-sequence."""
    if hasattr(item, "diameter_mm"):
        where = f" ({item.path} line {item.line})" if getattr(item, "line", 0) else ""
        xyz = np.array([item.x, item.y, item.z], dtype=np.float64)
        return xyz, float(item.diameter_mm), where
    x, y, z, d = (float(v) for v in item)
    return np.array([x, y, z]), d, ""


def _annotations_to_grid(
    scan: Scan, grid: Grid, items, uid: str, what: str, excluded: bool
) -> list[tuple[np.ndarray, float]]:
    """[(grid voxel (z, y, x), diameter mm)]; a centre outside the scan is a DataError."""
    out = []
    shape = np.asarray(scan.array.shape, dtype=np.float64)
    for i, item in enumerate(items):
        xyz, d, where = _annotation_xyzd(item)
        if excluded:
            d = excluded_diameter(d)
        if not (np.all(np.isfinite(xyz)) and math.isfinite(d) and d > 0):
            raise DataError(
                scan.path, f"seriesuid {uid}: {what} #{i}{where} is invalid ({xyz}, d={d})"
            )
        zyx = world_to_voxel(scan, xyz)
        if np.any(zyx < -0.5) or np.any(zyx > shape - 0.5):
            raise DataError(
                scan.path,
                f"seriesuid {uid}: {what} #{i}{where} centre (x, y, z) = "
                f"({xyz[0]:.2f}, {xyz[1]:.2f}, {xyz[2]:.2f}) mm lies outside the scan "
                f"(voxel z, y, x = {np.round(zyx, 1).tolist()}, shape {list(scan.array.shape)})",
            )
        out.append((grid.world_to_voxel(xyz[None])[0], d))
    return out


def _crop_box(
    mask: np.ndarray, boxes: list[tuple[np.ndarray, float]], margin_mm: float, spacing_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) (z, y, x) on the grid: mask bbox + margin, grown to hold every sphere."""
    lo, hi = mask_bbox(mask)
    margin = int(math.ceil(margin_mm / spacing_mm))
    lo, hi = lo - margin, hi + margin
    for zyx, d in boxes:
        r = 0.5 * d / spacing_mm
        lo = np.minimum(lo, np.floor(zyx - r).astype(int))
        hi = np.maximum(hi, np.ceil(zyx + r).astype(int) + 1)
    return np.maximum(lo, 0), np.minimum(hi, mask.shape)


def _boxes_json(boxes: list[tuple[np.ndarray, float]], start: np.ndarray) -> list[dict]:
    out = []
    for zyx, d in boxes:
        z, y, x = (float(round(v, 4)) for v in zyx - start)
        out.append({"z": z, "y": y, "x": x, "d": float(round(d, 4))})
    return out


def preprocess_scan(
    scan: Scan,
    lung_mask: Scan | None,
    config: PreprocessConfig,
    nodules_xyzd=(),
    excluded_xyzd=(),
    *,
    seriesuid: str | None = None,
    subset: int | None = None,
) -> tuple[np.ndarray, dict]:
    """Turns a scan into a cache volume and its sidecar.

    Args:
      scan: int16 HU scan (any spacing and direction).
      lung_mask: its lung mask (uint8 0/1, own geometry; resampled by nearest neighbour), or
        None to segment by threshold
        (:func:`~tf_agg3d.data.preprocessing.lungs.threshold_lung_mask`).
      config: spacing, HU window, fill value, dilation and margin.
      nodules_xyzd: annotations.csv findings: Annotation objects or (x, y, z, d) world mm.
      excluded_xyzd: annotations_excluded.csv findings, likewise; d = -1 becomes 10 mm.
      seriesuid: for the sidecar and messages; default the scan file's stem.
      subset: LUNA16 subset for the sidecar (None outside LUNA16).

    Returns:
      (volume, meta): int16 [D, H, W] (z, y, x) HU in ``hu_window`` (``fill_hu`` outside the
      dilated lungs), and the sidecar dict of README "Conventions".

    Raises:
      DataError: an annotation centre outside the scan (naming the uid and the annotation), or
        no lungs found.
    """
    uid = seriesuid or _stem(scan.path)
    spacing = float(config.spacing_mm)
    lo_hu, hi_hu = (float(v) for v in config.hu_window)
    grid = isotropic_grid(scan.geometry, scan.array.shape, spacing)
    nodules = _annotations_to_grid(scan, grid, nodules_xyzd, uid, "nodule", excluded=False)
    excluded = _annotations_to_grid(
        scan, grid, excluded_xyzd, uid, "excluded finding", excluded=True
    )
    image = scan.to_sitk()

    if lung_mask is not None:
        kind = "luna16"
        mask = resample(lung_mask.to_sitk(), grid, sitk.sitkNearestNeighbor, sitk.sitkUInt8)
        if not mask.any():
            raise DataError(lung_mask.path, f"seriesuid {uid}: lung mask does not overlap the scan")
        start, stop = _crop_box(mask, nodules + excluded, config.crop_margin_mm, spacing)
        # Only the crop is resampled: the lungs' box is a fraction of the field of view.
        crop = resample(image, grid.sub(start, stop), sitk.sitkLinear, sitk.sitkFloat32)
    else:
        kind = "threshold"
        log.warning("%s: no lung mask file; using the threshold lung segmentation", uid)
        full = resample(image, grid, sitk.sitkLinear, sitk.sitkFloat32)
        mask = threshold_lung_mask(full, spacing)
        if not mask.any():
            raise DataError(scan.path, f"seriesuid {uid}: threshold segmentation found no lungs")
        start, stop = _crop_box(mask, nodules + excluded, config.crop_margin_mm, spacing)
        crop = full[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
    del image

    # Dilating within the crop is exact: the crop holds the whole mask (its bbox + margin).
    region = mask[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
    keep = dilate(region, config.lung_dilation_mm, spacing)
    np.clip(crop, lo_hu, hi_hu, out=crop)
    crop[~keep] = config.fill_hu
    volume = np.rint(crop).astype(np.int16)

    sub = grid.sub(start, stop)
    meta = {
        "affine": sub.affine().tolist(),
        "shape": [int(n) for n in volume.shape],
        "nodules": _boxes_json(nodules, start),
        "excluded": _boxes_json(excluded, start),
        "origin": [float(v) for v in scan.origin],
        "spacing": [float(v) for v in scan.spacing],
        "direction": [float(v) for v in np.asarray(scan.direction).ravel()],
        "seriesuid": uid,
        "subset": subset,
        "lung_mask": kind,
        "hu_window": [lo_hu, hi_hu],
        "fill_hu": int(config.fill_hu),
        "source": str(scan.path),
    }
    return volume, meta


def _stem(path: str) -> str:
    name = os.path.basename(str(path).rstrip("/"))
    for suffix in (".nii.gz", ".mhd", ".mha", ".nii", ".nrrd", ".nhdr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name

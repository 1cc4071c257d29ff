"""Lung masks on the cache grid: threshold segmentation, hole filling, dilation.

Used by :func:`tf_agg3d.data.preprocessing.cache_entry.preprocess_scan` when a scan has no
LUNA16 `seg-lungs-LUNA16` mask, and to keep the dilated lungs of every scan.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

# Threshold segmentation: air-like voxels (lungs, outside air, gas) are below this HU.
AIR_THRESHOLD_HU = -320.0
# A second air component counts as the other lung only if at least this share of the largest.
SECOND_LUNG_MIN_RATIO = 0.1
# Closing radius (mm) that bridges vessels and the lung wall in the threshold mask.
THRESHOLD_CLOSING_MM = 2.0


def _image(array: np.ndarray, spacing: float = 1.0) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((float(spacing),) * 3)
    return img


def mask_bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) (z, y, x) of the non-zero voxels of a non-empty [D, H, W] mask."""
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        lo.append(idx[0])
        hi.append(idx[-1] + 1)
    return np.asarray(lo), np.asarray(hi)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fills enclosed cavities (nodules, vessels inside the lung) of a uint8 [D, H, W] mask."""
    if not mask.any():
        return mask
    lo, hi = mask_bbox(mask)
    # Pad by one so a cavity touching the bbox face is still seen as enclosed only if it is.
    region = np.pad(mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], 1)
    filled = sitk.GetArrayFromImage(sitk.BinaryFillhole(_image(region), fullyConnected=False))
    out = mask.copy()
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] |= filled[1:-1, 1:-1, 1:-1]
    return out


def threshold_lung_mask(volume_hu: np.ndarray, spacing_mm: float = 1.0) -> np.ndarray:
    """A simple lung segmentation for scans without a LUNA16 mask.

    Air-like voxels (HU < -320) form connected components; those touching the in-plane border
    are outside air (the z faces are allowed: scans often start or end inside the lungs). The
    largest remaining component is a lung, the second largest too when it is at least a tenth
    of the first. A closing and a hole filling then take in vessels and enclosed nodules.

    Args:
      volume_hu: [D, H, W] (z, y, x) HU on an isotropic grid.
      spacing_mm: its voxel size (sets the closing radius).

    Returns:
      uint8 [D, H, W] 0/1 mask; all zero when no component qualifies.
    """
    air = (volume_hu < AIR_THRESHOLD_HU).astype(np.uint8)
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(_image(air)))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    border = np.concatenate(
        [
            labels[:, 0, :].ravel(),
            labels[:, -1, :].ravel(),
            labels[:, :, 0].ravel(),
            labels[:, :, -1].ravel(),
        ]
    )
    sizes[np.unique(border)] = 0
    order = np.argsort(sizes)[::-1][:2]
    keep = [
        c for c in order if sizes[c] > 0 and sizes[c] >= SECOND_LUNG_MIN_RATIO * sizes[order[0]]
    ]
    mask = np.isin(labels, keep).astype(np.uint8)
    if not keep:
        return mask
    radius = max(1, int(round(THRESHOLD_CLOSING_MM / spacing_mm)))
    lo, hi = mask_bbox(mask)
    lo = np.maximum(lo - radius, 0)
    hi = np.minimum(hi + radius, mask.shape)
    # Pad so the closing's dilation is not clipped at the volume edge.
    region = np.pad(mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], radius)
    closed = sitk.BinaryMorphologicalClosing(_image(region), [radius] * 3, sitk.sitkBall)
    closed_arr = sitk.GetArrayFromImage(closed)[radius:-radius, radius:-radius, radius:-radius]
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] |= closed_arr
    return fill_holes(mask)


def dilate(mask: np.ndarray, radius_mm: float, spacing_mm: float = 1.0) -> np.ndarray:
    """Voxels within `radius_mm` (Euclidean) of a uint8 [D, H, W] mask, as bool [D, H, W]."""
    if radius_mm <= 0:
        return mask.astype(bool)
    # A distance map costs the same for any radius, unlike a ball-shaped structuring element.
    dist2 = sitk.SignedMaurerDistanceMap(
        _image(mask, spacing_mm), insideIsPositive=False, squaredDistance=True, useImageSpacing=True
    )
    return sitk.GetArrayViewFromImage(dist2) <= radius_mm * radius_mm

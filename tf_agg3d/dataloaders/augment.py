"""Training-crop geometry in NumPy: cut, scale, flip and rotate a crop and its boxes together.

A crop is defined by a source origin ``o`` (continuous cache voxels, z, y, x) and a scale ``s``:
crop voxel ``j`` samples the cache at ``o + j / s`` (trilinear, separable along the three
axes), so a box centre ``c`` lands at ``(c - o) * s`` and its diameter becomes ``d * s``.
Voxels outside the cache volume read the padding value (the cache's ``fill_hu``, soft tissue,
the same value the preprocessing wrote outside the lungs). At ``s == 1`` and an integer
origin the crop is a plain slice, with no interpolation.

Flips and 90-degree rotations in the axial (y, x) plane follow on the cut crop; every transform
maps boxes with the README's continuous-index convention (voxel ``i`` centred at ``i``), so
a flipped coordinate is ``n - 1 - c``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
    """One crop's augmentation.

    Attributes:
      scale: zoom factor s (> 1 magnifies); box diameters are multiplied by it.
      flips: (flip z, flip y, flip x), applied after the scaled cut.
      rot90: number k of 90-degree rotations in the (y, x) plane, applied after the flips, the
        same direction as ``np.rot90(crop, k, axes=(1, 2))``.
    """

    scale: float = 1.0
    flips: tuple[bool, bool, bool] = (False, False, False)
    rot90: int = 0


IDENTITY = Transform()


def sample_transform(
    rng: np.random.Generator,
    flip: bool,
    rotate90: bool,
    scale_range: Sequence[float],
) -> Transform:
    """Draws one augmentation.

    Args:
      rng: the element's generator (determinism comes from its seed).
      flip: allow a random flip per axis.
      rotate90: allow a random number of quarter turns in the axial plane.
      scale_range: (low, high) of a log-uniform zoom; (1, 1) disables scaling.

    Returns:
      A :class:`Transform`.
    """
    lo, hi = float(scale_range[0]), float(scale_range[1])
    # Always draw every variable so the stream of random numbers does not depend on switches.
    log_scale = rng.uniform(np.log(lo), np.log(hi)) if hi > lo else np.log(lo)
    flips = rng.random(3) < 0.5
    k = int(rng.integers(0, 4))
    return Transform(
        scale=float(np.exp(log_scale)),
        flips=tuple(bool(f and flip) for f in flips),
        rot90=k if rotate90 else 0,
    )


def _axis_interp(positions: np.ndarray, lo: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (relative to `lo`) and weights of linear interpolation at `positions`."""
    base = np.floor(positions)
    w = (positions - base).astype(np.float32)
    i0 = base.astype(np.int64) - lo
    return i0, i0 + 1, w


def _padded_region(
    volume: np.ndarray, lo: Sequence[int], hi: Sequence[int], fill: float
) -> np.ndarray:
    """``volume[lo:hi]`` (per axis, end exclusive) as float32, out-of-volume voxels = `fill`."""
    out = np.full([end - start for start, end in zip(lo, hi, strict=True)], fill, np.float32)
    src, dst = [], []
    for axis, (start, end) in enumerate(zip(lo, hi, strict=True)):
        a, b = max(start, 0), min(end, volume.shape[axis])
        if a >= b:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - start, b - start))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def cut_crop(
    volume: np.ndarray,
    origin: Sequence[float],
    crop_size: Sequence[int],
    scale: float,
    fill: float,
) -> np.ndarray:
    """Samples a crop of `crop_size` voxels at ``origin + j / scale``.

    Args:
      volume: [D, H, W] cache volume (any numeric dtype; a memory map is read only where
        needed).
      origin: (z, y, x) source position of crop voxel (0, 0, 0), continuous cache voxels.
      crop_size: (d, h, w) of the crop.
      scale: zoom factor s.
      fill: value of voxels outside the volume.

    Returns:
      float32 [d, h, w].
    """
    origin = np.asarray(origin, np.float64)
    size = [int(n) for n in crop_size]
    if scale == 1.0 and np.all(origin == np.round(origin)):
        lo = origin.astype(np.int64)
        return _padded_region(volume, lo, lo + size, fill)
    positions = [origin[a] + np.arange(size[a]) / scale for a in range(3)]
    lo = [int(np.floor(p.min())) for p in positions]
    hi = [int(np.floor(p.max())) + 2 for p in positions]
    region = _padded_region(volume, lo, hi, fill)
    # Separable trilinear interpolation: one axis at a time keeps the work ~ crop voxels.
    for axis in range(3):
        i0, i1, w = _axis_interp(positions[axis], lo[axis])
        shape = [1, 1, 1]
        shape[axis] = -1
        w = w.reshape(shape)
        region = np.take(region, i0, axis=axis) * (1.0 - w) + np.take(region, i1, axis=axis) * w
    return region.astype(np.float32, copy=False)


def transform_boxes(
    boxes: np.ndarray,
    origin: Sequence[float],
    crop_size: Sequence[int],
    transform: Transform,
) -> np.ndarray:
    """Maps cache-voxel boxes into the augmented crop.

    Args:
      boxes: float [N, 4] (z, y, x, d) in cache voxels / mm.
      origin: the crop's source origin (as in :func:`cut_crop`).
      crop_size: (d, h, w) of the crop.
      transform: the crop's :class:`Transform`.

    Returns:
      float32 [N, 4] (z, y, x, d) in crop voxels.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    centre = (boxes[:, :3] - np.asarray(origin, np.float64)) * transform.scale
    diameter = boxes[:, 3:4] * transform.scale
    size = np.asarray(crop_size, np.float64)
    for axis in range(3):
        if transform.flips[axis]:
            centre[:, axis] = size[axis] - 1 - centre[:, axis]
    for _ in range(transform.rot90 % 4):
        # np.rot90(axes=(1, 2)): out[:, i, j] = in[:, j, W - 1 - i], i.e. y' = W - 1 - x, x' = y.
        y, x = centre[:, 1].copy(), centre[:, 2].copy()
        centre[:, 1] = size[2] - 1 - x
        centre[:, 2] = y
        size[1], size[2] = size[2], size[1]
    return np.concatenate([centre, diameter], axis=1).astype(np.float32)


def apply_to_crop(crop: np.ndarray, transform: Transform) -> np.ndarray:
    """Flips then rotates a cut crop (the scale is applied by :func:`cut_crop`)."""
    axes = tuple(a for a in range(3) if transform.flips[a])
    if axes:
        crop = np.flip(crop, axis=axes)
    if transform.rot90 % 4:
        crop = np.rot90(crop, transform.rot90 % 4, axes=(1, 2))
    return np.ascontiguousarray(crop)


def augmented_crop(
    volume: np.ndarray,
    boxes: np.ndarray,
    centre: Sequence[float],
    crop_size: Sequence[int],
    transform: Transform,
    fill: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Cuts a crop centred at `centre`, augments it, and maps `boxes` with it.

    At scale 1 the origin is rounded to whole voxels, so the crop is a plain slice.

    Args:
      volume: [D, H, W] cache volume.
      boxes: [N, 4] (z, y, x, d) cache-voxel boxes.
      centre: (z, y, x) cache position that becomes the crop centre (before flips/rotation,
        which keep the centre fixed).
      crop_size: (d, h, w); h == w when `transform.rot90` is odd.
      transform: the augmentation.
      fill: padding value outside the volume.

    Returns:
      (float32 [d, h, w] crop, float32 [N, 4] boxes in crop voxels).
    """
    size = np.asarray(crop_size, np.float64)
    origin = np.asarray(centre, np.float64) - (size - 1) / (2.0 * transform.scale)
    if transform.scale == 1.0:
        origin = np.round(origin)
    crop = cut_crop(volume, origin, crop_size, transform.scale, fill)
    crop = apply_to_crop(crop, transform)
    return crop, transform_boxes(boxes, origin, crop_size, transform)

"""The isotropic resampling grid of the cache and SimpleITK resampling onto it.

A :class:`Grid` keeps the scan's origin and direction, so the cache affine is
``origin + direction @ diag(spacing_mm)`` with the (z, y, x) -> (x, y, z) swap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from tf_agg3d.data.scan import Geometry, world_to_voxel

# HU used where the resampler would have to extrapolate (never for in-scan output voxels).
_OUTSIDE_HU = -1024.0


@dataclasses.dataclass(frozen=True)
class Grid:
    """An isotropic voxel grid in the scan's orientation.

    Attributes:
      origin: [3] world (x, y, z) mm of voxel (0, 0, 0).
      size_zyx: voxels per axis (z, y, x).
      spacing: mm per voxel, all axes.
      direction: [3, 3] row-major, the scan's.
    """

    origin: np.ndarray
    size_zyx: tuple[int, int, int]
    spacing: float
    direction: np.ndarray

    def sub(self, start_zyx: Sequence[int], stop_zyx: Sequence[int]) -> Grid:
        """The grid of voxels [start, stop) of this one (same voxel centres)."""
        start = np.asarray(start_zyx, dtype=np.float64)
        origin = self.origin + self.direction @ (self.spacing * start[::-1])
        size = tuple(int(b - a) for a, b in zip(start_zyx, stop_zyx, strict=True))
        return Grid(origin, size, self.spacing, self.direction)

    def affine(self) -> np.ndarray:
        """[4, 4] map from grid voxel (z, y, x, 1) to world (x, y, z, 1) mm."""
        a = np.eye(4)
        # Column k of direction*spacing is index axis k in (x, y, z) order; reverse for (z, y, x).
        a[:3, :3] = (self.direction * self.spacing)[:, ::-1]
        a[:3, 3] = self.origin
        return a

    def world_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """[N, 3] world (x, y, z) -> [N, 3] continuous grid voxel (z, y, x)."""
        return world_to_voxel(Geometry(self.origin, np.full(3, self.spacing), self.direction), xyz)


def isotropic_grid(geometry: Geometry, shape_zyx: Sequence[int], spacing_mm: float) -> Grid:
    """The `spacing_mm` grid over a scan: same origin and direction, voxel centres inside it.

    Every output centre lies within the span of the input voxel centres, so linear
    interpolation never extrapolates.
    """
    extent_xyz = (np.asarray(shape_zyx[::-1], dtype=np.float64) - 1.0) * geometry.spacing
    size_xyz = np.floor(extent_xyz / spacing_mm + 1e-6).astype(int) + 1
    return Grid(
        geometry.origin, tuple(int(n) for n in size_xyz[::-1]), spacing_mm, geometry.direction
    )


def resample(image: sitk.Image, grid: Grid, interpolator: int, pixel_type: int) -> np.ndarray:
    """Resamples a SimpleITK image onto `grid`; returns its [D, H, W] (z, y, x) array."""
    f = sitk.ResampleImageFilter()
    f.SetOutputOrigin(tuple(float(v) for v in grid.origin))
    f.SetOutputSpacing((float(grid.spacing),) * 3)
    f.SetOutputDirection(tuple(float(v) for v in grid.direction.ravel()))
    f.SetSize([int(n) for n in grid.size_zyx[::-1]])
    f.SetInterpolator(interpolator)
    f.SetOutputPixelType(pixel_type)
    f.SetDefaultPixelValue(_OUTSIDE_HU if pixel_type == sitk.sitkFloat32 else 0)
    return sitk.GetArrayFromImage(f.Execute(image))

"""A CT volume with its geometry, and the map between world points and voxel indices.

Conventions (README "Conventions"): arrays are (z, y, x); world points are (x, y, z) in mm;
voxel coordinates are continuous indices (voxel ``i`` is centred on ``i``). The map between them
is SimpleITK's, direction included::

    xyz = origin + direction @ (spacing * (ix, iy, iz))

Scans are read by :mod:`tf_agg3d.data.readers.sitk` (any SimpleITK format, DICOM folders) and
:mod:`tf_agg3d.data.readers.dicom_tfio` (DICOM through tensorflow-io).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import SimpleITK as sitk


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where a voxel grid lies in the world.

    Attributes:
      origin: [3] float64, world position (x, y, z) mm of the centre of voxel (0, 0, 0).
      spacing: [3] float64, voxel size (x, y, z) mm, all > 0.
      direction: [3, 3] float64, row-major as SimpleITK's GetDirection; column k is the world
        direction of index axis k (x, y, z).
    """

    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray

    @classmethod
    def of(cls, obj: Any) -> Geometry:
        """The geometry of a Scan, Geometry, SimpleITK image or mapping.

        A mapping needs keys ``origin``, ``spacing``, ``direction`` (flat 9 or 3x3), as in the
        cache sidecar, whose geometry is the *source scan's*.
        """
        if isinstance(obj, Geometry):
            return obj
        if isinstance(obj, Scan):
            return obj.geometry
        if isinstance(obj, sitk.Image):
            return cls._make(obj.GetOrigin(), obj.GetSpacing(), obj.GetDirection())
        if isinstance(obj, Mapping):
            return cls._make(obj["origin"], obj["spacing"], obj["direction"])
        return cls._make(obj.origin, obj.spacing, obj.direction)

    @classmethod
    def _make(cls, origin, spacing, direction) -> Geometry:
        return cls(
            origin=np.asarray(origin, dtype=np.float64).reshape(3),
            spacing=np.asarray(spacing, dtype=np.float64).reshape(3),
            direction=np.asarray(direction, dtype=np.float64).reshape(3, 3),
        )


@dataclasses.dataclass
class Scan:
    """A CT volume with its geometry.

    Attributes:
      array: [D, H, W] (z, y, x); int16 HU for images, uint8 0/1 for lung masks.
      origin: [3] float64 (x, y, z) mm, centre of voxel (0, 0, 0).
      spacing: [3] float64 (x, y, z) mm.
      direction: [3, 3] float64 row-major, as SimpleITK's GetDirection.
      path: the file or DICOM folder it was read from ("" when built in memory).
    """

    array: np.ndarray
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    path: str = ""

    @property
    def geometry(self) -> Geometry:
        return Geometry._make(self.origin, self.spacing, self.direction)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with this array and geometry (the array is copied)."""
        image = sitk.GetImageFromArray(self.array)
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetSpacing(tuple(float(v) for v in self.spacing))
        image.SetDirection(tuple(float(v) for v in np.asarray(self.direction).ravel()))
        return image


def _points(values, what: str) -> tuple[np.ndarray, bool]:
    """[3] or [N, 3] -> ([N, 3] float64, was_single)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1 and arr.shape[0] == 3:
        return arr[None, :], True
    if arr.ndim == 2 and arr.shape[1] == 3:
        return arr, False
    raise ValueError(f"{what}: expected shape [3] or [N, 3], got {list(arr.shape)}")


def world_to_voxel(scan_or_geometry: Any, xyz_mm) -> np.ndarray:
    """World points to continuous voxel indices.

    Args:
      scan_or_geometry: a Scan, Geometry, SimpleITK image or mapping with origin/spacing/direction.
      xyz_mm: [3] or [N, 3] world (x, y, z) mm.

    Returns:
      float64 array of the same shape, (z, y, x) continuous indices.
    """
    geo = Geometry.of(scan_or_geometry)
    pts, single = _points(xyz_mm, "xyz_mm")
    # Solve direction @ (spacing * ijk) = xyz - origin; solve handles non-orthonormal directions.
    ijk = np.linalg.solve(geo.direction, (pts - geo.origin).T).T / geo.spacing
    zyx = ijk[:, ::-1]
    return zyx[0] if single else zyx


def voxel_to_world(scan_or_geometry: Any, zyx) -> np.ndarray:
    """Continuous voxel indices to world points.

    Args:
      scan_or_geometry: as for :func:`world_to_voxel`.
      zyx: [3] or [N, 3] continuous indices (z, y, x).

    Returns:
      float64 array of the same shape, world (x, y, z) mm.
    """
    geo = Geometry.of(scan_or_geometry)
    pts, single = _points(zyx, "zyx")
    xyz = geo.origin + (pts[:, ::-1] * geo.spacing) @ geo.direction.T
    return xyz[0] if single else xyz

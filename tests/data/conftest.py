"""Fixtures that write tiny scans with SimpleITK: anisotropic spacing, offsets, flipped axes.

Tests get the helpers through the `scans` fixture (not `from conftest import`, which breaks as
soon as another test folder has a conftest.py of its own).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
from support import chest_body, helpers_fixture

# (spacing xyz, origin xyz, direction row-major 3x3): the geometries the coordinate tests use.
GEOMETRIES = {
    "identity_aniso": ((0.7, 0.8, 2.5), (-120.5, 33.25, -410.0), np.eye(3)),
    "y_flip": ((0.6, 0.9, 1.25), (10.0, 180.0, -300.0), np.diag([1.0, -1.0, 1.0])),
    "z_flip": ((0.75, 0.75, 2.0), (-150.0, -140.0, 90.0), np.diag([1.0, 1.0, -1.0])),
    "xy_flip": ((0.9, 0.7, 1.5), (160.0, 170.0, -50.0), np.diag([-1.0, -1.0, 1.0])),
    "oblique": (
        (0.8, 0.7, 1.6),
        (5.0, -7.0, 12.0),
        np.array(
            [
                [np.cos(0.3), -np.sin(0.3), 0.0],
                [np.sin(0.3) * np.cos(0.2), np.cos(0.3) * np.cos(0.2), -np.sin(0.2)],
                [np.sin(0.3) * np.sin(0.2), np.cos(0.3) * np.sin(0.2), np.cos(0.2)],
            ]
        ),
    ),
}


def make_image(array_zyx: np.ndarray, spacing, origin, direction) -> sitk.Image:
    """A SimpleITK image of a (z, y, x) array with the given (x, y, z) geometry."""
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(float(v) for v in np.asarray(direction).ravel()))
    return image


def write_mhd(
    path, array_zyx, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None, compress=False
) -> str:
    """Writes `path` (.mhd + .raw, or .zraw when compressed) and returns it as str."""
    direction = np.eye(3) if direction is None else direction
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sitk.WriteImage(
        make_image(array_zyx, spacing, origin, direction), path, useCompression=compress
    )
    return path


def chest_phantom(shape_zyx, spacing, sphere_zyx_mm=None, sphere_d_mm=0.0, seed=0):
    """A tiny chest: air, a soft-tissue body, two lungs (-850 HU), an optional bright sphere.

    Args:
      shape_zyx: array shape.
      spacing: (x, y, z) mm.
      sphere_zyx_mm: sphere centre in mm from voxel (0, 0, 0) along the index axes (z, y, x).
      sphere_d_mm: its diameter.

    Returns:
      (int16 HU [D, H, W], uint8 LUNA16-style labels [D, H, W] with 3/4 for the lungs).
    """
    rng = np.random.default_rng(seed)
    d, h, w = shape_zyx
    sx, sy, sz = spacing
    image, (z, y, x), (cz, cy, cx) = chest_body(shape_zyx, spacing)
    labels = np.zeros(shape_zyx, np.uint8)
    for side, label in ((-1, 3), (1, 4)):
        lx = cx + side * 0.2 * w * sx
        lung = (
            ((x - lx) / (0.17 * w * sx)) ** 2
            + ((y - cy) / (0.3 * h * sy)) ** 2
            + ((z - cz) / (0.42 * d * sz)) ** 2
        ) <= 1.0
        labels[lung] = label
    image[labels > 0] = -850
    if sphere_zyx_mm is not None:
        pz, py, px = sphere_zyx_mm
        sphere = (z - pz) ** 2 + (y - py) ** 2 + (x - px) ** 2 <= (sphere_d_mm / 2) ** 2
        image[sphere] = 100
    image += rng.normal(0, 5, shape_zyx).round().astype(np.int16)
    return image, labels


@pytest.fixture(params=sorted(GEOMETRIES))
def geometry(request):
    """(name, spacing xyz, origin xyz, direction 3x3)."""
    spacing, origin, direction = GEOMETRIES[request.param]
    return request.param, spacing, origin, direction


scans = helpers_fixture(make_image, write_mhd, chest_phantom, GEOMETRIES=GEOMETRIES)

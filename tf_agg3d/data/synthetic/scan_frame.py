r"""The record a synthetic LUNA16 scan is drawn into, and the frame both profiles store it in.

Both profiles (:mod:`tf_agg3d.data.synthetic.default_profile`,
:mod:`tf_agg3d.data.synthetic.realistic`) draw a :class:`SyntheticScan` that
:func:`tf_agg3d.data.synthetic.luna16.generate_dataset` writes; this module holds what they
share: the pose of the scan (direction, origin), the scanner's padding outside the field of
view, and the mapping of the canonically drawn volume and findings to the stored files.

Coordinates: arrays are (z, y, x); world points are (x, y, z) mm with
`world = origin + direction @ (spacing * (ix, iy, iz))`, SimpleITK's convention. The anatomy is
drawn in a canonical (identity-direction) frame and the stored array is flipped along the
axes whose direction is -1, with the origin moved to the voxel that becomes index 0; the
anatomy thus has the same world geometry whatever the direction, and a reader that ignores the
direction puts the annotations in the wrong place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tf_agg3d.data.synthetic import anatomy as anat

FLIPS = ((1, 1, -1), (-1, 1, 1), (-1, -1, 1), (1, -1, 1))
"""Axis flips (diagonals of the direction) that flipped scans are written with."""


@dataclasses.dataclass(frozen=True)
class SyntheticScan:
    """One synthetic scan as written to disk.

    Attributes:
        volume: int16 `[D, H, W]` (z, y, x) HU, in stored order (flips applied).
        lung_mask: uint8 `[D, H, W]`, same geometry: 0, 3 / 4 lungs, 5 trachea.
        origin: (x, y, z) mm, world position of voxel (0, 0, 0).
        spacing: (sx, sy, sz) mm.
        direction: 9 floats, row-major 3x3, SimpleITK's order.
        nodules: (x, y, z, d) world mm per nodule (annotations.csv rows).
        nodule_kinds: "solid" or "part-solid" per nodule.
        excluded: (x, y, z, d) world mm per excluded finding; d = -1 for non-nodules.
        vessel_points: (x, y, z) world mm of points on vessel centrelines (class-0 candidates).
        lung_points: (x, y, z) world mm of random lung points away from nodules (class 0).
        nodule_sites: per nodule "isolated", "juxta-pleural" or "juxta-vascular"; empty for
            the default profile, whose nodules are all isolated.
    """

    volume: np.ndarray
    lung_mask: np.ndarray
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    nodules: tuple[tuple[float, float, float, float], ...]
    nodule_kinds: tuple[str, ...]
    excluded: tuple[tuple[float, float, float, float], ...]
    vessel_points: tuple[tuple[float, float, float], ...]
    lung_points: tuple[tuple[float, float, float], ...]
    nodule_sites: tuple[str, ...] = ()


def _diag(direction: Sequence[float]) -> tuple[int, int, int]:
    m = np.asarray(direction, np.float64).reshape(3, 3)
    diag = np.diag(m)
    if not (np.allclose(m, np.diag(diag)) and np.allclose(np.abs(diag), 1.0)):
        raise ValueError(f"direction must be diagonal with entries +-1 (axis flips), got {m}")
    return tuple(int(round(v)) for v in diag)


def draw_pose(
    rng: np.random.Generator,
    shape: Sequence[int],
    direction: Sequence[float] | None,
    origin: Sequence[float] | None,
) -> tuple[tuple[int, int, int], tuple[int, int, int], tuple[float, float, float]]:
    """Checks `shape` and draws the direction and origin the caller left None.

    Args:
        rng: the scan's generator (draws only for the arguments that are None).
        shape: (D, H, W) voxels, every size >= 16.
        direction: 9 floats row-major, diagonal with entries +-1; None: identity, or with
            probability 1/4 one of `FLIPS`.
        origin: (x, y, z) mm of the stored voxel (0, 0, 0); None: x, y in [-200, -100],
            z in [-400, -50].

    Returns:
        (shape as ints, flip: the direction's diagonal, origin as floats).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be (D, H, W) with every size >= 16, got {shape}")
    if direction is None:
        flip = FLIPS[int(rng.integers(len(FLIPS)))] if rng.random() < 0.25 else (1, 1, 1)
    else:
        flip = _diag(direction)
    if origin is None:
        origin = tuple(
            round(float(v), 3)
            for v in (rng.uniform(-200, -100), rng.uniform(-200, -100), rng.uniform(-400, -50))
        )
    return shape, flip, tuple(float(v) for v in origin)


def pad_outside_fov(hu: np.ndarray, spacing: Sequence[float]) -> None:
    """Sets `hu` to -2000 outside the largest in-plane circle, in place: outside the
    reconstruction circle real scanners write a padding value, not air."""
    shape = hu.shape
    _, y, x = anat.voxel_axes(shape, spacing)
    cy, cx = (shape[1] - 1) * spacing[1] / 2, (shape[2] - 1) * spacing[0] / 2
    hu[:, ((y[0] - cy) ** 2 + (x[0] - cx) ** 2) > min(cx, cy) ** 2] = -2000.0


def stored_scan(
    hu: np.ndarray,
    mask: np.ndarray,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    flip: tuple[int, int, int],
    nodules: Sequence[tuple[np.ndarray, float]],
    nodule_kinds: Sequence[str],
    excluded: Sequence[tuple[np.ndarray, float]],
    vessel_points: np.ndarray,
    lung_points: np.ndarray,
    nodule_sites: Sequence[str] = (),
    z_shift_mm: float = 0.0,
) -> SyntheticScan:
    """The scan as stored: drawn in the canonical frame, flipped into the stored order.

    Args:
        hu: float HU `[D, H, W]` in the canonical frame; rounded and clipped to int16.
        mask: uint8 labels, same grid.
        spacing, origin, flip: the stored geometry (`origin` is the stored voxel 0's).
        nodules, excluded: (canonical centre (x, y, z) mm, diameter mm) per finding.
        nodule_kinds, nodule_sites: per nodule, as in :class:`SyntheticScan`.
        vessel_points, lung_points: canonical (x, y, z) mm `[P, 3]`.
        z_shift_mm: where the findings were placed on a finer grid than the stored one, that
            grid's z (mm) of the stored slice 0's centre, taken off every finding (0: the same
            grid).
    """
    volume = np.clip(np.rint(hu), -3024, 3071).astype(np.int16)
    # The stored origin is the world position of the voxel that becomes index 0, so canonical
    # mm p maps to world canonical_origin + p on every axis.
    flip_arr = np.asarray(flip, np.float64)
    extent = np.asarray(spacing, np.float64) * (np.asarray(volume.shape[::-1], np.float64) - 1)
    canonical_origin = np.asarray(origin) - np.where(flip_arr < 0, extent, 0.0)
    shift = np.array([0.0, 0.0, z_shift_mm])
    for axis_xyz, f in enumerate(flip):
        if f < 0:
            volume = np.flip(volume, axis=2 - axis_xyz)
            mask = np.flip(mask, axis=2 - axis_xyz)

    def world(p: np.ndarray) -> tuple[float, ...]:
        return tuple(float(v) for v in canonical_origin + p - shift)

    return SyntheticScan(
        volume=np.ascontiguousarray(volume),
        lung_mask=np.ascontiguousarray(mask),
        origin=origin,
        spacing=spacing,
        direction=tuple(float(v) for v in np.diag(flip_arr).reshape(-1)),
        nodules=tuple((*world(c), float(d)) for c, d in nodules),
        nodule_kinds=tuple(nodule_kinds),
        excluded=tuple((*world(c), float(d)) for c, d in excluded),
        vessel_points=tuple(world(p) for p in vessel_points),
        lung_points=tuple(world(p) for p in lung_points),
        nodule_sites=tuple(nodule_sites),
    )

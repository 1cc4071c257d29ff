r"""The default profile of the synthetic LUNA16 generator: one easy chest CT per call.

Each scan: a body ellipse (soft tissue, subcutaneous fat), spine, sternum and ribs, two lungs
(~-850 HU, gravity gradient) with a heart notch, a trachea, branching vessel trees (1.5..4 mm
diameter, ~+30 HU) that look like small nodules in a local window, and 0..3 nodules of
3.5..30 mm (solid soft-edged ellipsoids of 0..100 HU, some lobulated; about a quarter of those >= 8 mm are
part-solid: a ~-500 HU ground-glass halo around a solid core, annotated with the halo's
diameter). Nodules sit inside a lung at least 4 mm from its wall and from vessels, so that each
is an isolated bright component (juxta-pleural and juxta-vascular nodules are not modelled).
About 20% of the patients have no nodule. Excluded findings are sub-3-mm nodules (with their
diameter), scar-like flat opacities and points on vessels (both with diameter -1).
Spacing is anisotropic (in-plane 0.6..0.9 mm, slices 1..2.5 mm), origins are non-zero, about a
quarter of the scans are stored with a flipped axis (direction diag(1, 1, -1), diag(-1, 1, 1),
...) and some have -2000 HU padding outside the circular field of view, as real scanners write.

The stored frame and the coordinate convention are :mod:`tf_agg3d.data.synthetic.scan_frame`'s;
:func:`tf_agg3d.data.synthetic.luna16.generate_dataset` writes these scans in the LUNA16 layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tf_agg3d.data.synthetic import anatomy as anat
from tf_agg3d.data.synthetic.scan_frame import (
    SyntheticScan,
    draw_pose,
    pad_outside_fov,
    stored_scan,
)

SLICE_SPACINGS = (1.0, 1.25, 1.5, 2.0, 2.5)
DEFAULT_IN_PLANE = 256
DEFAULT_SLICES = (100, 141)
MIN_NODULE_MM = 3.5
"""Smallest drawn nodule: its centre voxel stays solid (> -300 HU) wherever it falls inside a
0.9 x 0.9 x 2.5 mm voxel; smaller findings go to annotations_excluded.csv, as in LUNA16."""
MAX_NODULE_MM = 30.0
WALL_MARGIN_MM = 4.0
"""Clearance between a finding's surface and the lung wall, vessels or other findings: more
than one voxel diagonal (<= 2.8 mm) so the finding stays a separate bright component."""


def _place(
    rng: np.random.Generator,
    labels: np.ndarray,
    spacing,
    reach_mm: float,
    placed: list[tuple[np.ndarray, float]],
    tries: int = 256,
) -> np.ndarray | None:
    """A centre whose ball of `reach_mm` lies in one lung, clear of `placed` (centre, reach)."""
    cands = anat.random_lung_points(rng, labels, spacing, tries)
    if cands.shape[0] == 0:
        return None
    ok = anat.ball_inside(labels, spacing, cands, reach_mm)
    for centre, reach in placed:
        ok &= np.linalg.norm(cands - centre, axis=1) > reach + reach_mm
    hits = np.flatnonzero(ok)
    return cands[hits[0]] if hits.size else None


def _segment_distance(points: np.ndarray, tubes: anat.Tubes) -> np.ndarray:
    """Distance `[P, M]` from each point `[P, 3]` to each segment."""
    ab = tubes.b - tubes.a
    ap = points[:, None, :] - tubes.a[None]
    t = np.clip(np.sum(ap * ab, -1) / np.maximum(np.sum(ab * ab, -1), 1e-12), 0.0, 1.0)
    return np.linalg.norm(ap - t[..., None] * ab, axis=-1)


def synthesize_scan(
    rng: np.random.Generator,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    direction: Sequence[float] | None = None,
    n_nodules: int | None = None,
    diameters: Sequence[float] | None = None,
    part_solid_fraction: float = 0.25,
) -> SyntheticScan:
    """Draws one synthetic chest CT with its lung mask and findings.

    Args:
        rng: the generator all randomness is drawn from (determinism per seed).
        shape: (D, H, W) voxels; default 256 x 256 in-plane and 100..140 slices.
        spacing: (sx, sy, sz) mm; default in-plane 0.6..0.9 and slices 1..2.5.
        origin: (x, y, z) mm of the stored voxel (0, 0, 0); default x, y in [-200, -100],
            z in [-400, -50].
        direction: 9 floats row-major, diagonal with entries +-1; default identity, or with
            probability 1/4 one of `scan_frame.FLIPS`.
        n_nodules: nodules to place; default 0 with probability 0.2, else 1..3.
        diameters: requested nodule diameters in mm (overrides `n_nodules`); default
            log-uniform in [3.5, 30]. A nodule that does not fit in the lungs is shrunk (by
            0.8 per try, not below 3.5 mm) or, failing that, left out.
        part_solid_fraction: probability that a nodule of >= 8 mm is part-solid.

    Returns:
        The scan, in stored order, with findings in world mm.
    """
    if shape is None:
        shape = (int(rng.integers(*DEFAULT_SLICES)), DEFAULT_IN_PLANE, DEFAULT_IN_PLANE)
    if spacing is None:
        in_plane = round(float(rng.uniform(0.6, 0.9)), 4)
        spacing = (in_plane, in_plane, float(rng.choice(SLICE_SPACINGS)))
    spacing = tuple(float(s) for s in spacing)
    shape, flip, origin = draw_pose(rng, shape, direction, origin)
    if diameters is None:
        if n_nodules is None:
            n_nodules = 0 if rng.random() < 0.2 else int(rng.integers(1, 4))
        diameters = np.exp(rng.uniform(np.log(MIN_NODULE_MM), np.log(MAX_NODULE_MM), n_nodules))
    diameters = sorted((float(d) for d in diameters), reverse=True)  # big ones first: they fit

    chest = anat.draw_chest(rng, shape, spacing)
    hu, labels = chest.hu, chest.labels

    # Findings first (positions only), so vessels can keep clear of them.
    placed: list[tuple[np.ndarray, float]] = []
    nodules = []  # (centre, d, kind, axes, rotation, lobulation)
    for d in diameters:
        kind = "part-solid" if d >= 8.0 and rng.random() < part_solid_fraction else "solid"
        # Small nodules stay spheres: their centre voxel must be solid even at 2.5 mm slices.
        stretch = rng.uniform(0.85, 1.18, 3) if d >= 6.0 else np.ones(3)
        stretch /= np.prod(stretch) ** (1 / 3)  # same volume as the annotated sphere
        lob = rng.uniform(0.0, 0.08) if (kind == "solid" and d >= 8.0) else 0.0
        while True:
            reach = 0.5 * d * stretch.max() * (1 + lob) + WALL_MARGIN_MM
            centre = _place(rng, labels, spacing, reach, placed)
            if centre is not None or d * 0.8 < MIN_NODULE_MM:
                break
            d *= 0.8
        if centre is None:
            continue
        placed.append((centre, reach))
        nodules.append((centre, d, kind, 0.5 * d * stretch, anat.random_rotation(rng), lob))
    excluded = []  # (centre, d_written, axes, value_hu)
    for _ in range(int(rng.integers(0, 3))):  # sub-3-mm nodules: excluded with their size
        d = rng.uniform(1.5, 2.9)
        centre = _place(rng, labels, spacing, 0.5 * d + WALL_MARGIN_MM, placed)
        if centre is not None:
            placed.append((centre, 0.5 * d + WALL_MARGIN_MM))
            excluded.append((centre, round(d, 1), (0.5 * d,) * 3, rng.uniform(0.0, 80.0)))
    for _ in range(int(rng.integers(0, 2))):  # a flat scar-like opacity: a non-nodule, -1
        r = rng.uniform(1.5, 3.0)
        axes = (1.6 * r, 1.0 * r, 0.4 * r)
        centre = _place(rng, labels, spacing, axes[0] + WALL_MARGIN_MM, placed)
        if centre is not None:
            placed.append((centre, axes[0] + WALL_MARGIN_MM))
            excluded.append((centre, -1.0, axes, rng.uniform(-250.0, -50.0)))

    tubes = anat.grow_vessel_trees(rng, labels, spacing, chest.hila, chest.lung_scale_mm)
    if placed and len(tubes):
        centres = np.stack([c for c, _ in placed])
        reach = np.asarray([r for _, r in placed])
        clear = _segment_distance(centres, tubes) > reach[:, None] + tubes.radius[None]
        tubes = tubes.select(np.all(clear, axis=0))
    occ = anat.render_tubes(shape, spacing, tubes)
    occ *= (labels == anat.RIGHT_LUNG) | (labels == anat.LEFT_LUNG)
    vessel_hu = np.float32(rng.uniform(0.0, 60.0))
    hu += occ * (vessel_hu - hu)

    for centre, _, kind, axes, rot, lob in nodules:
        solid_hu = rng.uniform(0.0, 100.0)
        if kind == "part-solid":
            anat.paint_ellipsoid(hu, spacing, centre, axes, rot, rng.uniform(-560.0, -440.0))
            core = rng.uniform(0.35, 0.6)
            core_axes = np.maximum(axes * core, 1.5)
            anat.paint_ellipsoid(hu, spacing, centre, core_axes, rot, solid_hu)
        else:
            phase = rng.uniform(0, 2 * np.pi)
            anat.paint_ellipsoid(
                hu, spacing, centre, axes, rot, solid_hu, lobulation=lob, lobe_phase=phase
            )
    for centre, _, axes, value in excluded:
        anat.paint_ellipsoid(hu, spacing, centre, axes, anat.random_rotation(rng), value)

    hu += rng.standard_normal(shape, dtype=np.float32) * np.float32(rng.uniform(12.0, 30.0))
    if rng.random() < 0.3:
        pad_outside_fov(hu, spacing)

    # Class-0 candidate sites: points on thicker vessels and random lung points off nodules.
    vessel_sites = np.zeros((0, 3))
    thick = np.flatnonzero(tubes.radius >= 0.9) if len(tubes) else np.zeros(0, int)
    if thick.size:
        pick = rng.choice(thick, size=min(thick.size, int(rng.integers(15, 31))), replace=False)
        vessel_sites = 0.5 * (tubes.a[pick] + tubes.b[pick])
    lung_sites = anat.random_lung_points(rng, labels, spacing, int(rng.integers(8, 16)))
    for centre, d, *_ in nodules:
        lung_sites = lung_sites[np.linalg.norm(lung_sites - centre, axis=1) > 0.5 * d + 2.0]
    vessel_excluded = []
    if thick.size:
        for j in rng.choice(thick, size=min(thick.size, int(rng.integers(0, 3))), replace=False):
            vessel_excluded.append(0.5 * (tubes.a[j] + tubes.b[j]))

    return stored_scan(
        hu,
        labels,
        spacing,
        origin,
        flip,
        nodules=[(c, d) for c, d, *_ in nodules],
        nodule_kinds=[kind for _, _, kind, *_ in nodules],
        excluded=[(c, d) for c, d, *_ in excluded] + [(c, -1.0) for c in vessel_excluded],
        vessel_points=vessel_sites,
        lung_points=lung_sites,
    )


def make_scan(rng: np.random.Generator, **kwargs):
    """One synthetic scan as plain arrays (see `synthesize_scan` for the keyword arguments).

    Returns:
        (volume int16 `[D, H, W]` z, y, x HU; lung_mask uint8 `[D, H, W]`; origin (x, y, z) mm;
        spacing (x, y, z) mm; direction 9 floats row-major; nodules list of (x, y, z, d) world
        mm).
    """
    s = synthesize_scan(rng, **kwargs)
    return s.volume, s.lung_mask, s.origin, s.spacing, s.direction, list(s.nodules)

"""Shape drawing for the synthetic LUNA16 generator: chest, lungs, vessel trees, nodules.

Everything here works in the *canonical frame* of a scan: arrays are (z, y, x) with an identity
direction, and a point is given in millimetres from the centre of voxel (0, 0, 0), in (x, y, z)
order: `p = spacing * (ix, iy, iz)`. Index z grows towards the head, y towards the back and x
towards the patient's left (DICOM's LPS patient frame), so the chest is drawn as a scanner with
an identity direction would store it. `tf_agg3d.data.synthetic.scan_frame` maps this frame to
world coordinates and flips the stored axes of scans written with a flipped direction.

All drawing is vectorised: quantities that depend on (y, x) only are computed on 2-D maps and
broadcast over z, so a 256 x 256 x 140 chest costs a handful of full-volume operations.
"""

from __future__ import annotations

import dataclasses

import numpy as np

RIGHT_LUNG = 3
"""Mask label of the lung at smaller x (the patient's right in LPS)."""
LEFT_LUNG = 4
"""Mask label of the lung at larger x (the patient's left)."""
TRACHEA = 5
"""Mask label of the trachea, as in the LUNA16 `seg-lungs-LUNA16` masks."""
LUNG_LABELS = (RIGHT_LUNG, LEFT_LUNG)


@dataclasses.dataclass(frozen=True)
class Chest:
    """A drawn chest before vessels, nodules and noise.

    Attributes:
        hu: float32 `[D, H, W]` (z, y, x) Hounsfield units.
        labels: uint8 `[D, H, W]`: 0 background, 3 / 4 the lungs, 5 the trachea.
        hila: lung label -> float64 `(3,)` (x, y, z) canonical mm of that lung's hilum, a point
            inside the lung where its vessel trees start.
        lung_scale_mm: a typical lung size in mm (its antero-posterior extent), which sets
            vessel branch lengths so that small test volumes still get whole trees.
    """

    hu: np.ndarray
    labels: np.ndarray
    hila: dict[int, np.ndarray]
    lung_scale_mm: float


@dataclasses.dataclass(frozen=True)
class Tubes:
    """Vessel centrelines as straight segments.

    Attributes:
        a: float64 `[M, 3]` (x, y, z) canonical mm, first end of each segment.
        b: float64 `[M, 3]` (x, y, z) canonical mm, second end.
        radius: float64 `[M]` tube radius in mm.
    """

    a: np.ndarray
    b: np.ndarray
    radius: np.ndarray

    def __len__(self) -> int:
        return int(self.radius.shape[0])

    def select(self, keep: np.ndarray) -> Tubes:
        return Tubes(self.a[keep], self.b[keep], self.radius[keep])


def voxel_axes(
    shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical mm coordinates of voxel centres, shaped to broadcast over a `[D, H, W]` array.

    Args:
        shape: (D, H, W).
        spacing: (sx, sy, sz) mm.

    Returns:
        z `[D, 1, 1]`, y `[1, H, 1]`, x `[1, 1, W]`, float32 mm.
    """
    d, h, w = shape
    sx, sy, sz = spacing
    z = (np.arange(d, dtype=np.float32) * np.float32(sz)).reshape(d, 1, 1)
    y = (np.arange(h, dtype=np.float32) * np.float32(sy)).reshape(1, h, 1)
    x = (np.arange(w, dtype=np.float32) * np.float32(sx)).reshape(1, 1, w)
    return z, y, x


def mm_to_index(points_xyz: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Nearest voxel index of canonical mm points.

    Args:
        points_xyz: `[..., 3]` (x, y, z) mm.
        spacing: (sx, sy, sz) mm.

    Returns:
        int64 `[..., 3]` (iz, iy, ix), possibly out of bounds.
    """
    idx = np.rint(np.asarray(points_xyz, np.float64) / np.asarray(spacing, np.float64))
    return idx[..., ::-1].astype(np.int64)


def labels_at(labels: np.ndarray, spacing, points_xyz: np.ndarray) -> np.ndarray:
    """Mask label at the voxel nearest each point; 0 outside the volume.

    Args:
        labels: uint8 `[D, H, W]`.
        spacing: (sx, sy, sz) mm.
        points_xyz: `[..., 3]` (x, y, z) canonical mm.

    Returns:
        uint8 `[...]`.
    """
    idx = mm_to_index(points_xyz, spacing)
    inside = np.all((idx >= 0) & (idx < np.asarray(labels.shape)), axis=-1)
    safe = np.where(inside[..., None], idx, 0)
    out = labels[safe[..., 0], safe[..., 1], safe[..., 2]]
    return np.where(inside, out, 0).astype(np.uint8)


def random_lung_points(
    rng: np.random.Generator, labels: np.ndarray, spacing, n: int, label: int | None = None
) -> np.ndarray:
    """Uniform random points inside the lungs (or one lung), jittered within their voxel.

    Args:
        rng: the scan's generator.
        labels: uint8 `[D, H, W]`.
        spacing: (sx, sy, sz) mm.
        n: number of points.
        label: a lung label, or None for either lung.

    Returns:
        float64 `[n, 3]` (x, y, z) canonical mm (empty when the mask has no such voxel).
    """
    flat = labels.reshape(-1)
    if label is None:
        cand = np.flatnonzero((flat == RIGHT_LUNG) | (flat == LEFT_LUNG))
    else:
        cand = np.flatnonzero(flat == label)
    if cand.size == 0:
        return np.zeros((0, 3))
    pick = cand[rng.integers(0, cand.size, size=n)]
    zyx = np.stack(np.unravel_index(pick, labels.shape), axis=-1).astype(np.float64)
    zyx += rng.uniform(-0.5, 0.5, size=zyx.shape)
    return zyx[:, ::-1] * np.asarray(spacing, np.float64)


def _fibonacci_sphere(n: int) -> np.ndarray:
    """`n` roughly evenly spread unit vectors, `[n, 3]`."""
    i = np.arange(n, dtype=np.float64) + 0.5
    polar = np.arccos(1.0 - 2.0 * i / n)
    azimuth = np.pi * (1.0 + 5.0**0.5) * i
    return np.stack(
        [np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], -1
    )


_SHELL = np.concatenate([_fibonacci_sphere(96), 0.5 * _fibonacci_sphere(24), np.zeros((1, 3))])


def ball_inside(labels: np.ndarray, spacing, centres_xyz: np.ndarray, radius: float) -> np.ndarray:
    """Whether a ball of `radius` mm around each centre lies within a single lung.

    Tested on a shell of sample points (lungs are close to convex, so a dense shell suffices).

    Args:
        labels: uint8 `[D, H, W]`.
        spacing: (sx, sy, sz) mm.
        centres_xyz: `[N, 3]` (x, y, z) canonical mm.
        radius: mm.

    Returns:
        bool `[N]`.
    """
    pts = centres_xyz[:, None, :] + radius * _SHELL[None]
    lab = labels_at(labels, spacing, pts)
    first = lab[:, -1:]
    return np.all(lab == first, axis=1) & np.isin(first[:, 0], LUNG_LABELS)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation matrix `[3, 3]`."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def draw_chest(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> Chest:
    """Draws body, fat, spine, sternum, ribs, two lungs, heart notch and trachea.

    The anatomy is sized relative to the field of view (so a small test volume still holds a
    whole chest); HU values: air -1000, soft tissue ~20..45, fat ~-100, bone 200..900, lungs
    ~-850 with a gravity gradient (denser at the back).

    Args:
        rng: the scan's generator.
        shape: (D, H, W).
        spacing: (sx, sy, sz) mm.

    Returns:
        The drawn chest.
    """
    d, h, w = shape
    sx, sy, sz = spacing
    wmm, hmm, zmm = (w - 1) * sx, (h - 1) * sy, (d - 1) * sz
    z, y, x = voxel_axes(shape, spacing)
    y2, x2 = y[0], x[0]  # [H, 1], [1, W]

    # Body: an elliptic cylinder, wider than deep, a little behind the image centre.
    cx = wmm / 2 + rng.uniform(-0.02, 0.02) * wmm
    cy = hmm / 2 + rng.uniform(0.0, 0.04) * hmm
    ax, ay = 0.45 * wmm * rng.uniform(0.94, 1.02), 0.34 * hmm * rng.uniform(0.94, 1.04)
    rho_body = np.sqrt(((x2 - cx) / ax) ** 2 + ((y2 - cy) / ay) ** 2)  # [H, W]
    base = np.full((h, w), -1000.0, np.float32)
    base[rho_body <= 1.0] = rng.uniform(20.0, 45.0)
    base[(rho_body > 0.89) & (rho_body <= 1.0)] = rng.uniform(-115.0, -85.0)  # subcutaneous fat

    # Spine (cancellous body in a cortical ring) at the back, sternum at the front.
    rs = 0.05 * min(wmm, hmm)
    ys = cy + 0.72 * ay
    r_spine = np.sqrt((x2 - cx) ** 2 + (y2 - ys) ** 2)
    base[r_spine <= rs] = rng.uniform(600.0, 900.0)
    base[r_spine <= 0.8 * rs] = rng.uniform(180.0, 300.0)
    r_sternum = np.sqrt(((x2 - cx) / (1.6 * rs)) ** 2 + ((y2 - (cy - 0.86 * ay)) / (0.5 * rs)) ** 2)
    base[r_sternum <= 1.0] = rng.uniform(250.0, 450.0)
    hu = np.broadcast_to(base, shape).copy()

    # Lungs: superellipse cross-sections whose size follows a z profile (flat below, domed apex),
    # sitting on a diaphragm dome; both described by 2-D maps compared with 1-D z profiles.
    z_bot0 = zmm * rng.uniform(0.06, 0.14)
    z_top = zmm * rng.uniform(0.88, 0.95)
    lung_h = z_top - z_bot0
    zc = z[:, 0, 0]
    labels = np.zeros(shape, np.uint8)
    lungs_any = np.zeros(shape, bool)
    # The heart takes a notch out of the lower, front, medial lungs (mostly the left one).
    hcx, hcy = cx + 0.06 * wmm, cy - 0.30 * ay
    hax, hay, hz0, hzr = 0.15 * wmm, 0.40 * ay, z_bot0 + 0.22 * lung_h, 0.30 * lung_h
    rho_heart = np.sqrt(((x2 - hcx) / hax) ** 2 + ((y2 - hcy) / hay) ** 2)
    s_heart = np.sqrt(np.clip(1.0 - ((zc - hz0) / hzr) ** 2, 0.0, 1.0))
    heart = rho_heart[None] <= s_heart[:, None, None]
    hila: dict[int, np.ndarray] = {}
    lung_ay = 0.73 * ay * rng.uniform(0.95, 1.04)
    for label, side in ((RIGHT_LUNG, -1.0), (LEFT_LUNG, 1.0)):
        lcx = cx + side * 0.205 * wmm * rng.uniform(0.97, 1.04)
        lcy = cy - 0.05 * ay
        lax = 0.155 * wmm * rng.uniform(0.93, 1.03)
        p = 2.4
        theta = np.arctan2(y2 - lcy, x2 - lcx)
        wobble = 1.0 + 0.05 * np.sin(2 * theta + rng.uniform(0, 2 * np.pi))
        wobble += 0.035 * np.sin(3 * theta + rng.uniform(0, 2 * np.pi))
        q = (np.abs(x2 - lcx) / lax) ** p + (np.abs(y2 - lcy) / lung_ay) ** p
        rho = (q * wobble) ** (1.0 / p)  # [H, W], 1 on the widest cross-section's boundary
        # The right diaphragm sits higher (the liver lies under it).
        z_bot = z_bot0 + (0.04 * lung_h if label == RIGHT_LUNG else 0.0)
        dome = (0.18 * lung_h * (1.0 - np.clip(rho, 0.0, 1.0) ** 2)).astype(np.float32)
        t = (zc - z_bot) / (z_top - z_bot)
        apex = np.clip((t - 0.45) / 0.55, 0.0, None)
        profile = np.sqrt(np.clip(1.0 - apex**2, 0.0, None)) * (1.0 - 0.10 * np.clip(t, 0, 1))
        profile = np.where((t >= 0) & (t <= 1), profile, -1.0).astype(np.float32)
        lung = (rho[None] <= profile[:, None, None]) & (zc[:, None, None] >= z_bot + dome[None])
        lung &= ~heart
        labels[lung] = label
        lungs_any |= lung
        hila[label] = np.array([lcx - side * 0.5 * lax, lcy + 0.1 * lung_ay, z_bot + 0.55 * lung_h])

    # Ribs: bone arcs in a ring just outside the lungs, repeating along z and sloping down
    # towards the front; not at the sternum or the spine.
    theta_b = np.arctan2((y2 - cy) / ay, (x2 - cx) / ax)
    ring = (rho_body > 0.80) & (rho_body < 0.87)
    ring &= (np.abs(theta_b + np.pi / 2) > 0.35) & (np.abs(theta_b - np.pi / 2) > 0.3)
    period, thick, slope = rng.uniform(16.0, 22.0), rng.uniform(5.0, 8.0), rng.uniform(0.3, 0.6)
    phase = np.mod(z - slope * (y - cy) + rng.uniform(0, period), period)  # [D, H, 1]
    in_chest = ((z >= z_bot0 - 10.0) & (z <= z_top + 10.0)).reshape(d, 1, 1)
    ribs = (phase < thick) & in_chest & ring[None] & ~lungs_any
    hu[ribs] = rng.uniform(350.0, 700.0)

    # Lung parenchyma: ~-850 HU, denser towards the back (gravity), over the drawn body.
    lung_hu = np.float32(rng.uniform(-880.0, -830.0)) + np.float32(rng.uniform(15.0, 40.0)) * (
        (y - cy) / np.float32(hmm)
    )
    np.copyto(hu, np.broadcast_to(lung_hu, shape), where=lungs_any)

    # Trachea: an air tube from above the carina to the top of the scan, between the lungs.
    rt = float(np.clip(0.03 * wmm, 3.0, 9.0))
    tcx, tcy = cx + rng.uniform(-0.01, 0.01) * wmm, cy - 0.25 * ay
    disc = ((x2 - tcx) ** 2 + (y2 - tcy) ** 2) <= rt**2
    trachea = disc[None] & (z >= z_bot0 + 0.68 * lung_h) & ~lungs_any
    hu[trachea] = -1000.0
    labels[trachea] = TRACHEA
    return Chest(hu=hu, labels=labels, hila=hila, lung_scale_mm=float(2 * lung_ay))


def grow_vessel_trees(
    rng: np.random.Generator,
    labels: np.ndarray,
    spacing,
    hila: dict[int, np.ndarray],
    lung_scale_mm: float,
    roots_per_lung: tuple[int, int] = (6, 10),
    max_depth: int = 4,
    step_mm: float = 1.0,
    max_segments_per_lung: int = 5000,
) -> Tubes:
    """Grows branching vessel trees from each lung's hilum as persistent random walks.

    A root starts at the hilum with a radius of 1.6..2 mm (diameter 3.2..4) and walks towards a
    random point of its lung; its heading drifts (cumulated Gaussian turns), so vessels curve
    and, seen in a small window, cut through slices as round bright blobs like nodules do.
    Branches spawn 2..3 children with 0.7..0.9 of the local radius until the radius would fall
    below 0.75 mm (diameter 1.5). A walk stops where it leaves its lung.

    Args:
        rng: the scan's generator.
        labels: uint8 `[D, H, W]` mask.
        spacing: (sx, sy, sz) mm.
        hila: lung label -> `(3,)` (x, y, z) canonical mm start point.
        lung_scale_mm: typical lung size, scales branch lengths.
        roots_per_lung: [low, high) number of roots per lung.
        max_depth: branching generations below the roots.
        step_mm: centreline sampling step.
        max_segments_per_lung: cap on the segments of one lung (bounds the cost).

    Returns:
        The trees' segments.
    """
    a_list, b_list, r_list = [], [], []
    for label, hilum in hila.items():
        total = 0
        # The nominal hilum may miss a lung with an odd shape: start from the lung voxel nearest
        # to it among a random sample.
        sample = random_lung_points(rng, labels, spacing, 4000, label)
        if sample.shape[0] == 0:
            continue
        start0 = sample[np.argmin(np.sum((sample - hilum) ** 2, axis=1))]
        targets = random_lung_points(rng, labels, spacing, 64, label)
        queue = []
        for _ in range(int(rng.integers(*roots_per_lung))):
            heading = targets[rng.integers(len(targets))] - start0
            start = start0 + rng.normal(0.0, 1.0, 3)
            queue.append((start, heading, rng.uniform(1.6, 2.0), 0))
        while queue and total < max_segments_per_lung:
            start, heading, r0, depth = queue.pop(0)
            heading = heading / max(np.linalg.norm(heading), 1e-6)
            length = lung_scale_mm * rng.uniform(0.35, 0.75) * 0.75**depth
            n = max(4, int(length / step_mm))
            turns = np.cumsum(rng.normal(0.0, 0.1, (n, 3)), axis=0)
            dirs = heading + turns
            dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
            pts = np.concatenate([start[None], start + np.cumsum(dirs * step_mm, axis=0)])
            inside = labels_at(labels, spacing, pts) == label
            inside[0] = True
            stop = int(np.argmin(inside)) if not inside.all() else len(pts)
            pts = pts[:stop]
            if len(pts) < 3:
                continue
            radii = np.maximum(np.linspace(r0, 0.85 * r0, len(pts)), 0.75)
            a_list.append(pts[:-1])
            b_list.append(pts[1:])
            r_list.append(0.5 * (radii[:-1] + radii[1:]))
            total += len(pts) - 1
            if depth >= max_depth:
                continue
            n_children = int(rng.integers(2, 4))
            for j in rng.integers(len(pts) // 4, len(pts) - 1, size=n_children):
                r_child = max(radii[j] * rng.uniform(0.7, 0.9), 0.75)
                turn = dirs[min(j, len(dirs) - 1)] + rng.normal(0.0, 0.8, 3)
                queue.append((pts[j], turn, r_child, depth + 1))
    if not a_list:
        empty = np.zeros((0, 3))
        return Tubes(empty, empty, np.zeros((0,)))
    return Tubes(np.concatenate(a_list), np.concatenate(b_list), np.concatenate(r_list))


def render_tubes(
    shape: tuple[int, int, int],
    spacing,
    tubes: Tubes,
    edge_mm: float = 0.7,
    chunk: int = 384,
) -> np.ndarray:
    """Occupancy in [0, 1] of a union of tubes (soft edges), point-sampled at voxel centres.

    Each segment stamps the voxels of a box around it with `clip(0.5 + (r - dist) / edge, 0, 1)`,
    `dist` the distance to the segment (not to its end points, so thin tubes show no beads);
    overlaps take the maximum. Segments are sorted by radius and handled in chunks whose box
    fits the chunk's largest tube.

    Args:
        shape: (D, H, W).
        spacing: (sx, sy, sz) mm.
        tubes: the segments, canonical mm.
        edge_mm: width of the linear edge ramp.
        chunk: segments per vectorised batch (bounds memory).

    Returns:
        float32 `[D, H, W]`.
    """
    occ = np.zeros(int(np.prod(shape)), np.float32)
    if len(tubes) == 0:
        return occ.reshape(shape)
    sp = np.asarray(spacing, np.float64)
    dims = np.asarray(shape, np.int64)
    order = np.argsort(tubes.radius, kind="stable")
    for start in range(0, len(order), chunk):
        sel = order[start : start + chunk]
        a, b, r = tubes.a[sel], tubes.b[sel], tubes.radius[sel]
        mid = 0.5 * (a + b)
        half_len = 0.5 * np.linalg.norm(b - a, axis=1).max()
        reach = r.max() + 0.5 * edge_mm + half_len
        k = np.ceil(reach / sp[::-1] + 0.5).astype(np.int64)  # (kz, ky, kx)
        grids = np.meshgrid(*[np.arange(-kk, kk + 1) for kk in k], indexing="ij")
        offsets = np.stack([g.reshape(-1) for g in grids], axis=-1)  # [K, 3] (z, y, x)
        centre = mm_to_index(mid, spacing)  # [M, 3] (z, y, x)
        # float32 positions relative to each segment's start keep the [M, K, 3] work cheap.
        off_mm = (offsets[:, ::-1] * sp).astype(np.float32)  # [K, 3] (x, y, z)
        base = (centre[:, ::-1] * sp - a).astype(np.float32)  # [M, 3]
        rel = base[:, None, :] + off_mm[None]  # [M, K, 3] voxel centre - a
        ab = (b - a).astype(np.float32)
        t = (
            np.einsum("mkc,mc->mk", rel, ab)
            / np.maximum(np.einsum("mc,mc->m", ab, ab), 1e-9)[:, None]
        )
        rel -= np.clip(t, 0.0, 1.0)[..., None] * ab[:, None, :]
        dist = np.sqrt(np.einsum("mkc,mkc->mk", rel, rel))
        val = np.clip(0.5 + (r.astype(np.float32)[:, None] - dist) / np.float32(edge_mm), 0, 1)
        m_idx, k_idx = np.nonzero(val > 0)
        vox = centre[m_idx] + offsets[k_idx]  # [N, 3] (z, y, x)
        inside = np.all((vox >= 0) & (vox < dims), axis=-1)
        flat = np.ravel_multi_index(tuple(vox[inside].T), shape)
        np.maximum.at(occ, flat, val[m_idx[inside], k_idx[inside]])
    return occ.reshape(shape)


def paint_ellipsoid(
    hu: np.ndarray,
    spacing,
    centre_xyz: np.ndarray,
    semi_axes_mm: tuple[float, float, float],
    rotation: np.ndarray,
    value_hu: float,
    edge_mm: float = 0.8,
    lobulation: float = 0.0,
    lobe_phase: float = 0.0,
) -> None:
    """Blends a soft-edged (optionally lobulated) ellipsoid into `hu`, in place.

    The signed distance to the surface is measured along the ray from the centre, and the
    occupancy `clip(0.5 - sd / edge, 0, 1)` blends `value_hu` over what is there. Only a box
    around the ellipsoid is touched.

    Args:
        hu: float32 `[D, H, W]`, modified in place.
        spacing: (sx, sy, sz) mm.
        centre_xyz: `(3,)` (x, y, z) canonical mm.
        semi_axes_mm: the ellipsoid's semi-axes along the columns of `rotation`.
        rotation: `[3, 3]`, columns are the ellipsoid's axes in (x, y, z).
        value_hu: HU inside.
        edge_mm: width of the linear edge ramp.
        lobulation: relative amplitude of a 3-lobed surface ripple (0 for a plain ellipsoid).
        lobe_phase: rotation of the ripple about the ellipsoid's third axis.
    """
    sp = np.asarray(spacing, np.float64)
    axes = np.asarray(semi_axes_mm, np.float64)
    reach = axes.max() * (1.0 + lobulation) + edge_mm
    lo = np.maximum(np.floor((centre_xyz - reach) / sp).astype(int), 0)[::-1]  # (z, y, x)
    hi = np.minimum(np.ceil((centre_xyz + reach) / sp).astype(int) + 1, hu.shape[::-1])[::-1]
    if np.any(hi <= lo):
        return
    zz, yy, xx = (np.arange(lo[i], hi[i]) * sp[2 - i] for i in range(3))
    v = np.stack(np.broadcast_arrays(xx[None, None, :], yy[None, :, None], zz[:, None, None]), -1)
    v = v - centre_xyz  # [d, h, w, 3] (x, y, z) mm from the centre
    u = v @ rotation  # ellipsoid frame
    rad = np.sqrt(np.sum((u / axes) ** 2, axis=-1))  # 1 on the surface
    if lobulation:
        az = np.arctan2(u[..., 1], u[..., 0]) + lobe_phase
        rad = rad / (1.0 + lobulation * np.cos(3.0 * az))
    norm = np.linalg.norm(v, axis=-1)
    boundary = np.where(rad > 1e-3, norm / np.maximum(rad, 1e-3), axes.min())
    sd = np.where(rad > 1e-3, norm - boundary, -axes.min())
    occ = np.clip(0.5 - sd / edge_mm, 0.0, 1.0).astype(np.float32)
    box = hu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    box += occ * (np.float32(value_hu) - box)

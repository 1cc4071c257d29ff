"""Nodules and excluded findings of the realistic synthetic LUNA16 profile.

What is drawn, and why:

- **Size.** LUNA16's nodules are 3..30 mm, most 4..10 mm, median about 7 mm: diameters are a
  log-normal (median `diameter_median_mm`, log-sd `diameter_log_sd`) truncated to
  `diameter_range` by redrawing (clipping would pile mass on the bounds).
- **Texture.** Solid (soft-tissue HU, sharp-ish edge, larger ones lobulated and some with
  spicules), ground-glass (-600..-300 HU, wide soft edge: vessels stay visible through it, as
  in real GGOs) and part-solid (a ground-glass halo around a solid core; annotated with the
  halo's diameter, as LUNA16 readers measure the whole lesion).
- **Site.** Isolated (inside the lung, clear of the wall), juxta-pleural (the nodule's surface
  crosses the lung wall, so it merges with the chest wall) and juxta-vascular (it touches a
  vessel of 0.6..2.5 mm radius). Every nodule centre lies inside a lung label of the mask.
- **Excluded findings** (annotations_excluded.csv): nodules under 3 mm (with their diameter)
  and non-nodules (diameter -1): flat scars and elongated mucus plugs. They are in the image,
  so a detector that marks them is not penalised only because the exclusion path works.

Everything is painted with *maximum* blending: a lesion never makes tissue darker, so a
ground-glass nodule leaves the chest wall and a vessel it touches as they are.
Coordinates are the canonical frame of :mod:`tf_agg3d.data.synthetic.anatomy`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tf_agg3d.data.synthetic import anatomy as anat
from tf_agg3d.data.synthetic.vessels import distance_to_tubes

TEXTURES = ("solid", "part-solid", "ground-glass")
SITES = ("isolated", "juxta-pleural", "juxta-vascular")


@dataclasses.dataclass(frozen=True)
class LesionParams:
    """The nodule and excluded-finding model (the realistic profile's defaults).

    Attributes:
        diameter_median_mm, diameter_log_sd, diameter_range: the truncated log-normal.
        texture_probs: probabilities of TEXTURES; part-solid needs >= `part_solid_min_mm`
            (smaller draws become ground-glass: a 4 mm halo cannot hold a visible core).
        site_probs: probabilities of SITES.
        solid_hu, ggo_hu: (low, high) HU of solid tissue and of ground glass.
        solid_edge_mm, ggo_edge_mm: (low, high) widths of the edge ramp.
        pleural_depth: (low, high) distance of a juxta-pleural centre from the wall, in radii
            (< 1: the nodule crosses the wall and merges with the chest wall).
        sub3_per_scan, nonnodules_per_scan: [low, high) counts of excluded findings.
    """

    diameter_median_mm: float = 7.0
    diameter_log_sd: float = 0.5
    diameter_range: tuple[float, float] = (3.0, 30.0)
    texture_probs: tuple[float, float, float] = (0.68, 0.12, 0.20)
    part_solid_min_mm: float = 6.0
    site_probs: tuple[float, float, float] = (0.55, 0.25, 0.20)
    solid_hu: tuple[float, float] = (-20.0, 80.0)
    ggo_hu: tuple[float, float] = (-600.0, -300.0)
    solid_edge_mm: tuple[float, float] = (0.4, 1.0)
    ggo_edge_mm: tuple[float, float] = (1.5, 3.0)
    pleural_depth: tuple[float, float] = (0.45, 0.9)
    sub3_per_scan: tuple[int, int] = (0, 3)
    nonnodules_per_scan: tuple[int, int] = (0, 3)


DEFAULT_PARAMS = LesionParams()


@dataclasses.dataclass(frozen=True)
class Lesion:
    """One nodule or excluded finding, placed (canonical mm of the grid it was placed on).

    Attributes:
        centre: `(3,)` (x, y, z).
        diameter: the annotated diameter (mm); -1 for a non-nodule.
        texture: one of TEXTURES, or "scar" / "plug" / "sub3" for excluded findings.
        site: one of SITES.
        parts: (semi_axes `(3,)`, rotation `[3, 3]`, centre offset `(3,)`, HU, edge mm,
            lobulation) per painted ellipsoid, halo first.
        spicules: float64 `[S, 2, 3]` segment ends of thin spicules (solid nodules only).
    """

    centre: np.ndarray
    diameter: float
    texture: str
    site: str
    parts: tuple
    spicules: np.ndarray


def sample_diameters(rng: np.random.Generator, n: int, params: LesionParams = DEFAULT_PARAMS):
    """`n` nodule diameters (mm) from the truncated log-normal, float64 `[n]`."""
    lo, hi = params.diameter_range
    out = np.empty(0)
    while out.size < n:
        draw = np.exp(
            rng.normal(np.log(params.diameter_median_mm), params.diameter_log_sd, 2 * n + 4)
        )
        out = np.concatenate([out, draw[(draw >= lo) & (draw <= hi)]])
    return out[:n]


def _texture(rng: np.random.Generator, d: float, params: LesionParams) -> str:
    texture = TEXTURES[int(rng.choice(3, p=np.asarray(params.texture_probs)))]
    if texture == "part-solid" and d < params.part_solid_min_mm:
        texture = "ground-glass"
    return texture


def _nodule_parts(rng: np.random.Generator, d: float, texture: str, params: LesionParams):
    """The painted ellipsoids of one nodule, and its spicules' directions and lengths."""
    rot = anat.random_rotation(rng)
    # Small nodules stay near-spherical; larger ones are stretched at constant volume.
    stretch = rng.uniform(0.8, 1.25, 3) if d >= 6.0 else rng.uniform(0.92, 1.08, 3)
    stretch /= np.prod(stretch) ** (1 / 3)
    axes = 0.5 * d * stretch
    zero = np.zeros(3)
    if texture == "solid":
        lob = rng.uniform(0.0, 0.12) if d >= 8.0 else 0.0
        edge = rng.uniform(*params.solid_edge_mm)
        return ((axes, rot, zero, rng.uniform(*params.solid_hu), edge, lob),)
    halo = (axes, rot, zero, rng.uniform(*params.ggo_hu), rng.uniform(*params.ggo_edge_mm), 0.0)
    if texture == "ground-glass":
        return (halo,)
    core = rng.uniform(0.3, 0.6)
    offset = rng.uniform(-0.15, 0.15, 3) * 0.5 * d  # cores sit off-centre in real lesions
    core_axes = np.maximum(axes * core, 1.2)
    edge = rng.uniform(*params.solid_edge_mm)
    return (halo, (core_axes, rot, offset, rng.uniform(*params.solid_hu), edge, 0.0))


def _spicules(rng: np.random.Generator, centre: np.ndarray, d: float) -> np.ndarray:
    """0..8 thin lines radiating from a solid nodule of >= 8 mm (40% of them), `[S, 2, 3]`."""
    if d < 8.0 or rng.random() >= 0.4:
        return np.zeros((0, 2, 3))
    n = int(rng.integers(3, 9))
    u = rng.normal(size=(n, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    inner = centre + 0.35 * d * u
    outer = centre + (0.5 + rng.uniform(0.3, 0.8, (n, 1))) * d * u
    return np.stack([inner, outer], axis=1)


def _site_candidates(rng, labels, spacing, r: float, site: str, params, n: int = 768):
    """Random lung points where a nodule of radius `r` may sit for `site`, `[M, 3]`."""
    pts = anat.random_lung_points(rng, labels, spacing, n)
    if pts.shape[0] == 0:
        return pts
    if site == "juxta-pleural":
        lo, hi = params.pleural_depth
        # Inside a ball of lo * r but not of hi * r: the wall lies between lo * r and hi * r
        # from the centre, so the nodule's surface reaches past it into the chest wall.
        ok = anat.ball_inside(labels, spacing, pts, lo * r)
        ok &= ~anat.ball_inside(labels, spacing, pts, hi * r)
        return pts[ok]
    return pts[anat.ball_inside(labels, spacing, pts, r + 2.0)]


def _juxta_vascular(rng, labels, spacing, r: float, tubes: anat.Tubes, taken) -> np.ndarray | None:
    """A centre touching a vessel of radius 0.6..2.5 mm, clear of the wall, or None."""
    ok = np.flatnonzero((tubes.radius >= 0.6) & (tubes.radius <= 2.5))
    if ok.size == 0:
        return None
    for seg in rng.choice(ok, size=min(64, ok.size), replace=False):
        a, b, rv = tubes.a[seg], tubes.b[seg], tubes.radius[seg]
        axis = (b - a) / max(np.linalg.norm(b - a), 1e-6)
        side = np.cross(axis, rng.normal(size=3))
        side /= max(np.linalg.norm(side), 1e-6)
        # Centre at 0.75..0.95 of (r + rv) from the centreline: the two overlap a little.
        centre = 0.5 * (a + b) + side * (r + rv) * rng.uniform(0.75, 0.95)
        if not anat.ball_inside(labels, spacing, centre[None], r + 1.5)[0]:
            continue
        if all(np.linalg.norm(centre - c) > rr + r + 2.0 for c, rr in taken):
            return centre
    return None


def place_nodules(
    rng: np.random.Generator,
    labels: np.ndarray,
    spacing,
    diameters,
    tubes: anat.Tubes,
    params: LesionParams = DEFAULT_PARAMS,
) -> list[Lesion]:
    """Places and shapes nodules of the given diameters (big ones first: they fit).

    A nodule that does not fit at its drawn site tries isolated, then shrinks by 0.85 per try
    down to `diameter_range[0]`, then is left out.
    """
    taken: list[tuple[np.ndarray, float]] = []
    out = []
    for d in sorted((float(v) for v in diameters), reverse=True):
        texture = _texture(rng, d, params)
        site = SITES[int(rng.choice(3, p=np.asarray(params.site_probs)))]
        centre = None
        while centre is None:
            r = 0.5 * d
            for s in dict.fromkeys((site, "isolated")):
                if s == "juxta-vascular":
                    centre = _juxta_vascular(rng, labels, spacing, r, tubes, taken)
                else:
                    cands = _site_candidates(rng, labels, spacing, r, s, params)
                    far = [np.linalg.norm(cands - c, axis=1) > rr + r + 2.0 for c, rr in taken]
                    cands = cands[np.all(far, axis=0)] if far else cands
                    if len(cands) and s == "isolated" and len(tubes):
                        # Isolated: the candidate with the most room from the vessels.
                        clear = distance_to_tubes(cands[:48], tubes)
                        cands = cands[[int(np.argmax(clear))]]
                    centre = cands[0] if len(cands) else None
                if centre is not None:
                    site = s
                    break
            if centre is None:
                if d * 0.85 < params.diameter_range[0]:
                    break
                d *= 0.85
        if centre is None:
            continue
        taken.append((centre, 0.5 * d))
        parts = _nodule_parts(rng, d, texture, params)
        spic = _spicules(rng, centre, d) if texture == "solid" else np.zeros((0, 2, 3))
        out.append(Lesion(centre, round(d, 2), texture, site, parts, spic))
    return out


def place_excluded(
    rng: np.random.Generator,
    labels: np.ndarray,
    spacing,
    nodules: list[Lesion],
    params: LesionParams = DEFAULT_PARAMS,
) -> list[Lesion]:
    """Sub-3-mm nodules (with their diameter) and non-nodules (scars, plugs; diameter -1)."""
    taken = [(n.centre, 0.5 * n.diameter) for n in nodules]
    kinds = ["sub3"] * int(rng.integers(*params.sub3_per_scan))
    kinds += [
        ("scar", "plug")[int(rng.integers(2))]
        for _ in range(int(rng.integers(*params.nonnodules_per_scan)))
    ]
    out = []
    for kind in kinds:
        if kind == "sub3":
            d = float(rng.uniform(1.5, 2.9))
            axes = np.full(3, 0.5 * d)
        elif kind == "scar":  # a flat, irregular opacity
            s = rng.uniform(2.0, 4.5)
            axes, d = np.array([1.6 * s, s, 0.35 * s]), -1.0
        else:  # a mucus-plugged bronchiole: a short thick tube
            s = rng.uniform(1.0, 1.8)
            axes, d = np.array([2.8 * s, s, s]), -1.0
        reach = float(axes.max())
        cands = anat.random_lung_points(rng, labels, spacing, 256)
        cands = (
            cands[anat.ball_inside(labels, spacing, cands, reach + 1.0)] if len(cands) else cands
        )
        far = [np.linalg.norm(cands - c, axis=1) > rr + reach + 3.0 for c, rr in taken]
        cands = cands[np.all(far, axis=0)] if far and len(cands) else cands
        if not len(cands):
            continue
        centre = cands[0]
        hu = rng.uniform(-20.0, 80.0) if kind != "scar" else rng.uniform(-300.0, -60.0)
        edge = rng.uniform(0.4, 1.0)
        part = (axes, anat.random_rotation(rng), np.zeros(3), hu, edge, 0.0)
        taken.append((centre, reach))
        out.append(
            Lesion(
                centre,
                round(d, 2) if d > 0 else -1.0,
                kind,
                "isolated",
                (part,),
                np.zeros((0, 2, 3)),
            )
        )
    return out


def paint(hu: np.ndarray, spacing, lesion: Lesion) -> None:
    """Paints a lesion's ellipsoids into `hu` (float32, in place) with maximum blending."""
    sp = np.asarray(spacing, np.float64)
    for axes, rot, offset, value, edge, lob in lesion.parts:
        centre = lesion.centre + offset
        reach = float(np.max(axes)) * (1.0 + lob) + edge
        lo = np.maximum(np.floor((centre - reach) / sp).astype(int), 0)[::-1]  # (z, y, x)
        hi = np.minimum(np.ceil((centre + reach) / sp).astype(int) + 1, hu.shape[::-1])[::-1]
        if np.any(hi <= lo):
            continue
        zz, yy, xx = (np.arange(lo[i], hi[i]) * sp[2 - i] for i in range(3))
        grid = np.broadcast_arrays(xx[None, None, :], yy[None, :, None], zz[:, None, None])
        v = np.stack(grid, -1) - centre  # [d, h, w, 3] (x, y, z) mm
        u = v @ rot
        rad = np.sqrt(np.sum((u / axes) ** 2, axis=-1))  # 1 on the surface
        if lob:
            rad = rad / (1.0 + lob * np.cos(3.0 * np.arctan2(u[..., 1], u[..., 0])))
        norm = np.linalg.norm(v, axis=-1)
        # Signed distance along the ray from the centre (exact for spheres, close otherwise).
        sd = np.where(rad > 1e-3, norm - norm / np.maximum(rad, 1e-3), -float(np.min(axes)))
        occ = np.clip(0.5 - sd / edge, 0.0, 1.0).astype(np.float32)
        box = hu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        np.maximum(box, box + occ * (np.float32(value) - box), out=box)

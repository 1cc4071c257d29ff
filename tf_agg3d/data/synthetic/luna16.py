r"""Synthetic LUNA16: chest CT scans with nodules and vessels, written in the exact LUNA16 layout.

Real LUNA16 is not available on every machine; this generator writes a stand-in that every
reader, test and the demo can use as if it were the real data:

    OUT/subset0..subset9/<seriesuid>.mhd + .raw        int16 HU, MET_SHORT (SimpleITK)
    OUT/seg-lungs-LUNA16/<seriesuid>.mhd + .zraw       uint8 mask, compressed: 0 background,
                                                       3 and 4 the lungs, 5 the trachea
    OUT/annotations.csv           seriesuid,coordX,coordY,coordZ,diameter_mm   (world mm)
    OUT/annotations_excluded.csv  the same columns; -1 diameters for non-nodule findings
    OUT/candidates.csv            seriesuid,coordX,coordY,coordZ,class
    OUT/seriesuids.csv            one seriesuid per line, no header

Scan i goes to subset `i % 10`, so 10-fold cross-validation works on any number of scans.

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

Coordinates: arrays are (z, y, x); world points are (x, y, z) mm with
`world = origin + direction @ (spacing * (ix, iy, iz))`, SimpleITK's convention. The anatomy is
drawn in a canonical (identity-direction) frame and the stored array is flipped along the
axes whose direction is -1, with the origin moved to the voxel that becomes index 0; the
anatomy thus has the same world geometry whatever the direction, and a reader that ignores the
direction puts the annotations in the wrong place.

Determinism: the same seed, scan count and shape give byte-identical files. Scan i draws from
`SeedSequence(seed).spawn(n + 1)[i + 1]`; which scans are negative or flipped is drawn from
child 0 so that every set of two or more scans has a flipped one and every set of five or
more a negative one.

Writing (:mod:`tf_agg3d.data.synthetic.writers`): every file is written to a temporary name and
renamed into place. A MetaImage pair is written by SimpleITK into a private temporary folder
beside its target under the final file names (the `.mhd` names its data file, so the pair
cannot be renamed to a new stem), then the data file and, last, the header are renamed into
place: a reader that finds a `.mhd` finds its complete data file. Files whose bytes would not
change are left untouched (a re-run with the same arguments is a no-op on disk). The lung
mask is written before its scan, the CSVs after all scans and `seriesuids.csv` last. Scans in
the layout folders that the new dataset does not contain are refused (FileExistsError) unless
`overwrite`, which deletes exactly those files.

Usage (flags: :mod:`tf_agg3d.cli.synthetic`):
  python -m tf_agg3d.data.synthetic --out DIR --n-scans N --seed S [--shape D,H,W] [--overwrite]
"""

from __future__ import annotations

import dataclasses
import glob
import os
import time
from collections.abc import Sequence

import numpy as np

from tf_agg3d.data.synthetic import anatomy as anat
from tf_agg3d.data.synthetic.writers import (
    check_generator_arguments,
    write_metaimage,
    write_text_if_changed,
)

UID_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001."
N_SUBSETS = 10
MASK_DIR = "seg-lungs-LUNA16"
ANNOTATION_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm"
CANDIDATE_HEADER = "seriesuid,coordX,coordY,coordZ,class"
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FLIPS = ((1, 1, -1), (-1, 1, 1), (-1, -1, 1), (1, -1, 1))
"""Axis flips (diagonals of the direction) that flipped scans are written with."""
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


def _diag(direction: Sequence[float]) -> tuple[int, int, int]:
    m = np.asarray(direction, np.float64).reshape(3, 3)
    diag = np.diag(m)
    if not (np.allclose(m, np.diag(diag)) and np.allclose(np.abs(diag), 1.0)):
        raise ValueError(f"direction must be diagonal with entries +-1 (axis flips), got {m}")
    return tuple(int(round(v)) for v in diag)


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
            probability 1/4 one of `FLIPS`.
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
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be (D, H, W) with every size >= 16, got {shape}")
    if spacing is None:
        in_plane = round(float(rng.uniform(0.6, 0.9)), 4)
        spacing = (in_plane, in_plane, float(rng.choice(SLICE_SPACINGS)))
    spacing = tuple(float(s) for s in spacing)
    if direction is None:
        flip = FLIPS[int(rng.integers(len(FLIPS)))] if rng.random() < 0.25 else (1, 1, 1)
    else:
        flip = _diag(direction)
    if origin is None:
        origin = tuple(
            round(float(v), 3)
            for v in (rng.uniform(-200, -100), rng.uniform(-200, -100), rng.uniform(-400, -50))
        )
    origin = tuple(float(v) for v in origin)
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
        # Outside the reconstruction circle real scanners write a padding value, not air.
        _, y, x = anat.voxel_axes(shape, spacing)
        cy, cx = (shape[1] - 1) * spacing[1] / 2, (shape[2] - 1) * spacing[0] / 2
        radius = min(cx, cy)
        hu[:, ((y[0] - cy) ** 2 + (x[0] - cx) ** 2) > radius**2] = -2000.0
    volume = np.clip(np.rint(hu), -3024, 3071).astype(np.int16)

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

    # Stored order: flip the axes whose direction is -1; the stored origin is the world
    # position of the voxel that becomes index 0, so canonical mm p maps to world
    # canonical_origin + p on every axis.
    flip_arr = np.asarray(flip, np.float64)
    sp = np.asarray(spacing, np.float64)
    extent = sp * (np.asarray(shape[::-1], np.float64) - 1)  # (x, y, z) mm
    canonical_origin = np.asarray(origin) - np.where(flip_arr < 0, extent, 0.0)
    mask = labels
    for axis_xyz, f in enumerate(flip):
        if f < 0:
            volume = np.flip(volume, axis=2 - axis_xyz)
            mask = np.flip(mask, axis=2 - axis_xyz)

    def world(p: np.ndarray) -> tuple[float, ...]:
        return tuple(float(v) for v in canonical_origin + p)

    return SyntheticScan(
        volume=np.ascontiguousarray(volume),
        lung_mask=np.ascontiguousarray(mask),
        origin=origin,
        spacing=spacing,
        direction=tuple(float(v) for v in np.diag(flip_arr).reshape(-1)),
        nodules=tuple((*world(c), float(d)) for c, d, *_ in nodules),
        nodule_kinds=tuple(kind for _, _, kind, *_ in nodules),
        excluded=tuple((*world(c), float(d)) for c, d, *_ in excluded)
        + tuple((*world(c), -1.0) for c in vessel_excluded),
        vessel_points=tuple(world(p) for p in vessel_sites),
        lung_points=tuple(world(p) for p in lung_sites),
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


def _uid(rng: np.random.Generator) -> str:
    digits = rng.integers(0, 10, size=30)
    digits[0] = rng.integers(1, 10)  # DICOM UID components have no leading zero
    return UID_PREFIX + "".join(str(int(d)) for d in digits)


def _fmt(v: float) -> str:
    v = float(v)
    return "-1" if v == -1.0 else f"{v:.6f}"


def _layout_scans(out_dir: str) -> dict[str, list[str]]:
    """uid -> existing files of that uid in the layout folders."""
    found: dict[str, list[str]] = {}
    folders = [f"subset{k}" for k in range(N_SUBSETS)] + [MASK_DIR]
    for folder in folders:
        for path in glob.glob(os.path.join(glob.escape(out_dir), folder, "*")):
            stem, ext = os.path.splitext(os.path.basename(path))
            if ext in (".mhd", ".raw", ".zraw"):
                found.setdefault(stem, []).append(path)
    return found


def generate_dataset(
    out_dir: str,
    n_scans: int,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    overwrite: bool = False,
    negative_fraction: float = 0.2,
    flipped_fraction: float = 0.25,
    verbose: bool = False,
) -> dict:
    """Writes a synthetic dataset in the LUNA16 layout (see the module docstring).

    Args:
        out_dir: local folder (created if needed).
        n_scans: number of scans (>= 1); scan i goes to subset `i % 10`.
        seed: non-negative seed; the same seed, count and shape give identical files.
        shape: (D, H, W) for every scan; default 256 x 256 and 100..140 slices per scan.
        overwrite: delete scans in the layout folders that this dataset does not contain
            (otherwise they are refused: the CSVs would not describe them).
        negative_fraction: share of patients without nodules (at least one when n >= 5).
        flipped_fraction: share of scans with a flipped direction (at least one when n >= 2).
        verbose: print one line per scan.

    Returns:
        A JSON-serialisable summary: `uids` (in generation order), `subset` (uid -> int),
        `nodules` (uid -> list of {x, y, z, d, kind}, world mm), `n_nodules`, `negative_uids`,
        `flipped_uids`, `origin` / `spacing` (uid -> x, y, z mm), `direction` (uid -> 9 floats),
        `shape` (uid -> [D, H, W]), `seed`, `out_dir`, `seconds`.
    """
    check_generator_arguments(out_dir, "n_scans", n_scans, seed)
    start = time.time()
    children = np.random.SeedSequence(seed).spawn(n_scans + 1)
    plan = np.random.default_rng(children[0])
    n_neg = int(round(negative_fraction * n_scans))
    n_neg = max(n_neg, 1) if n_scans >= 5 else n_neg
    n_flip = int(round(flipped_fraction * n_scans))
    n_flip = max(n_flip, 1) if n_scans >= 2 else n_flip
    negatives = set(plan.choice(n_scans, size=min(n_neg, n_scans), replace=False).tolist())
    flipped = set(plan.choice(n_scans, size=min(n_flip, n_scans), replace=False).tolist())
    flips = [FLIPS[int(plan.integers(len(FLIPS)))] for _ in range(n_scans)]
    counts = [int(plan.integers(1, 4)) for _ in range(n_scans)]

    rngs = [np.random.default_rng(c) for c in children[1:]]
    uids = [_uid(r) for r in rngs]
    if len(set(uids)) != len(uids):  # 30 random digits: never in practice, but be sure
        raise RuntimeError("synthetic seriesuid collision; use another seed")

    os.makedirs(out_dir, exist_ok=True)
    stale = {u: files for u, files in _layout_scans(out_dir).items() if u not in set(uids)}
    if stale:
        if not overwrite:
            raise FileExistsError(
                f"{out_dir} holds {len(stale)} scan(s) that this dataset does not contain "
                f"(e.g. {sorted(stale)[0]}); choose an empty folder or pass overwrite "
                "(--overwrite) to delete them"
            )
        for files in stale.values():
            for path in files:
                os.remove(path)

    annotations, excluded, candidates = [], [], []
    summary = {
        "out_dir": os.path.abspath(out_dir),
        "seed": int(seed),
        "uids": uids,
        "subset": {},
        "nodules": {},
        "negative_uids": [],
        "flipped_uids": [],
        "origin": {},
        "spacing": {},
        "direction": {},
        "shape": {},
    }
    for i, (uid, rng) in enumerate(zip(uids, rngs, strict=True)):
        t0 = time.time()
        flip = flips[i] if i in flipped else (1, 1, 1)
        scan = synthesize_scan(
            rng,
            shape=shape,
            direction=np.diag(np.asarray(flip, np.float64)).reshape(-1),
            n_nodules=0 if i in negatives else counts[i],
        )
        subset = i % N_SUBSETS
        write_metaimage(
            os.path.join(out_dir, MASK_DIR, f"{uid}.mhd"),
            scan.lung_mask,
            scan.origin,
            scan.spacing,
            scan.direction,
            compress=True,
        )
        write_metaimage(
            os.path.join(out_dir, f"subset{subset}", f"{uid}.mhd"),
            scan.volume,
            scan.origin,
            scan.spacing,
            scan.direction,
        )
        for x, y, z, d in scan.nodules:
            annotations.append((uid, x, y, z, d))
        for x, y, z, d in scan.excluded:
            excluded.append((uid, x, y, z, d))
        rows = []
        for x, y, z, d in scan.nodules:
            rows.append((x, y, z, 1))
            for _ in range(int(rng.integers(0, 3))):  # detector-like duplicates near the centre
                jx, jy, jz = rng.uniform(-0.25, 0.25, 3) * d / np.sqrt(3)
                rows.append((x + jx, y + jy, z + jz, 1))
        rows += [(x, y, z, 0) for x, y, z in scan.vessel_points + scan.lung_points]
        rows += [(x, y, z, 0) for x, y, z, _ in scan.excluded]
        for j in rng.permutation(len(rows)):
            candidates.append((uid, *rows[j]))
        summary["subset"][uid] = subset
        summary["nodules"][uid] = [
            {"x": x, "y": y, "z": z, "d": d, "kind": k}
            for (x, y, z, d), k in zip(scan.nodules, scan.nodule_kinds, strict=True)
        ]
        if not scan.nodules:
            summary["negative_uids"].append(uid)
        if flip != (1, 1, 1):
            summary["flipped_uids"].append(uid)
        summary["origin"][uid] = list(scan.origin)
        summary["spacing"][uid] = list(scan.spacing)
        summary["direction"][uid] = list(scan.direction)
        summary["shape"][uid] = list(scan.volume.shape)
        if verbose:
            print(
                f"[{i + 1}/{n_scans}] subset{subset}/{uid}: shape {scan.volume.shape}, spacing "
                f"{scan.spacing}, flip {flip}, {len(scan.nodules)} nodule(s), "
                f"{time.time() - t0:.1f} s",
                flush=True,
            )

    def table(header: str, rows, last) -> str:
        lines = [header]
        lines += [",".join([r[0], *(_fmt(v) for v in r[1:4]), last(r[4])]) for r in rows]
        return "\n".join(lines) + "\n"

    # The per-scan files are complete before the tables that name them; seriesuids.csv last.
    tables = (
        ("annotations.csv", ANNOTATION_HEADER, annotations, _fmt),
        ("annotations_excluded.csv", ANNOTATION_HEADER, excluded, _fmt),
        ("candidates.csv", CANDIDATE_HEADER, candidates, lambda c: str(int(c))),
    )
    for name, header, rows, last in tables:
        write_text_if_changed(os.path.join(out_dir, name), table(header, rows, last))
    seriesuids = "".join(f"{u}\n" for u in uids)
    write_text_if_changed(os.path.join(out_dir, "seriesuids.csv"), seriesuids)
    summary["n_nodules"] = len(annotations)
    summary["seconds"] = round(time.time() - start, 2)
    return summary

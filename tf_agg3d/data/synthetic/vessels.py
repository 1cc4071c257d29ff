"""Dense pulmonary vessel trees for the realistic synthetic LUNA16 profile.

The default profile's trees (:func:`tf_agg3d.data.synthetic.anatomy.grow_vessel_trees`) are a
few dozen random walks of 1.5..4 mm: enough to look like vessels, too sparse to make the
detector's job hard. Real lungs are filled by two interleaved trees (arteries and veins) that
branch from the hilum down to sub-millimetre twigs; in a 16..32 mm window a vessel cut across,
a bifurcation or a curve looks like a small nodule, and that is where real detectors put most
of their false positives (the paper's Fig. 1). This module grows such trees:

- roots leave each hilum (two slightly different start points: arteries and veins) with a
  radius of ``root_radius_mm`` and head for random points of their lung;
- a branch runs ``length_per_radius`` times its radius with a persistent random heading, pulled
  towards its own target point in the lung (so the tree spreads over the whole lung instead of
  bunching), then splits in two (sometimes three) children whose radii follow Murray's law
  (r^3 = sum r_i^3) with an asymmetry, at 20..60 degrees from the parent;
- a branch stops where it leaves its lung or its radius falls below ``min_radius_mm``.

All coordinates are the canonical frame of :mod:`tf_agg3d.data.synthetic.anatomy` ((x, y, z)
mm from the centre of voxel 0), on whatever grid the labels are given (the realistic profile
grows on its fine, partial-volume grid).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tf_agg3d.data.synthetic import anatomy as anat


@dataclasses.dataclass(frozen=True)
class VesselParams:
    """How dense, thick and long the trees are (the realistic profile's defaults).

    Attributes:
        roots_per_hilum: [low, high) roots per start point; each lung has two start points
            (arteries and veins).
        root_radius_mm: (low, high) radius of a root.
        min_radius_mm: branches thinner than this are not grown (about the smallest vessel a
            0.7 mm CT voxel still shows as a faint line).
        length_per_radius: (low, high) branch length in radii before it splits.
        murray_asymmetry: (low, high) share of the parent's r^3 that the larger child takes.
        taper: radius at a branch's end relative to its start.
        step_mm: centreline sampling step.
        wander: per-step standard deviation of the heading's random turn.
        pull: weight of the pull towards the branch's target point, per step.
        max_segments_per_lung: cap on one lung's segments (bounds time and memory).
        hu: (low, high) vessel HU (unenhanced blood).
    """

    roots_per_hilum: tuple[int, int] = (3, 5)
    root_radius_mm: tuple[float, float] = (2.6, 3.4)
    min_radius_mm: float = 0.35
    length_per_radius: tuple[float, float] = (7.0, 12.0)
    murray_asymmetry: tuple[float, float] = (0.5, 0.8)
    taper: float = 0.97
    step_mm: float = 0.8
    wander: float = 0.06
    pull: float = 0.12
    max_segments_per_lung: int = 60000
    hu: tuple[float, float] = (20.0, 60.0)


DEFAULT_PARAMS = VesselParams()


@dataclasses.dataclass(frozen=True)
class VesselTrees:
    """Grown trees: their segments, and points where they split.

    Attributes:
        tubes: the centreline segments and radii (canonical mm).
        bifurcations: float64 `[B, 3]` (x, y, z) canonical mm of the split points, with
            `bifurcation_radius` `[B]` the parent's radius there (nodule-like spots that
            candidates.csv lists as class-0 sites).
        bifurcation_radius: see `bifurcations`.
    """

    tubes: anat.Tubes
    bifurcations: np.ndarray
    bifurcation_radius: np.ndarray


def _rotate_away(u: np.ndarray, angle: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at `angle` radians from unit `u`, in a random plane containing `u`."""
    helper = rng.normal(size=3)
    perp = helper - np.dot(helper, u) * u
    norm = np.linalg.norm(perp)
    if norm < 1e-9:
        perp = np.array([1.0, 0.0, 0.0]) if abs(u[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
        perp -= np.dot(perp, u) * u
        norm = np.linalg.norm(perp)
    perp /= norm
    return np.cos(angle) * u + np.sin(angle) * perp


def _pick_target(
    rng: np.random.Generator, pool: np.ndarray, start: np.ndarray, heading: np.ndarray
) -> np.ndarray:
    """Among 12 random lung points, the one best ahead of `heading` from `start`."""
    cand = pool[rng.integers(0, len(pool), size=12)]
    rel = cand - start
    dist = np.maximum(np.linalg.norm(rel, axis=1), 1e-6)
    # Ahead and not too close: a target right beside the start would fold the branch back.
    score = rel @ heading / dist + 0.2 * np.minimum(dist / 30.0, 1.0)
    return cand[int(np.argmax(score))]


def grow_dense_trees(
    rng: np.random.Generator,
    labels: np.ndarray,
    spacing,
    hila: dict[int, np.ndarray],
    params: VesselParams = DEFAULT_PARAMS,
) -> VesselTrees:
    """Grows the arterial and venous trees of both lungs (see the module docstring).

    Args:
        rng: the scan's generator (all randomness; same generator state, same trees).
        labels: uint8 `[D, H, W]` lung labels of the grid the trees are grown on.
        spacing: (sx, sy, sz) mm of that grid.
        hila: lung label -> `(3,)` (x, y, z) canonical mm of its hilum.
        params: density, radii and lengths.

    Returns:
        The trees' segments and split points.
    """
    a_list, b_list, r_list, bif, bif_r = [], [], [], [], []
    for label, hilum in hila.items():
        pool = anat.random_lung_points(rng, labels, spacing, 4096, label)
        if pool.shape[0] == 0:
            continue
        # The nominal hilum may lie outside an oddly shaped lung: start from the lung point
        # nearest to it, and the second tree (veins) a little lower and further back.
        near = pool[np.argsort(np.sum((pool - hilum) ** 2, axis=1))[:64]]
        starts = [near[0], near[int(rng.integers(8, 64))]]
        queue: list[tuple[np.ndarray, np.ndarray, float, np.ndarray]] = []
        for start in starts:
            for _ in range(int(rng.integers(*params.roots_per_hilum))):
                target = pool[int(rng.integers(len(pool)))]
                heading = target - start
                heading /= max(np.linalg.norm(heading), 1e-6)
                queue.append(
                    (start.copy(), heading, float(rng.uniform(*params.root_radius_mm)), target)
                )
        total = 0
        head = 0
        # Breadth first (a FIFO by index): when the segment cap bites it trims the finest
        # twigs everywhere rather than whole late-grown trees.
        while head < len(queue) and total < params.max_segments_per_lung:
            start, heading, radius, target = queue[head]
            head += 1
            length = radius * rng.uniform(*params.length_per_radius)
            n = max(3, int(np.ceil(length / params.step_mm)))
            # Vectorised walk: the heading drifts (cumulated turns) and bends more and more
            # towards the target (the pull grows with the step count), so a branch curves
            # like a vessel and the tree spreads over the lung.
            to_target = target - start
            to_target /= max(np.linalg.norm(to_target), 1e-6)
            steps = np.arange(1, n + 1, dtype=np.float64)[:, None]
            dirs = heading + np.cumsum(rng.normal(0.0, params.wander, (n, 3)), axis=0)
            dirs += params.pull * steps * to_target
            dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
            pts = np.concatenate([start[None], start + np.cumsum(dirs * params.step_mm, axis=0)])
            u = dirs[-1]
            inside = anat.labels_at(labels, spacing, pts) == label
            inside[0] = True
            stop = len(pts) if inside.all() else int(np.argmin(inside))
            pts = pts[:stop]
            if len(pts) < 2:
                continue
            # Taper a little along the branch, as real vessels do between splits.
            radii = np.linspace(radius, params.taper * radius, len(pts))
            a_list.append(pts[:-1])
            b_list.append(pts[1:])
            r_list.append(0.5 * (radii[:-1] + radii[1:]))
            total += len(pts) - 1
            if stop < max(4, (n + 1) // 3):
                # Ran into the wall almost at once: a twig at the pleura, no children.
                continue
            # A branch that reaches the wall later still splits where it stopped: real vessels
            # turn away from the pleura rather than end, and the children aim back inside.
            end_r = float(radii[-1])
            n_children = 3 if rng.random() < 0.12 else 2
            share = rng.uniform(*params.murray_asymmetry)
            shares = [share, 1.0 - share] if n_children == 2 else list(rng.dirichlet([3, 2, 2]))
            child_r = [end_r * s ** (1.0 / 3.0) for s in shares]
            if max(child_r) < params.min_radius_mm:
                continue
            bif.append(pts[-1])
            bif_r.append(end_r)
            # The thinner child turns more (flow-optimal branching); opposite sides of u.
            for r_child in child_r:
                if r_child < params.min_radius_mm:
                    continue
                turn = (
                    rng.uniform(15.0, 35.0) if r_child == max(child_r) else rng.uniform(35.0, 65.0)
                )
                v = _rotate_away(u, np.deg2rad(turn), rng)
                child_target = _pick_target(rng, pool, pts[-1], v)
                queue.append((pts[-1].copy(), v, float(r_child), child_target))
    if not a_list:
        empty = np.zeros((0, 3))
        return VesselTrees(anat.Tubes(empty, empty, np.zeros((0,))), empty, np.zeros((0,)))
    tubes = anat.Tubes(np.concatenate(a_list), np.concatenate(b_list), np.concatenate(r_list))
    bif_arr = np.asarray(bif, np.float64).reshape(-1, 3)
    return VesselTrees(tubes, bif_arr, np.asarray(bif_r, np.float64))


def distance_to_tubes(points: np.ndarray, tubes: anat.Tubes, chunk: int = 4096) -> np.ndarray:
    """Distance `[P]` from each point `[P, 3]` to the nearest tube *surface* (negative inside).

    Chunked over segments so that thousands of points against tens of thousands of segments
    stay within a few hundred MB.
    """
    points = np.asarray(points, np.float64).reshape(-1, 3)
    best = np.full(points.shape[0], np.inf)
    for s in range(0, len(tubes), chunk):
        a, b, r = tubes.a[s : s + chunk], tubes.b[s : s + chunk], tubes.radius[s : s + chunk]
        ab = b - a
        ap = points[:, None, :] - a[None]
        t = np.clip(np.sum(ap * ab, -1) / np.maximum(np.sum(ab * ab, -1), 1e-12), 0.0, 1.0)
        d = np.linalg.norm(ap - t[..., None] * ab, axis=-1) - r[None]
        best = np.minimum(best, d.min(axis=1))
    return best

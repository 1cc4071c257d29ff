r"""The realistic profile of the synthetic LUNA16 generator, and the benchmark split.

The default profile (:mod:`tf_agg3d.data.synthetic.default_profile`) is easy by construction: sparse
vessels, isolated solid nodules kept 4 mm away from everything, point-sampled slices and mild
noise. A detector that scores 0.98 FROC there can score 0.1 on scans that are hard the way real
CT is hard. This profile draws those difficulties, on the same chest anatomy
(:func:`tf_agg3d.data.synthetic.anatomy.draw_chest`) and in the same LUNA16 layout:

- **dense vessel trees** (:mod:`tf_agg3d.data.synthetic.vessels`): arteries and veins branch
  from each hilum down to ~0.9 mm twigs, with bifurcations; cross-sections, bends and
  bifurcations look like small nodules in a local window, the main false-positive source;
- **nodules like LUNA16's** (:mod:`tf_agg3d.data.synthetic.lesions`): 3..30 mm, median ~7 mm
  (truncated log-normal); solid, part-solid and ground-glass; isolated, juxta-pleural and
  juxta-vascular; 1..4 per patient with nodules;
- **excluded findings** in annotations_excluded.csv: sub-3-mm nodules and non-nodules (scars,
  mucus plugs) that are in the image;
- **the scanner** (:mod:`tf_agg3d.data.synthetic.scanner`): the anatomy is drawn on slices
  `k` times thinner than the native ones (<= 0.7 mm) and averaged to the native thickness
  (partial volume), blurred by a Gaussian PSF of 0.5..1 mm and overlaid with correlated noise of
  20..40 HU; slices 0.625..2.5 mm, in-plane 0.5..0.9 mm, a field of view of 190..220 mm and
  150..185 mm of z (a chest a little smaller than an adult's, so scans stay small).

The benchmark split is by subset (scan i goes to subset `i % 10`, as in the default profile):
subsets 0-5 train, subsets 6-9 are held out. `generate_dataset` also writes the two lists,
`train_seriesuids.csv` and `heldout_seriesuids.csv` (one seriesuid per line, no header, like
`seriesuids.csv`), for `data.train_seriesuids` and `evaluate --seriesuids`, and
`nodule_types.csv` (annotations.csv's rows plus `texture,site` columns).
docs/benchmark.md has the commands and the calibration.

Determinism: same seed, scan count, shape and profile, same bytes (every draw comes from the
scan's own generator, in a fixed order; SimpleITK's filters are deterministic).

Usage:
  python -m tf_agg3d.data.synthetic --profile realistic --out DIR --n-scans 100 --seed 18
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from tf_agg3d.data.synthetic import anatomy as anat
from tf_agg3d.data.synthetic import lesions as les
from tf_agg3d.data.synthetic import luna16, scanner
from tf_agg3d.data.synthetic.scan_frame import (
    SyntheticScan,
    draw_pose,
    pad_outside_fov,
    stored_scan,
)
from tf_agg3d.data.synthetic.vessels import VesselParams, grow_dense_trees
from tf_agg3d.data.synthetic.writers import write_text_if_changed

TRAIN_SUBSETS = (0, 1, 2, 3, 4, 5)
HELDOUT_SUBSETS = (6, 7, 8, 9)
TRAIN_LIST = "train_seriesuids.csv"
HELDOUT_LIST = "heldout_seriesuids.csv"
NODULE_TYPES = "nodule_types.csv"
"""annotations.csv's rows with each nodule's texture and site (for per-type sensitivities)."""


@dataclasses.dataclass(frozen=True)
class RealisticProfile:
    """Every parameter of the realistic profile (docs/benchmark.md lists them).

    Attributes:
        fov_mm: (low, high) in-plane field of view; the pixel count is fov / spacing.
        z_extent_mm: (low, high) scanned length; the slice count is extent / slice spacing.
        in_plane_mm: (low, high) in-plane pixel spacing.
        slice_mm, slice_weights: native slice spacings (= thickness) and their probabilities.
        fine_slice_mm: the fine grid's largest slice step (partial volume is averaged from it).
        psf_sigma_mm: (low, high) in-plane Gaussian PSF sigma.
        noise_std_hu: (low, high) noise standard deviation.
        noise_grain_mm: (low, high) in-plane noise correlation sigma.
        padding_probability: share of scans with -2000 HU outside the reconstruction circle.
        nodules_per_scan: [low, high) nodules of a patient with nodules.
        vessels, lesions: the vessel-tree and lesion models.
    """

    fov_mm: tuple[float, float] = (190.0, 220.0)
    z_extent_mm: tuple[float, float] = (150.0, 185.0)
    in_plane_mm: tuple[float, float] = (0.5, 0.9)
    slice_mm: tuple[float, ...] = (0.625, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5)
    slice_weights: tuple[float, ...] = (0.12, 0.1, 0.1, 0.13, 0.15, 0.1, 0.15, 0.15)
    fine_slice_mm: float = 0.7
    psf_sigma_mm: tuple[float, float] = (0.5, 1.0)
    noise_std_hu: tuple[float, float] = (20.0, 40.0)
    noise_grain_mm: tuple[float, float] = (0.3, 0.6)
    padding_probability: float = 0.3
    nodules_per_scan: tuple[int, int] = (1, 5)
    vessels: VesselParams = VesselParams()
    lesions: les.LesionParams = les.LesionParams()


PROFILE = RealisticProfile()


def sample_spacing(rng: np.random.Generator, profile: RealisticProfile = PROFILE):
    """(sx, sy, sz) mm: in-plane uniform in `in_plane_mm`, slices from `slice_mm`."""
    in_plane = round(float(rng.uniform(*profile.in_plane_mm)), 4)
    weights = np.asarray(profile.slice_weights, np.float64)
    sz = float(profile.slice_mm[int(rng.choice(len(weights), p=weights / weights.sum()))])
    return (in_plane, in_plane, sz)


def synthesize_scan(
    rng: np.random.Generator,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    direction: Sequence[float] | None = None,
    n_nodules: int | None = None,
    diameters: Sequence[float] | None = None,
    profile: RealisticProfile = PROFILE,
) -> SyntheticScan:
    """Draws one realistic scan (the arguments are those of the default profile's).

    Args:
        rng: the generator all randomness is drawn from.
        shape: (D, H, W) native voxels; default from the profile's field of view and z extent.
        spacing: (sx, sy, sz) mm; default :func:`sample_spacing`.
        origin: (x, y, z) mm of stored voxel 0; default as in the default profile.
        direction: 9 floats, diagonal +-1; default identity or, with probability 1/4, a flip.
        n_nodules: nodules; default 0 with probability 0.2, else `nodules_per_scan`.
        diameters: nodule diameters in mm (overrides `n_nodules`); default the profile's
            truncated log-normal. Nodules that do not fit are shrunk or left out.
        profile: the profile's parameters.

    Returns:
        The scan in stored order, findings in world mm; `nodule_kinds` holds the texture and
        `nodule_sites` the site of each nodule.
    """
    if spacing is None:
        spacing = sample_spacing(rng, profile)
    spacing = tuple(float(s) for s in spacing)
    if shape is None:
        side = 2 * int(round(rng.uniform(*profile.fov_mm) / spacing[0] / 2))
        shape = (int(round(rng.uniform(*profile.z_extent_mm) / spacing[2])), side, side)
    shape, flip, origin = draw_pose(rng, shape, direction, origin)
    if diameters is None:
        if n_nodules is None:
            n_nodules = 0 if rng.random() < 0.2 else int(rng.integers(*profile.nodules_per_scan))
        diameters = les.sample_diameters(rng, n_nodules, profile.lesions)

    # The fine grid: k thin slices per native slice, drawn as one volume.
    k = scanner.fine_factor(spacing[2], profile.fine_slice_mm)
    fine_shape = (shape[0] * k, shape[1], shape[2])
    fine_sp = (spacing[0], spacing[1], spacing[2] / k)
    chest = anat.draw_chest(rng, fine_shape, fine_sp)
    hu, labels = chest.hu, chest.labels
    trees = grow_dense_trees(rng, labels, fine_sp, chest.hila, profile.vessels)
    nodules = les.place_nodules(rng, labels, fine_sp, diameters, trees.tubes, profile.lesions)
    excluded = les.place_excluded(rng, labels, fine_sp, nodules, profile.lesions)

    # Vessels (and the spicules of solid nodules, soft tissue too) in one pass.
    spic = [n.spicules for n in nodules if len(n.spicules)]
    tubes = trees.tubes
    if spic:
        ends = np.concatenate(spic)
        radius = rng.uniform(0.3, 0.5, len(ends))
        tubes = anat.Tubes(
            np.concatenate([tubes.a, ends[:, 0]]),
            np.concatenate([tubes.b, ends[:, 1]]),
            np.concatenate([tubes.radius, radius]),
        )
    occ = anat.render_tubes(fine_shape, fine_sp, tubes)
    lungs = np.isin(labels, anat.LUNG_LABELS)
    occ *= lungs  # vessels end at the pleura
    hu += occ * (np.float32(rng.uniform(*profile.vessels.hu)) - hu)
    del occ
    for lesion in nodules + excluded:
        les.paint(hu, fine_sp, lesion)

    native = scanner.acquire(
        rng,
        hu,
        k,
        spacing,
        psf_sigma_mm=float(rng.uniform(*profile.psf_sigma_mm)),
        noise_std_hu=float(rng.uniform(*profile.noise_std_hu)),
        noise_grain_mm=float(rng.uniform(*profile.noise_grain_mm)),
    )
    del hu
    # The mask of native slice j: the fine slice nearest its centre.
    mask = np.ascontiguousarray(labels[k // 2 :: k])
    if rng.random() < profile.padding_probability:
        pad_outside_fov(native, spacing)

    # Class-0 candidate sites: bifurcations of visible vessels and random lung points.
    thick = np.flatnonzero(trees.bifurcation_radius >= 0.8)
    pick = rng.choice(thick, size=min(thick.size, int(rng.integers(15, 31))), replace=False)
    vessel_sites = trees.bifurcations[np.sort(pick)] if thick.size else np.zeros((0, 3))
    lung_sites = anat.random_lung_points(rng, labels, fine_sp, int(rng.integers(8, 16)))
    for n in nodules:
        lung_sites = lung_sites[
            np.linalg.norm(lung_sites - n.centre, axis=1) > 0.5 * n.diameter + 2
        ]

    # The findings are in fine-grid mm; native slice 0's centre lies above fine slice 0's.
    return stored_scan(
        native,
        mask,
        spacing,
        origin,
        flip,
        nodules=[(n.centre, n.diameter) for n in nodules],
        nodule_kinds=[n.texture for n in nodules],
        excluded=[(e.centre, e.diameter) for e in excluded],
        vessel_points=vessel_sites,
        lung_points=lung_sites,
        nodule_sites=[n.site for n in nodules],
        z_shift_mm=scanner.fine_z_offset(spacing[2], k),
    )


def split_of(subset: int) -> str:
    """ "train" or "heldout" for a LUNA16 subset number (the benchmark split)."""
    return "heldout" if int(subset) in HELDOUT_SUBSETS else "train"


def generate_dataset(
    out_dir: str, n_scans: int, profile: RealisticProfile = PROFILE, **options
) -> dict:
    """Writes a realistic synthetic LUNA16 set and its benchmark split lists.

    The layout, determinism and writing rules are those of
    :func:`tf_agg3d.data.synthetic.luna16.generate_dataset`; besides, `train_seriesuids.csv`
    and `heldout_seriesuids.csv` list the scans of subsets 0-5 and 6-9, and
    `nodule_types.csv` repeats annotations.csv with each nodule's texture and site.

    Args:
        out_dir, n_scans: as in `luna16.generate_dataset`.
        profile: the profile's parameters.
        **options: `luna16.generate_dataset`'s further keyword arguments (`seed`, `shape`,
            `overwrite`, `verbose`, ...), save the scan synthesis and nodule count, which
            are the profile's.

    Returns:
        The summary of `luna16.generate_dataset` (each nodule with its `kind` and `site`),
        plus `profile` ("realistic") and `split` ({"train": uids, "heldout": uids,
        "heldout_nodules": count}).
    """

    def synthesize(rng, **kwargs):
        return synthesize_scan(rng, profile=profile, **kwargs)

    summary = luna16.generate_dataset(
        out_dir,
        n_scans,
        synthesize=synthesize,
        nodules_per_scan=profile.nodules_per_scan,
        **options,
    )
    split = {"train": [], "heldout": []}
    for uid in summary["uids"]:
        split[split_of(summary["subset"][uid])].append(uid)
    for name, key in ((TRAIN_LIST, "train"), (HELDOUT_LIST, "heldout")):
        text = "".join(f"{u}\n" for u in split[key])
        write_text_if_changed(os.path.join(out_dir, name), text)
    # Same rows and number format as annotations.csv (generation order), plus the types.
    lines = [luna16.ANNOTATION_HEADER + ",texture,site"]
    for uid in summary["uids"]:
        for n in summary["nodules"][uid]:
            xyzd = ",".join(luna16._fmt(n[k]) for k in ("x", "y", "z", "d"))
            lines.append(f"{uid},{xyzd},{n['kind']},{n['site']}")
    write_text_if_changed(os.path.join(out_dir, NODULE_TYPES), "\n".join(lines) + "\n")
    split["heldout_nodules"] = sum(len(summary["nodules"][u]) for u in split["heldout"])
    summary["profile"] = "realistic"
    summary["split"] = split
    return summary

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

What a scan holds is its profile's: the default profile
(:mod:`tf_agg3d.data.synthetic.default_profile`, easy: sparse vessels, isolated nodules) or the
realistic one (:mod:`tf_agg3d.data.synthetic.realistic`, `--profile realistic`: dense vessel
trees, ground-glass / juxta-pleural / juxta-vascular nodules, partial volume). Coordinates
follow :mod:`tf_agg3d.data.synthetic.scan_frame`: a reader that ignores the direction puts the
annotations in the wrong place.

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
      [--profile default|realistic]
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from tf_agg3d.data.synthetic.default_profile import synthesize_scan
from tf_agg3d.data.synthetic.scan_frame import FLIPS, SyntheticScan
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
    synthesize: Callable[..., SyntheticScan] | None = None,
    nodules_per_scan: tuple[int, int] = (1, 4),
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
        synthesize: draws one scan, called as `synthesize(rng, shape=, direction=,
            n_nodules=)`; default the default profile's
            :func:`tf_agg3d.data.synthetic.default_profile.synthesize_scan` (the realistic
            profile passes its own, :mod:`tf_agg3d.data.synthetic.realistic`).
        nodules_per_scan: [low, high) nodule count of a patient with nodules.

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
    counts = [int(plan.integers(*nodules_per_scan)) for _ in range(n_scans)]
    synthesize = synthesize_scan if synthesize is None else synthesize

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
        scan = synthesize(
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
        for row, site in zip(summary["nodules"][uid], scan.nodule_sites, strict=False):
            row["site"] = site
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

"""Hard-case gallery: axial slices around the top false positives and the missed nodules.

Like the paper's Fig. 5: each case is one PNG with three axial slices (the centre slice and
`slice_step_mm` above and below) of the preprocessed cache around the finding, the finding
circled with its score (0 for a missed nodule, as in the paper), and the other marks within the
window drawn with their probabilities. An ``index.json`` lists the cases.

The cache is read with :mod:`tf_agg3d.data.cache`; world (x, y, z) mm go to cache voxels
(z, y, x) by inverting the sidecar's affine here, so the gallery depends only on the README
contract of the sidecar.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from tf_agg3d.data import cache
from tf_agg3d.data.errors import DataError
from tf_agg3d.evaluation.froc import MatchResult
from tf_agg3d.evaluation.io import Annotations, Predictions
from tf_agg3d.evaluation.plots import save_figure
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.atomic_write import atomic_write_json

log = logging.getLogger(__name__)

# Diameter drawn for a mark without a diameter_mm column.
DEFAULT_MARK_DIAMETER_MM = 10.0


@dataclasses.dataclass
class GalleryConfig:
    """What the gallery shows.

    Attributes:
      top_false_positives: the highest-probability false positives drawn.
      max_missed: missed nodules drawn (largest first).
      window_mm: side of the square shown around the finding.
      slice_step_mm: distance of the two extra slices from the centre slice.
      hu_window: display window in HU.
    """

    top_false_positives: int = 10
    max_missed: int = 20
    window_mm: float = 64.0
    slice_step_mm: float = 3.0
    hu_window: tuple[float, float] = (-1200.0, 600.0)


def world_to_voxel(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """World (x, y, z) mm [N, 3] -> continuous cache voxel (z, y, x) through the inverse affine."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64).reshape(4, 4))
    pts = np.concatenate([np.atleast_2d(xyz), np.ones((np.atleast_2d(xyz).shape[0], 1))], axis=1)
    return (pts @ inv.T)[:, :3]


def _voxel_mm(affine: np.ndarray) -> np.ndarray:
    """Voxel size (z, y, x) in mm: the lengths of the affine's columns."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64).reshape(4, 4)[:3, :3], axis=0)


def _case_figure(volume, affine, centre_xyz, diameter, title, score_text, others, config):
    zyx = world_to_voxel(affine, centre_xyz)[0]
    vox = _voxel_mm(affine)
    half = np.maximum(1, np.round(config.window_mm / 2.0 / vox[1:]).astype(int))
    step = max(1, int(round(config.slice_step_mm / vox[0])))
    cz, cy, cx = (int(round(v)) for v in zyx)
    fig = Figure(figsize=(9.0, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    lo_hu, hi_hu = config.hu_window
    for k, dz in enumerate((-step, 0, step)):
        ax = fig.add_subplot(1, 3, k + 1)
        z = cz + dz
        y0, y1 = cy - half[0], cy + half[0] + 1
        x0, x1 = cx - half[1], cx + half[1] + 1
        # Pad outside the volume with the display minimum so every panel has the same frame.
        tile = np.full((y1 - y0, x1 - x0), lo_hu, dtype=np.float32)
        if 0 <= z < volume.shape[0]:
            ys, ye = max(y0, 0), min(y1, volume.shape[1])
            xs, xe = max(x0, 0), min(x1, volume.shape[2])
            if ys < ye and xs < xe:
                tile[ys - y0 : ye - y0, xs - x0 : xe - x0] = volume[z, ys:ye, xs:xe]
        ax.imshow(
            tile,
            cmap="gray",
            vmin=lo_hu,
            vmax=hi_hu,
            extent=(x0 - 0.5, x1 - 0.5, y1 - 0.5, y0 - 0.5),
            interpolation="nearest",
        )
        # The sphere's cross-section on this slice (in-plane radius in voxels).
        r_mm = diameter / 2.0
        off_mm = abs(z - zyx[0]) * vox[0]
        if off_mm < r_mm:
            r = np.sqrt(r_mm**2 - off_mm**2) / vox[2]
            ax.add_patch(Circle((zyx[2], zyx[1]), r, fill=False, color="yellow", lw=1.2))
        for ozyx, od, text in others:
            if abs(ozyx[0] - z) * vox[0] <= od / 2.0 and y0 <= ozyx[1] < y1 and x0 <= ozyx[2] < x1:
                ax.plot(ozyx[2], ozyx[1], "+", color="cyan", ms=6)
                ax.text(ozyx[2] + 1.5, ozyx[1] - 1.5, text, color="cyan", fontsize=7)
        ax.set_title(f"z {z} ({dz * vox[0]:+.0f} mm)", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if dz == 0:
            ax.text(
                0.02,
                0.98,
                score_text,
                transform=ax.transAxes,
                color="yellow",
                fontsize=11,
                va="top",
                ha="left",
                weight="bold",
            )
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def hard_cases(m: MatchResult, annotations: Annotations, config: GalleryConfig) -> list[dict]:
    """The cases to draw: top FPs by probability, then missed nodules by diameter."""
    cases = []
    fp = np.flatnonzero(m.fp_mask)
    fp = fp[np.argsort(-m.mark_prob[fp], kind="stable")][: config.top_false_positives]
    for rank, i in enumerate(fp):
        cases.append({"kind": "false_positive", "rank": rank, "mark": int(i)})
    missed = np.flatnonzero(~m.detected)
    diam = annotations.diameter_mm[m.nodule_row[missed]]
    missed = missed[np.argsort(-diam, kind="stable")][: config.max_missed]
    for rank, k in enumerate(missed):
        cases.append({"kind": "missed", "rank": rank, "nodule": int(k)})
    return cases


def write_gallery(
    out_dir: str,
    cache_dir: str,
    m: MatchResult,
    annotations: Annotations,
    predictions: Predictions,
    config: GalleryConfig | None = None,
) -> list[dict]:
    """Draws the hard cases into `out_dir` and writes ``out_dir/index.json``.

    Scans missing from the cache are skipped with a warning (listed with ``"skipped"``).

    Args:
      out_dir: gallery folder (created).
      cache_dir: the preprocessed cache (``<uid>.npy`` + ``<uid>.json``).
      m: the FROC match.
      annotations: the included annotations of the match.
      predictions: the predictions of the match.
      config: what to draw.

    Returns:
      The index entries (kind, seriesuid, world centre, score, file or skip reason).
    """
    config = config or GalleryConfig()
    uio.makedirs(out_dir)
    index = []
    loaded: dict[str, tuple] = {}
    for case in hard_cases(m, annotations, config):
        if case["kind"] == "false_positive":
            i = case["mark"]
            scan = int(m.mark_scan[i])
            row = int(m.mark_row[i])
            centre = predictions.xyz[row]
            diameter = (
                float(predictions.diameter_mm[row])
                if predictions.diameter_mm is not None
                else DEFAULT_MARK_DIAMETER_MM
            )
            score = float(m.mark_prob[i])
            score_text = f"FP {score:.3f}"
        else:
            k = case["nodule"]
            scan = int(m.nodule_scan[k])
            row = int(m.nodule_row[k])
            centre = annotations.xyz[row]
            diameter = float(annotations.diameter_mm[row])
            score = 0.0
            score_text = "missed 0"
        uid = m.seriesuids[scan]
        entry = {
            "kind": case["kind"],
            "rank": case["rank"],
            "seriesuid": uid,
            "xyz_mm": [float(v) for v in centre],
            "diameter_mm": diameter,
            "score": score,
        }
        if uid not in loaded:
            try:
                meta = cache.read_meta(cache_dir, uid)
                loaded[uid] = (cache.read_volume(cache_dir, uid, mmap=True), meta["affine"])
            except DataError as err:
                loaded[uid] = (None, str(err))
        volume, affine = loaded[uid]
        if volume is None:
            log.warning("gallery: skipping %s (%s)", uid, affine)
            entry["skipped"] = affine
            index.append(entry)
            continue
        others = _other_marks(m, predictions, scan, affine, exclude_row=row, case=case)
        name = f"{case['kind']}_{case['rank']:02d}_{uid}.png"
        title = f"{case['kind'].replace('_', ' ')} #{case['rank'] + 1}  {uid}  d={diameter:.1f} mm"
        fig = _case_figure(volume, affine, centre, diameter, title, score_text, others, config)
        save_figure(fig, uio.join(out_dir, name), dpi=100)
        entry["file"] = name
        index.append(entry)
    atomic_write_json(uio.join(out_dir, "index.json"), index)
    return index


def _other_marks(m, predictions, scan, affine, exclude_row, case):
    """Marks of the scan (except the case's own FP mark) as (zyx, diameter, label)."""
    sel = np.flatnonzero(m.mark_scan == scan)
    if case["kind"] == "false_positive":
        sel = sel[m.mark_row[sel] != exclude_row]
    if sel.size == 0:
        return []
    rows = m.mark_row[sel]
    zyx = world_to_voxel(affine, predictions.xyz[rows])
    if predictions.diameter_mm is not None:
        diam = predictions.diameter_mm[rows]
    else:
        diam = np.full(rows.size, DEFAULT_MARK_DIAMETER_MM)
    return [(zyx[j], float(diam[j]), f"{m.mark_prob[sel[j]]:.2f}") for j in range(rows.size)]

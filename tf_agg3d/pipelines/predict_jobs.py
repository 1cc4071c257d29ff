"""Which scans a Beam prediction run predicts, in the order ``python -m tf_agg3d.predict`` uses.

:func:`plan_jobs` turns the run's input (a cache, a LUNA16 download with its lung masks, or a
list of scan files / DICOM folders) into picklable :class:`PredictJob` elements, and names the
requested scans it cannot find (dead letters of stage ``list``); :func:`read_scan_list` reads a
``--scans`` file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tf_agg3d.utils import files as uio


@dataclasses.dataclass(frozen=True)
class PredictJob:
    """One scan to predict (picklable).

    Attributes:
      order: its place in the output CSV (the order ``python -m tf_agg3d.predict`` uses).
      uid: the seriesuid the CSV rows carry.
      source: ``"cache"`` (a cache entry) or ``"scan"`` (a file / DICOM folder to preprocess).
      path: the cache folder, or the scan.
      mask_path: the scan's LUNA16 lung mask (None: threshold segmentation).
    """

    order: int
    uid: str
    source: str
    path: str
    mask_path: str | None = None


def plan_jobs(
    *,
    cache: str | None = None,
    luna_root: str | None = None,
    subsets: Sequence[int] | None = None,
    seriesuids: Sequence[str] | None = None,
    scans: Sequence[str] | None = None,
) -> tuple[list[PredictJob], dict[str, str]]:
    """The scans of a run, in ``predict``'s order (:func:`tf_agg3d.inference.jobs.prediction_jobs`).

    Args:
      cache: a cache folder (its entries, or `seriesuids` of them).
      luna_root: a LUNA16 folder (the scans of `subsets`, or `seriesuids` of them).
      subsets: with `luna_root`, the subsets (None: all).
      seriesuids: with `cache` or `luna_root`, the uids to predict (None: all).
      scans: scan files / DICOM folders (taking precedence, as in ``predict``).

    Returns:
      (jobs, missing): missing maps a requested uid that no LUNA16 subset holds to the reason
      (a dead letter of stage ``list``). A uid missing from a cache fails when it is read.
    """
    if scans:
        from tf_agg3d.inference.predictor import scan_uid

        return [PredictJob(i, scan_uid(p), "scan", str(p)) for i, p in enumerate(scans)], {}
    if luna_root:
        from tf_agg3d.data.luna16 import layout

        found = layout.find_luna16_scans(luna_root, subsets)
        wanted = list(seriesuids) if seriesuids is not None else list(found)
        jobs, missing = [], {}
        where = f" in subsets {sorted(subsets)}" if subsets is not None else ""
        for order, uid in enumerate(wanted):
            if uid not in found:
                missing[uid] = f"no subset*/{uid}.mhd under {luna_root}{where}"
                continue
            mask = layout.find_lung_mask(luna_root, uid)
            jobs.append(PredictJob(order, uid, "scan", found[uid][0], mask))
        return jobs, missing
    from tf_agg3d.data import cache as cache_lib

    uids = list(seriesuids) if seriesuids is not None else cache_lib.list_uids(cache)
    return [PredictJob(i, uid, "cache", str(cache)) for i, uid in enumerate(uids)], {}


def read_scan_list(path: str) -> list[str]:
    """A ``--scans`` file: one scan path or URL per line; blank lines and ``#`` comments skipped."""
    lines = (line.strip() for line in uio.read_text(path).splitlines())
    return [line for line in lines if line and not line.startswith("#")]

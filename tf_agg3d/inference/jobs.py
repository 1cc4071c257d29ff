"""The scans a prediction run covers, as a list of jobs for a :class:`Predictor`.

A run predicts either the scans of a preprocessed cache (all of them or a seriesuid list),
the scans of a LUNA16 download (preprocessed in memory, with the LUNA16 lung mask when the
download has one), or scan files / DICOM folders given one by one. :func:`prediction_jobs`
turns that choice into ``[(label, job)]`` in prediction order; ``job(predictor)`` returns
``(seriesuid, findings)`` or raises for that scan alone (a seriesuid listed but missing from the
download raises FileNotFoundError when its job runs, so the other scans are still predicted).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# job(predictor) -> (seriesuid, findings)
Job = Callable[[Any], tuple[str, list]]


def _missing(reason: str) -> Job:
    def job(predictor):
        del predictor
        raise FileNotFoundError(reason)

    return job


def luna16_jobs(root: str, subsets: Sequence[int] | None, uids: Sequence[str] | None):
    """Jobs for the scans of a LUNA16 folder (`uids` of them, default all) in `subsets`."""
    from tf_agg3d.data.luna16 import layout

    scans = layout.find_luna16_scans(root, subsets)
    wanted = list(uids) if uids is not None else list(scans)
    jobs: list[tuple[str, Job]] = []
    for uid in wanted:
        if uid not in scans:
            where = f" in subsets {sorted(subsets)}" if subsets is not None else ""
            jobs.append((uid, _missing(f"no subset*/{uid}.mhd under {root}{where}")))
            continue
        path, mask = scans[uid][0], layout.find_lung_mask(root, uid)
        jobs.append((uid, lambda p, path=path, mask=mask: p.predict_scan(path, mask)))
    return jobs


def cache_jobs(cache: str, uids: Sequence[str] | None):
    """Jobs for the entries of a preprocessed cache (`uids` of them, default all)."""
    from tf_agg3d.data import cache as cache_lib

    uids = list(uids) if uids is not None else cache_lib.list_uids(cache)
    return [(uid, lambda p, uid=uid: (uid, p.predict_cache_entry(cache, uid))) for uid in uids]


def scan_jobs(paths: Sequence[str]):
    """Jobs for scan files / DICOM folders / NIfTI files, in the order given."""
    return [(path, lambda p, path=path: p.predict_scan(path)) for path in paths]


def prediction_jobs(
    *,
    cache: str | None = None,
    luna_root: str | None = None,
    subsets: Sequence[int] | None = None,
    seriesuids: str | None = None,
    scans: Sequence[str] | None = None,
) -> list[tuple[str, Job]]:
    """``[(label, job)]`` for one of `scans`, `luna_root` or `cache`, in prediction order.

    Args:
      cache: a preprocessed cache folder.
      luna_root: a LUNA16 folder (``subset*/<uid>.mhd``).
      subsets: with `luna_root`, the subsets to look in (default all).
      seriesuids: with `cache` or `luna_root`, a file listing the seriesuids (default all).
      scans: scan files / DICOM folders (takes precedence over the others).

    Raises:
      DataError, FileNotFoundError: an unreadable seriesuid list, cache or folder.
    """
    if scans:
        return scan_jobs(scans)
    from tf_agg3d.data.luna16.csv_io import read_seriesuids

    uids = read_seriesuids(seriesuids) if seriesuids else None
    if luna_root:
        return luna16_jobs(luna_root, subsets, uids)
    return cache_jobs(cache, uids)


def run_jobs(
    jobs: Sequence[tuple[str, Job]],
    predictor,
    note: Callable[[str], None],
    step: str = "",
    unit: str = "windows",
) -> tuple[list[dict], list[tuple[str, Exception]]]:
    """Runs every job with `predictor`, one progress line per scan.

    A failed scan does not stop the others: its line says ``FAILED`` and why.

    Args:
      jobs: ``[(label, job)]`` (see :func:`prediction_jobs`).
      note: line printer; each line starts ``[{step}n/N]``.
      unit: what ``predictor.last_stats.num_windows`` counts (``windows``, ``tile(s)``).

    Returns:
      (the findings' CSV rows, ``(label, error)`` of each failed scan).
    """
    rows, failed = [], []
    for n, (label, job) in enumerate(jobs, start=1):
        at = f"[{step}{n}/{len(jobs)}]"
        try:
            uid, findings = job(predictor)
        except Exception as err:  # noqa: BLE001 - one bad scan must not stop the others
            failed.append((label, err))
            note(f"{at} {label} FAILED: {type(err).__name__}: {err}")
            continue
        stats = predictor.last_stats
        note(
            f"{at} {uid}: {stats.num_windows} {unit}, {stats.seconds:.1f} s, "
            f"{len(findings)} findings"
        )
        rows.extend(f.as_row(uid) for f in findings)
    return rows, failed

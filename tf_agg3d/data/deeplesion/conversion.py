"""DeepLesion -> the cache: one job per series, the run, annotations.csv and the split lists.

Layout read and written, conventions and errors: docs/deeplesion.md. The steps are in
:mod:`~tf_agg3d.data.deeplesion.dl_info` (DL_info.csv), :mod:`~tf_agg3d.data.deeplesion.lesions`,
:mod:`~tf_agg3d.data.deeplesion.slices` and :mod:`~tf_agg3d.data.deeplesion.series`; the job
loop is :func:`tf_agg3d.data.preprocessing.runner.run_jobs`, shared with LUNA16.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import os
import time
from collections.abc import Callable, Sequence

from tf_agg3d.config import PreprocessConfig
from tf_agg3d.data import cache
from tf_agg3d.data.deeplesion.dl_info import DL_INFO, SPLITS, DLRow, read_dl_info
from tf_agg3d.data.deeplesion.lesions import DeepLesionOptions
from tf_agg3d.data.deeplesion.series import preprocess_series
from tf_agg3d.data.deeplesion.slices import IMAGES_DIR
from tf_agg3d.data.errors import DataError
from tf_agg3d.data.luna16.csv_io import ANNOTATION_COLUMNS
from tf_agg3d.data.preprocessing.runner import JobResult, RunSummary, run_jobs
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.atomic_write import atomic_write_text

ANNOTATIONS_CSV = "annotations.csv"
EXCLUDED_CSV = "annotations_excluded.csv"
ANNOTATION_HEADER = (*ANNOTATION_COLUMNS, "lesion_type", "split", "large")
SPLIT_LIST = {split: f"{name}_seriesuids.csv" for split, name in SPLITS.items()}


@dataclasses.dataclass(frozen=True)
class SeriesJob:
    """One series for one worker (picklable)."""

    uid: str
    folder: str
    rows: tuple[DLRow, ...]


def convert_one(
    job: SeriesJob, cache_dir: str, config: PreprocessConfig, options: DeepLesionOptions
) -> JobResult:
    """Converts and caches one series; any error becomes a failed result naming its cause."""
    start = time.perf_counter()
    try:
        volume, meta = preprocess_series(job.folder, job.rows, config, options, job.uid)
        cache.write_entry(cache_dir, job.uid, volume, meta)
    except DataError as err:
        return JobResult(job.uid, False, time.perf_counter() - start, str(err))
    except Exception as err:  # a bug or an OS failure on one series must not stop the others
        return JobResult(
            job.uid, False, time.perf_counter() - start, f"{type(err).__name__}: {err}"
        )
    note = f"split={meta['split']} lesions={len(meta['nodules'])}"
    return JobResult(job.uid, True, time.perf_counter() - start, "", note, tuple(meta["shape"]))


def make_jobs(
    root: str,
    options: DeepLesionOptions,
    splits: Sequence[int] | None = None,
    seriesuids: Sequence[str] | None = None,
    dl_info: str | None = None,
) -> tuple[list[SeriesJob], dict[str, str], dict[str, str]]:
    """Groups DL_info.csv rows into series jobs.

    Returns:
      (jobs sorted by uid, failed, skipped): `failed` maps a series (or ``"<csv> line N"`` for a
      row whose File_name is unreadable) to the reasons its rows were refused; `skipped` maps
      series that are left out on purpose (only possibly-noisy rows) to the reason.

    Raises:
      DataError: DL_info.csv missing or without the official header.
    """
    path = dl_info or os.path.join(root, DL_INFO)
    if not uio.exists(path):
        raise DataError(path, "DL_info.csv not found (give --dl-info or put it under --root)")
    rows, errors = read_dl_info(path)
    failed: dict[str, list[str]] = {}
    for err in errors:
        key = err.series_uid or f"{path} line {err.line}"
        failed.setdefault(key, []).append(str(err))
    by_series: dict[str, list[DLRow]] = {}
    for row in rows:
        by_series.setdefault(row.series_uid, []).append(row)
    bad_series = {err.series_uid for err in errors if err.series_uid}
    wanted = set(seriesuids) if seriesuids is not None else None
    split_set = set(splits) if splits is not None else None

    def selected(uid: str, series_rows: Sequence[DLRow]) -> bool:
        if wanted is not None and uid not in wanted:
            return False
        return split_set is None or not series_rows or series_rows[0].split in split_set

    jobs, skipped = [], {}
    for uid in sorted(set(by_series) | bad_series):
        series_rows = by_series.get(uid, [])
        if not selected(uid, series_rows):
            failed.pop(uid, None)
            continue
        if uid in bad_series:
            continue
        if not options.keep_noisy and all(r.noisy for r in series_rows):
            skipped[uid] = "every annotation is Possibly_noisy (use --keep-noisy to keep them)"
            continue
        jobs.append(SeriesJob(uid, os.path.join(root, IMAGES_DIR, uid), tuple(series_rows)))
    return jobs, {k: "; ".join(v) for k, v in failed.items()}, skipped


def annotation_rows(cache_dir: str, uids: Sequence[str]) -> list[dict]:
    """annotations.csv rows (frame mm) from the sidecars of `uids` that are DeepLesion entries."""
    rows = []
    for uid in uids:
        meta = cache.read_meta(cache_dir, uid)
        if meta.get("dataset") != "deeplesion":
            continue
        for n in meta["nodules"]:
            x, y, z = n["xyz_mm"]
            rows.append(
                {
                    "seriesuid": uid,
                    "coordX": x,
                    "coordY": y,
                    "coordZ": z,
                    "diameter_mm": n["d"],
                    "lesion_type": int(n["lesion_type"]),
                    "split": int(meta["split"]),
                    "large": int(bool(n["large"])),
                }
            )
    return rows


def _csv_text(header: Sequence[str], rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([row[c] for c in header])
    return buf.getvalue()


def write_annotation_files(cache_dir: str, known_uids: Sequence[str]) -> dict[str, str]:
    """Writes annotations.csv, annotations_excluded.csv and the split lists into `cache_dir`.

    Every series of `known_uids` (the DL_info.csv series) with a complete cache entry is
    included, whichever run converted it, so converting splits in separate runs still yields
    complete files. All files are written atomically.

    Returns:
      name -> path of the files written.
    """
    uids = [u for u in sorted(set(known_uids)) if cache.has_entry(cache_dir, u)]
    rows = annotation_rows(cache_dir, uids)
    paths = {}
    paths["annotations"] = uio.join(cache_dir, ANNOTATIONS_CSV)
    atomic_write_text(paths["annotations"], _csv_text(ANNOTATION_HEADER, rows))
    paths["excluded"] = uio.join(cache_dir, EXCLUDED_CSV)
    atomic_write_text(paths["excluded"], _csv_text(ANNOTATION_COLUMNS, []))
    by_split: dict[int, list[str]] = {s: [] for s in SPLITS}
    for uid in uids:
        meta = cache.read_meta(cache_dir, uid)
        if meta.get("dataset") == "deeplesion":
            by_split[int(meta["split"])].append(uid)
    for split, name in SPLIT_LIST.items():
        paths[name] = uio.join(cache_dir, name)
        # No header: the evaluation counts a header row as one more scan, like LUNA16's script.
        atomic_write_text(paths[name], "".join(f"{u}\n" for u in by_split[split]))
    return paths


def run_conversion(
    root: str,
    cache_dir: str,
    config: PreprocessConfig,
    options: DeepLesionOptions | None = None,
    splits: Sequence[int] | None = None,
    seriesuids: Sequence[str] | None = None,
    workers: int = 1,
    force: bool = False,
    dl_info: str | None = None,
    report: Callable[[str], None] = print,
) -> RunSummary:
    """Converts DeepLesion under `root` into `cache_dir`, then writes the CSV files.

    Args:
      root: folder with Images_png/ and DL_info.csv.
      cache_dir: output folder.
      config: resampling, HU window, fill value, border margin.
      options: lesion conversion settings (default :class:`DeepLesionOptions`).
      splits: 1/2/3 to convert (None: all).
      seriesuids: only these series (None: all of the selected splits).
      workers: processes; 1 runs here.
      force: reconvert series already in the cache.
      dl_info: DL_info.csv path (default ``root/DL_info.csv``).
      report: receives one line per series and the summary.

    Returns:
      The summary; ``failed`` lists every series (or unreadable row) that was not converted,
      with the DataError text.

    Raises:
      DataError: DL_info.csv is missing or lacks the official header.
    """
    t0 = time.perf_counter()
    options = options or DeepLesionOptions()
    path = dl_info or os.path.join(root, DL_INFO)
    jobs, failed, skipped = make_jobs(root, options, splits, seriesuids, path)

    def write_csv_files() -> None:
        all_rows, _ = read_dl_info(path)
        written = write_annotation_files(cache_dir, {r.series_uid for r in all_rows})
        report(f"wrote {', '.join(os.path.basename(p) for p in written.values())} in {cache_dir}")

    work = functools.partial(convert_one, cache_dir=cache_dir, config=config, options=options)
    return run_jobs(
        jobs,
        work,
        cache_dir,
        workers=workers,
        force=force,
        failed=failed,
        skipped=skipped,
        action="converting",
        unit="series",
        note_label="",
        before_summary=write_csv_files,
        started=t0,
        report=report,
    )

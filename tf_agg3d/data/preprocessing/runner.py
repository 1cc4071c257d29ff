"""Preprocesses a LUNA16 folder into the cache: many scans, resumable, failures isolated.

:func:`run_preprocess` finds ``subset*/<uid>.mhd`` under the root
(:mod:`tf_agg3d.data.luna16.layout`), reads annotations.csv and annotations_excluded.csv once
(:mod:`tf_agg3d.data.luna16.csv_io`), skips scans whose cache entry is complete, and
preprocesses the rest (:func:`tf_agg3d.data.preprocessing.cache_entry.preprocess_scan`, in a
process pool with ``workers > 1``). A scan that fails is reported with its uid and the others
go on. Progress and the summary go through a ``report`` callable (print by default).
:func:`run_jobs` is that loop on its own, each job ending in a :class:`JobResult`; the
DeepLesion conversion (:mod:`tf_agg3d.data.deeplesion.conversion`) runs through it too.

Faults at rest: an existing entry that is unreadable (a truncated ``.npy``, a corrupt sidecar, a
sidecar whose shape is not its array's) is named and redone. A full disk (or quota) while an
entry is written stops the run: the entry being written keeps its previous files (both are
written to temporaries first), the jobs not yet started are left, and rerunning the same command
goes on from there.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import SimpleITK as sitk

from tf_agg3d.config import PreprocessConfig
from tf_agg3d.data import cache
from tf_agg3d.data.errors import DataError
from tf_agg3d.data.luna16 import csv_io, layout
from tf_agg3d.data.preprocessing.cache_entry import preprocess_scan
from tf_agg3d.data.readers import sitk as sitk_reader
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.atomic_write import is_storage_full

# Where the LUNA16 download keeps its CSV files, relative to the root, in search order.
ANNOTATION_LOCATIONS = ("annotations.csv", "CSVFILES/annotations.csv")
EXCLUDED_LOCATIONS = (
    "annotations_excluded.csv",
    "CSVFILES/annotations_excluded.csv",
    "evaluationScript/annotations/annotations_excluded.csv",
)


@dataclasses.dataclass(frozen=True)
class ScanJob:
    """Everything one worker needs for one scan (picklable)."""

    uid: str
    scan_path: str
    subset: int | None
    mask_path: str | None
    nodules: tuple = ()
    excluded: tuple = ()


@dataclasses.dataclass(frozen=True)
class JobResult:
    """Outcome of one job of :func:`run_jobs` (one scan or series).

    Attributes:
      uid: the job's seriesuid.
      ok: whether its cache entry was written.
      seconds: time it took.
      message: why it failed ("" when ok).
      note: said after ``note_label`` on an ok line (LUNA16: the lung mask used).
      shape: the cache volume's shape when ok.
      stop: the failure ends the run (the storage is full: every later job would fail too).
    """

    uid: str
    ok: bool
    seconds: float
    message: str
    note: str = ""
    shape: tuple = ()
    stop: bool = False


def stops_run(result: JobResult) -> bool:
    """True for a failed job whose failure ends the run: its ``stop`` flag, or a message that
    says the disk or the quota is full (work functions that do not set the flag)."""
    if result.ok:
        return False
    return result.stop or any(
        text in result.message for text in ("No space left on device", "Disk quota exceeded")
    )


@dataclasses.dataclass
class RunSummary:
    """Outcome of a run: uids written, skipped (already cached) and failed (uid -> reason);
    when the run stopped early (a full disk), why (`stopped`) and the jobs not started."""

    ok: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    stopped: str = ""
    not_started: list[str] = dataclasses.field(default_factory=list)

    def line(self) -> str:
        text = (
            f"preprocess summary: ok={len(self.ok)} skipped={len(self.skipped)} "
            f"failed={len(self.failed)} seconds={self.seconds:.1f}"
        )
        if self.stopped:
            text += f" not_started={len(self.not_started)} (stopped early)"
        return text


def preprocess_one(job: ScanJob, cache_dir: str, config: PreprocessConfig) -> JobResult:
    """Reads, preprocesses and caches one scan; any error becomes a failed result."""
    start = time.perf_counter()
    try:
        scan = sitk_reader.read_scan(job.scan_path)
        mask = sitk_reader.read_lung_mask(job.mask_path) if job.mask_path else None
        volume, meta = preprocess_scan(
            scan, mask, config, job.nodules, job.excluded, seriesuid=job.uid, subset=job.subset
        )
        del scan, mask
        cache.write_entry(cache_dir, job.uid, volume, meta)
    except DataError as err:
        return JobResult(job.uid, False, time.perf_counter() - start, str(err))
    except Exception as err:  # a bug or an OS failure on one scan must not stop the others
        message = f"{type(err).__name__}: {err}"
        # ... but a full disk stops the run: every later scan would fail the same way.
        full = is_storage_full(err)
        return JobResult(job.uid, False, time.perf_counter() - start, message, stop=full)
    note = meta["lung_mask"]
    if note == "threshold":
        note += " (no seg-lungs-LUNA16 mask; threshold segmentation used)"
    return JobResult(job.uid, True, time.perf_counter() - start, "", note, tuple(meta["shape"]))


def _find_csv(root: str, locations: Sequence[str]) -> str | None:
    for rel in locations:
        path = uio.join(root, rel)
        if uio.isfile(path):
            return path
    return None


def _init_worker(threads: int) -> None:
    # Each worker gets its share of the cores; SimpleITK would otherwise take them all.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def make_jobs(
    luna_root: str,
    subsets: Sequence[int] | None = None,
    seriesuids: Sequence[str] | None = None,
    annotations_path: str | None = None,
    excluded_path: str | None = None,
    report: Callable[[str], None] = print,
) -> tuple[list[ScanJob], dict[str, str]]:
    """Lists the scans to do and attaches their annotations.

    Returns:
      (jobs sorted by uid, missing) where `missing` maps requested seriesuids that no subset
      holds to a reason.

    Raises:
      DataError: a malformed CSV (the labels would be wrong for every scan) or a bad root.
    """
    scans = layout.find_luna16_scans(luna_root, subsets)
    annotations_path = annotations_path or _find_csv(luna_root, ANNOTATION_LOCATIONS)
    excluded_path = excluded_path or _find_csv(luna_root, EXCLUDED_LOCATIONS)
    if annotations_path:
        nodules = csv_io.read_annotations(annotations_path)
    else:
        report(f"no annotations.csv under {luna_root}: scans get no nodules")
        nodules = {}
    excluded = csv_io.read_excluded(excluded_path) if excluded_path else {}
    missing: dict[str, str] = {}
    if seriesuids is not None:
        wanted = list(dict.fromkeys(seriesuids))
        where = f" in subsets {sorted(subsets)}" if subsets is not None else ""
        missing = {
            u: f"no subset*/{u}.mhd under {luna_root}{where}" for u in wanted if u not in scans
        }
        scans = {u: scans[u] for u in wanted if u in scans}
    jobs = [
        ScanJob(
            uid=uid,
            scan_path=path,
            subset=subset,
            mask_path=layout.find_lung_mask(luna_root, uid),
            nodules=tuple(nodules.get(uid, ())),
            excluded=tuple(excluded.get(uid, ())),
        )
        for uid, (path, subset) in sorted(scans.items())
    ]
    return jobs, missing


def run_preprocess(
    luna_root: str,
    cache_dir: str,
    config: PreprocessConfig,
    subsets: Sequence[int] | None = None,
    seriesuids: Sequence[str] | None = None,
    workers: int = 1,
    annotations_path: str | None = None,
    excluded_path: str | None = None,
    report: Callable[[str], None] = print,
) -> RunSummary:
    """Preprocesses every selected LUNA16 scan into `cache_dir`.

    Args:
      luna_root: folder with subset0..9/, seg-lungs-LUNA16/, annotations*.csv; local or a
        `tf.io.gfile` URL (``s3://bucket/luna16``), whose scans are read through local copies.
      cache_dir: output folder (README "Conventions"), local or a URL.
      config: preprocessing parameters.
      subsets: subset numbers to do, or None for all.
      seriesuids: only these scans (None: all found); a listed uid that is not found fails.
      workers: processes; 1 runs in this process.
      annotations_path, excluded_path: override the CSV locations under the root.
      report: receives one line per scan and the summary.

    Returns:
      The :class:`RunSummary` (its ``failed`` is non-empty when any scan failed).
    """
    t0 = time.perf_counter()
    jobs, missing = make_jobs(
        luna_root, subsets, seriesuids, annotations_path, excluded_path, report
    )
    work = functools.partial(preprocess_one, cache_dir=cache_dir, config=config)
    return run_jobs(
        jobs, work, cache_dir, workers=workers, failed=missing, started=t0, report=report
    )


def run_jobs(
    jobs: Sequence[Any],
    work: Callable[[Any], JobResult],
    cache_dir: str,
    *,
    workers: int = 1,
    force: bool = False,
    failed: Mapping[str, str] | None = None,
    skipped: Mapping[str, str] | None = None,
    action: str = "preprocessing",
    unit: str = "scan(s)",
    note_label: str = "lung_mask=",
    before_summary: Callable[[], None] | None = None,
    started: float | None = None,
    report: Callable[[str], None] = print,
) -> RunSummary:
    """Runs `work` on every job not yet in the cache: the loop LUNA16 and DeepLesion share.

    Reports `failed` (found before any work: counted as failed) and `skipped` (reported only),
    skips jobs whose cache entry is complete (unless `force`), runs the rest here or in a
    process pool, reports one line per job, calls `before_summary`, then reports the summary
    and every failure. A job that raises, or whose worker dies, fails alone.

    Args:
      jobs: objects with a ``uid``, picklable when ``workers > 1``.
      work: job -> :class:`JobResult`; picklable (a module-level function or a
        ``functools.partial`` of one) when ``workers > 1``.
      cache_dir: the cache the jobs write into (for the skip check and the messages).
      workers: processes; 1 runs in this process.
      force: redo jobs already in the cache.
      failed, skipped: key -> reason, from listing the jobs.
      action, unit: words of the "<action> <n> <unit> into ..." line.
      note_label: written before ``JobResult.note`` on an ok line.
      before_summary: called after the last job, before the summary (e.g. to write CSVs).
      started: ``time.perf_counter()`` at the start of the run (default: now).
      report: receives every line.

    Returns:
      The :class:`RunSummary`.
    """
    t0 = time.perf_counter() if started is None else started
    summary = RunSummary()
    for key, reason in (failed or {}).items():
        summary.failed[key] = reason
        report(f"FAILED {key}: {reason}")
    for key, reason in (skipped or {}).items():
        report(f"skip   {key}: {reason}")
    todo = []
    for job in jobs:
        problem = None if force else cache.check_entry(cache_dir, job.uid)
        if not force and problem is None:
            summary.skipped.append(job.uid)
            report(f"skip   {job.uid} (already in the cache)")
            continue
        if problem and problem != "missing":
            report(f"redo   {job.uid}: its cache entry is unreadable: {problem}")
        todo.append(job)
    total = len(todo)
    report(f"{action} {total} {unit} into {cache_dir} with {max(1, workers)} worker(s)")

    def record(index: int, result: JobResult) -> None:
        prefix = f"[{index}/{total}]"
        if result.ok:
            summary.ok.append(result.uid)
            report(
                f"{prefix} ok     {result.uid} {result.seconds:.1f} s shape={list(result.shape)} "
                f"{note_label}{result.note}"
            )
        else:
            summary.failed[result.uid] = result.message
            report(f"{prefix} FAILED {result.uid} {result.seconds:.1f} s: {result.message}")
            if stops_run(result) and not summary.stopped:
                summary.stopped = f"{result.uid}: {result.message}"
                report(f"stopping: the storage is full ({result.message})")
        return not summary.stopped

    if workers <= 1 or total <= 1:
        for index, job in enumerate(todo, start=1):
            if not record(index, work(job)):
                summary.not_started = [j.uid for j in todo[index:]]
                break
    else:
        summary.not_started = _run_pool(todo, work, workers, record)
    if before_summary is not None:
        before_summary()
    summary.seconds = time.perf_counter() - t0
    report(summary.line())
    for key, reason in summary.failed.items():
        report(f"  failed {key}: {reason}")
    if summary.stopped:
        report(
            f"stopped early, {len(summary.not_started)} {unit} not started: free space in "
            f"{cache_dir} and rerun the same command; entries already written are complete "
            "and are skipped"
        )
    return summary


def _run_pool(jobs, work, workers, record) -> list[str]:
    """Runs the jobs in a process pool; `record(index, result)` returns False to stop the run.

    Returns:
      The uids of the jobs not started because the run stopped.
    """
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: SimpleITK's thread pool in the parent does not survive a fork safely.
    context = multiprocessing.get_context("spawn")
    not_started: list[str] = []
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(threads,)
    ) as pool:
        futures = {pool.submit(work, job): job for job in jobs}
        going = True
        for index, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            job = futures[future]
            if future.cancelled():
                continue
            try:
                result = future.result()
            except Exception as err:  # a worker that died (e.g. out of memory) fails its job
                result = JobResult(
                    job.uid, False, 0.0, f"worker failed: {type(err).__name__}: {err}"
                )
            if not record(index, result) and going:
                going = False
                # Jobs still queued are not started; those already running finish.
                not_started = [futures[f].uid for f in futures if f.cancel()]
    return sorted(not_started)

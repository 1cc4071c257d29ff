"""Apache Beam job: a LUNA16 download -> the preprocessed cache, one element per scan.

    python -m tf_agg3d.pipelines.preprocess --luna-root ROOT --out CACHE [--subsets 0,1]
        [--seriesuids FILE] [--config YAML] [--set preprocess.key=value] [--force]
        [--runner DirectRunner|DataflowRunner|FlinkRunner|SparkRunner] [Beam pipeline options]

The scans and their annotations are listed here, on the launching machine, exactly as
``python -m tf_agg3d.preprocess`` lists them (:func:`tf_agg3d.data.preprocessing.runner.make_jobs`).
Each scan is one element; a worker reads it, preprocesses it and writes its cache entry with
the functions ``preprocess_one`` calls (``read_scan``, ``read_lung_mask``, ``preprocess_scan``,
``cache.write_entry``: the same arrays and sidecars, written atomically, the sidecar last).
An entry already complete is skipped (``--force`` redoes it). A scan that fails, at any stage
(``list``: a ``--seriesuids`` entry no subset holds; ``check``, ``read``, ``preprocess``,
``write``), is a row of the dead-letter file ``CACHE/_failures.csv`` (``uid,stage,error``,
rewritten by every run) and never fails the pipeline. The summary at the end counts the scans
done, skipped and failed.

With no ``--runner`` the DirectRunner runs on every local core (``multi_processing``,
``--direct_num_workers`` = the cores); README "Batch jobs on Apache Beam" has the Dataflow,
Flink and Spark command lines. Paths may be local (local runners) or ``gs://`` / ``s3://``.

Exit status: 0 when every scan is cached (now or before), 1 when any scan failed (the others
are done) or the pipeline failed, 2 for a usage or configuration error or a missing
apache-beam (``pip install 'tf_agg3d[beam]'``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from tf_agg3d.config import PreprocessConfig
from tf_agg3d.data import cache
from tf_agg3d.data.preprocessing.runner import ScanJob, make_jobs
from tf_agg3d.pipelines import common
from tf_agg3d.pipelines.common import DoFn, Failure, RunnerInfo
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.filesystems import ensure_filesystems

FAILURES_NAME = "_failures.csv"
FAILED, SKIPPED = "failed", "skipped"


def failures_path(cache_dir: str) -> str:
    """The dead-letter file of a cache: ``CACHE/_failures.csv``."""
    return uio.join(str(cache_dir), FAILURES_NAME)


@dataclasses.dataclass(frozen=True)
class ScanDone:
    """A scan whose cache entry a worker wrote: seconds it took, cache shape, lung mask used."""

    uid: str
    seconds: float
    shape: tuple
    lung_mask: str


@dataclasses.dataclass
class PreprocessSummary:
    """What a run did.

    Attributes:
      done, skipped: scans written now / already complete (the pipeline's counters).
      failed: the dead-letter rows (read back from ``CACHE/_failures.csv``).
      seconds: wall time of the whole run (listing, pipeline start, work, end).
      runner: where it ran.
      metrics: every counter and distribution of the run (:func:`common.metric_totals`).
    """

    done: int
    skipped: int
    failed: list[Failure]
    seconds: float
    runner: RunnerInfo
    metrics: dict = dataclasses.field(default_factory=dict)

    @property
    def worker_seconds_per_scan(self) -> float | None:
        """Mean worker time of a scan done (read, preprocess, write), None when none was."""
        return common.seconds_per_item(self.metrics, "preprocess_ms_per_scan")

    def line(self) -> str:
        counts = {"done": self.done, "skipped": self.skipped, "failed": len(self.failed)}
        return common.summary_line(
            "preprocess", counts, self.seconds, self.worker_seconds_per_scan, self.runner
        )


class PreprocessScanFn(DoFn):
    """One :class:`ScanJob` -> its cache entry; emits :class:`ScanDone`, or a uid on the
    ``skipped`` output, or a :class:`Failure` on the ``failed`` output. Never raises for a scan.

    Args:
      cache_dir: the cache (local or URL).
      config: the preprocessing parameters.
      force: redo entries that are already complete.
      threads: SimpleITK threads in this worker (None: SimpleITK's default, every core).
    """

    def __init__(
        self,
        cache_dir: str,
        config: PreprocessConfig,
        force: bool = False,
        threads: int | None = None,
    ):
        super().__init__()
        self.cache_dir = str(cache_dir)
        self.config = config
        self.force = force
        self.threads = threads
        self.done = common.counter("scans_done")
        self.skipped = common.counter("scans_skipped")
        self.failed = common.counter("scans_failed")
        self.milliseconds = common.distribution("preprocess_ms_per_scan")

    def setup(self):
        if self.threads:
            import SimpleITK as sitk

            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(self.threads)

    def _fail(self, job: ScanJob, stage: str, err: BaseException):
        failure = Failure(job.uid, stage, common.error_message(err))
        self.failed.inc()
        common.say(f"FAILED {job.uid} ({stage}): {failure.error}")
        return common.beam.pvalue.TaggedOutput(FAILED, failure)

    def process(self, job: ScanJob):
        from tf_agg3d.data.preprocessing.cache_entry import preprocess_scan
        from tf_agg3d.data.readers import sitk as sitk_reader

        start = time.perf_counter()
        stage = "check"
        try:
            if not self.force and cache.has_entry(self.cache_dir, job.uid):
                self.skipped.inc()
                common.say(f"skip   {job.uid} (already in the cache)")
                yield common.beam.pvalue.TaggedOutput(SKIPPED, job.uid)
                return
            # The steps of runner.preprocess_one, one stage each, so a dead letter says which.
            stage = "read"
            scan = sitk_reader.read_scan(job.scan_path)
            mask = sitk_reader.read_lung_mask(job.mask_path) if job.mask_path else None
            stage = "preprocess"
            volume, meta = preprocess_scan(
                scan,
                mask,
                self.config,
                job.nodules,
                job.excluded,
                seriesuid=job.uid,
                subset=job.subset,
            )
            del scan, mask
            stage = "write"
            cache.write_entry(self.cache_dir, job.uid, volume, meta)
        except Exception as err:  # noqa: BLE001 - one bad scan must not fail the pipeline
            yield self._fail(job, stage, err)
            return
        seconds = time.perf_counter() - start
        self.done.inc()
        self.milliseconds.update(int(round(seconds * 1000)))
        note = meta["lung_mask"]
        common.say(f"ok     {job.uid} {seconds:.1f} s shape={list(volume.shape)} lung_mask={note}")
        yield ScanDone(job.uid, seconds, tuple(volume.shape), note)


def build_pipeline(
    pipeline,
    jobs: Sequence[ScanJob],
    missing: dict[str, str],
    cache_dir: str,
    config: PreprocessConfig,
    *,
    force: bool = False,
    threads: int | None = None,
):
    """Adds the preprocessing to `pipeline`: scans -> cache entries, failures -> the CSV.

    Args:
      pipeline: a ``beam.Pipeline``.
      jobs: the scans (``make_jobs``).
      missing: requested uids no subset holds -> reason (dead letters of stage ``list``).
      cache_dir: the cache.
      config: preprocessing parameters.
      force: redo complete entries.
      threads: SimpleITK threads per worker.

    Returns:
      The ``ParDo``'s outputs: ``done`` (:class:`ScanDone`), ``skipped`` (uids), ``failed``
      (:class:`Failure`).
    """
    beam = common.beam
    outputs = (
        pipeline
        | "Scans" >> beam.Create(list(jobs))
        # Breaks fusion with Create, so that the scans spread over the workers.
        | "Spread" >> beam.Reshuffle()
        | "Preprocess"
        >> beam.ParDo(PreprocessScanFn(cache_dir, config, force, threads)).with_outputs(
            FAILED, SKIPPED, main="done"
        )
    )
    listed = pipeline | "NotFound" >> beam.Create(
        [Failure(uid, "list", reason) for uid, reason in sorted(missing.items())]
    )
    _ = (
        (outputs[FAILED], listed)
        | "Failures" >> beam.Flatten()
        | "AllFailures" >> beam.combiners.ToList()
        | "WriteFailures" >> beam.Map(common.write_failures_step, failures_path(cache_dir))
    )
    return outputs


def run_preprocess_pipeline(
    luna_root: str,
    cache_dir: str,
    config: PreprocessConfig,
    *,
    beam_args: Sequence[str] = (),
    subsets: Sequence[int] | None = None,
    seriesuids: Sequence[str] | None = None,
    annotations_path: str | None = None,
    excluded_path: str | None = None,
    force: bool = False,
    jobs: Sequence[ScanJob] | None = None,
    report: Callable[[str], None] = print,
) -> PreprocessSummary:
    """Preprocesses the selected LUNA16 scans into `cache_dir` with a Beam pipeline.

    Args:
      luna_root: the LUNA16 folder (subset0..9/, seg-lungs-LUNA16/, annotations*.csv).
      cache_dir: the cache folder.
      config: preprocessing parameters.
      beam_args: Beam's pipeline options (``--runner``, ``--direct_num_workers=2``, ...).
      subsets, seriesuids, annotations_path, excluded_path: as ``run_preprocess``'s.
      force: redo complete entries.
      jobs: the scans to do instead of listing `luna_root` (benchmarks: ``[]`` times the
        pipeline's fixed cost).
      report: receives the progress and summary lines.

    Returns:
      The :class:`PreprocessSummary`.

    Raises:
      DataError: a malformed CSV or a bad root (before any work).
      ValueError: a bad Beam option, or local paths with a cluster runner.
      RuntimeError: the pipeline itself failed.
    """
    common.require_beam()
    start = time.perf_counter()
    options, runner = common.pipeline_options(beam_args)
    common.check_reachable(runner, [("--luna-root", luna_root), ("--out", cache_dir)])
    ensure_filesystems(luna_root, cache_dir)
    missing: dict[str, str] = {}
    if jobs is None:
        jobs, missing = make_jobs(
            luna_root, subsets, seriesuids, annotations_path, excluded_path, report
        )
    report(
        f"beam preprocessing {len(jobs)} scan(s) into {cache_dir} on {runner.describe()}"
        + (f"; {len(missing)} requested scan(s) not found" if missing else "")
    )
    uio.makedirs(str(cache_dir))
    pipeline = common.beam.Pipeline(options=options)
    build_pipeline(
        pipeline,
        jobs,
        missing,
        cache_dir,
        config,
        force=force,
        threads=runner.threads_per_worker,
    )
    result = common.run_pipeline(pipeline)
    totals = common.metric_totals(result)
    failed = common.read_failures(failures_path(cache_dir))
    summary = PreprocessSummary(
        done=int(totals.get("scans_done", 0)),
        skipped=int(totals.get("scans_skipped", 0)),
        failed=failed,
        seconds=time.perf_counter() - start,
        runner=runner,
        metrics=totals,
    )
    report(summary.line())
    common.report_failures(report, failed, failures_path(cache_dir))
    return summary


if __name__ == "__main__":
    # `python -m tf_agg3d.pipelines.preprocess` is the `agg3d-beam-preprocess` command of the
    # CLI layer.
    from tf_agg3d.cli.pipelines import run_preprocess

    run_preprocess()

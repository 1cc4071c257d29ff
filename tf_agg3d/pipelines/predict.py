r"""Apache Beam job: whole-scan findings of many scans -> one LUNA16 submission CSV.

    python -m tf_agg3d.pipelines.predict (--export BASE/agg3d/VERSION | --model-dir DIR) \
        (--cache CACHE [--seriesuids LIST] | --luna-root ROOT [--subsets 0,1] [--seriesuids LIST]
         | --scans LIST | --scan PATH ...) --out predictions.csv [--failures FILE]
        [--threshold T] [--max-marks N] [--config YAML] [--set k=v] (with --model-dir)
        [--runner DirectRunner|DataflowRunner|FlinkRunner|SparkRunner] [Beam pipeline options]

The model is a SavedModel exported for TF-Serving (``python -m tf_agg3d.export``;
``docs/serving.md``): Beam's RunInference runs its ``detect`` signature, one whole
preprocessed scan per call, keyed by the series uid. ``--model-dir`` first exports the training
run (with ``--config`` / ``--set`` / ``--threshold`` / ``--max-marks`` applied, as
``python -m tf_agg3d.predict`` applies them) to a temporary version with the export library
(:mod:`tf_agg3d.serving.publishing`): a local folder for local runners, ``--export-base`` or
``<--temp_location>/...`` for a cluster. An export's inference settings are part of its graph,
so those flags need ``--model-dir``.

RunInference's stock TensorFlow handler cannot serve this model (it loads SavedModels through
Keras, which Keras 3 no longer does, and stacks a batch into one tensor, while scans differ in
shape): :class:`DetectSignatureHandler` is a ``ModelHandler`` that loads the SavedModel with
``tf.saved_model.load`` and calls ``detect`` once per scan.

Inputs are those of ``python -m tf_agg3d.predict``: cache entries (``--cache``), a LUNA16
download preprocessed in memory with its lung masks (``--luna-root``), or scan files / DICOM
folders (``--scans`` a file listing them, one per line, or ``--scan`` repeated), preprocessed
with the export's own ``preprocess`` config. Findings go back to world millimetres through the
entry's affine exactly as ``predict`` maps them
(:func:`tf_agg3d.inference.predictor.findings_from_detections`). Workers write shards (JSON
lines beside the output, in a hidden ``.tmp-`` folder); one step merges them into the CSV of
``write_predictions`` (LUNA16's columns + ``diameter_mm,rpn_score,fpr_score``, rows in input
order) written atomically, and removes the shards. A scan that fails (``list``, ``read``,
``preprocess``, ``inference``) is a row of the dead-letter CSV (``--failures``, default
``<out>_failures.csv``: ``uid,stage,error``) and never fails the pipeline.

Exit status: 0 when every scan was predicted, 1 when any failed (the others are in the CSV) or
the pipeline failed, 2 for a usage, configuration or model error or a missing apache-beam.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from tf_agg3d.config import ExperimentConfig, PreprocessConfig
from tf_agg3d.pipelines import common
from tf_agg3d.pipelines.common import DoFn, Failure, ModelHandler, RunnerInfo
from tf_agg3d.utils import io as uio

FAILED = "failed"
# The pipeline's own exports accept larger volumes than a served model (contract.py's 512^3
# bounds gRPC requests, not a batch job); `predict` itself has no limit.
EXPORT_MAX_VOLUME_SHAPE = (1024, 1024, 1024)
MAX_SHARDS = 64


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScanInput:
    """A preprocessed scan on its way to the model: int16 [D, H, W] HU and its affine."""

    order: int
    volume: np.ndarray
    affine: tuple


@dataclasses.dataclass(frozen=True)
class ScanRef:
    """What a prediction keeps of its input (not the volume): its place and its affine."""

    order: int
    affine: tuple


@dataclasses.dataclass(frozen=True)
class ScanRows:
    """One predicted scan: its place in the CSV, its uid and its rows (``Finding.as_row``)."""

    order: int
    uid: str
    rows: tuple


class LoadVolumeFn(DoFn):
    """:class:`PredictJob` -> ``(uid, ScanInput)``: a cache entry read, or a scan read and
    preprocessed as ``Predictor.predict_scan`` does; a :class:`Failure` on ``failed``."""

    def __init__(self, preprocess: PreprocessConfig, threads: int | None = None):
        super().__init__()
        self.preprocess = preprocess
        self.threads = threads
        self.failed = common.counter("scans_failed")
        self.milliseconds = common.distribution("load_ms_per_scan")

    def setup(self):
        if self.threads:
            import SimpleITK as sitk

            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(self.threads)

    def process(self, job: PredictJob):
        from tf_agg3d.data import cache as cache_lib
        from tf_agg3d.data.preprocessing.cache_entry import preprocess_scan
        from tf_agg3d.data.readers import sitk as sitk_reader

        start = time.perf_counter()
        stage = "read"
        try:
            if job.source == "cache":
                meta, volume = cache_lib.read_entry(job.path, job.uid)
            else:
                scan = sitk_reader.read_scan(job.path)
                mask = sitk_reader.read_lung_mask(job.mask_path) if job.mask_path else None
                stage = "preprocess"
                volume, meta = preprocess_scan(scan, mask, self.preprocess)
                del scan, mask
            volume = np.asarray(volume)
            if volume.dtype != np.int16 or volume.ndim != 3:
                raise ValueError(
                    f"expected an int16 [D, H, W] volume, got {volume.dtype} {volume.shape}"
                )
            affine = tuple(float(v) for v in np.asarray(meta["affine"], np.float64).ravel())
        except Exception as err:  # noqa: BLE001 - one bad scan must not fail the pipeline
            self.failed.inc()
            failure = Failure(job.uid, stage, common.error_message(err))
            common.say(f"FAILED {job.uid} ({stage}): {failure.error}")
            yield common.beam.pvalue.TaggedOutput(FAILED, failure)
            return
        self.milliseconds.update(int(round((time.perf_counter() - start) * 1000)))
        yield job.uid, ScanInput(job.order, volume, affine)


class DetectSignatureHandler(ModelHandler):
    """RunInference's model handler for the export's ``detect`` signature.

    Examples are :class:`ScanInput`; each is one ``detect`` call (batches of one: scans differ
    in shape, and one scan already fills the model's window batches). Predictions are
    ``PredictionResult(ScanRef, {output: numpy array, "seconds": float})``.

    Args:
      export_dir: the SavedModel version folder (local or URL).
      threads: TensorFlow intra-op threads in this worker (None: TensorFlow's default).
    """

    def __init__(self, export_dir: str, threads: int | None = None):
        super().__init__(min_batch_size=1, max_batch_size=1)
        self.export_dir = str(export_dir)
        self.threads = threads

    def load_model(self):
        import tensorflow as tf

        if self.threads:
            # RuntimeError: TensorFlow already started in this process; it keeps its pools.
            with contextlib.suppress(RuntimeError):
                tf.config.threading.set_intra_op_parallelism_threads(self.threads)
        uio.ensure_filesystem(self.export_dir)
        return tf.saved_model.load(self.export_dir)

    def run_inference(self, batch, model, inference_args=None):
        import tensorflow as tf
        from apache_beam.ml.inference.base import PredictionResult

        from tf_agg3d.serving import contract

        detect = model.signatures[contract.DETECT_SIGNATURE]
        results = []
        for example in batch:
            start = time.perf_counter()
            out = detect(**{contract.VOLUME_INPUT: tf.constant(example.volume)})
            inference = {k: v.numpy() for k, v in out.items()}
            inference["seconds"] = time.perf_counter() - start
            results.append(
                PredictionResult(ScanRef(example.order, example.affine), inference, self.export_dir)
            )
        return results

    def get_num_bytes(self, batch) -> int:
        return int(sum(np.asarray(example.volume).nbytes for example in batch))

    def get_metrics_namespace(self) -> str:
        return "tf_agg3d_detect"


class FindingsFn(DoFn):
    """``(uid, PredictionResult)`` -> ``(shard, ScanRows)``: world-mm findings as CSV rows."""

    def __init__(self, num_shards: int):
        super().__init__()
        self.num_shards = max(1, int(num_shards))
        self.done = common.counter("scans_done")
        self.findings = common.counter("findings")
        self.milliseconds = common.distribution("detect_ms_per_scan")

    def process(self, element):
        from tf_agg3d.inference.predictor import findings_from_detections

        uid, result = element
        ref, inference = result.example, result.inference
        findings = findings_from_detections(inference, np.asarray(ref.affine).reshape(4, 4))
        rows = tuple(f.as_row(uid) for f in findings)
        seconds = float(inference["seconds"])
        self.done.inc()
        self.findings.inc(len(rows))
        self.milliseconds.update(int(round(seconds * 1000)))
        windows = int(inference.get("num_windows", -1))
        common.say(f"ok     {uid}: {windows} windows, {seconds:.1f} s, {len(rows)} findings")
        shard = zlib.crc32(uid.encode("utf-8")) % self.num_shards
        yield shard, ScanRows(ref.order, uid, rows)


def _shard_line(item: ScanRows) -> str:
    # json writes floats with repr: the merged CSV holds exactly the digits predict writes.
    return json.dumps({"order": item.order, "uid": item.uid, "rows": list(item.rows)})


class WriteShardFn(DoFn):
    """``(shard, [ScanRows])`` -> the shard file's path (JSON lines, written atomically; a
    retried bundle rewrites the same name)."""

    def __init__(self, shards_dir: str):
        super().__init__()
        self.shards_dir = shards_dir

    def process(self, element):
        shard, items = element
        items = sorted(items, key=lambda item: item.order)
        path = uio.join(self.shards_dir, f"shard-{int(shard):05d}.jsonl")
        uio.atomic_write_text(path, "".join(_shard_line(item) + "\n" for item in items))
        yield path


def merge_shards(paths: list, out: str, shards_dir: str) -> int:
    """Writes the CSV from the shards (rows in input order), atomically; removes the shards.

    Returns:
      The number of rows written.
    """
    from tf_agg3d.data.luna16.csv_io import write_predictions

    records = []
    for path in paths:
        records += [json.loads(line) for line in uio.read_text(path).splitlines() if line]
    records.sort(key=lambda record: record["order"])
    count = write_predictions(out, [row for record in records for row in record["rows"]])
    common.remove_tree(shards_dir)
    return count


def _inference_failures(element):
    """RunInference's dead letters ``(batch, (type, repr, traceback))`` -> :class:`Failure`."""
    batch, error = element
    kind, text = error[0], error[1]
    name = getattr(kind, "__name__", str(kind))
    for key, _ in batch:
        yield Failure(str(key), "inference", " ".join(f"{name}: {text}".split()))


def _count_failure(failure: Failure) -> Failure:
    if failure.stage == "inference":
        common.counter("scans_failed").inc()
        common.say(f"FAILED {failure.uid} ({failure.stage}): {failure.error}")
    return failure


def build_pipeline(
    pipeline,
    jobs: Sequence[PredictJob],
    missing: dict[str, str],
    export_dir: str,
    preprocess: PreprocessConfig,
    out: str,
    failures_path: str,
    shards_dir: str,
    *,
    threads: int | None = None,
    num_shards: int | None = None,
):
    """Adds the prediction to `pipeline`: scans -> RunInference -> shards -> the CSV.

    Args:
      pipeline: a ``beam.Pipeline``.
      jobs: the scans (:func:`plan_jobs`).
      missing: requested uids that were not found -> reason (dead letters of stage ``list``).
      export_dir: the SavedModel version folder.
      preprocess: how scans (not cache entries) are preprocessed: the model's config.
      out: the CSV.
      failures_path: the dead-letter CSV.
      shards_dir: where workers write shards (removed by the merge).
      threads: CPU threads per worker (SimpleITK and TensorFlow).
      num_shards: shard files (default: one per scan, at most 64).
    """
    beam = common.beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

    num_shards = num_shards or max(1, min(len(jobs), MAX_SHARDS))
    loaded = (
        pipeline
        | "Scans" >> beam.Create(list(jobs))
        | "Spread" >> beam.Reshuffle()
        | "Load" >> beam.ParDo(LoadVolumeFn(preprocess, threads)).with_outputs(FAILED, main="ok")
    )
    handler = KeyedModelHandler(DetectSignatureHandler(export_dir, threads))
    predicted, dead = loaded.ok | "Detect" >> RunInference(handler).with_exception_handling()
    _ = (
        predicted
        | "Findings" >> beam.ParDo(FindingsFn(num_shards))
        | "ByShard" >> beam.GroupByKey()
        | "WriteShards" >> beam.ParDo(WriteShardFn(shards_dir))
        | "AllShards" >> beam.combiners.ToList()
        | "Merge" >> beam.Map(merge_shards, out, shards_dir)
    )
    inference_failed = (
        dead.failed_inferences
        | "InferenceFailures" >> beam.FlatMap(_inference_failures)
        | "CountInferenceFailures" >> beam.Map(_count_failure)
    )
    listed = pipeline | "NotFound" >> beam.Create(
        [Failure(uid, "list", reason) for uid, reason in sorted(missing.items())]
    )
    _ = (
        (loaded[FAILED], inference_failed, listed)
        | "Failures" >> beam.Flatten()
        | "AllFailures" >> beam.combiners.ToList()
        | "WriteFailures" >> beam.Map(common.write_failures_step, failures_path)
    )


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def resolve_export(export: str) -> str:
    """The SavedModel version folder of ``--export``: the folder itself, or the newest version
    when it is a model base (``BASE/agg3d``).

    Raises:
      FileNotFoundError: neither a version (no ``saved_model.pb``) nor a base with versions.
    """
    from tf_agg3d.serving import contract
    from tf_agg3d.serving.publishing import existing_versions

    export = str(export).rstrip("/") if uio.is_url(export) else str(export)
    if uio.isfile(uio.join(export, contract.SAVED_MODEL_PB)):
        return export
    for version in reversed(existing_versions(export) if uio.isdir(export) else []):
        candidate = uio.join(export, str(version))
        if uio.isfile(uio.join(candidate, contract.SAVED_MODEL_PB)):
            return candidate
    raise FileNotFoundError(
        f"{export}: no {contract.SAVED_MODEL_PB}: expected an export version folder "
        "(EXPORT_BASE/agg3d/VERSION, python -m tf_agg3d.export) or its model base"
    )


def export_config(export_dir: str) -> ExperimentConfig:
    """The experiment config an export was made with (``assets.extra/config.yaml``).

    Raises:
      FileNotFoundError: the export has no config (not made by this project's exporter).
    """
    from tf_agg3d.config import load_config
    from tf_agg3d.serving import contract

    path = uio.join(export_dir, contract.ASSETS_EXTRA, "config.yaml")
    if not uio.isfile(path):
        raise FileNotFoundError(f"{path}: missing; export the model with python -m tf_agg3d.export")
    return load_config(path)


def export_model_dir(
    model_dir: str,
    config: ExperimentConfig,
    export_base: str,
    checkpoint: str | None = None,
) -> str:
    """Exports a training run with `config` (its inference settings included) as the next
    version under ``export_base/agg3d`` with the export library; returns the version folder.

    The steps of :func:`tf_agg3d.serving.publishing.export_from_checkpoint`, with `config` in
    place of the run's own config.yaml (so ``--threshold`` and the like reach the graph).
    """
    from tf_agg3d.models.checkpoints import find_checkpoint
    from tf_agg3d.models.loading import load_detector
    from tf_agg3d.models.whole_scan import WholeScanDetector
    from tf_agg3d.ops.roi_align import roi_align_3d
    from tf_agg3d.serving import contract
    from tf_agg3d.serving.publishing import export_saved_model, next_version
    from tf_agg3d.serving.signatures import Agg3DExportModule

    detector, config = load_detector(model_dir, config=config, checkpoint=checkpoint)
    detector.roi_align_fn = roi_align_3d  # the export's contract: stock ops only
    whole_scan = WholeScanDetector(detector, config.inference, fill_hu=config.preprocess.fill_hu)
    module = Agg3DExportModule(
        whole_scan,
        config,
        version=next_version(uio.join(export_base, contract.MODEL_NAME)),
        max_volume_shape=EXPORT_MAX_VOLUME_SHAPE,
        extra_metadata={"checkpoint": os.fspath(find_checkpoint(model_dir, checkpoint))},
    )
    return export_saved_model(module, export_base).path


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def default_failures_path(out: str) -> str:
    """``predictions.csv`` -> ``predictions_failures.csv`` (beside the output)."""
    stem = out[: -len(".csv")] if out.lower().endswith(".csv") else out
    return f"{stem}_failures.csv"


@dataclasses.dataclass
class PredictSummary:
    """What a run did: scans predicted, the dead letters, findings written, wall seconds."""

    done: int
    failed: list[Failure]
    findings: int
    seconds: float
    runner: RunnerInfo
    out: str
    failures_path: str
    export_seconds: float = 0.0
    metrics: dict = dataclasses.field(default_factory=dict)

    @property
    def worker_seconds_per_scan(self) -> float | None:
        """Mean worker time of a scan predicted (read or preprocess, then detect), None when
        none was."""
        return common.seconds_per_item(self.metrics, "detect_ms_per_scan", "load_ms_per_scan")

    def line(self) -> str:
        per_scan = self.worker_seconds_per_scan
        return (
            f"beam predict summary: done={self.done} failed={len(self.failed)} "
            f"findings={self.findings} seconds={self.seconds:.1f} "
            + (f"worker_s_per_scan={per_scan:.3f} " if per_scan is not None else "")
            + f"runner={self.runner.describe()}"
        )


def run_predict_pipeline(
    *,
    out: str,
    export: str | None = None,
    model_dir: str | None = None,
    config: ExperimentConfig | None = None,
    checkpoint: str | None = None,
    export_base: str | None = None,
    cache: str | None = None,
    luna_root: str | None = None,
    subsets: Sequence[int] | None = None,
    seriesuids: Sequence[str] | None = None,
    scans: Sequence[str] | None = None,
    failures: str | None = None,
    beam_args: Sequence[str] = (),
    jobs: Sequence[PredictJob] | None = None,
    report: Callable[[str], None] = print,
) -> PredictSummary:
    """Predicts the selected scans with a Beam pipeline and writes one submission CSV.

    Args:
      out: the CSV (local or URL).
      export: an export version folder (or its model base: the newest version).
      model_dir: a training run to export first (instead of `export`), with `config` (default:
        its config.yaml) and `checkpoint` (default: the latest).
      export_base: where `model_dir` is exported (kept); default a temporary folder (local
        runners) or ``<temp_location>/tf_agg3d-beam-export-<id>`` (removed at the end).
      cache, luna_root, subsets, seriesuids, scans: the scans (:func:`plan_jobs`).
      failures: the dead-letter CSV (default :func:`default_failures_path`).
      beam_args: Beam's pipeline options.
      jobs: the scans to predict instead of listing the input (benchmarks: ``[]``).
      report: receives the progress and summary lines.

    Returns:
      The :class:`PredictSummary`.

    Raises:
      ValueError: a bad Beam option, local paths with a cluster runner, or neither / both of
        `export` and `model_dir`.
      FileNotFoundError, ConfigError, DataError: an unreadable model, config or input list.
      RuntimeError: the pipeline itself failed.
    """
    common.require_beam()
    if (export is None) == (model_dir is None):
        raise ValueError("give exactly one of an export (--export) or a model dir (--model-dir)")
    start = time.perf_counter()
    options, runner = common.pipeline_options(beam_args)
    failures = failures or default_failures_path(out)
    if not uio.is_url(out):
        out, failures = os.path.abspath(out), os.path.abspath(failures)
    common.check_reachable(
        runner,
        [
            ("--export", export),
            ("--export-base", export_base),
            ("--cache", cache),
            ("--luna-root", luna_root),
            ("--out", out),
            ("--failures", failures),
            *(("--scan", s) for s in scans or ()),
        ],
    )
    uio.ensure_filesystems(export, model_dir, export_base, cache, luna_root, out, failures)
    missing: dict[str, str] = {}
    if jobs is None:
        jobs, missing = plan_jobs(
            cache=cache, luna_root=luna_root, subsets=subsets, seriesuids=seriesuids, scans=scans
        )
    temporary = None
    export_seconds = 0.0
    try:
        if model_dir is not None:
            if config is None:
                from tf_agg3d.models.loading import load_model_config

                config = load_model_config(model_dir)
            if export_base is None:
                temporary = _temporary_export_base(options, runner)
            t0 = time.perf_counter()
            export_dir = export_model_dir(model_dir, config, export_base or temporary, checkpoint)
            export_seconds = time.perf_counter() - t0
            report(f"exported {model_dir} to {export_dir} in {export_seconds:.1f} s")
        else:
            export_dir = resolve_export(export)
            config = export_config(export_dir)
        report(
            f"beam predicting {len(jobs)} scan(s) with {export_dir} on {runner.describe()}"
            + (f"; {len(missing)} requested scan(s) not found" if missing else "")
        )
        shards_dir = uio.join(
            uio.dirname(out), f".tmp-{uio.basename(out)}-shards-{uuid.uuid4().hex[:12]}"
        )
        pipeline = common.beam.Pipeline(options=options)
        build_pipeline(
            pipeline,
            jobs,
            missing,
            export_dir,
            config.preprocess,
            out,
            failures,
            shards_dir,
            threads=runner.threads_per_worker,
        )
        try:
            result = common.run_pipeline(pipeline)
        finally:
            common.remove_tree(shards_dir)
    finally:
        if temporary is not None:
            common.remove_tree(temporary)
    totals = common.metric_totals(result)
    failed = common.read_failures(failures)
    summary = PredictSummary(
        done=int(totals.get("scans_done", 0)),
        failed=failed,
        findings=int(totals.get("findings", 0)),
        seconds=time.perf_counter() - start,
        runner=runner,
        out=out,
        failures_path=failures,
        export_seconds=export_seconds,
        metrics=totals,
    )
    report(summary.line())
    report(f"wrote {out}")
    for f in failed:
        report(f"  failed {f.uid} ({f.stage}): {f.error}")
    if failed:
        report(f"dead letters: {failures}")
    return summary


def _temporary_export_base(options, runner: RunnerInfo) -> str:
    """A fresh folder for a ``--model-dir`` export that every worker can read."""
    if runner.local:
        return tempfile.mkdtemp(prefix="tf_agg3d-beam-export-")
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    temp_location = options.view_as(GoogleCloudOptions).temp_location
    if not temp_location or not uio.is_url(temp_location):
        raise ValueError(
            f"{runner.name} workers cannot read a local export: give --export-base (a gs:// or "
            "s3:// URL) or --temp_location, or export first (python -m tf_agg3d.export) and "
            "pass --export"
        )
    return uio.join(temp_location, f"tf_agg3d-beam-export-{uuid.uuid4().hex[:12]}")


if __name__ == "__main__":
    # `python -m tf_agg3d.pipelines.predict` is the `agg3d-beam-predict` command of the CLI
    # layer.
    from tf_agg3d.cli.pipelines import run_predict

    run_predict()

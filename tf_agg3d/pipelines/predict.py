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
shape): :class:`~tf_agg3d.pipelines.predict_inference.DetectSignatureHandler` is a
``ModelHandler`` that loads the SavedModel with ``tf.saved_model.load`` and calls ``detect``
once per scan.

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

This module assembles and runs the pipeline (:func:`build_pipeline`,
:func:`run_predict_pipeline`); its steps are :mod:`~tf_agg3d.pipelines.predict_jobs` (which
scans), :mod:`~tf_agg3d.pipelines.predict_model` (which SavedModel),
:mod:`~tf_agg3d.pipelines.predict_inference` (a scan's volume, then ``detect``) and
:mod:`~tf_agg3d.pipelines.predict_output` (the rows, the shards, the CSV). Its command line is
:mod:`tf_agg3d.cli.pipelines` (``agg3d-beam-predict``).
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Callable, Sequence

from tf_agg3d.config import ExperimentConfig, PreprocessConfig
from tf_agg3d.pipelines import common
from tf_agg3d.pipelines.common import Failure, RunnerInfo
from tf_agg3d.pipelines.predict_inference import (
    FAILED,
    DetectSignatureHandler,
    LoadVolumeFn,
    count_failure,
    inference_failures,
)
from tf_agg3d.pipelines.predict_jobs import PredictJob, plan_jobs
from tf_agg3d.pipelines.predict_model import (
    export_config,
    export_model_dir,
    resolve_export,
    temporary_export_base,
)
from tf_agg3d.pipelines.predict_output import (
    MAX_SHARDS,
    FindingsFn,
    WriteShardFn,
    default_failures_path,
    merge_shards,
)
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.filesystems import ensure_filesystems, is_url


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
        | "InferenceFailures" >> beam.FlatMap(inference_failures)
        | "CountInferenceFailures" >> beam.Map(count_failure)
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
        counts = {"done": self.done, "failed": len(self.failed), "findings": self.findings}
        return common.summary_line(
            "predict", counts, self.seconds, self.worker_seconds_per_scan, self.runner
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
    if not is_url(out):
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
    ensure_filesystems(export, model_dir, export_base, cache, luna_root, out, failures)
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
                temporary = temporary_export_base(options, runner)
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
    common.report_failures(report, failed, failures)
    return summary


if __name__ == "__main__":
    # `python -m tf_agg3d.pipelines.predict` is the `agg3d-beam-predict` command of the CLI
    # layer.
    from tf_agg3d.cli.pipelines import run_predict

    run_predict()

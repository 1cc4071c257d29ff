"""LUNA16 10-fold cross-validation: one model per held-out subset, one pooled FROC.

The paper's LUNA16 numbers are 10-fold cross-validation: fold k trains on every subset but k
(``data.fold = k``, :func:`tf_agg3d.dataloaders.input_pipeline.fold_split`) and predicts the
scans of subset k, so every scan is predicted by the model that did not train on it; the
folds' predictions are pooled and ONE FROC is computed over all of them.

Layout of the output folder ``DIR`` (local or an ``s3://`` / ``gs://`` URL)::

  DIR/fold{k}/                 fold k's model directory (config.yaml, checkpoints/, summaries/)
  DIR/fold{k}/timings.json     seconds of each stage so far (summed over resumed runs)
  DIR/fold{k}/predictions.csv  the held-out subset's findings (written atomically)
  DIR/fold{k}/DONE.json        written last: the seriesuids predicted, timings, checkpoint
  DIR/predictions.csv          the union of the folds' CSVs
  DIR/seriesuids.csv           every pooled scan (the FROC's FP-per-scan divisor)
  DIR/evaluation/              the pooled evaluation (tf_agg3d.evaluation.report: summary.json,
                               froc.png, froc_curve.csv, nodules.csv)
  DIR/folds.csv                fold, scans, nodules, FROC of that fold alone, seconds
  DIR/summary.json             the pooled FROC, its CI, the per-branch FROCs, the fold table

A fold runs its stages in order (:func:`plan_steps`): ``rpn`` (phase 1), ``joint`` or
``alternating`` (phase 2), ``abs`` (Anchor Based Sampling mines hard negatives into
``abs_hard_negatives.json``, then a phase-2 round trains on them into ``checkpoints/joint_abs``)
-- the sequence of ``python -m tf_agg3d.train``'s "recipe on one model directory". Resuming is
free: a fold with DONE.json is skipped, a training phase resumes from its newest checkpoint and a
finished one returns at once (:class:`tf_agg3d.training.trainer.Trainer`), the ABS pass is not
redone once its file exists, and the held-out scans are predicted again when DONE.json is
missing. Folds can run on different machines writing to one ``DIR``; :meth:`CrossValidation.pool`
then checks that every held-out scan of the cache was predicted exactly once.

The parts an ablation shares live beside this module: the fold and stage grammar
(:mod:`~tf_agg3d.experiments.plan`), a run's folder and markers
(:mod:`~tf_agg3d.experiments.run_dir`), training and predicting one model
(:mod:`~tf_agg3d.experiments.model_run`), the annotation files
(:mod:`~tf_agg3d.experiments.annotation_sources`), per-branch scoring
(:mod:`~tf_agg3d.experiments.scoring`) and parallel subprocesses
(:mod:`~tf_agg3d.experiments.processes`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from tf_agg3d.config import EvalConfig, ExperimentConfig, load_config
from tf_agg3d.data.errors import DataError
from tf_agg3d.experiments import annotation_sources, model_run, scoring
from tf_agg3d.experiments.crossval_table import FOLD_COLUMNS, folds_csv, format_table
from tf_agg3d.experiments.plan import (
    N_FOLDS,
    CacheExperiment,
    ExperimentError,
    format_folds,
    parse_folds,
    parse_stages,
    plan_steps,
    stages_from_config,
)
from tf_agg3d.experiments.run_dir import DONE_NAME, PREDICTIONS_NAME, RunDir, now
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.atomic_write import atomic_write_json, atomic_write_text

__all__ = [
    "CrossValidation",
    "CrossvalError",
    "FOLD_COLUMNS",
    "Pool",
    "fold_dir",
    "folds_csv",
    "format_folds",
    "format_table",
    "parse_folds",
    "parse_stages",
    "plan_steps",
]

SERIESUIDS_NAME = "seriesuids.csv"
FOLDS_TABLE_NAME = "folds.csv"
SUMMARY_NAME = "summary.json"
EVALUATION_DIR = annotation_sources.EVALUATION_DIR
DONE_FORMAT = "tf_agg3d.crossval.fold.v1"

# The name cross-validation's callers know for the experiments' request error.
CrossvalError = ExperimentError


def fold_dir(out_dir: str, fold: int) -> str:
    return uio.join(out_dir, f"fold{fold}")


@dataclasses.dataclass
class Pool:
    """The pooled predictions of the done folds.

    Attributes:
      predictions: ``DIR/predictions.csv``.
      seriesuids: ``DIR/seriesuids.csv`` (every pooled scan, with or without findings).
      folds: the pooled folds.
      missing: the asked-for folds that are not done (pooled anyway: ``allow_missing``).
      uids_by_fold: fold -> its held-out seriesuids.
      records: fold -> its DONE.json.
      rows: findings pooled.
    """

    predictions: str
    seriesuids: str
    folds: list[int]
    missing: list[int]
    uids_by_fold: dict[int, list[str]]
    records: dict[int, dict]
    rows: int


class CrossValidation(CacheExperiment):
    """A cross-validation experiment: a cache, a config and an output folder.

    Args:
      out_dir: the output folder (see the module docstring); local or a URL.
      cache_dir: the preprocessed LUNA16 cache; each sidecar's ``subset`` says its fold.
      config_path: the experiment YAML (None: the defaults).
      overrides: ``key=value`` overrides (``--set``), applied to every fold and stage.
      stages: the stages (None: the config's ``train.stages``, else ``rpn,joint``).
      log: line printer.

    Raises:
      ConfigError, CrossvalError: a bad config or stage list.
    """

    def __init__(
        self,
        out_dir: str,
        cache_dir: str,
        config_path: str | None = None,
        overrides: Sequence[str] = (),
        stages: str | Sequence[str] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        super().__init__(out_dir, cache_dir, overrides, log)
        self.config_path = config_path or None
        self.base_config = self.config()
        self.stages = parse_stages(stages) if stages else stages_from_config(self.base_config)
        self.steps = plan_steps(self.stages)
        self._held_out: dict[int, list[str]] | None = None

    # ---- configs and scans -----------------------------------------------------------------

    def config(self, fold: int | None = None, phase: str | None = None) -> ExperimentConfig:
        """The config of one fold and phase: YAML <- overrides <- cache, fold, phase.

        Raises:
          ConfigError: naming the key.
        """
        extra = [*self.overrides, f"data.cache_dir={self.cache_dir!r}"]
        if fold is not None:
            extra.append(f"data.fold={fold}")
        if phase is not None:
            extra.append(f"train.phase={phase}")
        return load_config(self.config_path, extra)

    def held_out(self) -> dict[int, list[str]]:
        """Subset -> the seriesuids of the cache in it (sorted); scans without one are left out.

        Raises:
          DataError: an unreadable sidecar, or a cache without any scan of a subset 0..9.
        """
        if self._held_out is None:
            from tf_agg3d.dataloaders.input_pipeline import load_scans

            by_subset: dict[int, list[str]] = {}
            for scan in load_scans(self.cache_dir):
                if 0 <= scan.subset < N_FOLDS:
                    by_subset.setdefault(scan.subset, []).append(scan.uid)
            if not by_subset:
                raise DataError(
                    self.cache_dir,
                    "no cache entry has a LUNA16 subset 0..9 (sidecar 'subset'): nothing to "
                    "cross-validate (an empty or missing cache?)",
                )
            self._held_out = {k: sorted(v) for k, v in sorted(by_subset.items())}
        return self._held_out

    def cache_folds(self) -> list[int]:
        """The folds the cache has held-out scans for (the default ``--folds``)."""
        return sorted(self.held_out())

    def check_folds(self, folds: Sequence[int]) -> list[int]:
        """`folds`, refusing any the cache has no scan of.

        Raises:
          CrossvalError: naming the empty folds and the cache's subsets.
        """
        held = self.held_out()
        empty = [k for k in folds if k not in held]
        if empty:
            raise CrossvalError(
                f"fold(s) {format_folds(empty)}: the cache {self.cache_dir} has no scan of that "
                f"subset (its subsets: {format_folds(sorted(held))})"
            )
        return list(folds)

    # ---- one fold ----------------------------------------------------------------------------

    def fold_dir(self, fold: int) -> str:
        return fold_dir(self.out_dir, fold)

    def run_dir(self, fold: int) -> RunDir:
        return RunDir(self.fold_dir(fold))

    def done_path(self, fold: int) -> str:
        return self.run_dir(fold).done_path

    def is_done(self, fold: int) -> bool:
        return self.run_dir(fold).is_done()

    def read_done(self, fold: int) -> dict:
        return self.run_dir(fold).read_done()

    def done_folds(self) -> list[int]:
        return [k for k in range(N_FOLDS) if self.is_done(k)]

    def validate(self, folds: Sequence[int]) -> None:
        """Checks every fold's and stage's config before any work.

        Raises:
          ConfigError: naming the key; CrossvalError: a fold without held-out scans.
        """
        from tf_agg3d.training.checks import validate_training_config

        self.check_folds(folds)
        for fold in folds:
            for step in self.steps:
                validate_training_config(self.config(fold, step.phase))

    def run_fold(self, fold: int, strategy=None) -> dict:
        """Trains fold `fold`'s stages, predicts its held-out scans, writes DONE.json last.

        A fold with DONE.json is skipped (its record is returned). Training resumes from the
        newest checkpoint of each phase; a finished phase returns at once.

        Args:
          fold: 0..9.
          strategy: the tf.distribute strategy (default: from ``train.distribute``).

        Returns:
          The fold's DONE.json record.

        Raises:
          CrossvalError: no held-out scan for the fold. RunFailed: a scan could not be
          predicted (nothing marked done). The trainer's errors (TrainingInterrupted,
          NonFiniteLossError, DataError, ...) pass through.
        """
        (fold,) = self.check_folds([fold])
        if self.is_done(fold):
            self.log(f"fold {fold}: already done ({self.done_path(fold)}); skipped")
            return self.read_done(fold)
        uids = self.held_out()[fold]
        configs = [self.config(fold, step.phase) for step in self.steps]
        self.log(
            f"=== fold {fold}: train on every subset but {fold}, hold out {len(uids)} scan(s); "
            f"stages {' -> '.join(s.label for s in self.steps)}; model {self.fold_dir(fold)}"
        )
        done = model_run.train_and_predict(
            self.run_dir(fold),
            self.steps,
            configs,
            self.cache_dir,
            uids,
            strategy=strategy,
            log=self.log,
            tag=f"fold {fold}",
        )
        record = {
            "format": DONE_FORMAT,
            "fold": fold,
            "held_out_subset": fold,
            "seriesuids": list(uids),
            "findings": done["findings"],
            "stages": list(self.stages),
            "steps": [s.label for s in self.steps],
            "checkpoint": done["checkpoint"],
            "timings": done["timings"],
            "train_seconds": done["train_seconds"],
            "predict_seconds": done["predict_seconds"],
            "cache": self.cache_dir,
            "config": self.config_path,
            "overrides": self.overrides,
            "finished": now(),
        }
        self.run_dir(fold).write_done(record)
        self.log(
            f"fold {fold}: done: {len(uids)} scan(s), {done['findings']} finding(s); train "
            f"{done['train_seconds']:.1f} s, predict {done['predict_seconds']:.1f} s"
        )
        return record

    # ---- pooling and evaluation -------------------------------------------------------------

    def pool(self, folds: Sequence[int] | None = None, allow_missing: bool = False) -> Pool:
        """Writes ``DIR/predictions.csv`` (the union of the done folds') and the scan list.

        Args:
          folds: the folds expected (default: every fold the cache has scans of).
          allow_missing: pool the done ones when some are not done, instead of refusing.

        Raises:
          CrossvalError: folds not done (listed), none done, a seriesuid predicted by two
            folds, or a fold whose scans differ from the cache's held-out scans.
          DataError: an unreadable marker or predictions file.
        """
        from tf_agg3d.data.luna16 import csv_io

        held = self.held_out()
        folds = self.check_folds(self.cache_folds() if folds is None else folds)
        done = [k for k in folds if self.is_done(k)]
        missing = [k for k in folds if k not in done]
        if missing and not allow_missing:
            raise CrossvalError(
                f"fold(s) {format_folds(missing)} of {format_folds(folds)} are not done under "
                f"{self.out_dir} (no fold<k>/{DONE_NAME}): run them (--folds "
                f"{format_folds(missing)}), or pass --allow-missing to pool the "
                f"{len(done)} done fold(s)"
            )
        if not done:
            raise CrossvalError(f"no fold is done under {self.out_dir}: nothing to pool")
        owner: dict[str, int] = {}
        rows: list = []
        records, uids_by_fold = {}, {}
        for k in done:
            record = self.read_done(k)
            uids = [str(u) for u in record["seriesuids"]]
            expected = held[k]
            if len(set(uids)) != len(uids):
                raise CrossvalError(f"fold {k}: {self.done_path(k)} lists a seriesuid twice")
            if set(uids) != set(expected):
                lost = sorted(set(expected) - set(uids))
                extra = sorted(set(uids) - set(expected))
                raise CrossvalError(
                    f"fold {k}: {self.done_path(k)} predicted {len(uids)} scan(s) but the cache "
                    f"holds {len(expected)} of subset {k}"
                    + (f"; not predicted: {', '.join(lost[:5])}" if lost else "")
                    + (f"; not of subset {k} in the cache: {', '.join(extra[:5])}" if extra else "")
                    + f" (the cache changed? delete {self.done_path(k)} and rerun the fold)"
                )
            for uid in uids:
                if uid in owner:
                    raise CrossvalError(
                        f"seriesuid {uid} was predicted by fold {owner[uid]} and fold {k}: each "
                        "scan must come from exactly one fold"
                    )
                owner[uid] = k
            path = uio.join(self.fold_dir(k), PREDICTIONS_NAME)
            if not uio.exists(path):
                raise CrossvalError(f"fold {k} is marked done but {path} is missing")
            found = csv_io.read_predictions(path)
            stray = sorted(set(found) - set(uids))
            if stray:
                raise CrossvalError(
                    f"{path}: findings of scan(s) fold {k} did not hold out: "
                    f"{', '.join(stray[:5])}"
                )
            for uid in found:
                rows.extend(found[uid])
            records[k], uids_by_fold[k] = record, uids
        predictions = uio.join(self.out_dir, PREDICTIONS_NAME)
        seriesuids = uio.join(self.out_dir, SERIESUIDS_NAME)
        csv_io.write_predictions(predictions, rows)
        atomic_write_text(seriesuids, "".join(f"{u}\n" for k in done for u in uids_by_fold[k]))
        self.log(
            f"pooled {len(rows)} finding(s) of {len(owner)} scan(s) from fold(s) "
            f"{format_folds(done)} into {predictions}"
            + (f"; fold(s) {format_folds(missing)} missing" if missing else "")
        )
        return Pool(predictions, seriesuids, done, missing, uids_by_fold, records, len(rows))

    def annotation_files(self, annotations: str = "", excluded: str = "") -> dict:
        """The annotation files of the evaluation: given, else what the cache provides
        (:func:`tf_agg3d.experiments.annotation_sources.annotation_files`; written ones go to
        ``DIR/evaluation/``).

        Returns:
          ``{"annotations": path, "excluded": path or "", "source": how they were found}``.
        """
        uids = [u for k in sorted(self.held_out()) for u in self.held_out()[k]]
        return annotation_sources.annotation_files(
            self.cache_dir, uids, self.out_dir, annotations, excluded, self.log
        )

    def evaluate(
        self,
        pool: Pool,
        config: EvalConfig | None = None,
        annotations: str = "",
        excluded: str = "",
    ) -> dict:
        """The pooled evaluation, the per-fold table and ``DIR/summary.json``.

        The pooled CSV is evaluated by :func:`tf_agg3d.evaluation.report.evaluate` (what
        ``python -m tf_agg3d.evaluate`` runs) into ``DIR/evaluation``; each fold's FROC alone is
        the same computation restricted to its scans; the per-branch FROCs (combined, RPN,
        FPRN) come from the evaluation library when it has them.

        Returns:
          The summary (also ``DIR/summary.json``).
        """
        from tf_agg3d.evaluation.report import EvalInputs
        from tf_agg3d.evaluation.report import evaluate as evaluate_files

        config = config or self.base_config.evaluation
        files = self.annotation_files(annotations, excluded)
        inputs = EvalInputs(
            annotations=files["annotations"],
            predictions=pool.predictions,
            excluded=files["excluded"],
            seriesuids=pool.seriesuids,
            label="cross-validation",
        )
        eval_dir = uio.join(self.out_dir, EVALUATION_DIR)
        pooled = evaluate_files(inputs, eval_dir, config=config, warn=self.log)
        branches, branch_note = scoring.branch_scores(inputs, config)
        folds = self._fold_rows(pool, files, config)
        table_path = uio.join(self.out_dir, FOLDS_TABLE_NAME)
        atomic_write_text(table_path, folds_csv(folds))
        summary = {
            "froc_score": pooled["froc_score"],
            "fp_rates": pooled["fp_rates"],
            "sensitivities": pooled["sensitivities"],
            "froc_ci": pooled["froc_ci"],
            "ci_lower": pooled["ci_lower"],
            "ci_upper": pooled["ci_upper"],
            "bootstrap": pooled["bootstrap"],
            "scans": pooled["scans"],
            "nodules": pooled["nodules"],
            "true_positives": pooled["true_positives"],
            "false_positives": pooled["false_positives"],
            "branches": branches,
            "branches_note": branch_note,
            "folds": folds,
            "folds_pooled": pool.folds,
            "folds_missing": pool.missing,
            "findings": pool.rows,
            "stages": list(self.stages),
            "annotations": files,
            "files": {
                "predictions": PREDICTIONS_NAME,
                "seriesuids": SERIESUIDS_NAME,
                "evaluation": f"{EVALUATION_DIR}/{SUMMARY_NAME}",
                "froc_png": f"{EVALUATION_DIR}/froc.png" if pooled["nodules"] else None,
                "folds": FOLDS_TABLE_NAME,
            },
            "cache": self.cache_dir,
            "config": self.config_path,
            "overrides": self.overrides,
            "finished": now(),
        }
        atomic_write_json(uio.join(self.out_dir, SUMMARY_NAME), summary)
        return summary

    def _fold_rows(self, pool: Pool, files: dict, config: EvalConfig) -> list[dict]:
        """One row per pooled fold: its scans, nodules, FROC alone and seconds."""
        from tf_agg3d.evaluation import froc as froc_lib
        from tf_agg3d.evaluation.io import read_annotations, read_predictions

        annotations = read_annotations(files["annotations"])
        excluded = read_annotations(files["excluded"], excluded=True) if files["excluded"] else None
        predictions = read_predictions(pool.predictions)
        rows = []
        for k in pool.folds:
            uids = pool.uids_by_fold[k]
            m = scoring.scan_match(annotations, excluded, predictions, uids, config)
            result = froc_lib.froc(m, config.fp_rates)
            record = pool.records[k]
            rows.append(
                {
                    "fold": k,
                    "scans": len(uids),
                    "nodules": int(m.n_nodules),
                    "froc": froc_lib._num(result.froc_score),
                    "findings": int(m.marks_total),
                    "train_seconds": record.get("train_seconds"),
                    "predict_seconds": record.get("predict_seconds"),
                }
            )
        return rows

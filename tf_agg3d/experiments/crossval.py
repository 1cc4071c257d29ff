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
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from tf_agg3d.config import EvalConfig, ExperimentConfig, load_config
from tf_agg3d.data.errors import DataError
from tf_agg3d.utils import io as uio

N_FOLDS = 10
STAGES = ("rpn", "joint", "alternating", "abs")
DEFAULT_STAGES = ("rpn", "joint")  # when the config has no train.stages
PHASE2 = ("joint", "alternating")

DONE_NAME = "DONE.json"
PREDICTIONS_NAME = "predictions.csv"
TIMINGS_NAME = "timings.json"
SERIESUIDS_NAME = "seriesuids.csv"
FOLDS_TABLE_NAME = "folds.csv"
SUMMARY_NAME = "summary.json"
EVALUATION_DIR = "evaluation"
DONE_FORMAT = "tf_agg3d.crossval.fold.v1"

# Table III's rows: the score column of predict's CSV behind each FROC.
BRANCHES = (("combined", "probability"), ("rpn", "rpn_score"), ("fprn", "fpr_score"))


class CrossvalError(ValueError):
    """A bad request (fold spec, stages) or an inconsistent output folder."""


class FoldFailed(RuntimeError):
    """Some held-out scans of a fold could not be predicted (the fold is not DONE)."""


# --------------------------------------------------------------------------------------------
# Folds and stages
# --------------------------------------------------------------------------------------------


def parse_folds(spec: str | Sequence[int]) -> list[int]:
    """Fold numbers from ``"3"``, ``"0-9"``, ``"0,2,5"`` or ``"0-2,7"`` (sorted, unique).

    Raises:
      CrossvalError: anything else, or a fold outside 0..9.
    """
    if not isinstance(spec, str):
        spec = ",".join(str(k) for k in spec)
    folds: set[int] = set()
    hint = "folds are 0..9, e.g. '3', '0-9', '0,2,5'"
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise CrossvalError(f"--folds {spec!r}: cannot read {part.strip()!r} ({hint})")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo > hi:
            raise CrossvalError(f"--folds {spec!r}: empty range {part.strip()!r} ({hint})")
        if hi >= N_FOLDS:
            raise CrossvalError(f"--folds {spec!r}: fold {hi} does not exist ({hint})")
        folds.update(range(lo, hi + 1))
    return sorted(folds)


def format_folds(folds: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (what :func:`parse_folds` reads back)."""
    parts, folds = [], sorted(folds)
    i = 0
    while i < len(folds):
        j = i
        while j + 1 < len(folds) and folds[j + 1] == folds[j] + 1:
            j += 1
        parts.append(str(folds[i]) if i == j else f"{folds[i]}-{folds[j]}")
        i = j + 1
    return ",".join(parts)


def parse_stages(spec: str | Sequence[str]) -> tuple[str, ...]:
    """The stage list from ``"rpn,joint,abs"`` (or a sequence), checked and made explicit.

    The stages are ``train --phase`` values run in order on one model directory, like
    ``train.stages``: ``rpn,joint,abs,joint`` is the paper's recipe. ``abs`` last is short for
    ``abs`` followed by the phase-2 stage before it (``rpn,joint,abs`` -> ``rpn,joint,abs,joint``).
    Rules: names from :data:`STAGES`; ``rpn`` first when present; one ``abs`` at most, after a
    phase-2 stage (``joint`` or ``alternating``) and followed by at most one phase-2 stage (the
    round after ABS); no other stage twice.

    Returns:
      The explicit stage list.

    Raises:
      CrossvalError: naming the problem.
    """
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [str(s).strip() for s in names if str(s).strip()]
    shown = ",".join(names)
    if not names:
        raise CrossvalError(f"stages {spec!r}: no stage (known: {', '.join(STAGES)})")
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise CrossvalError(
            f"stages {shown}: unknown stage(s) {', '.join(unknown)} (known: {', '.join(STAGES)})"
        )
    if "rpn" in names[1:]:
        raise CrossvalError(f"stages {shown}: rpn (phase 1) must come first, once")
    if names.count("abs") > 1:
        raise CrossvalError(f"stages {shown}: one abs round at most")
    before, after = names, []
    if "abs" in names:
        i = names.index("abs")
        before, after = names[:i], names[i + 1 :]
        phase2 = [s for s in before if s in PHASE2]
        if not phase2:
            raise CrossvalError(
                f"stages {shown}: abs mines hard negatives with a phase-2 model; put joint or "
                "alternating before it"
            )
        if not after:
            after = [phase2[-1]]
        if len(after) > 1 or after[0] not in PHASE2:
            raise CrossvalError(
                f"stages {shown}: after abs comes one phase-2 round (joint or alternating)"
            )
    if len(set(before)) != len(before):
        raise CrossvalError(f"stages {shown}: a stage appears twice")
    return tuple(before + (["abs", *after] if "abs" in names else []))


def stages_from_config(config: ExperimentConfig) -> tuple[str, ...]:
    """``train.stages`` of the config when it has that field and it is set, else rpn,joint."""
    stages = getattr(config.train, "stages", None)
    if not stages:
        return DEFAULT_STAGES
    return parse_stages(stages)


@dataclasses.dataclass(frozen=True)
class Step:
    """One training run of a fold.

    Attributes:
      label: its name in logs and timings (``rpn``, ``joint``, ``abs``, ``joint_abs``).
      phase: the ``train.phase`` it runs.
      checkpoint_dir: its folder under ``checkpoints/`` ("" for the ABS pass).
      before_abs: a run that an ABS pass of the same plan follows. Once the pass has written
        its file the run is over, and must not run again: with the file present the trainer
        would take it for a round after ABS (``<phase>_abs``).
    """

    label: str
    phase: str
    checkpoint_dir: str
    before_abs: bool = False


def plan_steps(stages: Sequence[str]) -> list[Step]:
    """The training runs of `stages` (see :func:`parse_stages`).

    ``rpn,joint,abs,joint`` -> rpn, joint, abs, joint_abs: ``python -m tf_agg3d.train --phase``
    rpn, joint, abs, joint on one model directory (the round after ABS trains into
    ``checkpoints/joint_abs``).
    """
    stages = parse_stages(stages)
    has_abs = "abs" in stages
    steps: list[Step] = []
    seen_abs = False
    for name in stages:
        if name == "abs":
            seen_abs = True
            steps.append(Step("abs", "abs", ""))
        elif seen_abs:
            steps.append(Step(f"{name}_abs", name, f"{name}_abs"))
        else:
            steps.append(Step(name, name, name, before_abs=has_abs))
    return steps


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------


def fold_dir(out_dir: str, fold: int) -> str:
    return uio.join(out_dir, f"fold{fold}")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _clear_tensorflow() -> None:
    """Frees the previous run's graphs and variables before the next one is built."""
    import keras

    keras.backend.clear_session()
    gc.collect()


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


class CrossValidation:
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
        self.out_dir = str(out_dir)
        self.cache_dir = str(cache_dir)
        self.config_path = config_path or None
        self.overrides = list(overrides)
        self.log = log or (lambda line: print(line, flush=True))
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

    def done_path(self, fold: int) -> str:
        return uio.join(self.fold_dir(fold), DONE_NAME)

    def is_done(self, fold: int) -> bool:
        return uio.exists(self.done_path(fold))

    def read_done(self, fold: int) -> dict:
        path = self.done_path(fold)
        try:
            record = uio.read_json(path)
        except (ValueError, OSError) as err:
            raise DataError(path, f"unreadable fold marker ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("seriesuids"), list):
            raise DataError(path, "fold marker without a 'seriesuids' list")
        return record

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

    def _timings(self, fold: int) -> dict:
        path = uio.join(self.fold_dir(fold), TIMINGS_NAME)
        if not uio.exists(path):
            return {}
        try:
            return {str(k): float(v) for k, v in uio.read_json(path).items()}
        except (ValueError, OSError, AttributeError):
            return {}

    def _add_time(self, fold: int, timings: dict, key: str, seconds: float) -> None:
        timings[key] = round(timings.get(key, 0.0) + seconds, 3)
        uio.atomic_write_json(uio.join(self.fold_dir(fold), TIMINGS_NAME), timings)

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
          CrossvalError: no held-out scan for the fold. FoldFailed: a scan could not be
          predicted (nothing marked done). The trainer's errors (TrainingInterrupted,
          NonFiniteLossError, DataError, ...) pass through.
        """
        (fold,) = self.check_folds([fold])
        if self.is_done(fold):
            self.log(f"fold {fold}: already done ({self.done_path(fold)}); skipped")
            return self.read_done(fold)
        from tf_agg3d.models import checkpoints as ckpt_lib
        from tf_agg3d.training.abs import ABS_FILE
        from tf_agg3d.training.checks import validate_training_config
        from tf_agg3d.training.strategy import make_strategy
        from tf_agg3d.training.trainer import Trainer

        model_dir = self.fold_dir(fold)
        uids = self.held_out()[fold]
        configs = [self.config(fold, step.phase) for step in self.steps]
        for config in configs:
            validate_training_config(config)
        if strategy is None:
            strategy = make_strategy(configs[0].train.distribute)
        uio.makedirs(model_dir)
        timings = self._timings(fold)
        abs_file = uio.join(model_dir, ABS_FILE)
        self.log(
            f"=== fold {fold}: train on every subset but {fold}, hold out {len(uids)} scan(s); "
            f"stages {' -> '.join(s.label for s in self.steps)}; model {model_dir}"
        )
        for step, config in zip(self.steps, configs, strict=True):
            if step.phase == "abs" and uio.exists(abs_file):
                self.log(f"fold {fold} [{step.label}] hard negatives already mined: {abs_file}")
                continue
            if step.before_abs and uio.exists(abs_file):
                # The ABS pass ran after it, so it finished; rerun, the trainer would see the
                # ABS file and train a round after ABS (checkpoints/<phase>_abs) instead.
                self.log(f"fold {fold} [{step.label}] finished before the ABS pass; skipped")
                continue
            self.log(f"fold {fold} [{step.label}] phase {step.phase}")
            start = time.perf_counter()
            try:
                trainer = Trainer(config, model_dir, strategy=strategy)
                trainer.run()
            finally:
                self._add_time(fold, timings, step.label, time.perf_counter() - start)
                trainer = None
                _clear_tensorflow()

        last = [s for s in self.steps if s.checkpoint_dir][-1]
        checkpoint = ckpt_lib.latest_phase_checkpoint(model_dir, last.checkpoint_dir)
        if checkpoint is None:
            raise ckpt_lib.CheckpointNotFoundError(
                f"{model_dir}: no checkpoint of the last stage ({last.checkpoint_dir}) to "
                "predict with"
            )
        start = time.perf_counter()
        try:
            rows = self._predict(fold, model_dir, checkpoint, uids)
        finally:
            self._add_time(fold, timings, "predict", time.perf_counter() - start)
            _clear_tensorflow()
        train_seconds = sum(v for k, v in timings.items() if k != "predict")
        record = {
            "format": DONE_FORMAT,
            "fold": fold,
            "held_out_subset": fold,
            "seriesuids": list(uids),
            "findings": rows,
            "stages": list(self.stages),
            "steps": [s.label for s in self.steps],
            "checkpoint": checkpoint,
            "timings": timings,
            "train_seconds": round(train_seconds, 3),
            "predict_seconds": timings.get("predict", 0.0),
            "cache": self.cache_dir,
            "config": self.config_path,
            "overrides": self.overrides,
            "finished": _now(),
        }
        uio.atomic_write_json(self.done_path(fold), record)
        self.log(
            f"fold {fold}: done: {len(uids)} scan(s), {rows} finding(s); train "
            f"{train_seconds:.1f} s, predict {timings.get('predict', 0.0):.1f} s"
        )
        return record

    def _predict(self, fold: int, model_dir: str, checkpoint: str, uids: list[str]) -> int:
        """Predicts `uids` with `checkpoint` into ``fold{k}/predictions.csv``; the row count."""
        from tf_agg3d.data.luna16.csv_io import write_predictions
        from tf_agg3d.inference.jobs import cache_jobs
        from tf_agg3d.inference.predictor import Predictor

        predictor = Predictor(model_dir, checkpoint=checkpoint)
        self.log(f"fold {fold} [predict] {len(uids)} held-out scan(s) with {checkpoint}")
        rows, failed = [], []
        jobs = cache_jobs(self.cache_dir, uids)
        for n, (label, job) in enumerate(jobs, start=1):
            try:
                uid, findings = job(predictor)
            except Exception as err:  # noqa: BLE001 - report every failed scan, then fail
                failed.append(f"{label} ({type(err).__name__}: {err})")
                self.log(f"fold {fold} [predict {n}/{len(jobs)}] {label} FAILED: {err}")
                continue
            stats = predictor.last_stats
            self.log(
                f"fold {fold} [predict {n}/{len(jobs)}] {uid}: {stats.num_windows} windows, "
                f"{stats.seconds:.1f} s, {len(findings)} findings"
            )
            rows.extend(f.as_row(uid) for f in findings)
        if failed:
            raise FoldFailed(
                f"fold {fold}: {len(failed)} held-out scan(s) could not be predicted: "
                f"{'; '.join(failed)}; the fold is not marked done (rerun it)"
            )
        write_predictions(uio.join(self.fold_dir(fold), PREDICTIONS_NAME), rows)
        return len(rows)

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
        uio.atomic_write_text(seriesuids, "".join(f"{u}\n" for k in done for u in uids_by_fold[k]))
        self.log(
            f"pooled {len(rows)} finding(s) of {len(owner)} scan(s) from fold(s) "
            f"{format_folds(done)} into {predictions}"
            + (f"; fold(s) {format_folds(missing)} missing" if missing else "")
        )
        return Pool(predictions, seriesuids, done, missing, uids_by_fold, records, len(rows))

    def annotation_files(self, annotations: str = "", excluded: str = "") -> dict:
        """The annotation files of the evaluation: given, else what the cache provides.

        Looked for in order: `annotations` / `excluded`; ``CACHE/annotations.csv`` (and
        ``annotations_excluded.csv``); the LUNA16 root the cache was made from (the sidecars'
        ``source`` is ``ROOT/subsetN/<uid>.mhd``; the CSVs where ``tf_agg3d.preprocess`` looks);
        else both are written from the sidecars' nodules and excluded findings (world mm,
        through each entry's affine) into ``DIR/evaluation/``.

        Returns:
          ``{"annotations": path, "excluded": path or "", "source": how they were found}``.
        """
        if annotations:
            return {"annotations": annotations, "excluded": excluded or "", "source": "given"}
        from tf_agg3d.data.preprocessing.runner import ANNOTATION_LOCATIONS, EXCLUDED_LOCATIONS

        def first(root, locations):
            for rel in locations:
                path = uio.join(root, rel)
                if uio.isfile(path):
                    return path
            return ""

        found = first(self.cache_dir, ANNOTATION_LOCATIONS[:1])
        if found:
            excl = excluded or first(self.cache_dir, EXCLUDED_LOCATIONS[:1])
            return {"annotations": found, "excluded": excl, "source": "cache"}
        root = self._luna_root()
        if root:
            found = first(root, ANNOTATION_LOCATIONS)
            if found:
                excl = excluded or first(root, EXCLUDED_LOCATIONS)
                return {"annotations": found, "excluded": excl, "source": f"luna16 root {root}"}
        return self._annotations_from_sidecars(excluded)

    def _luna_root(self) -> str:
        """The LUNA16 root of the cache's first scan (``ROOT/subsetN/<uid>.mhd``), or ""."""
        from tf_agg3d.data import cache as cache_lib

        for uids in self.held_out().values():
            source = str(cache_lib.read_meta(self.cache_dir, uids[0]).get("source") or "")
            parent = uio.dirname(source)
            if re.fullmatch(r"subset\d", uio.basename(parent) or ""):
                return uio.dirname(parent)
            return ""
        return ""

    def _annotations_from_sidecars(self, excluded: str = "") -> dict:
        import numpy as np

        from tf_agg3d.data import cache as cache_lib

        header = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
        text = {"nodules": header, "excluded": header}
        for uids in self.held_out().values():
            for uid in uids:
                meta = cache_lib.read_meta(self.cache_dir, uid)
                for key in text:
                    boxes = meta[key]
                    if not boxes:
                        continue
                    zyx = np.asarray([[b["z"], b["y"], b["x"]] for b in boxes], np.float64)
                    xyz = cache_lib.cache_voxel_to_world(meta, zyx)
                    for (x, y, z), box in zip(xyz, boxes, strict=True):
                        text[key] += f"{uid},{x!r},{y!r},{z!r},{float(box['d'])!r}\n"
        out = uio.join(self.out_dir, EVALUATION_DIR)
        uio.makedirs(out)
        paths = {
            "annotations": uio.join(out, "annotations_from_cache.csv"),
            "excluded": uio.join(out, "annotations_excluded_from_cache.csv"),
        }
        uio.atomic_write_text(paths["annotations"], text["nodules"])
        uio.atomic_write_text(paths["excluded"], text["excluded"])
        self.log(
            "no annotations.csv given or found beside the cache or its LUNA16 root: evaluating "
            f"against the cache sidecars' nodules, written to {paths['annotations']}"
        )
        return {
            "annotations": paths["annotations"],
            "excluded": excluded or paths["excluded"],
            "source": "cache sidecars",
        }

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
        branches, branch_note = self._branches(inputs, config)
        folds = self._fold_rows(pool, files, config)
        table_path = uio.join(self.out_dir, FOLDS_TABLE_NAME)
        uio.atomic_write_text(table_path, folds_csv(folds))
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
            "finished": _now(),
        }
        uio.atomic_write_json(uio.join(self.out_dir, SUMMARY_NAME), summary)
        return summary

    def _branches(self, inputs, config: EvalConfig) -> tuple[dict | None, str]:
        """Table III's rows (combined, RPN, FPRN) when the evaluation library computes them."""
        from tf_agg3d.evaluation import report

        branch_frocs = getattr(report, "branch_frocs", None)
        if branch_frocs is None:
            return None, (
                "the evaluation library has no per-branch FROC (branch_frocs): only the "
                "combined probability is reported"
            )
        try:
            by_column = branch_frocs(inputs, config, columns=[c for _, c in BRANCHES])
        except DataError as err:
            return None, f"per-branch FROC not computed: {err}"
        return {name: by_column[column] | {"column": column} for name, column in BRANCHES}, ""

    def _fold_rows(self, pool: Pool, files: dict, config: EvalConfig) -> list[dict]:
        """One row per pooled fold: its scans, nodules, FROC alone and seconds."""
        import numpy as np

        from tf_agg3d.evaluation import froc as froc_lib
        from tf_agg3d.evaluation.io import read_annotations, read_predictions

        annotations = read_annotations(files["annotations"])
        excluded = read_annotations(files["excluded"], excluded=True) if files["excluded"] else None
        predictions = read_predictions(pool.predictions)
        rows = []
        for k in pool.folds:
            uids = pool.uids_by_fold[k]
            marks = predictions.subset(np.isin(predictions.seriesuid, uids))
            m = froc_lib.match(
                annotations, excluded, marks, uids, max_marks=config.max_marks, unknown="error"
            )
            result = froc_lib.froc(m, config.fp_rates)
            record = pool.records[k]
            rows.append(
                {
                    "fold": k,
                    "scans": len(uids),
                    "nodules": int(m.n_nodules),
                    "froc": froc_lib._num(result.froc_score),
                    "findings": int(len(marks)),
                    "train_seconds": record.get("train_seconds"),
                    "predict_seconds": record.get("predict_seconds"),
                }
            )
        return rows


FOLD_COLUMNS = ("fold", "scans", "nodules", "froc", "findings", "train_seconds", "predict_seconds")


def folds_csv(rows: Sequence[Mapping]) -> str:
    """The per-fold table as CSV text (empty cells for None)."""
    lines = [",".join(FOLD_COLUMNS)]
    for row in rows:
        lines.append(",".join("" if row.get(c) is None else str(row.get(c)) for c in FOLD_COLUMNS))
    return "\n".join(lines) + "\n"


def format_table(summary: Mapping) -> str:
    """The per-fold table and the pooled line, aligned for a terminal."""

    def cell(v, digits=3):
        if v is None:
            return "-"
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    header = ("fold", "scans", "nodules", "FROC", "findings", "train s", "predict s")
    body = [
        (
            str(r["fold"]),
            str(r["scans"]),
            str(r["nodules"]),
            cell(r["froc"]),
            str(r["findings"]),
            cell(r["train_seconds"], 1),
            cell(r["predict_seconds"], 1),
        )
        for r in summary["folds"]
    ]
    body.append(
        (
            "pooled",
            str(summary["scans"]),
            str(summary["nodules"]),
            cell(summary["froc_score"]),
            str(summary["findings"]),
            cell(sum(r["train_seconds"] or 0.0 for r in summary["folds"]), 1),
            cell(sum(r["predict_seconds"] or 0.0 for r in summary["folds"]), 1),
        )
    )
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in [header]]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Folds as parallel processes
# --------------------------------------------------------------------------------------------


def _relay(stream, prefix: str, log: Callable[[str], None]) -> None:
    for line in stream:
        log(prefix + line.rstrip("\n"))


def run_parallel(
    commands: Mapping[int, Sequence[str]],
    parallel: int,
    gpus: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
    poll_seconds: float = 0.2,
) -> dict[int, int]:
    """Runs one command per fold, `parallel` at a time; each output line prefixed ``[fold k]``.

    Args:
      commands: fold -> its command line (e.g. ``python -m tf_agg3d.crossval ... --folds k``).
      parallel: processes at once (>= 1).
      gpus: GPU ids: process slot j gets ``CUDA_VISIBLE_DEVICES=gpus[j % len(gpus)]``; empty
        leaves the variable as it is (on a CPU machine: just `parallel` processes).
      log: line printer.
      env: the environment (default ``os.environ``).

    Returns:
      fold -> exit status. SIGTERM / SIGINT are passed on to the running folds (which save a
      checkpoint and stop), then re-raised as KeyboardInterrupt once they have ended.
    """
    if parallel < 1:
        raise CrossvalError(f"--parallel must be >= 1, got {parallel}")
    log = log or (lambda line: print(line, flush=True))
    base_env = dict(os.environ if env is None else env)
    pending = list(commands.items())
    free = list(range(parallel))
    running: dict[int, tuple[int, subprocess.Popen, threading.Thread]] = {}
    results: dict[int, int] = {}
    stop: list[int] = []

    def on_signal(signum, frame):
        del frame
        stop.append(signum)
        for _, proc, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        while pending or running:
            while pending and free and not stop:
                slot = free.pop(0)
                fold, command = pending.pop(0)
                proc_env = dict(base_env)
                where = "CPU"
                if gpus:
                    proc_env["CUDA_VISIBLE_DEVICES"] = str(gpus[slot % len(gpus)])
                    where = f"GPU {proc_env['CUDA_VISIBLE_DEVICES']}"
                log(f"[fold {fold}] starting on {where}: {' '.join(command)}")
                proc = subprocess.Popen(
                    list(command),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=proc_env,
                )
                thread = threading.Thread(
                    target=_relay, args=(proc.stdout, f"[fold {fold}] ", log), daemon=True
                )
                thread.start()
                running[slot] = (fold, proc, thread)
            if stop and not running:
                break
            time.sleep(poll_seconds)
            for slot, (fold, proc, thread) in list(running.items()):
                if proc.poll() is not None:
                    thread.join()
                    results[fold] = proc.returncode
                    log(f"[fold {fold}] ended with exit status {proc.returncode}")
                    del running[slot]
                    free.append(slot)
    finally:
        for _, proc, _ in running.values():  # only after an exception of our own
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop:
        raise KeyboardInterrupt(f"stopped by signal {stop[0]}; folds ended: {results}")
    return results

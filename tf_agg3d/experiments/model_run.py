"""One model run of an experiment: train its stages on one model directory, predict held-out scans.

:func:`train_and_predict` is what a cross-validation fold and an ablation run have in common:
the stages of :func:`tf_agg3d.experiments.plan.plan_steps` in order (each a
:class:`tf_agg3d.training.trainer.Trainer` run on the same model directory), then the model of
the last stage predicts the held-out scans of the cache into ``RUN/predictions.csv``.

Resuming is free: a training phase resumes from its newest checkpoint and a finished one
returns at once (the trainer's own rule); the ABS pass is not redone once its file exists, and
the phases before it are not rerun either (with the file present the trainer would take them
for a round after ABS). Prediction is redone whole, it is cheap next to training.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence

from tf_agg3d.config import ExperimentConfig
from tf_agg3d.experiments.plan import Step
from tf_agg3d.experiments.run_dir import RunDir
from tf_agg3d.utils import files as uio


class RunFailed(RuntimeError):
    """Some held-out scans of a run could not be predicted (the run is not marked done)."""


def clear_tensorflow() -> None:
    """Frees the previous run's graphs and variables before the next one is built."""
    import keras

    keras.backend.clear_session()
    gc.collect()


def train_steps(
    run: RunDir,
    steps: Sequence[Step],
    configs: Sequence[ExperimentConfig],
    strategy,
    timings: dict[str, float],
    log: Callable[[str], None],
    tag: str,
) -> None:
    """Trains `steps` (with their `configs`) in order on the model directory of `run`.

    Args:
      run: the run's folder (the model directory).
      steps: the plan; configs: one config per step (its ``train.phase`` set).
      strategy: the tf.distribute strategy.
      timings: the run's timings so far; each step's seconds are added (and written).
      log: line printer; tag: the prefix of each line (``fold 3``, ``3d_ag seed 1``).
    """
    from tf_agg3d.training.abs import ABS_FILE
    from tf_agg3d.training.trainer import Trainer

    abs_file = uio.join(run.path, ABS_FILE)
    for step, config in zip(steps, configs, strict=True):
        if step.phase == "abs" and uio.exists(abs_file):
            log(f"{tag} [{step.label}] hard negatives already mined: {abs_file}")
            continue
        if step.before_abs and uio.exists(abs_file):
            # The ABS pass ran after it, so it finished; rerun, the trainer would see the
            # ABS file and train a round after ABS (checkpoints/<phase>_abs) instead.
            log(f"{tag} [{step.label}] finished before the ABS pass; skipped")
            continue
        log(f"{tag} [{step.label}] phase {step.phase}")
        start = time.perf_counter()
        try:
            trainer = Trainer(config, run.path, strategy=strategy)
            trainer.run()
        finally:
            run.add_time(timings, step.label, time.perf_counter() - start)
            trainer = None
            clear_tensorflow()


def last_checkpoint(model_dir: str, steps: Sequence[Step]) -> str:
    """The newest checkpoint of the last training stage of `steps`.

    Raises:
      CheckpointNotFoundError: that stage has none.
    """
    from tf_agg3d.models import checkpoints as ckpt_lib

    last = [s for s in steps if s.checkpoint_dir][-1]
    checkpoint = ckpt_lib.latest_phase_checkpoint(model_dir, last.checkpoint_dir)
    if checkpoint is None:
        raise ckpt_lib.CheckpointNotFoundError(
            f"{model_dir}: no checkpoint of the last stage ({last.checkpoint_dir}) to predict with"
        )
    return checkpoint


def predict_scans(
    run: RunDir,
    checkpoint: str,
    cache_dir: str,
    uids: Sequence[str],
    log: Callable[[str], None],
    tag: str,
) -> int:
    """Predicts the cache scans `uids` with `checkpoint` into ``RUN/predictions.csv``.

    Returns:
      The number of findings written.

    Raises:
      RunFailed: some scans could not be predicted (each named); nothing is written.
    """
    from tf_agg3d.data.luna16.csv_io import write_predictions
    from tf_agg3d.inference.jobs import cache_jobs, run_jobs
    from tf_agg3d.inference.predictor import Predictor

    predictor = Predictor(run.path, checkpoint=checkpoint)
    log(f"{tag} [predict] {len(uids)} held-out scan(s) with {checkpoint}")
    jobs = cache_jobs(cache_dir, list(uids))
    rows, failed = run_jobs(jobs, predictor, lambda line: log(f"{tag} {line}"), step="predict ")
    if failed:
        raise RunFailed(
            f"{tag}: {len(failed)} held-out scan(s) could not be predicted: "
            + "; ".join(f"{label} ({type(err).__name__}: {err})" for label, err in failed)
            + "; not marked done (rerun it)"
        )
    write_predictions(run.predictions, rows)
    return len(rows)


def train_and_predict(
    run: RunDir,
    steps: Sequence[Step],
    configs: Sequence[ExperimentConfig],
    cache_dir: str,
    uids: Sequence[str],
    strategy=None,
    log: Callable[[str], None] = print,
    tag: str = "run",
) -> dict:
    """Trains `steps` on `run`'s model directory, then predicts `uids` with its last stage.

    Args:
      run: the run's folder; steps, configs: the plan and one config per step.
      cache_dir: the preprocessed cache; uids: the held-out scans to predict.
      strategy: the tf.distribute strategy (default: from the first config's
        ``train.distribute``).
      log: line printer; tag: the prefix of each line.

    Returns:
      ``{"checkpoint", "findings", "timings", "train_seconds", "predict_seconds"}`` for the
      run's DONE.json (which the caller writes once it has what else it needs).

    Raises:
      ConfigError: a config the trainer refuses. RunFailed: a scan could not be predicted.
      The trainer's errors (TrainingInterrupted, NonFiniteLossError, DataError, ...) pass on.
    """
    from tf_agg3d.training.checks import validate_training_config
    from tf_agg3d.training.strategy import make_strategy

    for config in configs:
        validate_training_config(config)
    if strategy is None:
        strategy = make_strategy(configs[0].train.distribute)
    uio.makedirs(run.path)
    timings = run.timings()
    train_steps(run, steps, configs, strategy, timings, log, tag)
    checkpoint = last_checkpoint(run.path, steps)
    start = time.perf_counter()
    try:
        rows = predict_scans(run, checkpoint, cache_dir, uids, log, tag)
    finally:
        run.add_time(timings, "predict", time.perf_counter() - start)
        clear_tensorflow()
    return {
        "checkpoint": checkpoint,
        "findings": rows,
        "timings": timings,
        "train_seconds": round(sum(v for k, v in timings.items() if k != "predict"), 3),
        "predict_seconds": timings.get("predict", 0.0),
    }

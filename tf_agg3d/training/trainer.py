"""The detector's trainer: the generic loop (:mod:`tf_agg3d.training.loop`) driving the
detector's task (:mod:`tf_agg3d.training.detector_task`). What ``python -m tf_agg3d.train``
runs."""

from __future__ import annotations

import tensorflow as tf

from tf_agg3d.config import ExperimentConfig
from tf_agg3d.training.detector_task import DetectorTask
from tf_agg3d.training.loop import TrainingLoop


class Trainer(TrainingLoop):
    """One phase of training (or the ``abs`` phase) of the detector in a model directory.

    Args:
      config: the resolved experiment config (validated by
        :func:`tf_agg3d.training.checks.validate_training_config`).
      model_dir: model directory (created).
      strategy: a tf.distribute strategy; default from ``train.distribute``.
      log: line printer (the chief prints; other workers are silent).
      task: the task to run (default ``DetectorTask(config)``; tests pass a variant of it).

    Typical use: ``Trainer(config, model_dir).run()`` (what ``python -m tf_agg3d.train``
    does). Tests use :meth:`setup` and :meth:`train_steps` directly; the phase's data
    (``train_scans``, ``hard_negatives``, ...) is on :attr:`task`.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        model_dir: str,
        strategy: tf.distribute.Strategy | None = None,
        log=None,
        task: DetectorTask | None = None,
    ):
        super().__init__(task or DetectorTask(config), model_dir, strategy=strategy, log=log)


def train(config: ExperimentConfig, model_dir: str, strategy=None, log=None) -> dict:
    """Runs ``config.train.phase`` in `model_dir` (see :class:`Trainer`); the final summary."""
    return Trainer(config, model_dir, strategy=strategy, log=log).run()


__all__ = ["Trainer", "train"]

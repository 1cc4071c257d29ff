"""Rebuilding a trained detector from its model directory (for predict, export and tests).

A model directory (layout: :mod:`tf_agg3d.models.checkpoints`) holds ``config.yaml`` (the
training :class:`~tf_agg3d.config.ExperimentConfig`, written by
:func:`tf_agg3d.config.save_config`) and the ``tf.train.Checkpoint`` files that the trainer's
``tf.train.CheckpointManager`` writes, with the detector under the key ``model`` (the optimizer
and step counters beside it are not needed here, hence ``expect_partial``).

The directory may be local or a ``tf.io.gfile`` URL (``s3://``, ``gs://``): every lookup goes
through ``tf.io.gfile`` and ``tf.train.latest_checkpoint``, and the checkpoint reader opens the
variable shards through the same filesystems, so nothing is copied to local disk first.
"""

from __future__ import annotations

import tensorflow as tf

from tf_agg3d.config import ExperimentConfig, load_config
from tf_agg3d.models.checkpoints import (
    CONFIG_NAME,
    MODEL_KEY,
    CorruptCheckpointError,
    describe_error,
    find_checkpoint,
    phase_checkpoints,
)
from tf_agg3d.utils import files as uio

# Side of the dummy cube that creates the variables: the smallest input with a whole cell on
# the stride-16 level and room for the FPRN's crops; variables do not depend on input size.
_BUILD_SIDE = 32


class CheckpointMismatchError(ValueError):
    """A checkpoint that lacks weights of the detector its config builds."""


def load_model_config(model_dir: str) -> ExperimentConfig:
    """Reads ``<model_dir>/config.yaml``.

    Raises:
      FileNotFoundError: the model directory has no config.yaml.
      ConfigError: the file is invalid.
    """
    path = uio.join(str(model_dir), CONFIG_NAME)
    if not uio.exists(path):
        raise FileNotFoundError(f"{model_dir}: no {CONFIG_NAME} (not a model directory?)")
    return load_config(path)


def build_variables(detector, side: int = _BUILD_SIDE) -> None:
    """Runs the detector once on a dummy cube so that every variable exists before restore.

    The detector's own call runs the whole path (features, RPN, proposals and, when enabled,
    the FPRN), so every layer is built; variable shapes do not depend on the input size.
    """
    detector(tf.zeros([1, side, side, side, 1], tf.float32), training=False)


def load_detector(
    model_dir: str,
    config: ExperimentConfig | None = None,
    checkpoint: str | None = None,
):
    """Builds the detector of a model directory and restores its weights.

    Args:
      model_dir: directory with ``config.yaml`` and the training checkpoints.
      config: the experiment config to build from (None: the directory's config.yaml). Its
        model section must match the checkpoint's.
      checkpoint: a checkpoint name or number; None for the latest.

    Returns:
      (detector, config).

    Raises:
      CheckpointNotFoundError: no checkpoint in `model_dir` (or the named one is absent).
      CorruptCheckpointError: the checkpoint's files are truncated or damaged (a
        CheckpointNotFoundError naming it and the earlier checkpoints that could be named).
      CheckpointMismatchError: the checkpoint lacks weights of the configured detector.
      FileNotFoundError: no config.yaml and no `config` given.
    """
    from tf_agg3d.models.builder import build_detector

    if config is None:
        config = load_model_config(model_dir)
    # Look the checkpoint up before the (slow) model build, so a wrong directory fails fast.
    prefix = find_checkpoint(model_dir, checkpoint)
    detector = build_detector(config.model)
    build_variables(detector)
    try:
        status = tf.train.Checkpoint(**{MODEL_KEY: detector}).restore(prefix)
    except (tf.errors.OpError, IndexError) as err:
        raise _corrupt(prefix, err) from None
    status.expect_partial()
    # Every detector variable must come from the checkpoint: a model-section mismatch would
    # otherwise silently predict with random weights. (Variable names in the checkpoint are not
    # a usable count: TF stores each variable under its shortest object path, which for
    # trainable weights runs through the optimizer; the object graph still links them to
    # `model/`, and every sublayer is tracked (tf_agg3d.layers.tracking), so this check is
    # complete.)
    try:
        status.assert_existing_objects_matched()
    except AssertionError as err:
        raise CheckpointMismatchError(
            f"{prefix}: the checkpoint does not hold every weight of the detector built from "
            f"the config's model section (a different architecture, or an RPN-only checkpoint "
            f"with model.fpr.enabled true: then pass --set model.fpr.enabled=false). {err}"
        ) from None
    return detector, config


def _corrupt(prefix: str, err: BaseException) -> CorruptCheckpointError:
    """The error for an unreadable checkpoint: names it and the others of its folder."""
    others = [p for p in phase_checkpoints(uio.dirname(prefix)) if p != prefix]
    hint = (
        f"; pass --checkpoint to use an earlier one ({', '.join(uio.basename(p) for p in others)})"
        if others
        else ""
    )
    return CorruptCheckpointError(
        f"{prefix}: checkpoint is unreadable, truncated or damaged ({describe_error(err)}); "
        f"refusing to use it{hint}"
    )

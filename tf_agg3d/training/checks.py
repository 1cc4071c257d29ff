"""Semantic checks of a training config, run before any work starts.

:mod:`tf_agg3d.config` already rejects unknown keys and wrong types; these checks catch values
that parse but cannot work (a phase name that does not exist, a crop the pyramid cannot tile,
an empty cache, ...). Each error names the dotted key.
"""

from __future__ import annotations

from tf_agg3d.config import ConfigError, ExperimentConfig
from tf_agg3d.data import cache as cache_lib
from tf_agg3d.training.schedules import LR_SCHEDULES, OPTIMIZERS
from tf_agg3d.training.strategy import STRATEGIES
from tf_agg3d.utils import files as uio

PHASES = ("rpn", "joint", "alternating", "abs")
TRAINING_PHASES = ("rpn", "joint", "alternating")
RPN_LOSSES = ("adaptive_focal", "focal", "ohem")
# The backbone's coarsest stride (pre-block pool and three transitions).
SIZE_MULTIPLE = 16


def _fail(key: str, problem: str) -> None:
    raise ConfigError(f"{key}: {problem}")


def validate_training_config(config: ExperimentConfig, check_data: bool = True) -> None:
    """Raises :class:`ConfigError` naming the key of the first impossible value.

    Args:
      config: the resolved experiment config (``train.phase`` included).
      check_data: also check that the cache and the uid/ABS files exist (off for unit tests of
        the pure value checks).
    """
    d, t, m, loss = config.data, config.train, config.model, config.loss
    if t.phase not in PHASES:
        _fail("train.phase", f"unknown phase {t.phase!r} (known: {', '.join(PHASES)})")
    if t.phase in ("joint", "alternating") and not m.fpr.enabled:
        _fail("model.fpr.enabled", f"phase {t.phase!r} trains the FPRN, which is disabled")
    if any(n <= 0 or n % SIZE_MULTIPLE for n in d.crop_size):
        _fail("data.crop_size", f"{list(d.crop_size)} must be positive multiples of 16")
    if d.rotate90 and d.crop_size[1] != d.crop_size[2]:
        _fail("data.rotate90", "axial rotations need a square axial crop (crop_size[1] == [2])")
    if d.batch_size < 1:
        _fail("data.batch_size", f"{d.batch_size} must be >= 1")
    if not -1 <= d.fold <= 9:
        _fail("data.fold", f"{d.fold} must be -1 (no hold-out) or a LUNA16 subset 0..9")
    for key, value in (
        ("data.positive_fraction", d.positive_fraction),
        ("data.abs_fraction", d.abs_fraction),
    ):
        if not 0.0 <= value <= 1.0:
            _fail(key, f"{value} must be in [0, 1]")
    if d.positive_fraction + d.abs_fraction > 1.0:
        _fail("data.abs_fraction", "data.positive_fraction + data.abs_fraction must be <= 1")
    lo, hi = d.scale_range
    if not 0.0 < lo <= hi:
        _fail("data.scale_range", f"{list(d.scale_range)} must satisfy 0 < low <= high")
    if d.jitter_mm < 0:
        _fail("data.jitter_mm", "must be >= 0")
    if d.max_boxes < 1:
        _fail("data.max_boxes", "must be >= 1")
    if d.remote_cache_bytes < 0:
        _fail("data.remote_cache_bytes", "must be >= 0 (bytes of remote volumes kept in memory)")
    if len(m.anchors.strides) != len(m.anchors.sizes):
        _fail("model.anchors.sizes", "needs one group of sizes per stride")
    if any(n % s for s in m.anchors.strides for n in d.crop_size):
        _fail("data.crop_size", f"must be divisible by every stride {list(m.anchors.strides)}")
    if loss.rpn_classification not in RPN_LOSSES:
        _fail("loss.rpn_classification", f"{loss.rpn_classification!r} not in {RPN_LOSSES}")
    if t.optimizer not in OPTIMIZERS:
        _fail("train.optimizer", f"{t.optimizer!r} not in {OPTIMIZERS}")
    if t.lr_schedule not in LR_SCHEDULES:
        _fail("train.lr_schedule", f"{t.lr_schedule!r} not in {LR_SCHEDULES}")
    if t.distribute not in STRATEGIES:
        _fail("train.distribute", f"{t.distribute!r} not in {STRATEGIES}")
    if t.learning_rate <= 0:
        _fail("train.learning_rate", "must be > 0")
    if t.epochs < 1 and t.max_steps < 1:
        _fail("train.epochs", "train.epochs or train.max_steps must be >= 1")
    for key in (
        "checkpoint_every_steps",
        "log_every_steps",
        "alternate_every_steps",
        "keep_checkpoints",
    ):
        if getattr(t, key) < 1:
            _fail(f"train.{key}", "must be >= 1")
    if t.fpr_gt_copies < 0:
        _fail("train.fpr_gt_copies", "must be >= 0")
    if t.abs_window_overlap < 0 or t.abs_window_overlap >= min(d.crop_size):
        _fail("train.abs_window_overlap", f"must be in [0, {min(d.crop_size)})")
    if check_data:
        _check_data(config)


def _check_data(config: ExperimentConfig) -> None:
    d = config.data
    if not d.cache_dir:
        _fail("data.cache_dir", "no cache folder given (--cache or data.cache_dir)")
    if not uio.exists(d.cache_dir):
        _fail("data.cache_dir", f"{d.cache_dir} does not exist")
    if not cache_lib.list_uids(d.cache_dir):
        _fail("data.cache_dir", f"{d.cache_dir} has no cache entries (<uid>.npy + <uid>.json)")
    for key in ("train_seriesuids", "val_seriesuids", "abs_file"):
        path = getattr(d, key)
        if path and not uio.exists(path):
            _fail(f"data.{key}", f"{path} does not exist")
    init = config.train.init_checkpoint
    if init and not uio.exists(init + ".index"):
        _fail("train.init_checkpoint", f"{init} is not a checkpoint prefix (no {init}.index)")

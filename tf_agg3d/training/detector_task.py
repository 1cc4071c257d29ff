"""The detector's training task: phases, data, targets, losses and the RPN/FPRN step.

:class:`DetectorTask` is what :class:`~tf_agg3d.training.loop.TrainingLoop` trains (the loop
holds the model, optimizer, step, checkpoints and the schedule of logging, checkpoints and
validation; :mod:`tf_agg3d.training.trainer` puts the two together).

Phases (``train.phase``; Section III.E of the paper):

- ``rpn`` (phase 1): backbone + RPN heads on the RPN loss (``loss.rpn_classification``:
  adaptive focal, focal or OHEM, plus smooth-L1 box regression).
- ``joint`` (phase 2, default): RPN + FPRN losses together, starting from the phase-1
  checkpoint. The FPRN trains on the RPN's proposals of the crop (no gradient into the RPN
  through them) plus ``train.fpr_gt_copies`` jittered copies of every ground-truth box, so that
  positives exist from the first step; proposals are labelled by IoU with the ground truth
  (``model.proposals.fpr_positive_iou`` / ``fpr_negative_iou``) and the FPRN loss is binary
  cross-entropy.
- ``alternating`` (phase 2 option): blocks of ``train.alternate_every_steps`` RPN-loss steps and
  FPRN-loss steps in turn.
- ``abs``: Anchor Based Sampling (:mod:`tf_agg3d.training.abs`); afterwards the training
  phases run one more round (``<phase>_abs``, ``train.abs_epochs`` epochs) that oversamples
  the stored hard negatives.

The step's loss (:meth:`DetectorTask.replica_loss`, inside one replica): the losses come as
additive *terms* (:mod:`tf_agg3d.losses`): loss sums and normaliser counts kept apart. The
counts (N_pos, N_TN, ...) are all-reduced first, so each replica's loss is its own sums over
the *global* counts; with the loop's summed gradients, the sum over replicas of these losses
is exactly the single-device loss of the global batch, for every loss in the package (all are
linear in their sums once the counts are fixed) — except OHEM's choice of hard negatives,
which is made per replica.

Everything that varies along a run is a function of the checkpointed step: the learning rate,
the adaptive focal loss's T, the alternating schedule and the position in the crop stream
(:mod:`tf_agg3d.dataloaders.input_pipeline`), so a resumed run continues exactly where the
checkpoint was.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from tf_agg3d.config import ExperimentConfig
from tf_agg3d.dataloaders import input_pipeline as pipeline
from tf_agg3d.losses.detection_loss import (
    combine_fpr_terms,
    combine_rpn_terms,
    fpr_loss_terms,
    rpn_loss_terms,
)
from tf_agg3d.losses.focal import adaptive_focal_temperature
from tf_agg3d.models import checkpoints as ckpt_lib
from tf_agg3d.ops.targets import assign_proposal_labels
from tf_agg3d.training import abs as abs_lib
from tf_agg3d.utils import files as uio


def _is_count(key: str) -> bool:
    """Normaliser counts in the loss terms are named ``n_*`` (``cls_n_pos``, ``n_fpr``, ...)."""
    return key.startswith("n_") or "_n_" in key


@dataclasses.dataclass
class PhasePlan:
    """What a run of the trainer does.

    Attributes:
      phase: train.phase.
      name: checkpoint folder name (``<phase>`` or ``<phase>_abs`` in the ABS round).
      total_steps: the phase's length.
      steps_per_epoch: steps of one epoch (one crop per training scan per epoch by default).
      abs_file: the hard-negative file this round samples from ("" for none).
    """

    phase: str
    name: str
    total_steps: int
    steps_per_epoch: int
    abs_file: str

    @property
    def trains(self) -> bool:
        """False for the ``abs`` phase: a pass over the trained model, no training step."""
        return self.phase != "abs"


def plan_phase(config: ExperimentConfig, model_dir: str, num_train_scans: int) -> PhasePlan:
    """Resolves the phase's folder name, ABS file and length.

    ``data.abs_file`` empty means: use ``MODEL_DIR/abs_hard_negatives.json`` when the ``abs``
    phase has written it (the round after ABS), else none.
    """
    d, t = config.data, config.train
    abs_file = d.abs_file
    default_abs = uio.join(model_dir, abs_lib.ABS_FILE)
    if not abs_file and t.phase != "abs" and uio.exists(default_abs):
        abs_file = default_abs
    name = t.phase + ("_abs" if abs_file and t.phase != "abs" else "")
    spe = t.steps_per_epoch or max(1, math.ceil(num_train_scans / d.batch_size))
    epochs = t.abs_epochs if abs_file else t.epochs
    total = t.max_steps if t.max_steps > 0 else epochs * spe
    return PhasePlan(t.phase, name, int(total), int(spe), abs_file)


class DetectorTask:
    """Training the detector: one phase (or the ``abs`` phase) of ``config.train.phase``.

    Implements the task interface of :class:`~tf_agg3d.training.loop.TrainingLoop`.

    Args:
      config: the resolved experiment config (validated by
        :func:`tf_agg3d.training.checks.validate_training_config`).

    Attributes (after :meth:`prepare`):
      plan: the :class:`PhasePlan`.
      train_scans, val_scans: the cache's scans of this fold.
      hard_negatives: the ABS entries this round oversamples (empty without an ABS file).
    """

    # Losses shown on the loop's step log line, when the step reports them.
    log_keys = ("rpn_cls", "rpn_reg", "fpr_cls")

    def __init__(self, config: ExperimentConfig):
        self.config = config
        self.crop = tuple(int(n) for n in config.data.crop_size)
        self._val_scorer: abs_lib.ScanScorer | None = None
        self._log = lambda line: None

    # ----------------------------------------------------------------------------------------
    # Setup
    # ----------------------------------------------------------------------------------------

    def prepare(self, model_dir: str, log) -> PhasePlan:
        """Selects the scans, plans the phase and reads the hard negatives of its ABS file."""
        cfg = self.config
        self.model_dir = model_dir
        self._log = log
        self.train_scans, self.val_scans = pipeline.select_scans(cfg.data)
        self.plan = plan_phase(cfg, model_dir, len(self.train_scans))
        self.hard_negatives = (
            pipeline.read_hard_negatives(self.plan.abs_file, [s.uid for s in self.train_scans])
            if self.plan.abs_file
            else []
        )
        return self.plan

    def build_model(self):
        """The detector with every variable created (called in the strategy's scope)."""
        from tf_agg3d.models.builder import build_detector

        model = build_detector(self.config.model)
        # A real call creates every variable (RPN heads and the FPRN included) before the
        # first distributed step; creating them inside strategy.run would fail.
        model(tf.zeros([1, *self.crop, 1], tf.float32), training=False)
        return model

    def initial_checkpoint(self, model_dir: str) -> str | None:
        """Where the weights of a fresh run come from.

        Training phases: init_checkpoint, else phase 1 for phase 2, else the newest model for
        the round after ABS; a new phase-1 model starts from scratch (None). The ``abs`` phase:
        the newest model of the directory.

        Raises:
          FileNotFoundError: the checkpoint the phase needs does not exist.
        """
        t = self.config.train
        if not self.plan.trains:
            prefix = ckpt_lib.latest_model_checkpoint(model_dir)
            if prefix is None:
                raise FileNotFoundError(
                    f"{model_dir}: --phase abs needs a trained model (no checkpoint found)"
                )
            return prefix
        source = t.init_checkpoint or None
        if source is None and self.plan.name.endswith("_abs"):
            source = ckpt_lib.latest_model_checkpoint(model_dir)
            if source is None:
                raise FileNotFoundError(
                    f"{model_dir}: the round after Anchor Based Sampling needs a trained "
                    "model in the model directory"
                )
        elif source is None and self.plan.phase in ("joint", "alternating"):
            source = ckpt_lib.latest_phase_checkpoint(model_dir, "rpn")
            if source is None:
                raise FileNotFoundError(
                    f"{model_dir}: phase {self.plan.phase!r} starts from a phase-1 "
                    "checkpoint; run --phase rpn first (or set train.init_checkpoint)"
                )
        return source

    def dataset_fn(self, start_step: int):
        """``dataset_fn(tf.distribute.InputContext)`` over the crop stream from `start_step`."""
        cfg = self.config
        sampler = pipeline.CropSampler(
            cfg.data, self.train_scans, hard_negatives=self.hard_negatives
        )
        self.sampler = sampler
        note = sampler.volume_cache_summary()
        if note:
            self._log(note)
        global_batch = cfg.data.batch_size
        copies = cfg.train.fpr_gt_copies if self._uses_fpr() else 0

        def dataset_fn(ctx: tf.distribute.InputContext):
            per_replica = ctx.get_per_replica_batch_size(global_batch)
            per_pipeline = global_batch // ctx.num_input_pipelines
            return pipeline.make_dataset(
                sampler,
                cfg.model.anchors,
                per_replica,
                start=start_step * per_pipeline,
                pipeline_id=ctx.input_pipeline_id,
                num_pipelines=ctx.num_input_pipelines,
                gt_copies=copies,
            )

        return dataset_fn

    def _uses_fpr(self) -> bool:
        return self.plan.phase in ("joint", "alternating")

    # ----------------------------------------------------------------------------------------
    # The step
    # ----------------------------------------------------------------------------------------

    def mode_at(self, step: int) -> str:
        """Step kind at `step`: ``rpn``, ``joint`` or (alternating) ``fpr``."""
        if self.plan.phase == "rpn":
            return "rpn"
        if self.plan.phase == "joint":
            return "joint"
        block = step // self.config.train.alternate_every_steps
        return "rpn" if block % 2 == 0 else "fpr"

    def _proposal_levels(self, diameters: tf.Tensor) -> tf.Tensor:
        """Level index whose anchor sizes are closest (log scale) to each diameter."""
        logd = tf.math.log(tf.maximum(diameters, 1e-3))
        dist = [
            tf.reduce_min(
                tf.abs(logd[..., None] - tf.math.log(tf.constant(sizes, tf.float32))), axis=-1
            )
            for sizes in self.config.model.anchors.sizes
        ]
        return tf.argmin(tf.stack(dist, axis=-1), axis=-1, output_type=tf.int32)

    def _fpr_inputs(self, model, logits, deltas, batch):
        """Proposals + jittered ground truth, and their FPRN labels.

        Returns:
          (boxes [b, P + G*K, 4], levels int32 [b, P + G*K], valid bool, labels int32).
        """
        cfg = self.config
        props = model.propose(logits, deltas, self.crop)
        boxes, levels, valid = props["boxes"], props["levels"], props["valid"]
        gt = tf.cast(batch["gt_boxes"], tf.float32)
        copies = cfg.train.fpr_gt_copies
        if copies:
            noise = batch["gt_noise"]
            jitter = cfg.train.fpr_gt_jitter
            real = gt[..., 3] > 0
            d = gt[:, :, None, 3:4]
            centre = gt[:, :, None, :3] + noise[..., :3] * jitter * d
            centre = tf.clip_by_value(centre, 0.0, float(min(self.crop) - 1))
            diam = d * tf.exp(noise[..., 3:4] * jitter)
            jit = tf.concat([centre, diam], axis=-1)
            batch_size = tf.shape(gt)[0]
            jit = tf.reshape(jit, [batch_size, -1, 4])
            jvalid = tf.reshape(tf.repeat(real[..., None], copies, axis=-1), [batch_size, -1])
            # Padding rows get a harmless box, so no NaN can reach the masked-out logits.
            jit = tf.where(jvalid[..., None], jit, tf.constant([0.0, 0.0, 0.0, 4.0]))
            jlevels = tf.where(jvalid, self._proposal_levels(jit[..., 3]), 0)
            boxes = tf.concat([boxes, jit], axis=1)
            levels = tf.concat([levels, jlevels], axis=1)
            valid = tf.concat([valid, jvalid], axis=1)
        pc = cfg.model.proposals
        labels = tf.stack(
            [
                assign_proposal_labels(boxes[i], gt[i], pc.fpr_positive_iou, pc.fpr_negative_iou)
                for i in range(boxes.shape[0])
            ]
        )
        return tf.stop_gradient(boxes), levels, valid, labels

    def combine(self, terms: dict, mode: str, step) -> dict:
        """The losses of a step kind from its terms: ``rpn_*``, ``fpr_*`` and the total ``loss``."""
        cfg = self.config
        out = {}
        loss = tf.constant(0.0)
        if mode in ("rpn", "joint"):
            rpn = combine_rpn_terms(terms, cfg.loss, step)
            out.update(rpn)
            loss += rpn["rpn_loss"]
        if mode in ("joint", "fpr"):
            fpr = combine_fpr_terms(terms, cfg.loss)
            out.update(fpr)
            loss += fpr["fpr_loss"]
        out["loss"] = loss
        return out

    def replica_loss(self, model, batch, mode: str, step) -> tuple[tf.Tensor, dict]:
        """One replica's loss of its part of the batch (called under the loop's gradient tape).

        Args:
          model: the detector.
          batch: this replica's crops: ``volume`` [b, D, H, W, 1], ``labels_<s>`` /
            ``deltas_<s>`` anchor targets per stride, ``gt_boxes`` [b, G, 4] and, with
            ``train.fpr_gt_copies``, ``gt_noise`` [b, G, K, 4].
          mode: the step kind (:meth:`mode_at`).
          step: float32 scalar, the step.

        Returns:
          (loss scalar: this replica's sums over the global batch's counts, the replica's
          loss terms).
        """
        cfg = self.config
        ctx = tf.distribute.get_replica_context()
        labels, deltas = pipeline.split_targets(batch)
        targets = {s: (labels[s], deltas[s]) for s in labels}
        feats = model.features(batch["volume"], training=True)
        logits, rpn_deltas = model.rpn(feats, training=True)
        terms = {}
        if mode in ("rpn", "joint"):
            terms.update(rpn_loss_terms(logits, rpn_deltas, targets, cfg.loss))
        if mode in ("joint", "fpr"):
            boxes, levels, valid, plabels = self._fpr_inputs(model, logits, rpn_deltas, batch)
            fpr_logits = model.classify(feats, boxes, levels, valid, training=True)
            terms.update(fpr_loss_terms(plabels, fpr_logits, valid))
        # Global normalisers: this replica's sums over the counts of the whole batch.
        count_keys = sorted(k for k in terms if _is_count(k))
        counts = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [terms[k] for k in count_keys])
        local = dict(terms)
        local.update(zip(count_keys, counts, strict=True))
        return self.combine(local, mode, step)["loss"], terms

    def replica_report(self, terms: dict, mode: str, step) -> dict:
        """The global batch's losses and (``terms/<name>``) loss terms, all-reduced."""
        ctx = tf.distribute.get_replica_context()
        keys = sorted(terms)
        reduced = ctx.all_reduce(
            tf.distribute.ReduceOp.SUM, [tf.stop_gradient(terms[k]) for k in keys]
        )
        global_terms = dict(zip(keys, reduced, strict=True))
        report = {
            k: tf.cast(v, tf.float32) for k, v in self.combine(global_terms, mode, step).items()
        }
        report.update({f"terms/{k}": v for k, v in global_terms.items()})
        return report

    def scalars(self, step: int) -> dict[str, float]:
        """Extra TensorBoard scalars at `step` (``train/<name>``): the adaptive focal T."""
        lc = self.config.loss
        return {
            "adaptive_focal_T": float(
                adaptive_focal_temperature(float(step), lc.t_start, lc.t_slope, lc.t_max)
            )
        }

    # ----------------------------------------------------------------------------------------
    # Validation, reporting and the abs phase
    # ----------------------------------------------------------------------------------------

    def validate(self, model) -> dict | None:
        """Sensitivity / FP counts on up to ``train.val_max_scans`` validation scans."""
        t = self.config.train
        scans = self.val_scans[: t.val_max_scans]
        if not scans:
            return None
        if self._val_scorer is None:
            self._val_scorer = abs_lib.ScanScorer(
                model,
                self.config,
                t.abs_window_overlap,
                self.config.model.proposals.score_threshold,
                use_fpr=self._uses_fpr(),
            )
        return abs_lib.evaluate_scans(self._val_scorer, scans, self.config.data.cache_dir)

    def describe_validation(self, result: dict) -> tuple[dict[str, float], str]:
        """(``val/<name>`` scalars, the log line's text) of a :meth:`validate` result."""
        scalars = {
            f"{k}@{thr}": values[k]
            for thr, values in result["at"].items()
            for k in ("sensitivity", "fp_per_scan", "found", "false_positives")
        }
        at = ", ".join(
            f"@{thr}: sens {v['sensitivity']:.3f} fp/scan {v['fp_per_scan']:.2f}"
            for thr, v in result["at"].items()
        )
        return scalars, f"on {result['scans']} scans ({at})"

    def describe(self) -> str:
        """The data of the run, for the loop's first log line."""
        return (
            f"{len(self.train_scans)} training scans, {len(self.val_scans)} validation "
            f"scans, {len(self.hard_negatives)} hard negatives"
        )

    def summary_fields(self) -> dict:
        """The task's entries of the run summary."""
        return {
            "train_scans": len(self.train_scans),
            "val_scans": len(self.val_scans),
            "hard_negatives": len(self.hard_negatives),
            "abs_file": self.plan.abs_file,
        }

    def run_pass(self, model, model_dir: str) -> dict:
        """The ``abs`` phase (``plan.trains`` false): hard negatives of every training scan."""
        return abs_lib.run_abs(self.config, model_dir, model, self.train_scans, log=self._log)

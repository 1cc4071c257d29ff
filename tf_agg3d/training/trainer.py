"""Two-phase training of the detector with explicit, distributed custom train steps.

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

The loop (why it is explicit): one ``tf.function`` per step kind pulls the next distributed
batch and runs :meth:`Trainer._replica_step` on every replica with ``strategy.run``. Inside a
replica the losses come as additive *terms* (:mod:`tf_agg3d.losses`): loss sums and
normaliser counts kept apart. The counts (N_pos, N_TN, ...) are all-reduced first, so each
replica's loss is its own sums over the *global* counts; the gradients are then all-reduced
(summed) and clipped by their global norm once, as on one device. The sum over replicas of
these losses is exactly the single-device loss of the global batch, for every loss in the
package (all are linear in their sums once the counts are fixed) — except OHEM's choice of
hard negatives, which is made per replica. BatchNormalization statistics are per replica
unless ``model.backbone.sync_batch_norm`` is set; then
:class:`~tf_agg3d.layers.sync_batch_norm.SyncBatchNormalization` normalises with the moments of
the global batch and the update is the single-device one to float rounding. The Python side of
the loop reads one scalar per step (NaN/Inf check), logs, writes TensorBoard summaries and
checkpoints.

Everything that varies along a run is a function of the checkpointed step: the learning rate,
the adaptive focal loss's T, the alternating schedule and the position in the crop stream
(:mod:`tf_agg3d.data.pipeline`), so a resumed run continues exactly where the checkpoint was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time

import keras
import tensorflow as tf

from tf_agg3d.config import ExperimentConfig, save_config, to_dict
from tf_agg3d.data import pipeline
from tf_agg3d.losses.detection_loss import (
    combine_fpr_terms,
    combine_rpn_terms,
    fpr_loss_terms,
    rpn_loss_terms,
)
from tf_agg3d.losses.focal import adaptive_focal_temperature
from tf_agg3d.ops.targets import assign_proposal_labels
from tf_agg3d.training import abs as abs_lib
from tf_agg3d.training import checkpoints as ckpt_lib
from tf_agg3d.training.schedules import learning_rate, make_optimizer
from tf_agg3d.training.strategy import is_chief, make_strategy, task_info
from tf_agg3d.utils import io as uio

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the run stopped without saving that state."""


class TrainingInterrupted(Exception):  # noqa: N818 - a control-flow signal, not an error
    """SIGTERM/SIGINT arrived; a checkpoint was saved before this was raised.

    Attributes:
      checkpoint: the prefix saved on the way out.
      step: its step.
    """

    def __init__(self, checkpoint: str, step: int):
        super().__init__(f"interrupted at step {step}; saved {checkpoint}")
        self.checkpoint = checkpoint
        self.step = step


def _is_count(key: str) -> bool:
    """Normaliser counts in the loss terms are named ``n_*`` (``cls_n_pos``, ``n_fpr``, ...)."""
    return key.startswith("n_") or "_n_" in key


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


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


class Trainer:
    """One phase of training (or the ``abs`` phase) in a model directory.

    Args:
      config: the resolved experiment config (validated by
        :func:`tf_agg3d.training.checks.validate_training_config`).
      model_dir: model directory (created).
      strategy: a tf.distribute strategy; default from ``train.distribute``.
      log: line printer (the chief prints; other workers are silent).

    Typical use: ``Trainer(config, model_dir).run()`` (what ``python -m tf_agg3d.train``
    does). Tests use :meth:`setup` and :meth:`train_steps` directly.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        model_dir: str,
        strategy: tf.distribute.Strategy | None = None,
        log=None,
    ):
        self.config = config
        self.model_dir = str(model_dir)
        self.strategy = strategy or make_strategy(config.train.distribute)
        self.chief = is_chief(self.strategy)
        self._print = log or (lambda line: print(line, flush=True))
        self._stop_signal: int | None = None
        self._is_setup = False
        self._step_fns: dict[str, tf.types.experimental.GenericFunction] = {}
        self._val_scorer: abs_lib.ScanScorer | None = None
        self.crop = tuple(int(n) for n in config.data.crop_size)
        self.replicas = self.strategy.num_replicas_in_sync

    def log(self, line: str) -> None:
        if self.chief:
            self._print(line)

    # ----------------------------------------------------------------------------------------
    # Setup
    # ----------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Data, model, optimizer and checkpoints; restores or initialises the weights."""
        cfg = self.config
        if cfg.data.batch_size % self.replicas:
            raise ValueError(
                f"data.batch_size={cfg.data.batch_size} (the global batch) must be divisible "
                f"by the {self.replicas} replicas"
            )
        uio.makedirs(self.model_dir)
        if self.chief:
            save_config(cfg, uio.join(self.model_dir, "config.yaml"))
        self.train_scans, self.val_scans = pipeline.select_scans(cfg.data)
        self.plan = plan_phase(cfg, self.model_dir, len(self.train_scans))
        self.hard_negatives = (
            pipeline.read_hard_negatives(self.plan.abs_file, [s.uid for s in self.train_scans])
            if self.plan.abs_file
            else []
        )
        self._build()
        task_type, task_id = task_info(self.strategy)
        self.checkpoints = ckpt_lib.PhaseCheckpoints(
            self.model_dir,
            self.plan.name,
            self.model,
            self.optimizer,
            self.step,
            keep=cfg.train.keep_checkpoints,
            chief=self.chief,
            task_id=task_id,
        )
        self.resumed_from = None
        self.init_from = None
        if self.plan.phase == "abs":
            self._restore_for_abs()
        else:
            self.resumed_from = self.checkpoints.restore_latest()
            if self.resumed_from is None:
                self.init_from = self._initial_weights()
            self.start_step = int(self.step.numpy())
        self._is_setup = True

    def _build(self) -> None:
        cfg = self.config
        from tf_agg3d.models.builder import build_detector

        previous_policy = keras.mixed_precision.global_policy()
        if cfg.train.mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        try:
            with self.strategy.scope():
                keras.utils.set_random_seed(cfg.train.seed)
                self.model = build_detector(cfg.model)
                # A real call creates every variable (RPN heads and the FPRN included) before
                # the first distributed step; creating them inside strategy.run would fail.
                self.model(tf.zeros([1, *self.crop, 1], tf.float32), training=False)
                self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
                self.optimizer = make_optimizer(cfg.train, self.step, self.plan.total_steps)
                self.optimizer.build(self.model.trainable_variables)
        finally:
            keras.mixed_precision.set_global_policy(previous_policy)

    def _initial_weights(self) -> str | None:
        """Weights of a fresh phase: init_checkpoint, else phase 1 for phase 2, else the
        newest model for the round after ABS; a new phase-1 model starts from scratch."""
        t = self.config.train
        source = t.init_checkpoint or None
        if source is None and self.plan.name.endswith("_abs"):
            source = ckpt_lib.latest_model_checkpoint(self.model_dir)
            if source is None:
                raise FileNotFoundError(
                    f"{self.model_dir}: the round after Anchor Based Sampling needs a trained "
                    "model in the model directory"
                )
        elif source is None and self.plan.phase in ("joint", "alternating"):
            source = ckpt_lib.latest_phase_checkpoint(self.model_dir, "rpn")
            if source is None:
                raise FileNotFoundError(
                    f"{self.model_dir}: phase {self.plan.phase!r} starts from a phase-1 "
                    "checkpoint; run --phase rpn first (or set train.init_checkpoint)"
                )
        if source:
            self.checkpoints.init_model_from(source)
            self.log(f"[{self.plan.name}] initialised the model from {source}")
        return source

    def _restore_for_abs(self) -> None:
        prefix = ckpt_lib.latest_model_checkpoint(self.model_dir)
        if prefix is None:
            raise FileNotFoundError(
                f"{self.model_dir}: --phase abs needs a trained model (no checkpoint found)"
            )
        self.checkpoints.init_model_from(prefix)
        self.resumed_from = prefix
        self.start_step = 0

    def make_iterator(self, start_step: int):
        """The distributed iterator over the crop stream, positioned at `start_step`."""
        cfg = self.config
        sampler = pipeline.CropSampler(
            cfg.data, self.train_scans, hard_negatives=self.hard_negatives
        )
        self.sampler = sampler
        note = sampler.volume_cache_summary()
        if note:
            self.log(note)
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

        dist = self.strategy.distribute_datasets_from_function(dataset_fn)
        return iter(dist)

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

    def _fpr_inputs(self, logits, deltas, batch):
        """Proposals + jittered ground truth, and their FPRN labels.

        Returns:
          (boxes [b, P + G*K, 4], levels int32 [b, P + G*K], valid bool, labels int32).
        """
        cfg = self.config
        props = self.model.propose(logits, deltas, self.crop)
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

    def _combine(self, terms: dict, mode: str, step) -> dict:
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

    def _replica_step(self, batch, mode: str):
        cfg = self.config
        ctx = tf.distribute.get_replica_context()
        model = self.model
        labels, deltas = pipeline.split_targets(batch)
        targets = {s: (labels[s], deltas[s]) for s in labels}
        step = tf.cast(self.step, tf.float32)
        mixed = cfg.train.mixed_precision
        with tf.GradientTape() as tape:
            feats = model.features(batch["volume"], training=True)
            logits, rpn_deltas = model.rpn(feats, training=True)
            terms = {}
            if mode in ("rpn", "joint"):
                terms.update(rpn_loss_terms(logits, rpn_deltas, targets, cfg.loss))
            if mode in ("joint", "fpr"):
                boxes, levels, valid, plabels = self._fpr_inputs(logits, rpn_deltas, batch)
                fpr_logits = model.classify(feats, boxes, levels, valid, training=True)
                terms.update(fpr_loss_terms(plabels, fpr_logits, valid))
            # Global normalisers: this replica's sums over the counts of the whole batch.
            count_keys = sorted(k for k in terms if _is_count(k))
            counts = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [terms[k] for k in count_keys])
            local = dict(terms)
            local.update(zip(count_keys, counts, strict=True))
            loss = self._combine(local, mode, step)["loss"]
            scaled = self.optimizer.scale_loss(loss) if mixed else loss
        variables = model.trainable_variables
        grads = tape.gradient(scaled, variables)
        # Variables outside this step kind's graph (the FPRN in an RPN step, the RPN heads in
        # an FPRN step) have no gradient and are left alone.
        pairs = [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
        summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [g for g, _ in pairs])
        scale = tf.cast(self.optimizer.dynamic_scale, tf.float32) if mixed else 1.0
        grad_norm = tf.linalg.global_norm(summed) / scale
        if cfg.train.clip_norm > 0:
            # Clip the all-reduced gradient (Keras' clipnorm would clip each replica's part);
            # with loss scaling the threshold scales with the gradients.
            summed, _ = tf.clip_by_global_norm(summed, cfg.train.clip_norm * scale)
        # The optimizer sums gradients over replicas again; hand it each replica's share.
        shares = [g / float(ctx.num_replicas_in_sync) for g in summed]
        self.optimizer.apply(shares, [v for _, v in pairs])

        # Reporting: the global batch's losses and terms (no gradient needed).
        keys = sorted(terms)
        reduced = ctx.all_reduce(
            tf.distribute.ReduceOp.SUM, [tf.stop_gradient(terms[k]) for k in keys]
        )
        global_terms = dict(zip(keys, reduced, strict=True))
        report = {
            k: tf.cast(v, tf.float32) for k, v in self._combine(global_terms, mode, step).items()
        }
        report.update({f"terms/{k}": v for k, v in global_terms.items()})
        report["grad_norm"] = grad_norm
        return report

    def _step_fn(self, mode: str):
        if mode not in self._step_fns:

            @tf.function
            def step_fn(iterator):
                batch = next(iterator)
                report = self.strategy.run(self._replica_step, args=(batch, mode))
                self.step.assign_add(1)
                # Every replica reports the same all-reduced values; take the first.
                return {
                    k: self.strategy.experimental_local_results(v)[0] for k, v in report.items()
                }

            self._step_fns[mode] = step_fn
        return self._step_fns[mode]

    def train_steps(self, iterator, num_steps: int) -> dict:
        """Runs `num_steps` steps (no logging, checkpoints or checks); returns the last report
        as Python floats. For tests and benchmarks."""
        report = {}
        for _ in range(num_steps):
            mode = self.mode_at(int(self.step.numpy()))
            report = self._step_fn(mode)(iterator)
        return {k: float(v) for k, v in report.items()}

    # ----------------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame):
        del frame
        self._stop_signal = signum

    @contextlib.contextmanager
    def _signals(self):
        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread: no handlers, the loop still works
            previous = {}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _current_lr(self) -> float:
        return float(learning_rate(self.step, self.plan.total_steps, self.config.train))

    def _temperature(self) -> float:
        lc = self.config.loss
        return float(
            adaptive_focal_temperature(float(self.step.numpy()), lc.t_start, lc.t_slope, lc.t_max)
        )

    def validate(self) -> dict | None:
        """Sensitivity / FP counts on up to ``train.val_max_scans`` validation scans."""
        t = self.config.train
        scans = self.val_scans[: t.val_max_scans]
        if not scans or not self.chief:
            return None
        if self._val_scorer is None:
            self._val_scorer = abs_lib.ScanScorer(
                self.model,
                self.config,
                t.abs_window_overlap,
                self.config.model.proposals.score_threshold,
                use_fpr=self._uses_fpr(),
            )
        return abs_lib.evaluate_scans(self._val_scorer, scans, self.config.data.cache_dir)

    def run(self) -> dict:
        """Runs the phase to its end (or the ``abs`` phase); returns the final summary.

        Raises:
          NonFiniteLossError: NaN/Inf loss (nothing saved at that step).
          TrainingInterrupted: SIGTERM/SIGINT (a checkpoint was saved first).
        """
        if not self._is_setup:
            self.setup()
        if self.plan.phase == "abs":
            return self._run_abs()
        with self._signals():
            return self._train_loop()

    def _run_abs(self) -> dict:
        summary = {}
        if self.chief:
            summary = abs_lib.run_abs(
                self.config, self.model_dir, self.model, self.train_scans, log=self.log
            )
            uio.atomic_write_json(uio.join(self.model_dir, "train_summary_abs.json"), summary)
            self.log(json.dumps(summary))
        return summary

    def _train_loop(self) -> dict:
        cfg, plan = self.config, self.plan
        t = cfg.train
        name = plan.name
        writer = (
            tf.summary.create_file_writer(uio.join(self.model_dir, "summaries", name))
            if self.chief
            else tf.summary.create_noop_writer()
        )
        start = self.start_step
        self.log(
            f"[{name}] {len(self.train_scans)} training scans, {len(self.val_scans)} validation "
            f"scans, {len(self.hard_negatives)} hard negatives; global batch "
            f"{cfg.data.batch_size} over {self.replicas} replica(s); steps {start} -> "
            f"{plan.total_steps} ({plan.steps_per_epoch} per epoch)"
            + (f"; resumed from {self.resumed_from}" if self.resumed_from else "")
        )
        t0 = time.time()
        status = "finished"
        report: dict = {}
        validation = None
        last_saved = self.resumed_from
        summary_path = uio.join(self.model_dir, f"train_summary_{name}.json")
        if start >= plan.total_steps:
            self.log(f"[{name}] already finished at step {start}")
            if uio.exists(summary_path):
                return uio.read_json(summary_path)
        else:
            if self.init_from and self.resumed_from is None:
                # Phase 2 owns its weights from now on, so phase 1 can be pruned independently.
                last_saved = self.checkpoints.save()
            iterator = self.make_iterator(start)
            window_t, window_steps = time.time(), 0
            step = start
            while step < plan.total_steps:
                if self._stop_signal is not None:
                    status = "interrupted"
                    break
                mode = self.mode_at(step)
                out = self._step_fn(mode)(iterator)
                step = int(self.step.numpy())
                report = {k: float(v) for k, v in out.items()}
                if not math.isfinite(report["loss"]):
                    status = "non_finite_loss"
                    break
                window_steps += 1
                if step % t.log_every_steps == 0 or step == plan.total_steps:
                    elapsed = time.time() - window_t
                    rate = window_steps / elapsed if elapsed > 0 else 0.0
                    self._log_step(name, step, report, rate, mode)
                    with writer.as_default(step=step):
                        for k, v in report.items():
                            tf.summary.scalar(f"train/{k}", v)
                        tf.summary.scalar("train/learning_rate", self._current_lr())
                        tf.summary.scalar("train/adaptive_focal_T", self._temperature())
                        tf.summary.scalar("train/steps_per_second", rate)
                    window_t, window_steps = time.time(), 0
                if step % t.checkpoint_every_steps == 0 or step == plan.total_steps:
                    last_saved = self.checkpoints.save()
                if t.val_every_steps and step % t.val_every_steps == 0 and step < plan.total_steps:
                    validation = self._validate_and_log(writer, step)
            if status == "finished":
                validation = self._validate_and_log(writer, step) or validation
            elif status == "interrupted" and (
                last_saved is None or ckpt_lib.checkpoint_step(last_saved) != step
            ):
                last_saved = self.checkpoints.save()
        writer.flush()
        summary = self._summary(status, start, report, validation, last_saved, time.time() - t0)
        if self.chief:
            uio.atomic_write_json(summary_path, summary)
            self.log(json.dumps(summary, indent=1))
        if status == "non_finite_loss":
            raise NonFiniteLossError(
                f"[{name}] the loss became non-finite at step {int(self.step.numpy())} "
                f"({ {k: v for k, v in report.items() if not k.startswith('terms/')} }); stopped "
                f"without saving. The last good checkpoint is {last_saved or 'none'}. Lower "
                "train.learning_rate, check the data, or enable train.clip_norm."
            )
        if status == "interrupted":
            raise TrainingInterrupted(last_saved or "", int(self.step.numpy()))
        return summary

    def _log_step(self, name: str, step: int, report: dict, rate: float, mode: str) -> None:
        remaining = (self.plan.total_steps - step) / rate if rate > 0 else float("nan")
        parts = " ".join(
            f"{k} {report[k]:.4f}" for k in ("rpn_cls", "rpn_reg", "fpr_cls") if k in report
        )
        self.log(
            f"[{name}] step {step}/{self.plan.total_steps} ({mode}) loss {report['loss']:.4f} "
            f"({parts}) lr {self._current_lr():.2e} {rate:.2f} steps/s "
            f"ETA {_eta(remaining) if math.isfinite(remaining) else '?'}"
        )

    def _validate_and_log(self, writer, step: int) -> dict | None:
        result = self.validate()
        if result is None:
            return None
        with writer.as_default(step=step):
            for thr, values in result["at"].items():
                for k in ("sensitivity", "fp_per_scan", "found", "false_positives"):
                    tf.summary.scalar(f"val/{k}@{thr}", values[k])
        at = ", ".join(
            f"@{thr}: sens {v['sensitivity']:.3f} fp/scan {v['fp_per_scan']:.2f}"
            for thr, v in result["at"].items()
        )
        self.log(f"[{self.plan.name}] validation on {result['scans']} scans ({at})")
        return result

    def _summary(self, status, start, report, validation, checkpoint, seconds) -> dict:
        final = int(self.step.numpy())
        steps = final - start
        return {
            "status": status,
            "phase": self.plan.phase,
            "phase_dir": self.plan.name,
            "start_step": start,
            "final_step": final,
            "total_steps": self.plan.total_steps,
            "steps_per_epoch": self.plan.steps_per_epoch,
            "seconds": round(seconds, 1),
            "steps_per_second": round(steps / seconds, 3) if seconds > 0 and steps else 0.0,
            "global_batch": self.config.data.batch_size,
            "replicas": self.replicas,
            "train_scans": len(self.train_scans),
            "val_scans": len(self.val_scans),
            "hard_negatives": len(self.hard_negatives),
            "abs_file": self.plan.abs_file,
            "resumed_from": self.resumed_from,
            "initialised_from": self.init_from,
            "checkpoint": checkpoint,
            "last_losses": {k: v for k, v in report.items() if not k.startswith("terms/")},
            "last_terms": {k[6:]: v for k, v in report.items() if k.startswith("terms/")},
            "validation": validation,
            "config": to_dict(self.config)["train"],
        }


def train(config: ExperimentConfig, model_dir: str, strategy=None, log=None) -> dict:
    """Runs ``config.train.phase`` in `model_dir` (see :class:`Trainer`); the final summary."""
    return Trainer(config, model_dir, strategy=strategy, log=log).run()


def exit_code_for(error: BaseException) -> int:
    """Process exit status of a training run that raised `error` (143 after SIGTERM)."""
    if isinstance(error, TrainingInterrupted):
        return SIGTERM_EXIT_CODE
    return 1


__all__ = [
    "NonFiniteLossError",
    "PhasePlan",
    "Trainer",
    "TrainingInterrupted",
    "exit_code_for",
    "plan_phase",
    "train",
]

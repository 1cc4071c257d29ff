"""A generic distributed training loop: steps, resume, checkpoints, signals, logs, validation.

:class:`TrainingLoop` drives a *task* through one run in a model directory, the way Model
Garden's trainer drives its task: the task says what is trained on which data with which loss
(:class:`Task`; the detector's is :class:`tf_agg3d.training.detector_task.DetectorTask`, and
:mod:`tf_agg3d.training.trainer` puts the two together); the loop knows nothing about the
model. It owns the model, the optimizer, the step variable and the run's checkpoints
(:class:`~tf_agg3d.models.checkpoints.PhaseCheckpoints`), and reads ``train.*`` (and
``data.batch_size``, the global batch) of the task's config.

The step (why it is explicit): one ``tf.function`` per step kind (``task.mode_at``) pulls the
next distributed batch and runs :meth:`TrainingLoop._replica_step` on every replica with
``strategy.run``. Inside a replica the task computes its loss under a gradient tape (with its
own cross-replica normalisation); the gradients are then all-reduced (summed) and clipped by
their global norm once, as on one device, and each replica hands the optimizer its share.
BatchNormalization statistics are per replica unless ``model.backbone.sync_batch_norm`` is
set; then :class:`~tf_agg3d.layers.sync_batch_norm.SyncBatchNormalization` normalises with the
moments of the global batch and the update is the single-device one to float rounding.

The Python side of the loop reads one scalar per step (NaN/Inf check), logs, writes
TensorBoard summaries, checkpoints every ``train.checkpoint_every_steps``, validates every
``train.val_every_steps`` and at the end, and on SIGTERM/SIGINT saves and stops. A run resumes
from the newest checkpoint of its folder (the step restores everything that varies along a
run); a fresh run starts from ``task.initial_checkpoint``. A run whose plan does not train
(``plan.trains`` false: the detector's ``abs`` phase) restores that checkpoint and runs
``task.run_pass`` once instead.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

import keras
import tensorflow as tf

from tf_agg3d.config import ExperimentConfig, save_config, to_dict
from tf_agg3d.models import checkpoints as ckpt_lib
from tf_agg3d.training.schedules import learning_rate, make_optimizer
from tf_agg3d.training.strategy import is_chief, make_strategy, task_info
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.atomic_write import atomic_write_json

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


def exit_code_for(error: BaseException) -> int:
    """Process exit status of a training run that raised `error` (143 after SIGTERM)."""
    if isinstance(error, TrainingInterrupted):
        return SIGTERM_EXIT_CODE
    return 1


class Plan(Protocol):
    """What one run does (returned by ``task.prepare``).

    Attributes:
      phase: the kind of run (the summary's ``phase``).
      name: folder of the run's checkpoints and summaries; names ``train_summary_<name>.json``.
      total_steps: the step the run ends at.
      steps_per_epoch: steps of one epoch (for the log).
      trains: False for a run that only passes over a restored model (``task.run_pass``).
    """

    phase: str
    name: str
    total_steps: int
    steps_per_epoch: int

    @property
    def trains(self) -> bool: ...


class Task(Protocol):
    """What :class:`TrainingLoop` needs of a task (see ``DetectorTask`` for the detector's)."""

    config: ExperimentConfig
    log_keys: tuple[str, ...]  # losses of the report shown on the step log line

    def prepare(self, model_dir: str, log: Callable[[str], None]) -> Plan: ...
    def build_model(self) -> keras.Model: ...
    def initial_checkpoint(self, model_dir: str) -> str | None: ...
    def dataset_fn(self, start_step: int) -> Callable[[tf.distribute.InputContext], Any]: ...
    def mode_at(self, step: int) -> str: ...
    def replica_loss(self, model, batch, mode: str, step) -> tuple[tf.Tensor, dict]: ...
    def replica_report(self, terms: dict, mode: str, step) -> dict: ...
    def scalars(self, step: int) -> dict[str, float]: ...
    def validate(self, model) -> dict | None: ...
    def describe_validation(self, result: dict) -> tuple[dict[str, float], str]: ...
    def describe(self) -> str: ...
    def summary_fields(self) -> dict: ...
    def run_pass(self, model, model_dir: str) -> dict: ...


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class TrainingLoop:
    """One run of a task in a model directory.

    Args:
      task: the :class:`Task`.
      model_dir: model directory (created).
      strategy: a tf.distribute strategy; default from ``train.distribute``.
      log: line printer (the chief prints; other workers are silent).

    Typical use: ``TrainingLoop(task, model_dir).run()``. Tests use :meth:`setup` and
    :meth:`train_steps` directly.

    Attributes (after :meth:`setup`): ``plan``, ``model``, ``optimizer``, ``step`` (int64
    variable), ``checkpoints``, ``start_step``, ``resumed_from`` and ``init_from`` (checkpoint
    prefixes or None).
    """

    def __init__(
        self,
        task: Task,
        model_dir: str,
        strategy: tf.distribute.Strategy | None = None,
        log=None,
    ):
        self.task = task
        self.config = task.config
        self.model_dir = str(model_dir)
        self.strategy = strategy or make_strategy(self.config.train.distribute)
        self.chief = is_chief(self.strategy)
        self._print = log or (lambda line: print(line, flush=True))
        self._stop_signal: int | None = None
        self._is_setup = False
        self._step_fns: dict[str, tf.types.experimental.GenericFunction] = {}
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
            save_config(cfg, uio.join(self.model_dir, ckpt_lib.CONFIG_NAME))
        self.plan = self.task.prepare(self.model_dir, self.log)
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
        if not self.plan.trains:
            prefix = self.task.initial_checkpoint(self.model_dir)
            self.checkpoints.init_model_from(prefix)
            self.resumed_from = prefix
            self.start_step = 0
        else:
            # An unreadable newest checkpoint is passed over for the one before (one log line).
            self.resumed_from = self.checkpoints.restore_latest(log=self.log)
            if self.resumed_from is None:
                self.init_from = self._initial_weights()
            self.start_step = int(self.step.numpy())
        self._is_setup = True

    def _build(self) -> None:
        cfg = self.config
        previous_policy = keras.mixed_precision.global_policy()
        if cfg.train.mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        try:
            with self.strategy.scope():
                keras.utils.set_random_seed(cfg.train.seed)
                self.model = self.task.build_model()
                self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
                self.optimizer = make_optimizer(cfg.train, self.step, self.plan.total_steps)
                self.optimizer.build(self.model.trainable_variables)
        finally:
            keras.mixed_precision.set_global_policy(previous_policy)

    def _initial_weights(self) -> str | None:
        """Loads the model of a fresh run from the task's initial checkpoint, if it has one."""
        source = self.task.initial_checkpoint(self.model_dir)
        if source:
            self.checkpoints.init_model_from(source)
            self.log(f"[{self.plan.name}] initialised the model from {source}")
        return source

    def make_iterator(self, start_step: int):
        """The distributed iterator over the task's data, positioned at `start_step`."""
        dataset_fn = self.task.dataset_fn(start_step)
        dist = self.strategy.distribute_datasets_from_function(dataset_fn)
        return iter(dist)

    # ----------------------------------------------------------------------------------------
    # The step
    # ----------------------------------------------------------------------------------------

    def _replica_step(self, batch, mode: str):
        cfg = self.config
        ctx = tf.distribute.get_replica_context()
        model = self.model
        step = tf.cast(self.step, tf.float32)
        mixed = cfg.train.mixed_precision
        with tf.GradientTape() as tape:
            loss, terms = self.task.replica_loss(model, batch, mode, step)
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
        report = self.task.replica_report(terms, mode, step)
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
            mode = self.task.mode_at(int(self.step.numpy()))
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

    def validate(self) -> dict | None:
        """The task's validation of the current model (the chief's; None elsewhere)."""
        if not self.chief:
            return None
        return self.task.validate(self.model)

    def run(self) -> dict:
        """Runs the plan to its end (or the task's pass); returns the final summary.

        Raises:
          NonFiniteLossError: NaN/Inf loss (nothing saved at that step).
          TrainingInterrupted: SIGTERM/SIGINT (a checkpoint was saved first).
        """
        if not self._is_setup:
            self.setup()
        if not self.plan.trains:
            return self._run_pass()
        with self._signals():
            return self._train_loop()

    def _run_pass(self) -> dict:
        summary = {}
        if self.chief:
            summary = self.task.run_pass(self.model, self.model_dir)
            path = uio.join(self.model_dir, f"train_summary_{self.plan.name}.json")
            atomic_write_json(path, summary)
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
            f"[{name}] {self.task.describe()}; global batch "
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
                # The run owns its weights from now on, so their source can be pruned
                # independently (phase 2 of phase 1's).
                last_saved = self.checkpoints.save()
            iterator = self.make_iterator(start)
            window_t, window_steps = time.time(), 0
            step = start
            while step < plan.total_steps:
                if self._stop_signal is not None:
                    status = "interrupted"
                    break
                mode = self.task.mode_at(step)
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
                        for k, v in self.task.scalars(step).items():
                            tf.summary.scalar(f"train/{k}", v)
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
            atomic_write_json(summary_path, summary)
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
        parts = " ".join(f"{k} {report[k]:.4f}" for k in self.task.log_keys if k in report)
        self.log(
            f"[{name}] step {step}/{self.plan.total_steps} ({mode}) loss {report['loss']:.4f} "
            f"({parts}) lr {self._current_lr():.2e} {rate:.2f} steps/s "
            f"ETA {_eta(remaining) if math.isfinite(remaining) else '?'}"
        )

    def _validate_and_log(self, writer, step: int) -> dict | None:
        result = self.validate()
        if result is None:
            return None
        scalars, text = self.task.describe_validation(result)
        with writer.as_default(step=step):
            for k, v in scalars.items():
                tf.summary.scalar(f"val/{k}", v)
        self.log(f"[{self.plan.name}] validation {text}")
        return result

    def _summary(self, status, start, report, validation, checkpoint, seconds) -> dict:
        """The run summary; report entries named ``terms/<name>`` are the loss terms."""
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
            **self.task.summary_fields(),
            "resumed_from": self.resumed_from,
            "initialised_from": self.init_from,
            "checkpoint": checkpoint,
            "last_losses": {k: v for k, v in report.items() if not k.startswith("terms/")},
            "last_terms": {k[6:]: v for k, v in report.items() if k.startswith("terms/")},
            "validation": validation,
            "config": to_dict(self.config)["train"],
        }


__all__ = [
    "NonFiniteLossError",
    "Plan",
    "Task",
    "TrainingInterrupted",
    "TrainingLoop",
    "exit_code_for",
]

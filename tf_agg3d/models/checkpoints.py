"""The model directory's checkpoint layout: phase checkpoints, resume, the "latest model" pointer.

Training writes it (:class:`PhaseCheckpoints`, driven by :mod:`tf_agg3d.training.loop`);
prediction and export find a checkpoint in it (:func:`find_checkpoint`) and restore the
detector (:mod:`tf_agg3d.models.loading`). Layout of a model directory::

  MODEL_DIR/config.yaml                      resolved experiment config (rebuilds the model)
  MODEL_DIR/checkpoints/<phase>/ckpt-<step>  tf.train.CheckpointManager of one phase
  MODEL_DIR/checkpoints/checkpoint           pointer to the newest checkpoint of any phase

Each phase (``rpn``, ``joint``, ``alternating``, and ``<phase>_abs`` for the round after Anchor
Based Sampling) keeps its own manager, so phase 2 never deletes the phase-1 checkpoint it
started from. A checkpoint holds ``model`` (the detector), ``optimizer`` and ``step``; the
adaptive focal loss's T, the learning rate and the position in the crop stream are functions of
the step (see :mod:`tf_agg3d.dataloaders.input_pipeline`), so restoring the step restores them
all.

TensorFlow writes a checkpoint's data before its index and updates the manager's state file by
an atomic rename; the pointer file is written atomically after each save. An interrupted save
therefore leaves the previous checkpoint as the latest. The pointer uses a relative path, so
``tf.train.latest_checkpoint(MODEL_DIR + "/checkpoints")`` finds the newest model for predict
and export (:func:`find_checkpoint`), and a model directory copied to or from object storage
still resolves.

MODEL_DIR may be an ``s3://`` / ``gs://`` URL: TensorFlow's checkpoint writer and
``CheckpointManager`` go through ``tf.io.gfile``, whose object-store renames are copy + delete
(:mod:`tf_agg3d.utils.atomic_write`), and folders are removed with ``tf.io.gfile.rmtree`` there.

Corruption at rest: a checkpoint whose files are truncated or damaged (a copy cut short, a bad
disk) fails to restore with TensorFlow's DataLossError / "Read less bytes than requested".
Training then resumes from the newest good checkpoint of its phase and says so in one line
naming both (:meth:`PhaseCheckpoints.restore_latest`); prediction and export refuse the
checkpoint with :class:`CorruptCheckpointError` naming it (a CheckpointNotFoundError: exit
status 2). A save that fails (a full disk) removes its partial files, leaves the previous
checkpoint and the pointers as they were and raises :class:`CheckpointWriteError`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil

import tensorflow as tf

from tf_agg3d.utils import files as uio
from tf_agg3d.utils.atomic_write import atomic_write_text, is_storage_full
from tf_agg3d.utils.filesystems import ensure_filesystems, is_url

CHECKPOINTS = "checkpoints"
CONFIG_NAME = "config.yaml"
# Key of the detector in the checkpoint (tf_agg3d.models.loading relies on it).
MODEL_KEY = "model"


class CheckpointNotFoundError(FileNotFoundError):
    """A model directory (or a named checkpoint) without a restorable checkpoint."""


class CorruptCheckpointError(CheckpointNotFoundError):
    """A checkpoint whose files cannot be read back (truncated or damaged); names it."""


class CheckpointWriteError(tf.errors.OpError):
    """Saving a checkpoint failed (e.g. a full disk); the previous checkpoint is intact.

    A TensorFlow storage error (OpError), as the failures of TensorFlow's own writer are, so the
    training command reports it in one line with exit status 1 ("rerun to resume").
    """

    def __init__(self, message: str, error_code: int = tf.errors.UNKNOWN):
        super().__init__(None, None, message, error_code)


# What reading a damaged checkpoint raises: DataLossError (checksums), OpError (a bad index,
# a missing shard) and, for a data file cut short, IndexError("Read less bytes than requested").
_UNREADABLE = (tf.errors.OpError, IndexError)
_CKPT_INDEX_RE = re.compile(r"^ckpt-(\d+)\.index$")


def describe_error(err: BaseException, limit: int = 300) -> str:
    """One line of `err`: TensorFlow's message without its function-node prefix."""
    text = getattr(err, "message", None) or str(err) or type(err).__name__
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", str(text)).strip().replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def phase_checkpoints(directory: str) -> list[str]:
    """Prefixes of the ``ckpt-<step>`` checkpoints in one phase folder, newest (highest step)
    first: those the manager's state lists and those whose ``.index`` is on disk."""
    found: set[str] = set()
    # A state file that does not parse (damaged too) is no reason to stop: the files decide.
    with contextlib.suppress(Exception):
        state = tf.train.get_checkpoint_state(directory)
        if state is not None:
            found.update(
                uio.join(directory, uio.basename(p)) for p in state.all_model_checkpoint_paths
            )
    with contextlib.suppress(tf.errors.OpError, OSError):
        if uio.isdir(directory):
            for name in uio.listdir(directory):
                match = _CKPT_INDEX_RE.match(name)
                if match:
                    found.add(uio.join(directory, name[: -len(".index")]))
    numbered = []
    for prefix in found:
        with contextlib.suppress(ValueError, IndexError):
            numbered.append((checkpoint_step(prefix), prefix))
    return [p for _, p in sorted(numbered, reverse=True)]


def phase_dir(model_dir: str, phase_name: str) -> str:
    return uio.join(model_dir, CHECKPOINTS, phase_name)


def latest_phase_checkpoint(model_dir: str, phase_name: str) -> str | None:
    """Newest checkpoint prefix of one phase, or None."""
    return tf.train.latest_checkpoint(phase_dir(model_dir, phase_name))


def latest_model_checkpoint(model_dir: str) -> str | None:
    """Newest checkpoint prefix of any phase (the pointer file), or None."""
    return tf.train.latest_checkpoint(uio.join(model_dir, CHECKPOINTS))


def checkpoint_step(prefix: str) -> int:
    """The step number of a ``.../ckpt-<step>`` prefix."""
    return int(uio.basename(prefix).rsplit("-", 1)[1])


def find_checkpoint(model_dir: str, checkpoint: str | None = None) -> str:
    """The checkpoint prefix to restore.

    The trainer (:class:`PhaseCheckpoints`) writes ``checkpoints/<phase>/ckpt-N``
    and a pointer ``checkpoints/checkpoint`` to the newest of any phase; a plain
    ``tf.train.CheckpointManager`` directory (pointer in `model_dir` itself) works too.

    Args:
      model_dir: the model directory.
      checkpoint: None for the latest; otherwise a prefix, absolute or relative to `model_dir`
        or its ``checkpoints/`` (``checkpoints/joint/ckpt-12``, ``joint/ckpt-12``), a bare
        name found in any phase (``ckpt-12``), or a number (``12`` -> ``ckpt-12``).

    Raises:
      CheckpointNotFoundError: naming the directory (and the checkpoint asked for).
    """
    model_dir = str(model_dir)
    # s3:// exists for tf.io.gfile and the checkpoint reader only once tensorflow-io is loaded.
    ensure_filesystems(model_dir, checkpoint)
    root = uio.join(model_dir, CHECKPOINTS)
    if checkpoint is None or checkpoint == "":
        for directory in (root, model_dir):
            latest = tf.train.latest_checkpoint(directory)
            if latest:
                return latest
        raise CheckpointNotFoundError(
            f"{model_dir}: no checkpoint found (no tf.train 'checkpoint' pointer in {root} or "
            f"{model_dir}); train a model there first or name a checkpoint"
        )
    name = str(checkpoint)
    if name.isdigit():
        name = f"ckpt-{name}"
    candidates = [name] if os.path.isabs(name) or is_url(name) else []
    candidates += [uio.join(model_dir, name), uio.join(root, name)]
    if tf.io.gfile.isdir(root):
        candidates += sorted(tf.io.gfile.glob(uio.join(root, "*", name + ".index")))
    for prefix in candidates:
        prefix = prefix[: -len(".index")] if prefix.endswith(".index") else prefix
        if tf.io.gfile.exists(prefix + ".index"):
            return prefix
    raise CheckpointNotFoundError(
        f"{model_dir}: checkpoint '{checkpoint}' not found (no {name}.index in {model_dir}, "
        f"{root} or its phase folders)"
    )


def _remove_tree(path: str) -> None:
    """Removes a folder, local or URL; a missing one is fine."""
    if is_url(path):
        # shutil knows nothing of URLs; on object stores this deletes every object below.
        with contextlib.suppress(tf.errors.NotFoundError):
            if tf.io.gfile.exists(path):
                tf.io.gfile.rmtree(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _remove_partial(prefix: str) -> None:
    """Removes what a failed save of `prefix` left: TensorFlow's ``<prefix>_temp`` folder and a
    data shard without its index."""
    _remove_tree(prefix + "_temp")
    folder = uio.dirname(prefix)
    with contextlib.suppress(tf.errors.OpError, OSError):
        for name in uio.listdir(folder):
            if name.startswith(uio.basename(prefix) + ".data-"):
                uio.remove(uio.join(folder, name))


def _write_pointer(model_dir: str, prefix: str) -> None:
    root = uio.join(model_dir, CHECKPOINTS)
    rel = prefix[len(root) :].lstrip("/") if prefix.startswith(root) else prefix
    text = f'model_checkpoint_path: "{rel}"\nall_model_checkpoint_paths: "{rel}"\n'
    atomic_write_text(uio.join(root, "checkpoint"), text)


class PhaseCheckpoints:
    """Save/restore of one training phase.

    Args:
      model_dir: the model directory.
      phase_name: folder name under ``checkpoints/`` (``rpn``, ``joint``, ``joint_abs`` ...).
      model: the detector (built).
      optimizer: the optimizer (built).
      step: int64 scalar variable, the phase's step.
      keep: checkpoints kept (older ones deleted).
      chief: this process writes the real files; other multi-worker processes save into a
        scratch folder removed after each save (every worker must take part in a save).
      task_id: the worker's id, names its scratch folder.
    """

    def __init__(
        self,
        model_dir: str,
        phase_name: str,
        model,
        optimizer,
        step: tf.Variable,
        keep: int = 3,
        chief: bool = True,
        task_id: int | None = None,
    ):
        self.model_dir = model_dir
        self.directory = phase_dir(model_dir, phase_name)
        self.chief = chief
        self.step = step
        self.checkpoint = tf.train.Checkpoint(**{MODEL_KEY: model}, optimizer=optimizer, step=step)
        write_dir = (
            self.directory
            if chief
            else uio.join(model_dir, CHECKPOINTS, f".worker-{task_id}-{phase_name}")
        )
        self._write_dir = write_dir
        self.manager = tf.train.CheckpointManager(
            self.checkpoint,
            write_dir,
            max_to_keep=max(1, keep),
            checkpoint_name="ckpt",
            step_counter=step,
        )
        self._model = model

    def latest(self) -> str | None:
        """Newest checkpoint of this phase (in the chief's folder, which every worker reads)."""
        return tf.train.latest_checkpoint(self.directory)

    def restore_latest(self, log=None) -> str | None:
        """Restores model, optimizer and step from this phase's newest readable checkpoint.

        A checkpoint that cannot be read (truncated or damaged files) is passed over for the
        one before it, and `log` gets one line naming both.

        Args:
          log: a line printer for that notice (None: silent).

        Returns:
          The prefix restored, or None when the phase has no checkpoint.

        Raises:
          CorruptCheckpointError: the phase has checkpoints and none of them can be read.
          AssertionError: a readable checkpoint that does not match the model.
        """
        candidates = phase_checkpoints(self.directory)
        bad: list[tuple[str, str]] = []
        for prefix in candidates:
            try:
                self.checkpoint.restore(prefix).assert_existing_objects_matched()
            except _UNREADABLE as err:
                bad.append((prefix, describe_error(err)))
                continue
            if bad and log is not None:
                newest, why = bad[0]
                log(
                    f"checkpoint {newest} is unreadable ({why}); resuming from the previous "
                    f"good checkpoint {prefix}"
                    + (f" ({len(bad) - 1} more unreadable one(s) skipped)" if len(bad) > 1 else "")
                )
            return prefix
        if bad:
            names = ", ".join(p for p, _ in bad)
            raise CorruptCheckpointError(
                f"{self.directory}: no readable checkpoint to resume from ({names} cannot be "
                f"read: {bad[0][1]}); remove them to start the phase over"
            )
        return None

    def init_model_from(self, prefix: str) -> None:
        """Loads only the detector's weights from another checkpoint (phase 2 from phase 1).

        Raises:
          ValueError: a checkpoint whose detector does not match this one.
          CorruptCheckpointError: the checkpoint's files cannot be read.
        """
        try:
            status = tf.train.Checkpoint(**{MODEL_KEY: self._model}).restore(prefix)
        except _UNREADABLE as err:
            raise CorruptCheckpointError(
                f"{prefix}: checkpoint is unreadable, truncated or damaged ({describe_error(err)})"
            ) from None
        status.expect_partial()
        try:
            status.assert_existing_objects_matched()
        except AssertionError as err:
            raise ValueError(
                f"{prefix}: its model does not match the configured one ({err})"
            ) from None

    def save(self) -> str:
        """Saves at the current step; returns the prefix (the chief's).

        Raises:
          CheckpointWriteError: the save failed (a full disk, a storage error); its partial
            files are removed and the previous checkpoint stays the latest.
        """
        step = int(self.step.numpy())
        previous = self.latest()
        target = uio.join(self._write_dir, f"ckpt-{step}")
        try:
            path = self.manager.save(checkpoint_number=step)
            if self.chief:
                _write_pointer(self.model_dir, path)
        except (tf.errors.OpError, OSError) as err:
            if self.chief and not uio.exists(target + ".index"):
                _remove_partial(target)
            full = is_storage_full(err)
            raise CheckpointWriteError(
                f"{target}: cannot save the checkpoint ("
                + ("the storage is full: " if full else "")
                + f"{describe_error(err)}); "
                + (
                    f"the previous checkpoint {previous} is intact"
                    if previous
                    else "no earlier checkpoint of this phase"
                )
                + "; free space (or fix the storage) and rerun to resume",
                tf.errors.RESOURCE_EXHAUSTED if full else tf.errors.UNKNOWN,
            ) from err
        if not self.chief:
            _remove_tree(self._write_dir)
            path = uio.join(self.directory, uio.basename(path))
        return path

"""Corruption at rest and full disks: checkpoints and cache entries.

- A truncated or damaged newest checkpoint: training resumes from the one before and says so in
  one line naming both; with every checkpoint damaged it refuses, naming them. Prediction and
  export refuse a damaged checkpoint with a CorruptCheckpointError naming it (exit status 2).
- A disk that fills up while a checkpoint or a cache entry is written (an injected ``ENOSPC``
  part-way through a write; a real full tmpfs for TensorFlow's own checkpoint writer where the
  tests run as root): the run stops with a message naming the file, the previous checkpoint or
  cache entry is intact, and a rerun completes.
- A truncated cache ``.npy`` or a sidecar whose shape disagrees with its array: named and
  redone by preprocessing, named and skipped by prediction (the other scans go on).

The training tests drive :class:`~tf_agg3d.training.loop.TrainingLoop` with a two-layer Keras
task (no detector), so they take seconds.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import PYTHON, REPO, TINY_DETECTOR_OVERRIDES, subprocess_env, write_cache

from tf_agg3d.config import PreprocessConfig, load_config
from tf_agg3d.data import cache
from tf_agg3d.data.preprocessing.runner import run_preprocess
from tf_agg3d.data.synthetic.luna16 import generate_dataset
from tf_agg3d.models import checkpoints as ckpt_lib
from tf_agg3d.training.loop import TrainingLoop
from tf_agg3d.utils import atomic_write

# --------------------------------------------------------------------------------------------
# A tiny task for the generic training loop
# --------------------------------------------------------------------------------------------


class _Plan:
    phase = name = "fake"
    total_steps = 4
    steps_per_epoch = 4
    trains = True


class _TinyTask:
    """Fits y = sum(x) with two Dense layers; everything else of the Task protocol is empty."""

    log_keys = ()

    def __init__(self, config):
        self.config = config

    def prepare(self, model_dir, log):
        return _Plan()

    def build_model(self):
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(8), keras.layers.Dense(1)])

    def initial_checkpoint(self, model_dir):
        return None

    def dataset_fn(self, start_step):
        def fn(ctx):
            x = tf.random.stateless_normal([64, 3], seed=[1, start_step])
            data = tf.data.Dataset.from_tensor_slices((x, tf.reduce_sum(x, 1, keepdims=True)))
            return data.repeat().batch(ctx.get_per_replica_batch_size(2))

        return fn

    def mode_at(self, step):
        return "train"

    def replica_loss(self, model, batch, mode, step):
        x, y = batch
        loss = tf.reduce_mean((model(x) - y) ** 2)
        return loss, {"loss": loss}

    def replica_report(self, terms, mode, step):
        return {"loss": terms["loss"]}

    def scalars(self, step):
        return {}

    def validate(self, model):
        return None

    def describe_validation(self, result):
        return {}, ""

    def describe(self):
        return "tiny task"

    def summary_fields(self):
        return {}

    def run_pass(self, model, model_dir):
        return {}


def _config():
    return load_config(
        None,
        [
            "data.batch_size=2",
            "train.checkpoint_every_steps=2",
            "train.log_every_steps=100",
            "train.distribute=one_device",
        ],
    )


def _train(model_dir, lines=None):
    """A fresh loop on `model_dir` run to its end; returns (loop, summary)."""
    log = lines.append if lines is not None else (lambda line: None)
    loop = TrainingLoop(_TinyTask(_config()), str(model_dir), log=log)
    return loop, loop.run()


def _phase(model_dir) -> str:
    return ckpt_lib.phase_dir(str(model_dir), "fake")


def _damage(prefix: str, how: str) -> None:
    data, index = prefix + ".data-00000-of-00001", prefix + ".index"
    if how == "truncated data":
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
    elif how == "flipped data byte":
        with open(data, "r+b") as f:
            f.seek(os.path.getsize(data) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif how == "truncated index":
        with open(index, "r+b") as f:
            f.truncate(os.path.getsize(index) // 2)
    elif how == "missing data":
        os.remove(data)
    else:
        raise AssertionError(how)


# --------------------------------------------------------------------------------------------
# Corrupt checkpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "how", ["truncated data", "flipped data byte", "truncated index", "missing data"]
)
def test_training_resumes_from_the_previous_good_checkpoint(tmp_path, how):
    model_dir = tmp_path / "model"
    first, summary = _train(model_dir)
    assert summary["checkpoint"].endswith("ckpt-4")
    ckpt2, ckpt4 = (os.path.join(_phase(model_dir), f"ckpt-{n}") for n in (2, 4))
    good = first.model.get_weights()
    _damage(ckpt4, how)

    # The loop resumes from ckpt-2, says so in one line naming both, and trains on to step 4.
    lines: list[str] = []
    loop = TrainingLoop(_TinyTask(_config()), str(model_dir), log=lines.append)
    loop.setup()
    assert loop.resumed_from == ckpt2 and loop.start_step == 2
    notice = [line for line in lines if "unreadable" in line]
    assert len(notice) == 1 and ckpt4 in notice[0] and ckpt2 in notice[0], lines
    assert f"resuming from the previous good checkpoint {ckpt2}" in notice[0]
    summary = loop.run()
    assert (summary["start_step"], summary["final_step"]) == (2, 4), summary
    # The step-4 checkpoint is whole again: a third run restores it without a notice.
    lines.clear()
    again = TrainingLoop(_TinyTask(_config()), str(model_dir), log=lines.append)
    again.setup()
    assert again.resumed_from == ckpt4 and again.start_step == 4
    assert not [line for line in lines if "unreadable" in line], lines
    assert len(again.model.get_weights()) == len(good)


def test_training_refuses_when_every_checkpoint_is_damaged(tmp_path):
    model_dir = tmp_path / "model"
    _train(model_dir)
    for n in (2, 4):
        _damage(os.path.join(_phase(model_dir), f"ckpt-{n}"), "truncated data")
    loop = TrainingLoop(_TinyTask(_config()), str(model_dir))
    with pytest.raises(ckpt_lib.CorruptCheckpointError) as info:
        loop.setup()
    message = str(info.value)
    assert "ckpt-4" in message and "ckpt-2" in message and "no readable checkpoint" in message
    assert isinstance(info.value, FileNotFoundError)  # the commands' status 2


# --------------------------------------------------------------------------------------------
# Full disks
# --------------------------------------------------------------------------------------------


def _enospc_after(fraction: float, match: str):
    """A stand-in for atomic_write._write_all that writes `fraction` of the bytes of files whose
    name ends with `match`, then fails as a full disk does."""
    real = atomic_write._write_all

    def write(f, data, path):
        if os.path.basename(path).endswith(match):
            f.write(data[: int(len(data) * fraction)])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data, path)

    return write


def _bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _edit_json(path, **changes) -> None:
    with open(path) as f:
        meta = json.load(f)
    meta.update(changes)
    with open(path, "w") as f:
        json.dump(meta, f)


def test_full_disk_while_the_checkpoint_pointer_is_written(tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    loop, _ = _train(model_dir)
    pointer = os.path.join(str(model_dir), "checkpoints", "checkpoint")
    before = _bytes(pointer)
    loop.step.assign(6)
    monkeypatch.setattr(atomic_write, "_write_all", _enospc_after(0.5, "checkpoint"))
    with pytest.raises(ckpt_lib.CheckpointWriteError) as info:
        loop.checkpoints.save()
    message = str(info.value)
    assert "ckpt-6: cannot save the checkpoint (the storage is full" in message, message
    assert f"{os.path.join(_phase(model_dir), 'ckpt-4')} is intact" in message, message
    assert info.value.error_code == tf.errors.RESOURCE_EXHAUSTED
    assert _bytes(pointer) == before  # the pointer is the old one, whole
    assert not [n for n in os.listdir(os.path.dirname(pointer)) if n.startswith(".tmp-")]
    monkeypatch.undo()
    assert loop.checkpoints.save().endswith("ckpt-6")  # space again: the save completes


def test_full_disk_inside_the_checkpoint_writer(tmp_path, monkeypatch):
    """TensorFlow's writer is C++: the failure is injected where the manager calls it, leaving
    the partial files a real full disk leaves (checked for real in the tmpfs test below)."""
    model_dir = tmp_path / "model"
    loop, _ = _train(model_dir)
    phase = _phase(model_dir)
    ckpt4 = os.path.join(phase, "ckpt-4")
    real_write = type(loop.checkpoints.checkpoint)._write

    def full_disk(self, prefix, options=None):
        os.makedirs(prefix + "_temp")
        with open(os.path.join(prefix + "_temp", "part-00000-of-00001.data-00000-of-00001"), "wb"):
            pass
        with open(prefix + ".data-00000-of-00001", "wb") as f:
            f.write(b"partial")
        raise tf.errors.ResourceExhaustedError(
            None, None, f"{prefix}_temp/part-00000: No space left on device [Op:SaveV2]"
        )

    monkeypatch.setattr(type(loop.checkpoints.checkpoint), "_write", full_disk)
    loop.step.assign(6)
    with pytest.raises(ckpt_lib.CheckpointWriteError) as info:
        loop.checkpoints.save()
    message = str(info.value)
    assert f"{os.path.join(phase, 'ckpt-6')}: cannot save the checkpoint" in message, message
    assert "No space left on device" in message and f"{ckpt4} is intact" in message, message
    # The partial files are gone, the previous checkpoint is the latest and restores.
    assert sorted(n for n in os.listdir(phase) if "ckpt-6" in n) == []
    assert ckpt_lib.latest_phase_checkpoint(str(model_dir), "fake") == ckpt4
    monkeypatch.setattr(type(loop.checkpoints.checkpoint), "_write", real_write)
    resumed = TrainingLoop(_TinyTask(_config()), str(model_dir))
    resumed.setup()
    assert resumed.resumed_from == ckpt4
    assert loop.checkpoints.save().endswith("ckpt-6")  # a rerun completes


@contextlib.contextmanager
def _tiny_tmpfs(path, size: str):
    """Mounts a tmpfs of `size` at `path` (root only); skips the test where that is impossible."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(folder: str) -> str:
    """Fills the filesystem of `folder` with one file; returns its path."""
    path = os.path.join(folder, "filler")
    with contextlib.suppress(OSError), open(path, "wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    return path


def test_a_really_full_disk_during_a_checkpoint_save(tmp_path):
    with _tiny_tmpfs(tmp_path / "disk", "1m") as disk:
        model_dir = os.path.join(disk, "model")
        loop, _ = _train(model_dir)
        phase = _phase(model_dir)
        filler = _fill(disk)
        loop.step.assign(6)
        with pytest.raises(ckpt_lib.CheckpointWriteError) as info:
            loop.checkpoints.save()
        message = str(info.value)
        assert "ckpt-6: cannot save the checkpoint (the storage is full" in message, message
        assert f"{os.path.join(phase, 'ckpt-4')} is intact" in message, message
        assert not [n for n in os.listdir(phase) if n.startswith("ckpt-6")], os.listdir(phase)
        assert ckpt_lib.latest_phase_checkpoint(model_dir, "fake").endswith("ckpt-4")
        os.remove(filler)
        assert loop.checkpoints.save().endswith("ckpt-6")


def test_full_disk_keeps_the_previous_cache_entry(tmp_path, monkeypatch):
    folder = str(tmp_path / "cache")
    write_cache(folder, n_scans=1, shape=(20, 20, 20))
    npy, sidecar = cache.volume_path(folder, "scan0"), cache.meta_path(folder, "scan0")
    before = (_bytes(npy), _bytes(sidecar))
    meta = cache.read_meta(folder, "scan0")
    # The volume is written whole, the sidecar fails half-way: neither file may change.
    monkeypatch.setattr(atomic_write, "_write_all", _enospc_after(0.5, "scan0.json"))
    with pytest.raises(atomic_write.WriteError) as info:
        meta.pop("shape")
        cache.write_entry(folder, "scan0", np.ones((9, 9, 9), np.int16), meta)
    assert str(info.value).startswith(f"{sidecar}: cannot write (No space left on device)")
    assert atomic_write.is_storage_full(info.value)
    assert (_bytes(npy), _bytes(sidecar)) == before
    assert sorted(os.listdir(folder)) == ["scan0.json", "scan0.npy"]  # no temporary left


@pytest.fixture(scope="module")
def luna(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("luna16"))
    uids = generate_dataset(root, n_scans=3, seed=1, shape=(40, 64, 64))["uids"]
    return root, sorted(uids)


def test_preprocess_stops_on_a_full_disk_and_a_rerun_completes(tmp_path, luna, monkeypatch):
    root, uids = luna
    out = str(tmp_path / "cache")
    lines: list[str] = []
    monkeypatch.setattr(atomic_write, "_write_all", _enospc_after(0.3, f"{uids[1]}.npy"))
    summary = run_preprocess(root, out, PreprocessConfig(), report=lines.append)
    assert summary.ok == [uids[0]] and list(summary.failed) == [uids[1]], lines
    assert summary.not_started == [uids[2]] and summary.stopped, lines
    text = "\n".join(lines)
    assert f"{os.path.join(out, uids[1])}.npy: cannot write (No space left on device)" in text
    assert (
        "stopping: the storage is full" in text and "stopped early, 1 scan(s) not started" in text
    )
    assert sorted(os.listdir(out)) == [f"{uids[0]}.json", f"{uids[0]}.npy"]  # no partial files

    monkeypatch.undo()
    again = run_preprocess(root, out, PreprocessConfig(), report=lines.append)
    assert again.skipped == [uids[0]] and sorted(again.ok) == uids[1:] and not again.failed


def test_preprocess_redoes_unreadable_entries_naming_them(tmp_path, luna):
    root, uids = luna
    out = str(tmp_path / "cache")
    run_preprocess(root, out, PreprocessConfig(), report=lambda line: None)
    truncated, disagreeing, good = uids
    npy = cache.volume_path(out, truncated)
    with open(npy, "r+b") as f:
        f.truncate(os.path.getsize(npy) - 100)
    sidecar = cache.meta_path(out, disagreeing)
    _edit_json(sidecar, shape=[n + 1 for n in cache.read_meta(out, disagreeing)["shape"]])

    lines: list[str] = []
    summary = run_preprocess(root, out, PreprocessConfig(), report=lines.append)
    assert sorted(summary.ok) == sorted([truncated, disagreeing]) and summary.skipped == [good]
    redo = [line for line in lines if line.startswith("redo")]
    assert len(redo) == 2, lines
    assert f"{npy}: cache volume is truncated or corrupt" in redo[0] + redo[1]
    assert f"{sidecar}: sidecar shape" in redo[0] + redo[1]
    assert all(cache.has_entry(out, u) for u in uids)


# --------------------------------------------------------------------------------------------
# Prediction and export: a damaged cache entry is skipped, a damaged checkpoint refused
# --------------------------------------------------------------------------------------------


def _run(*args):
    return subprocess.run(
        [PYTHON, "-m", *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_predict_skips_damaged_entries_and_predict_and_export_refuse_a_damaged_checkpoint(
    tmp_path,
):
    from support import write_model_dir

    config = load_config(None, [*TINY_DETECTOR_OVERRIDES, "inference.max_marks=3"])
    model_dir = tmp_path / "model"
    detector = write_model_dir(config, model_dir, seed=5)
    folder = write_cache(str(tmp_path / "cache"), n_scans=3, shape=(32, 32, 32))
    npy = cache.volume_path(folder, "scan0")
    with open(npy, "r+b") as f:  # a copy cut short
        f.truncate(os.path.getsize(npy) // 2)
    sidecar = cache.meta_path(folder, "scan1")
    _edit_json(sidecar, shape=[32, 32, 33])

    out = str(tmp_path / "predictions.csv")
    done = _run("tf_agg3d.predict", f"--model-dir={model_dir}", f"--cache={folder}", f"--out={out}")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert f"scan0 FAILED: DataError: {npy}: cache volume is truncated or corrupt" in log, log
    assert f"scan1 FAILED: DataError: {sidecar}, field 'shape': sidecar shape [32, 32, 33]" in log
    assert "2 failed: scan0, scan1" in log, log
    assert {line.split(",")[0] for line in _bytes(out).decode().splitlines()[1:]} <= {"scan2"}

    # A second checkpoint, then damage it: predict and export refuse it, naming it (status 2).
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=detector), str(model_dir), 5)
    ckpt2 = manager.save(checkpoint_number=2)
    assert ckpt2 == os.path.join(str(model_dir), "ckpt-2")
    _damage(ckpt2, "truncated data")
    for args in (
        ["tf_agg3d.predict", f"--model-dir={model_dir}", f"--cache={folder}", f"--out={out}"],
        ["tf_agg3d.export", f"--model-dir={model_dir}", f"--export-base={tmp_path / 'serving'}"],
    ):
        done = _run(*args)
        assert done.returncode == 2, args[0] + done.stdout[-3000:] + done.stderr[-3000:]
        assert f"CorruptCheckpointError: {ckpt2}: checkpoint is unreadable" in done.stderr
        assert "pass --checkpoint to use an earlier one (ckpt-1)" in done.stderr, done.stderr
    assert not os.path.exists(tmp_path / "serving" / "agg3d" / "1")

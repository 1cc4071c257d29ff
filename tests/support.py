"""Helpers shared by the test folders: tiny configs and models, cache sidecars, a toy cache.

tests/conftest.py puts this folder on ``sys.path``, so a test in any folder below imports them
with ``from support import ...``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import yaml

from tf_agg3d.config import BackboneConfig, load_config
from tf_agg3d.data import cache as cache_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


# oneDNN's Conv3D kernels sum a weight gradient in an order that depends on the batch size and
# the CPU (on AVX-512/AMX Xeons a one-crop and a two-crop batch differ by ~1e-4 relative), so
# tests that compare two replicas with one device run on TensorFlow's own kernels, whose
# rounding the layers under test can match.
REPLICA_EQUALITY_ENV = {"TF_ENABLE_ONEDNN_OPTS": "0"}


def subprocess_env(extra=None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_command(command: list, timeout: int = 600) -> tuple[int, str]:
    """Runs `command` from the repository root: (exit status, stdout + stderr).

    Output is decoded as UTF-8 whatever the locale: reports print ±, Δ, and tensorflow-io's
    DICOM test leaves the test process in the C locale.
    """
    proc = subprocess.run(
        [str(a) for a in command],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr


def run_module(module: str, *args, timeout: int = 420) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository root; stdout and stderr captured."""
    return subprocess.run(
        [PYTHON, "-m", module, *[str(a) for a in args]],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# A 32^3 crop and a backbone a few thousand parameters big: a step takes well under a second.
TINY_YAML = """
data:
  crop_size: [32, 32, 32]
  batch_size: 2
  jitter_mm: 4.0
  num_parallel_calls: 1
  prefetch: 1
model:
  backbone:
    preblock_filters: 4
    growth_rate: 4
    layers_per_block: 1
    bottleneck_width: 1
    transition_channels: [8, 8, 8]
    detector_layers: 1
    decoder_channels: 8
    pyramid_channels: 8
  fpr:
    hidden_units: 8
    magnify_stages: 1
    magnify_layers_per_stage: 1
    use_custom_op: false
  proposals:
    max_proposals: 4
    pre_nms_top_k: 32
inference:
  window_batch_size: 4
train:
  max_steps: 4
  learning_rate: 0.01
  lr_schedule: constant
  checkpoint_every_steps: 2
  log_every_steps: 1
  fpr_gt_copies: 1
  val_max_scans: 0
  abs_window_overlap: 0
"""

# The smallest real detector that still has every part (three levels, FPRN, magnification), as
# load_config overrides: one 32^3 inference window, no proposal or mark dropped by its score.
TINY_DETECTOR_OVERRIDES = [
    "model.backbone.preblock_filters=4",
    "model.backbone.growth_rate=4",
    "model.backbone.transition_channels=[8,8,8]",
    "model.backbone.pyramid_channels=8",
    "model.backbone.decoder_channels=8",
    "model.backbone.layers_per_block=1",
    "model.backbone.detector_layers=1",
    "model.fpr.hidden_units=8",
    "model.fpr.magnify_stages=1",
    "model.fpr.magnify_layers_per_stage=1",
    "model.fpr.use_custom_op=false",
    "model.proposals.score_threshold=0.0",
    "model.proposals.max_proposals=4",
    "inference.window_size=[32,32,32]",
    "inference.overlap=8",
    "inference.score_threshold=0.0",
    # float32 whatever the CPU: in-process and exported graphs (exports resolve auto to
    # float32) must give the same numbers.
    "inference.precision=float32",
]

# A backbone with three 8-channel pyramid levels, for the model tests that build it in-process.
SMALL_BACKBONE = BackboneConfig(
    preblock_filters=4,
    growth_rate=4,
    layers_per_block=1,
    bottleneck_width=2,
    transition_channels=(8, 8, 8),
    detector_layers=1,
    decoder_channels=8,
    pyramid_channels=8,
)


def tiny_config_file(tmp_path, sections=None) -> str:
    """Writes TINY_YAML to ``tmp_path/tiny.yaml``; returns the path.

    Args:
      sections: {section: {key: value}}; each updates (or adds) that top-level section.
    """
    settings = yaml.safe_load(TINY_YAML)
    for name, values in (sections or {}).items():
        settings.setdefault(name, {}).update(values)
    path = os.path.join(str(tmp_path), "tiny.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(settings, f, default_flow_style=None, sort_keys=False)
    return path


def read_until(proc, found, lines, timeout, failure):
    """Reads `proc`'s output lines into `lines` until ``found(line)`` is truthy; returns it.

    Kills `proc` and fails with `failure` and the log's end when the output ends or `timeout`
    seconds pass first.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        hit = found(line)
        if hit:
            return hit
    proc.kill()
    raise AssertionError(f"{failure}:\n" + "".join(lines)[-4000:])


# What the experiment tests (tests/experiments) add to TINY_YAML: windows of 32 voxels, every
# proposal and mark kept (a model trained a few steps scores low) and a short bootstrap.
EXPERIMENT_SECTIONS = {
    "inference": {
        "window_size": [32, 32, 32],
        "overlap": 0,
        "score_threshold": 0.0,
        "max_marks": 20,
        "window_batch_size": 4,
    },
    "model": {"proposals": {"score_threshold": 0.0, "max_proposals": 4, "pre_nms_top_k": 32}},
    "evaluation": {"bootstrap": 20},
}


def train_command(tmp_path, model_dir, *extra, cache=None) -> list:
    """The `python -m tf_agg3d.train` command line on the tiny config (see tiny_config_file).

    Args:
      extra: further arguments, appended after ``--config`` and ``--model-dir``.
      cache: the ``--cache`` directory; None leaves the flag out.
    """
    cmd = [
        PYTHON,
        "-m",
        "tf_agg3d.train",
        "--config",
        tiny_config_file(tmp_path),
        "--model-dir",
        str(model_dir),
        *[str(a) for a in extra],
    ]
    if cache is not None:
        cmd += ["--cache", str(cache)]
    return cmd


def tiny_config(tmp_path, cache_dir, overrides=()):
    return load_config(tiny_config_file(tmp_path), [f"data.cache_dir={cache_dir}", *overrides])


def write_model_dir(config, model_dir, seed):
    """Saves a detector of `config` with weights drawn from `seed` as a model directory.

    The detector uses the export's pure-TF RoI Align, so in-process and served outputs come from
    the same graph. Writes ``model_dir/config.yaml`` and ``model_dir/ckpt-1``; returns the detector.
    """
    import tensorflow as tf

    from tf_agg3d.config import save_config
    from tf_agg3d.models.builder import build_detector
    from tf_agg3d.models.loading import build_variables
    from tf_agg3d.ops.roi_align import roi_align_3d

    tf.keras.utils.set_random_seed(seed)
    detector = build_detector(config.model)
    build_variables(detector)
    detector.roi_align_fn = roi_align_3d
    save_config(config, os.path.join(str(model_dir), "config.yaml"))
    tf.train.Checkpoint(model=detector).save(os.path.join(str(model_dir), "ckpt"))
    return detector


def keras_roundtrip(model, x, path):
    """Checks that `model` rebuilds from its config and saves to the .keras file `path`; returns
    (outputs of `model` on `x`, outputs of the model loaded back from `path`)."""
    import keras

    ref = model(x)
    clone = type(model).from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    model.save(path)
    return ref, keras.saving.load_model(path)(x)


def identity_like_magnifier(lm, channels, stride=1):
    """Weights making LocalMagnification `lm` a pure resampler; returns `lm`.

    Each transposed conv averages its 8 taps per channel (stride 1, the table1 variant) or
    copies them (stride 2), the bottlenecks add zeros, BN and the 1x1x1 are identities
    (inference mode; inputs must be positive for the ReLUs).
    """
    import keras

    lm.build((None, None, None, None, channels))
    eye = np.eye(channels, dtype="float32")
    for deconv in lm.deconvs:
        kernel = np.zeros(deconv.kernel.shape, "float32")  # [2, 2, 2, out, in]
        kernel[..., :channels] = eye / 8.0 if stride == 1 else eye
        deconv.kernel.assign(kernel)
        deconv.bias.assign(np.zeros(channels, "float32"))
    for layer in lm._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_variance.assign(np.full(layer.moving_variance.shape, 1.0 - 1e-5, "f4"))
        elif isinstance(layer, keras.layers.Conv3D) and not isinstance(
            layer, keras.layers.Conv3DTranspose
        ):
            layer.kernel.assign(np.zeros(layer.kernel.shape, "float32"))
    kernel = np.zeros(lm.project.conv.kernel.shape, "float32")
    kernel[0, 0, 0, :channels, :] = eye
    lm.project.conv.kernel.assign(kernel)
    lm.project.conv.bias.assign(np.zeros(channels, "float32"))
    return lm


def cache_meta(
    uid,
    shape,
    *,
    affine=None,
    origin=(0.0, 0.0, 0.0),
    nodules=(),
    subset=0,
    lung_mask="",
    fill_hu=0,
    source="test",
) -> dict:
    """A cache sidecar (README "Conventions") of a 1 mm scan; `affine` defaults to the identity."""
    return {
        "affine": np.eye(4).tolist() if affine is None else np.asarray(affine).tolist(),
        "shape": list(shape),
        "nodules": list(nodules),
        "excluded": [],
        "origin": list(origin),
        "spacing": [1.0, 1.0, 1.0],
        "direction": np.eye(3).ravel().tolist(),
        "seriesuid": uid,
        "subset": subset,
        "lung_mask": lung_mask,
        "hu_window": [-1200, 600],
        "fill_hu": fill_hu,
        "source": source,
    }


def write_cache(cache_dir, n_scans=3, shape=(40, 40, 40), seed=0):
    """`n_scans` scans (subset i % 10) of -700 HU lungs with two bright 5-10 mm spheres each."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    for i in range(n_scans):
        vol = np.full(shape, -700, np.int16)
        nodules = []
        for _ in range(2):
            c = rng.uniform(8, np.asarray(shape) - 8)
            d = float(rng.uniform(5, 10))
            vol[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= (d / 2) ** 2] = 200
            nodules.append({"z": float(c[0]), "y": float(c[1]), "x": float(c[2]), "d": d})
        meta = cache_meta(f"scan{i}", shape, nodules=nodules, subset=i % 10)
        cache_lib.write_entry(str(cache_dir), f"scan{i}", vol, meta)
    return str(cache_dir)


def helpers_fixture(*functions, **values):
    """A session fixture whose value holds `functions` (by their names) and `values` as
    attributes.

    A conftest hands its helpers to its tests this way, never through ``from conftest import``,
    which breaks as soon as another test folder has a conftest.py of its own.
    """
    namespace = types.SimpleNamespace(**{f.__name__: f for f in functions}, **values)

    @pytest.fixture(scope="session")
    def fixture():
        return namespace

    return fixture


def csv_rows(path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a CSV file, every field a string."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def synthetic_dataset(tmp_path_factory, generate_dataset, n_scans, seed, shape):
    """(root, summary) of a synthetic generator's `generate_dataset` run in a fresh folder."""
    root = str(tmp_path_factory.mktemp("synthetic"))
    return root, generate_dataset(root, n_scans, seed=seed, shape=shape)


def luna16_scan_paths(root, summary, uid) -> tuple[str, str]:
    """(scan .mhd, lung mask .mhd) of `uid` in a LUNA16 folder a synthetic generator wrote
    (`summary` is the generator's)."""
    return (
        os.path.join(root, f"subset{summary['subset'][uid]}", f"{uid}.mhd"),
        os.path.join(root, "seg-lungs-LUNA16", f"{uid}.mhd"),
    )


def chest_body(shape_zyx, spacing_xyz):
    """The start of a tiny chest phantom: air around a soft-tissue body.

    Returns:
      (int16 HU [D, H, W]: 40 inside an elliptic body cylinder, -1000 outside;
      (z, y, x) voxel coordinates in mm from voxel (0, 0, 0), each broadcastable to the shape;
      (cz, cy, cx) mm, the grid's centre).
    """
    d, h, w = shape_zyx
    sx, sy, sz = spacing_xyz
    z = (np.arange(d) * sz)[:, None, None]
    y = (np.arange(h) * sy)[None, :, None]
    x = (np.arange(w) * sx)[None, None, :]
    cz, cy, cx = (d - 1) * sz / 2, (h - 1) * sy / 2, (w - 1) * sx / 2
    body = ((x - cx) / (0.45 * w * sx)) ** 2 + ((y - cy) / (0.4 * h * sy)) ** 2 <= 1.0
    image = np.where(np.broadcast_to(body, shape_zyx), 40, -1000).astype(np.int16)
    return image, (z, y, x), (cz, cy, cx)

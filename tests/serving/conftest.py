"""Fixtures for the serving tests: exports, development servers and tiny scans.

Two models are exported once per session:

- the **stand-in** whole-scan module of :mod:`tf_agg3d.serving.standin` (a few stock ops, same
  signature contract as ``WholeScanDetector``): exports and loads in seconds, so the protocol
  and error-path tests stay fast;
- the **real** tiny detector (``build_detector`` + ``WholeScanDetector``, pure-TF RoI Align),
  exported through ``export_from_checkpoint`` from a model directory, for the op-type,
  saved_model_cli, equality and round-trip tests (marked slow: its export alone takes tens of
  seconds on a shared CPU).

The reliability tests (restarts, overload, hostile requests, versions published mid-flight)
also run the server as a separate process (:func:`start_server_process`) and compare what the
client gets with the SavedModel run in-process (:func:`local_findings`).

Helpers reach tests through fixtures, never ``from conftest import``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import types

import pytest
import SimpleITK as sitk
import tensorflow as tf
from support import (
    REPO,
    TINY_DETECTOR_OVERRIDES,
    chest_body,
    helpers_fixture,
    subprocess_env,
    write_model_dir,
)

from tf_agg3d.config import load_config
from tf_agg3d.serving.dev_server import DevServer
from tf_agg3d.serving.publishing import export_saved_model
from tf_agg3d.serving.signatures import Agg3DExportModule
from tf_agg3d.serving.standin import (
    STANDIN_MAX_SHAPE,
    STANDIN_WINDOW,
    StandInWholeScan,
    export_standin,
)


def chest_phantom(shape_zyx=(24, 64, 64), spacing_xyz=(1.1, 1.1, 2.0), nodule_zyx=(12, 28, 20)):
    """A tiny chest (air, body, two -850 HU lungs, a 0 HU nodule) as int16 HU (z, y, x)."""
    d, h, w = shape_zyx
    sx, sy, sz = spacing_xyz
    image, (z, y, x), (cz, cy, cx) = chest_body(shape_zyx, spacing_xyz)
    for side in (-1, 1):
        lung = (
            ((x - cx - side * 0.2 * w * sx) / (0.15 * w * sx)) ** 2
            + ((y - cy) / (0.28 * h * sy)) ** 2
            + ((z - cz) / (0.6 * d * sz)) ** 2
        ) <= 1.0
        image[lung] = -850
    nz, ny, nx = nodule_zyx
    nodule = ((z - nz * sz) ** 2 + (y - ny * sy) ** 2 + (x - nx * sx) ** 2) <= 4.0**2
    image[nodule] = 0
    return image


def write_scan(path, array, spacing_xyz=(1.1, 1.1, 2.0), origin_xyz=(-35.0, 20.5, -120.0)) -> str:
    """Writes an .mhd/.raw scan with a non-trivial geometry; returns the path."""
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(v) for v in spacing_xyz))
    image.SetOrigin(tuple(float(v) for v in origin_xyz))
    sitk.WriteImage(image, path)
    return path


def tiny_config(overrides=()):
    return load_config(None, [*TINY_DETECTOR_OVERRIDES, "inference.max_marks=10", *overrides])


_LOADED: dict = {}


def local_findings(base, version, path, preprocess):
    """What the client should get for scan `path`: preprocessed and detected in this process.

    Args:
      base: the model base (holding ``agg3d/<version>/``).
      version: the version to run.
      path: the scan.
      preprocess: the PreprocessConfig (the client's ``preprocess_config()``).
    """
    from tf_agg3d.data.preprocessing.cache_entry import preprocess_scan
    from tf_agg3d.data.readers.sitk import read_scan
    from tf_agg3d.inference.predictor import findings_from_detections, scan_uid

    export = os.path.join(str(base), "agg3d", str(version))
    if export not in _LOADED:
        _LOADED[export] = tf.saved_model.load(export)
    volume, meta = preprocess_scan(read_scan(path), None, preprocess, seriesuid=scan_uid(path))
    out = _LOADED[export].signatures["detect"](volume=tf.constant(volume))
    return findings_from_detections({k: v.numpy() for k, v in out.items()}, meta["affine"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server_process(log_path, *flags):
    """``python -m tf_agg3d.serving.dev_server FLAGS`` with stdout and stderr in `log_path`."""
    log = open(log_path, "a")  # noqa: SIM115 - closed by stop_server_process
    proc = subprocess.Popen(
        [sys.executable, "-m", "tf_agg3d.serving.dev_server", *flags],
        cwd=REPO,
        env=subprocess_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proc.log_file = log
    return proc


def stop_server_process(proc, kill=False) -> None:
    if proc.poll() is None:
        proc.kill() if kill else proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    proc.log_file.close()


def wait_for_line(log_path, needle, timeout_s=120.0, proc=None) -> str:
    """The log's text once it contains `needle` (AssertionError with the log after timeout)."""
    end = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < end:
        with open(log_path) as f:
            text = f.read()
        if needle in text:
            return text
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in the server's log:\n{text[-3000:]}")


helpers = helpers_fixture(
    StandInWholeScan,
    chest_phantom,
    write_scan,
    tiny_config,
    export_standin,
    local_findings,
    free_port,
    start_server_process,
    stop_server_process,
    wait_for_line,
    STANDIN_MAX_SHAPE=STANDIN_MAX_SHAPE,
    STANDIN_WINDOW=STANDIN_WINDOW,
)


@pytest.fixture(scope="session")
def standin_base(tmp_path_factory):
    """A model base with stand-in versions 1 (scale 1) and 2 (scale 2)."""
    base = tmp_path_factory.mktemp("standin_base")
    export_standin(base, version=1, scale=1.0)
    export_standin(base, version=2, scale=2.0)
    return str(base)


@pytest.fixture(scope="session")
def standin_server(standin_base):
    """Serves both stand-in versions (latest = 2) with the label stable -> 1."""
    server = DevServer(standin_base, port=0, versions=[1, 2], version_labels={"stable": 1}).start()
    yield server
    server.stop(grace=0)


@pytest.fixture(scope="session")
def scan_path(tmp_path_factory):
    return write_scan(tmp_path_factory.mktemp("scans") / "phantom-1.mhd", chest_phantom())


@pytest.fixture(scope="session")
def real_model(tmp_path_factory):
    """A tiny real detector saved as a model directory, and its in-process whole-scan module."""
    from tf_agg3d.models.whole_scan import WholeScanDetector

    config = tiny_config()
    model_dir = tmp_path_factory.mktemp("model_dir")
    detector = write_model_dir(config, model_dir, seed=7)
    whole_scan = WholeScanDetector(detector, config.inference, fill_hu=config.preprocess.fill_hu)
    return types.SimpleNamespace(
        config=config, detector=detector, whole_scan=whole_scan, model_dir=str(model_dir)
    )


@pytest.fixture(scope="session")
def real_export(real_model, tmp_path_factory):
    """The in-memory real detector exported as version 1 (the checkpoint path has its own test)."""
    base = tmp_path_factory.mktemp("real_base")
    module = Agg3DExportModule(
        real_model.whole_scan,
        real_model.config,
        version=1,
        extra_metadata={"checkpoint": os.path.join(real_model.model_dir, "ckpt-1")},
    )
    return export_saved_model(module, str(base))


@pytest.fixture(scope="session")
def real_server(real_export):
    server = DevServer(os.path.dirname(real_export.model_base), port=0).start()
    yield server
    server.stop(grace=0)

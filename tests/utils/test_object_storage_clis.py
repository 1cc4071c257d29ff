"""The export and predict CLIs on object storage, against a real S3-compatible server (moto).

A tiny real detector is saved as a model directory and uploaded to a bucket. ``tf_agg3d.export``
publishes a version from it to another bucket (and refuses to replace it without --overwrite),
the version loads back from the bucket and answers like the in-memory detector, and
``tf_agg3d.predict`` reads a cache from a bucket and writes its CSV to one. Every CLI runs as a
real subprocess, so the exit status is the one a shell sees after S3 use (the interpreter would
otherwise abort at shutdown with 134; tf_agg3d/utils/process.py).
"""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
from support import TINY_DETECTOR_OVERRIDES, cache_meta, write_model_dir

from tf_agg3d.data.readers.dicom_tfio import tfio_dicom_available

pytest.importorskip("moto.server", reason="needs moto[server] (requirements/pinned.txt)")
pytestmark = [
    pytest.mark.needs_tfio,
    pytest.mark.slow,
    pytest.mark.skipif(not tfio_dicom_available(), reason="needs tensorflow-io"),
]
HERE = os.path.dirname(os.path.abspath(__file__))
UIDS = ("1.2.840.0.1", "1.2.840.0.2")
# The smallest real detector with every part (three levels, FPRN, magnification); one 32^3
# inference window covers each cache volume, so prediction takes seconds.
TINY_OVERRIDES = [*TINY_DETECTOR_OVERRIDES, "inference.max_marks=5"]


def _volume(seed: int) -> np.ndarray:
    """A 32^3 int16 HU cube: lung-like background and one soft-tissue sphere."""
    rng = np.random.default_rng(seed)
    volume = rng.normal(-850, 40, size=(32, 32, 32))
    z, y, x = np.ogrid[:32, :32, :32]
    centre = rng.integers(10, 22, size=3)
    volume[(z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= 16] = 20
    return volume.astype(np.int16)


def _meta(uid: str, shape) -> dict:
    origin = [-120.5, 30.0, -250.0]
    affine = np.eye(4)
    affine[:3, :3] = [[0, 0, 1], [0, 1, 0], [1, 0, 0]]  # voxel (z, y, x) -> world (x, y, z)
    affine[:3, 3] = origin
    return cache_meta(
        uid,
        shape,
        affine=affine,
        origin=origin,
        lung_mask="threshold",
        fill_hu=170,
        source=f"synthetic/{uid}.mhd",
    )


@pytest.fixture(scope="module")
def stored(s3, tmp_path_factory):
    """The tiny model directory and a two-scan cache, locally and in buckets."""
    import tensorflow as tf

    from tf_agg3d.config import load_config
    from tf_agg3d.data import cache
    from tf_agg3d.inference.predictor import Predictor

    config = load_config(None, TINY_OVERRIDES)
    model_dir = tmp_path_factory.mktemp("model_dir")
    detector = write_model_dir(config, model_dir, seed=11)

    local_cache = tmp_path_factory.mktemp("cache")
    for n, uid in enumerate(UIDS):
        volume = _volume(n)
        cache.write_entry(str(local_cache), uid, volume, _meta(uid, volume.shape))
    predictor = Predictor(detector=detector, config=config)
    expected = {uid: predictor.predict_cache_entry(str(local_cache), uid) for uid in UIDS}
    probe = _volume(7)
    probe_path = str(tmp_path_factory.mktemp("probe") / "probe.npy")
    np.save(probe_path, probe)
    whole = predictor.module.detect(tf.constant(probe))

    for bucket in ("models", "serving", "scans", "results"):
        s3.create_bucket(bucket)
    s3.upload_tree(str(model_dir), "models", "runs/tiny")
    s3.upload_tree(str(local_cache), "scans", "cache")
    return {
        "model_url": "s3://models/runs/tiny",
        "cache_url": "s3://scans/cache",
        "expected": expected,
        "probe_path": probe_path,
        "probe_detect": {k: v.numpy() for k, v in whole.items()},
    }


def _tail(done) -> str:
    return done.stdout[-3000:] + done.stderr[-3000:]


def test_export_publishes_a_version_to_a_bucket_that_loads_back(s3, stored):
    from tensorflow_serving.apis import get_model_status_pb2

    base = "s3://serving/tfs"
    done = s3.run(
        ["-m", "tf_agg3d.export", f"--model-dir={stored['model_url']}", f"--export-base={base}"]
    )
    assert done.returncode == 0, _tail(done)
    assert f"exported agg3d version 1 to {base}/agg3d/1" in done.stdout, done.stdout
    keys = s3.keys("serving", "tfs/")
    # Every file under the version, none left under a temporary prefix.
    assert all(k.startswith("tfs/agg3d/1/") for k in keys), keys
    names = {k[len("tfs/agg3d/1/") :] for k in keys}
    assert {"saved_model.pb", "variables/variables.index", "assets.extra/metadata.json"} <= names
    assert any(n.startswith("variables/variables.data-") for n in names), names
    meta = json.loads(s3.get("serving", "tfs/agg3d/1/assets.extra/metadata.json"))
    assert meta["version"] == 1 and meta["checkpoint"] == f"{stored['model_url']}/ckpt-1"

    # An existing version is never replaced silently: status 1 after S3 use, nothing changed.
    again = s3.run(
        [
            "-m",
            "tf_agg3d.export",
            f"--model-dir={stored['model_url']}",
            f"--export-base={base}",
            "--version=1",
        ]
    )
    assert again.returncode == 1, _tail(again)
    assert f"{base}/agg3d/1 already exists: pass --overwrite" in again.stderr, again.stderr
    assert s3.keys("serving", "tfs/") == keys

    # A version prefix an export is still moving in (no saved_model.pb yet) is not loaded.
    s3.client().put_object(Bucket="serving", Key="tfs/agg3d/2/variables/variables.index", Body=b"")
    scratch = "s3://serving/scratch"
    check = s3.run(
        [os.path.join(HERE, "s3_serving_checks.py"), base, stored["probe_path"], scratch]
    )
    assert check.returncode == 0, _tail(check)
    line = [x for x in check.stdout.splitlines() if x.startswith("RESULT ")][-1]
    got = json.loads(line[len("RESULT ") :])
    assert got["on_disk"] == [1]
    assert got["state"] == get_model_status_pb2.ModelVersionStatus.AVAILABLE, got["error"]
    assert got["version"] == 1
    want = stored["probe_detect"]
    assert got["detect"]["num_detections"] == int(want["num_detections"])
    np.testing.assert_allclose(got["detect"]["boxes"], want["boxes"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got["detect"]["scores"], want["scores"], rtol=1e-4, atol=1e-5)
    # Replacing a version on S3 (--overwrite): exactly the new objects, no staging prefix.
    assert got["replace"]["objects"] == {
        "1/saved_model.pb": "new graph",
        "1/variables/a": "new a",
        "1/assets.extra/m": "new m",
    }, got["replace"]
    assert s3.keys("serving", "scratch/") == [
        "scratch/agg3d/1/assets.extra/m",
        "scratch/agg3d/1/saved_model.pb",
        "scratch/agg3d/1/variables/a",
    ]


def test_predict_reads_a_cache_from_a_bucket_and_writes_the_csv_to_one(s3, stored):
    out = "s3://results/run1/predictions.csv"
    done = s3.run(
        [
            "-m",
            "tf_agg3d.predict",
            f"--model-dir={stored['model_url']}",
            f"--cache={stored['cache_url']}",
            f"--out={out}",
        ]
    )
    assert done.returncode == 0, _tail(done)
    assert s3.keys("results") == ["run1/predictions.csv"]  # no temporary object left
    rows = list(csv.DictReader(io.StringIO(s3.get("results", "run1/predictions.csv").decode())))
    expected = [f.as_row(uid) for uid in UIDS for f in stored["expected"][uid]]
    assert len(rows) == len(expected) > 0
    for row, want in zip(rows, expected, strict=True):
        assert row["seriesuid"] == want["seriesuid"]
        got = [float(row[k]) for k in ("coordX", "coordY", "coordZ", "probability")]
        ref = [want[k] for k in ("coordX", "coordY", "coordZ", "probability")]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)


def test_predict_exit_status_for_a_model_dir_missing_from_the_bucket(s3, stored):
    done = s3.run(
        [
            "-m",
            "tf_agg3d.predict",
            "--model-dir=s3://models/runs/nothing",
            f"--cache={stored['cache_url']}",
            "--out=s3://results/run2/predictions.csv",
        ]
    )
    assert done.returncode == 2, _tail(done)
    assert "s3://models/runs/nothing: no config.yaml" in done.stderr, done.stderr
    assert s3.keys("results", "run2/") == []


def test_clis_without_tensorflow_io_say_what_to_install(s3):
    # A process where `import tensorflow_io` fails, as on an install without the [io] extra.
    for module, args in (
        ("tf_agg3d.predict", ["--model-dir=s3://m/x", "--cache=s3://c/x", "--out=p.csv"]),
        ("tf_agg3d.export", ["--model-dir=s3://m/x", "--export-base=/tmp/unused"]),
        ("tf_agg3d.train", ["--model-dir=s3://m/x", "--cache=/tmp/unused"]),
        ("tf_agg3d.serving.dev_server", ["--model-base=s3://m/base", "--port=0"]),
        (
            "tf_agg3d.serving.client",
            ["--target=127.0.0.1:9", "--scan=s3://c/x.mhd", "--out=/tmp/unused.csv"],
        ),
    ):
        code = (
            "import sys\n"
            "sys.modules['tensorflow_io'] = None\n"
            f"sys.argv = ['{module}', *{args!r}]\n"
            "import runpy\n"
            f"runpy.run_module('{module}', run_name='__main__')\n"
        )
        done = s3.run(["-c", code])
        assert done.returncode == 2, (module, _tail(done))
        assert "needs tensorflow-io, which is not installed: pip install tf_agg3d[io]" in (
            done.stderr
        ), (module, done.stderr)

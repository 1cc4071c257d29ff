"""Object storage against a real S3-compatible server (moto, server mode, on 127.0.0.1).

The preprocess CLI reads a LUNA16 layout from one bucket and writes the cache to another; the
cache equals the one a local run writes, a second run skips every scan, and the exit status is
right after S3 use (the interpreter would otherwise abort at shutdown with status 134).
"""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from tf_agg3d.config import PreprocessConfig
from tf_agg3d.data import cache
from tf_agg3d.data.preprocessing.runner import run_preprocess
from tf_agg3d.data.readers.dicom_tfio import tfio_dicom_available
from tf_agg3d.data.synthetic.luna16 import generate_dataset

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
)
from dicom_series_writer import oblique_direction, write_ct_series  # noqa: E402

pytest.importorskip("moto.server", reason="needs moto[server] (requirements/pinned.txt)")
pytestmark = [
    pytest.mark.needs_tfio,
    pytest.mark.skipif(not tfio_dicom_available(), reason="needs tensorflow-io"),
]
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def luna_local(tmp_path_factory):
    root = tmp_path_factory.mktemp("luna16")
    summary = generate_dataset(str(root), n_scans=2, seed=0, shape=(48, 96, 96))
    return str(root), summary["uids"]


def _preprocess(s3, luna_url, cache_url, *extra):
    return s3.run(
        ["-m", "tf_agg3d.preprocess", f"--luna-root={luna_url}", f"--out={cache_url}", *extra]
    )


@pytest.mark.slow
def test_preprocess_bucket_to_bucket_equals_local_run(s3, luna_local, tmp_path):
    root, uids = luna_local
    s3.create_bucket("luna-src")
    s3.create_bucket("luna-cache")
    assert s3.upload_tree(root, "luna-src", "luna16") >= 4 * len(uids)

    done = _preprocess(s3, "s3://luna-src/luna16", "s3://luna-cache/cache", "--workers=2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ok=2 skipped=0 failed=0" in done.stdout, done.stdout

    keys = s3.keys("luna-cache", "cache/")
    assert keys == sorted(f"cache/{u}.{ext}" for u in uids for ext in ("json", "npy")), keys
    # The same cache as a local run over the same files (which never touches tensorflow-io).
    local_cache = str(tmp_path / "cache")
    summary = run_preprocess(root, local_cache, PreprocessConfig(), report=lambda line: None)
    assert sorted(summary.ok) == sorted(uids)
    for uid in uids:
        remote = np.load(io.BytesIO(s3.get("luna-cache", f"cache/{uid}.npy")), allow_pickle=False)
        np.testing.assert_array_equal(remote, cache.read_volume(local_cache, uid))
        meta = json.loads(s3.get("luna-cache", f"cache/{uid}.json"))
        expected = cache.read_meta(local_cache, uid)
        assert meta.pop("source").startswith("s3://luna-src/luna16/")
        expected.pop("source")
        assert meta == expected

    # Resumable on S3 too: has_entry reads the sidecar and the .npy header from the bucket.
    again = _preprocess(s3, "s3://luna-src/luna16", "s3://luna-cache/cache")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ok=0 skipped=2 failed=0" in again.stdout, again.stdout


@pytest.mark.slow
def test_preprocess_exit_status_after_s3_use(s3, luna_local):
    root, uids = luna_local
    s3.create_bucket("luna-bad")
    s3.upload_tree(root, "luna-bad", "luna16")
    # One scan whose .raw is missing: that scan fails, the other is cached, exit status 1.
    s3.client().delete_object(Bucket="luna-bad", Key=_raw_key(root, uids[0]))
    done = _preprocess(s3, "s3://luna-bad/luna16", "s3://luna-bad/cache")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ok=1 skipped=0 failed=1" in done.stdout
    assert "s3://luna-bad/luna16/" in done.stdout and "is missing" in done.stdout, done.stdout
    # A root that does not exist: a clear error before any work, exit status 2.
    missing = _preprocess(s3, "s3://luna-bad/nothing-here", "s3://luna-bad/cache2")
    assert missing.returncode == 2, missing.stderr[-3000:]
    assert "s3://luna-bad/nothing-here: LUNA16 root is not a folder" in missing.stderr


def _raw_key(root, uid):
    for folder, _, files in os.walk(root):
        if f"{uid}.raw" in files and "seg-lungs" not in folder:
            return "luna16/" + os.path.relpath(os.path.join(folder, f"{uid}.raw"), root)
    raise AssertionError(f"no raw file for {uid}")


def test_io_helpers_and_readers_on_s3(s3, tmp_path):
    s3.create_bucket("io-checks")
    image = np.random.default_rng(0).integers(-1000, 1000, size=(12, 20, 24)).astype(np.int16)
    mhd = str(tmp_path / "scan.mhd")
    itk = sitk.GetImageFromArray(image)
    itk.SetSpacing((0.8, 0.7, 2.0))
    itk.SetOrigin((5.0, -3.0, 40.0))
    sitk.WriteImage(itk, mhd)
    dicom = tmp_path / "dicom"
    write_ct_series(dicom, image, direction=oblique_direction(), slope=2.0)
    done = s3.run([os.path.join(HERE, "s3_io_checks.py"), "io-checks", mhd, str(dicom)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    got = json.loads(line[len("RESULT ") :])
    assert got["json"] == {"x": 2}
    assert got["listing"] == ["a.json"]  # no temporary object left
    assert got["npy"] == [[0, 1, 2], [3, 4, 5]]
    assert got["isdir"] == [True, False, True, False]
    assert got["find_files"] == ["s3://io-checks/checks/deep/a.json"]
    assert got["getsize"] > 0
    assert got["local_copy"] == ["scan.mhd", "scan.raw"]
    assert got["local_copy_is_local"] and got["local_copy_cleaned"]
    assert got["mhd_equal"] and got["mhd_path"] == "s3://io-checks/checks/img/scan.mhd"
    assert "s3://io-checks/checks/img" in got["missing_raw"] and "missing" in got["missing_raw"]
    assert "/tmp" not in got["missing_raw"], got["missing_raw"]
    assert got["missing_object"].startswith("s3://io-checks/checks/nothing.mhd: ")
    assert got["dicom_tfio_equal"] and got["dicom_sitk_equal"]


def test_exit_now_keeps_the_status_after_s3_use(s3):
    s3.create_bucket("exit-status")
    code = (
        "import tensorflow as tf\n"
        "from tf_agg3d.utils.atomic_write import atomic_write_text\n"
        "from tf_agg3d.utils.files import read_text\n"
        "from tf_agg3d.utils.process import exit_now\n"
        "atomic_write_text('s3://exit-status/x.txt', 'hi')\n"
        "print(read_text('s3://exit-status/x.txt'))\n"
        "exit_now(3)\n"
    )
    done = s3.run(["-c", code])
    assert done.returncode == 3, done.stderr[-3000:]
    assert done.stdout.strip().endswith("hi")

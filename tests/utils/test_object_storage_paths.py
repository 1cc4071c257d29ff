"""Object-store folders as users write them, against a real S3-compatible server (moto).

On object stores a folder is a key prefix: a LUNA16 tree or a cache may sit at a bucket root
(``s3://bucket``), a path may end in a slash, and a prefix may or may not have the zero-byte
"directory marker" objects some tools create. Every form must work in every command:

- the library paths (listing, finding scans, the cache, training's reading of the cache) in one
  subprocess (s3_path_checks.py), for each form;
- the commands, chained: ``preprocess`` from a bucket root to a bucket root and from a marked
  prefix with a trailing slash, ``predict --cache`` on the bucket-root cache with the model
  directory at a bucket root, ``evaluate`` on inputs at a bucket root writing to a bucket root.
"""

from __future__ import annotations

import csv
import io
import json
import os

import pytest
from support import TINY_DETECTOR_OVERRIDES, tiny_config_file, write_model_dir

from tf_agg3d.data.readers.dicom_tfio import tfio_dicom_available

pytest.importorskip("moto.server", reason="needs moto[server] (requirements/pinned.txt)")
pytestmark = [
    pytest.mark.needs_tfio,
    pytest.mark.skipif(not tfio_dicom_available(), reason="needs tensorflow-io"),
]
HERE = os.path.dirname(os.path.abspath(__file__))

# A LUNA16-like tree (the library checks only list and read CSVs; no scan is decoded there).
TREE = {
    "subset0/1.1.mhd": b"header",
    "subset0/1.1.raw": b"data",
    "subset1/1.2.mhd": b"header",
    "subset1/1.2.raw": b"data",
    "seg-lungs-LUNA16/1.1.mhd": b"header",
    "seg-lungs-LUNA16/1.1.raw": b"data",
    "annotations.csv": b"seriesuid,coordX,coordY,coordZ,diameter_mm\n1.1,1,2,3,6\n",
}


def _tail(done) -> str:
    return done.stdout[-3000:] + done.stderr[-3000:]


def _result(done) -> dict:
    assert done.returncode == 0, _tail(done)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def test_every_folder_form_lists_and_reads_the_same(s3, tmp_path):
    for name, prefix, markers in (("plain", "", False), ("marked", "luna16", True)):
        s3.create_bucket(name)
        local = tmp_path / name
        for key, body in TREE.items():
            os.makedirs(local / os.path.dirname(key), exist_ok=True)
            (local / key).write_bytes(body)
        s3.upload_tree(str(local), name, prefix, markers=markers)
    s3.create_bucket("cacheroot")
    assert "luna16/subset0/" in s3.keys("marked")  # the markers are there
    assert not [k for k in s3.keys("plain") if k.endswith("/")]  # and here none

    got = _result(s3.run([os.path.join(HERE, "s3_path_checks.py"), tiny_config_file(tmp_path)]))
    for form, base in (
        ("bucket", "s3://plain"),
        ("bucket_slash", "s3://plain"),
        ("marked_prefix", "s3://marked/luna16"),
        ("marked_prefix_slash", "s3://marked/luna16"),
    ):
        luna = got[form]
        assert (luna["isdir"], luna["exists"], luna["isfile"]) == (True, True, False), form
        assert luna["listdir"] == ["annotations.csv", "seg-lungs-LUNA16", "subset0", "subset1"]
        assert luna["subset0"] == ["1.1.mhd", "1.1.raw"], form
        # One spelling of every path found, whatever the root's.
        assert luna["find_files"] == [
            f"{base}/seg-lungs-LUNA16/1.1.mhd",
            f"{base}/subset0/1.1.mhd",
            f"{base}/subset1/1.2.mhd",
        ], form
        assert luna["scans"] == {
            "1.1": [f"{base}/subset0/1.1.mhd", 0],
            "1.2": [f"{base}/subset1/1.2.mhd", 1],
        }, form
        assert luna["mask"] == f"{base}/seg-lungs-LUNA16/1.1.mhd", form
        assert luna["annotations_csv"] == f"{base}/annotations.csv", form
        assert luna["annotations"] == ["1.1"], form
        assert luna["jobs"] == [
            ["1.1", f"{base}/subset0/1.1.mhd", f"{base}/seg-lungs-LUNA16/1.1.mhd", 1],
            ["1.2", f"{base}/subset1/1.2.mhd", None, 0],
        ], form
        assert luna["missing"] == {}, form
    for form in ("s3://cacheroot", "s3://cacheroot/"):
        c = got["cache"][form]
        assert c["list_uids"] == ["u1", "u2"], form
        assert c["has_entry"] == [True, True], form
        assert c["volume_path"] == "s3://cacheroot/u1.npy", form
        assert c["read_entry"] and c["train_volume"], form
        assert c["train_scans"] == ["u1", "u2"], form
    assert got["cache"]["keys_listing"] == ["u1.json", "u1.npy", "u2.json", "u2.npy"]
    assert s3.keys("cacheroot") == ["u1.json", "u1.npy", "u2.json", "u2.npy"]  # no stray object
    assert got["helpers"] == {
        "is_bucket_root": [True, True, False],
        "fs_path": ["s3://b/", "s3://b/", "s3://b/x", "/tmp/x"],
        "join": ["s3://b/x", "s3://b/x/y", "s3://b/x"],
        "makedirs_root": True,
    }


@pytest.mark.slow
def test_commands_on_bucket_roots_trailing_slashes_and_markers(s3, tmp_path):
    from tf_agg3d.config import load_config
    from tf_agg3d.data.synthetic.luna16 import generate_dataset

    root = str(tmp_path / "luna16")
    uids = generate_dataset(root, n_scans=2, seed=0, shape=(40, 64, 64))["uids"]
    for bucket in ("lunaroot", "lunamarked", "cacheout", "cacheout2", "pmodel", "presults"):
        s3.create_bucket(bucket)
    s3.create_bucket("evalout")
    s3.upload_tree(root, "lunaroot")  # at the bucket root, no markers
    s3.upload_tree(root, "lunamarked", "data/luna16", markers=True)

    # preprocess: the command, bucket root to bucket root.
    done = s3.run(["-m", "tf_agg3d.preprocess", "--luna-root=s3://lunaroot", "--out=s3://cacheout"])
    assert done.returncode == 0, _tail(done)
    assert "ok=2 skipped=0 failed=0" in done.stdout, done.stdout
    expected = sorted(f"{u}.{ext}" for u in uids for ext in ("json", "npy"))
    assert s3.keys("cacheout") == expected
    # A marked prefix with a trailing slash, into a prefix with one; then a rerun skips all.
    for attempt in ("ok=2 skipped=0", "ok=0 skipped=2"):
        done = s3.run(
            [
                "-m",
                "tf_agg3d.preprocess",
                "--luna-root=s3://lunamarked/data/luna16/",
                "--out=s3://cacheout2/cache/",
            ]
        )
        assert done.returncode == 0, _tail(done)
        assert f"{attempt} failed=0" in done.stdout, done.stdout
    assert s3.keys("cacheout2") == [f"cache/{k}" for k in expected]

    # predict --cache at a bucket root, the model directory at another (trailing slash).
    config = load_config(None, TINY_DETECTOR_OVERRIDES)
    model_dir = tmp_path / "model"
    write_model_dir(config, model_dir, seed=3)
    s3.upload_tree(str(model_dir), "pmodel")
    done = s3.run(
        [
            "-m",
            "tf_agg3d.predict",
            "--model-dir=s3://pmodel/",
            "--cache=s3://cacheout",
            "--out=s3://presults/predictions.csv",
        ]
    )
    assert done.returncode == 0, _tail(done)
    rows = list(csv.DictReader(io.StringIO(s3.get("presults", "predictions.csv").decode())))
    assert {r["seriesuid"] for r in rows} <= set(uids) and rows, rows[:3]

    # evaluate: inputs at a bucket root, the report written to a bucket root.
    done = s3.run(
        [
            "-m",
            "tf_agg3d.evaluate",
            "--annotations=s3://lunaroot/annotations.csv",
            "--excluded=s3://lunaroot/annotations_excluded.csv",
            "--predictions=s3://presults/predictions.csv",
            "--seriesuids=s3://lunaroot/seriesuids.csv",
            "--out=s3://evalout",
            "--bootstrap=0",
        ]
    )
    assert done.returncode == 0, _tail(done)
    keys = s3.keys("evalout")
    assert "summary.json" in keys and "froc_curve.csv" in keys, keys
    assert not [k for k in keys if k.startswith(".tmp-")], keys

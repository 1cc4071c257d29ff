"""Runs in a subprocess with the S3 environment: every library path of tf_agg3d on the folder
forms users write for object stores, and prints one JSON object of results, then leaves through
``exit_now``.

    python tests/utils/s3_path_checks.py

The test (test_object_storage_paths.py) has filled these buckets with boto3 first:

- ``plain``: a LUNA16-like tree at the bucket root, no directory-marker objects;
- ``marked``: the same tree under ``luna16/``, with a zero-byte marker object for every folder
  (``luna16/``, ``luna16/subset0/``, ...), as consoles and some sync tools create;
- ``cacheroot``: empty; a cache is written at its root here.

Each root form (bucket root with and without a trailing slash, a prefix with and without one)
must list, find and read the same things.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

ROOTS = {
    "bucket": "s3://plain",
    "bucket_slash": "s3://plain/",
    "marked_prefix": "s3://marked/luna16",
    "marked_prefix_slash": "s3://marked/luna16/",
}


def _luna(root: str) -> dict:
    from tf_agg3d.data.luna16 import csv_io, layout
    from tf_agg3d.data.preprocessing import runner
    from tf_agg3d.utils import files as uio

    out: dict = {
        "isdir": uio.isdir(root),
        "exists": uio.exists(root),
        "isfile": uio.isfile(root),
        "listdir": uio.listdir(root),
        "subset0": uio.listdir(uio.join(root, "subset0")),
        "find_files": uio.find_files(root, ".mhd"),
    }
    scans = layout.find_luna16_scans(root)
    out["scans"] = {uid: [path, subset] for uid, (path, subset) in scans.items()}
    out["mask"] = layout.find_lung_mask(root, "1.1")
    found = runner._find_csv(root, runner.ANNOTATION_LOCATIONS)
    out["annotations_csv"] = found
    out["annotations"] = sorted(csv_io.read_annotations(found)) if found else None
    jobs, missing = runner.make_jobs(root, report=lambda line: None)
    out["jobs"] = [[j.uid, j.scan_path, j.mask_path, len(j.nodules)] for j in jobs]
    out["missing"] = missing
    return out


def _cache(tmp_cfg: str) -> dict:
    from tf_agg3d.config import load_config
    from tf_agg3d.data import cache
    from tf_agg3d.dataloaders.input_pipeline import _Volumes, load_scans
    from tf_agg3d.training.checks import validate_training_config
    from tf_agg3d.utils import files as uio

    # The test suite's helpers: this script runs from tests/utils/ in its own process.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from support import cache_meta

    out: dict = {}
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    nodules = [{"z": 1.0, "y": 2.0, "x": 3.0, "d": 4.0}]
    # Written through both spellings of the bucket root.
    meta = cache_meta("u1", volume.shape, nodules=nodules)
    cache.write_entry("s3://cacheroot", "u1", volume, meta)
    meta = cache_meta("u2", volume.shape, nodules=nodules, subset=1)
    cache.write_entry("s3://cacheroot/", "u2", volume, meta)
    for form in ("s3://cacheroot", "s3://cacheroot/"):
        got = {
            "list_uids": cache.list_uids(form),
            "has_entry": [cache.has_entry(form, u) for u in ("u1", "u2")],
            "volume_path": cache.volume_path(form, "u1"),
        }
        read_meta, read_volume = cache.read_entry(form, "u2")
        got["read_entry"] = bool(np.array_equal(read_volume, volume)) and read_meta["subset"] == 1
        # train --cache: the start-up checks, the sidecars and the volumes of the input pipeline.
        config = load_config(tmp_cfg, [f"data.cache_dir={form}"])
        validate_training_config(config)
        scans = load_scans(form)
        got["train_scans"] = [s.uid for s in scans]
        volumes = _Volumes(form, scans, budget_bytes=1 << 20)
        got["train_volume"] = bool(np.array_equal(volumes.get("u1"), volume)) and volumes.remote
        out[form] = got
    out["keys_listing"] = uio.listdir("s3://cacheroot")
    return out


def main(config_path: str) -> dict:
    from tf_agg3d.utils import files as uio

    out = {name: _luna(root) for name, root in ROOTS.items()}
    out["cache"] = _cache(config_path)
    out["helpers"] = {
        "is_bucket_root": [uio.is_bucket_root(p) for p in ("s3://b", "s3://b/", "s3://b/x")],
        "fs_path": [uio.fs_path(p) for p in ("s3://b", "s3://b/", "s3://b/x", "/tmp/x")],
        "join": [uio.join("s3://b", "x"), uio.join("s3://b/", "x/", "y"), uio.join("s3://b/x/")],
        "makedirs_root": uio.makedirs("s3://cacheroot") is None,
    }
    return out


if __name__ == "__main__":
    from tf_agg3d.utils.process import exit_now

    result = main(sys.argv[1])
    print("RESULT " + json.dumps(result), flush=True)
    exit_now(0)

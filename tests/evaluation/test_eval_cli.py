"""`python -m tf_agg3d.evaluate` as a subprocess, bad inputs, and the hard-case gallery."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from _evaluation_testlib import write_csv
from support import REPO, cache_meta

from tf_agg3d.evaluation import froc as F
from tf_agg3d.evaluation.gallery import GalleryConfig, world_to_voxel, write_gallery
from tf_agg3d.evaluation.io import read_annotations, read_predictions

ANN_HEADER = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
PRED_HEADER = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "tf_agg3d.evaluate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    uids = [f"1.3.6.{i}" for i in range(12)]
    ann, preds = [], []
    for i, uid in enumerate(uids[:8]):
        c = rng.uniform(-50, 50, 3).round(2)
        ann.append((uid, *c, 8.0 + i))
        preds.append((uid, *(c + 1), round(float(rng.uniform(0.3, 1)), 3)))
    for uid in uids:
        for _ in range(3):
            preds.append((uid, *rng.uniform(-90, 90, 3).round(2), round(float(rng.random()), 3)))
    files = {
        "annotations": write_csv(tmp_path / "annotations.csv", ANN_HEADER, ann),
        "excluded": write_csv(
            tmp_path / "excluded.csv", ANN_HEADER, [(uids[9], 0.0, 0.0, 0.0, -1)]
        ),
        "predictions": write_csv(tmp_path / "preds.csv", PRED_HEADER, preds),
        "seriesuids": write_csv(tmp_path / "uids.csv", None, [(u,) for u in uids]),
    }
    return tmp_path, files


def _args(files, **over):
    merged = {**files, **over}
    return [f"--{k}={v}" for k, v in merged.items()]


def test_cli_writes_summary_and_png(inputs):
    tmp, files = inputs
    out = tmp / "eval"
    proc = _cli(*_args(files, out=out, bootstrap=100, seed=3))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(proc.stdout) == summary
    assert summary["fp_rates"] == [0.125, 0.25, 0.5, 1, 2, 4, 8]
    assert len(summary["sensitivities"]) == 7 and len(summary["ci_lower"]) == 7
    assert summary["froc_score"] == pytest.approx(np.mean(summary["sensitivities"]))
    assert all(
        lo <= s <= hi
        for lo, s, hi in zip(
            summary["ci_lower"], summary["sensitivities"], summary["ci_upper"], strict=True
        )
    )
    assert (summary["scans"], summary["nodules"], summary["true_positives"]) == (12, 8, 8)
    assert summary["false_positives"] + summary["marks_ignored_excluded"] == 36
    assert summary["tnp"]["n_np"] == 4
    assert (out / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same seed gives the same CI.
    again = _cli(*_args(files, out=tmp / "eval2", bootstrap=100, seed=3))
    assert json.loads(again.stdout)["ci_lower"] == summary["ci_lower"]


def test_cli_ensemble(inputs):
    tmp, files = inputs
    out = tmp / "merged.csv"
    proc = _cli(
        "ensemble",
        f"--a={files['predictions']}",
        f"--b={files['predictions']}",
        "--mode=intersection",
        "--distance_mm=1",
        f"--out={out}",
    )
    assert proc.returncode == 0, proc.stderr
    merged = read_predictions(str(out))
    orig = read_predictions(files["predictions"])
    assert len(merged) == len(orig)
    np.testing.assert_allclose(np.sort(merged.probability), np.sort(orig.probability))


@pytest.mark.parametrize(
    "case,expect",
    [
        ("missing_column", r"preds_bad.csv.*probability"),
        ("non_numeric", r"preds_bad.csv, line 2, field 'coordY'"),
        ("unknown_uid", r"preds_bad.csv, line 3.*not in the seriesuid list"),
        ("empty", r"preds_bad.csv.*empty"),
    ],
)
def test_cli_bad_predictions_fail_cleanly(inputs, case, expect):
    tmp, files = inputs
    uid = "1.3.6.0"
    bad = tmp / "preds_bad.csv"
    if case == "missing_column":
        write_csv(bad, PRED_HEADER[:4], [(uid, 0, 0, 0)])
    elif case == "non_numeric":
        write_csv(bad, PRED_HEADER, [(uid, 0, "abc", 0, 0.5)])
    elif case == "unknown_uid":
        write_csv(bad, PRED_HEADER, [(uid, 0, 0, 0, 0.5), ("9.9.9", 0, 0, 0, 0.5)])
    else:
        bad.write_text("")
    proc = _cli(*_args(files, predictions=bad, out=tmp / "e", bootstrap=0))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert re.search(expect, proc.stderr), proc.stderr
    assert not (tmp / "e" / "summary.json").exists()


def _write_cache(cache_dir, uid, origin):
    vol = np.full((40, 50, 60), -800, dtype=np.int16)
    vol[18:23, 20:25, 30:35] = 100
    affine = np.eye(4)
    # cache voxel (z, y, x) -> world (x, y, z): swap axes, 1 mm, offset.
    affine[:3, :3] = [[0, 0, 1], [0, 1, 0], [1, 0, 0]]
    affine[:3, 3] = origin
    np.save(cache_dir / f"{uid}.npy", vol, allow_pickle=False)
    meta = cache_meta(uid, vol.shape, affine=affine, origin=origin)
    (cache_dir / f"{uid}.json").write_text(json.dumps(meta))
    return affine


def test_gallery_draws_fps_and_missed(tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    origin = (-100.0, 20.0, 5.0)
    affine = _write_cache(cache_dir, "s1", origin)
    # World <-> cache voxel through the inverted affine.
    zyx = np.array([20.0, 22.0, 32.0])
    xyz = affine[:3, :3] @ zyx + affine[:3, 3]
    np.testing.assert_allclose(world_to_voxel(affine, xyz)[0], zyx)
    ann = write_csv(tmp_path / "a.csv", ANN_HEADER, [("s1", *xyz, 6.0), ("s2", 0, 0, 0, 5)])
    preds = write_csv(tmp_path / "p.csv", PRED_HEADER, [("s1", xyz[0] + 15, xyz[1], xyz[2], 0.8)])
    a = read_annotations(ann)
    p = read_predictions(preds)
    m = F.match(a, None, p, ["s1", "s2"])
    index = write_gallery(str(tmp_path / "g"), str(cache_dir), m, a, p, GalleryConfig())
    kinds = sorted((e["kind"], "file" in e) for e in index)
    # One FP and two missed nodules; s2 has no cache entry and is skipped.
    assert kinds == [("false_positive", True), ("missed", False), ("missed", True)]
    for e in index:
        if "file" in e:
            assert (tmp_path / "g" / e["file"]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "g" / "index.json").read_text()) == index

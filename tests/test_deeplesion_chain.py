"""The whole DeepLesion chain on synthetic data, through the real CLIs (tf_agg3d.demo_deeplesion).

generate -> preprocess_deeplesion -> train rpn -> train joint -> predict split 3 -> evaluate,
with a tiny network and a few steps: it proves the files and coordinates fit together, not
that the model learns.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from support import REPO, tiny_config_file

# TINY_YAML plus DeepLesion's split (fold -1) and 48 mm size cut, anchors up to 40 mm, 32 x 64 x 64
# inference windows, 3 steps and a short bootstrap.
DEEPLESION_SECTIONS = {
    "data": {"fold": -1, "max_train_diameter_mm": 48.0},
    "model": {
        "anchors": {
            "strides": [4, 8, 16],
            "sizes": [[3.0, 5.0, 7.0], [10.0, 13.0, 17.0], [22.0, 30.0, 40.0]],
        }
    },
    "inference": {
        "window_size": [32, 64, 64],
        "overlap": 0,
        "window_batch_size": 2,
        "score_threshold": 0.0,
    },
    "train": {"max_steps": 3, "checkpoint_every_steps": 3},
    "evaluation": {"bootstrap": 10},
}


@pytest.mark.slow
def test_deeplesion_chain_end_to_end(tmp_path):
    config = tiny_config_file(tmp_path, DEEPLESION_SECTIONS)
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tf_agg3d.demo_deeplesion",
            "--out",
            str(out),
            "--n-series",
            "8",
            "--size",
            "96",
            "--seed",
            "1",
            "--config",
            config,
            "--rpn-steps",
            "3",
            "--joint-steps",
            "3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    cache = out / "cache"
    with open(cache / "test_seriesuids.csv") as f:
        test_uids = [line.strip() for line in f if line.strip()]
    assert test_uids
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["seriesuid"] for r in rows} <= set(test_uids)
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    groups = summary["breakdown"]
    assert summary["scans"] == len(test_uids)
    assert "overall_without_large" in groups and "by_lesion_type" in groups
    assert groups["large_source"] == "column"
    assert sum(g["nodules"] for g in groups["by_lesion_type"].values()) == summary["nodules"]
    assert list(groups["by_size"]) == ["<10", "10-30", ">=30"]
    # The per-type table is printed.
    assert "FROC on split 3" in proc.stdout
    assert "without large (>= 48 mm)" in proc.stdout
    assert "type " in proc.stdout and "diameter 10-30 mm" in proc.stdout

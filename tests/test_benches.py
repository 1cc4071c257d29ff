"""Every benchmark in bench/ runs end to end with tiny settings and prints consistent JSON.

These check that the benchmarks keep working as the code under them changes (their timings are
meaningless at these settings): each runs as a subprocess, as `make bench` runs it, and its
report must be complete and self-consistent (speed-ups equal the ratios of the times they come
from, per-scan times equal windows x per-window time, ...).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from support import PYTHON, REPO, subprocess_env

pytestmark = pytest.mark.slow


def _run_bench(name: str, *args: str) -> str:
    proc = subprocess.run(
        [PYTHON, os.path.join(REPO, "bench", name), *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (
        proc.returncode == 0
    ), f"bench/{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_roi_align_bench_reports_every_case_and_consistent_speedups():
    report = json.loads(
        _run_bench("roi_align.py", "--repeats", "1", "--warmup", "1", "--loop", "2")
    )
    rows = report["results"]
    assert [(r["stride"], r["rois"]) for r in rows] == [
        (s, n) for s in (4, 8, 16) for n in (128, 512)
    ]
    paths = ("pure_tf", "custom_op") if report["custom_op"] else ("pure_tf",)
    kinds = ("forward", "fwd_bwd", "forward_in_graph", "fwd_bwd_in_graph")
    for row in rows:
        assert row["map"] == 128 // row["stride"]
        assert row["tf_function_call_floor_ms"] > 0
        for path in paths:
            for kind in kinds:
                assert row[f"{path}_{kind}_ms"] > 0
        if report["custom_op"]:
            assert row["custom_op_one_roi_fwd_bwd_in_graph_ms"] > 0
            for kind in kinds:
                ratio = row[f"pure_tf_{kind}_ms"] / row[f"custom_op_{kind}_ms"]
                assert row[f"speedup_{kind}"] == pytest.approx(ratio, rel=0.02, abs=0.002)
    if report["custom_op"]:
        worst = min(r["speedup_fwd_bwd_in_graph"] for r in rows)
        assert report["min_speedup_fwd_bwd_in_graph"] == worst
        assert report["target_10x_fwd_bwd_in_graph_met"] == (worst >= 10.0)


def test_inference_bench_times_both_paths_with_consistent_work_counts():
    report = json.loads(
        _run_bench(
            "inference.py",
            "--skip-paper",
            "--repeats",
            "1",
            "--path",
            "both",
            "--scan-shape",
            "64,96,96",
        )
    )
    tiles, windows = report["results"]
    scan_voxels = 64 * 96 * 96
    for row, path in ((tiles, "tiles"), (windows, "windows")):
        assert (row["config"], row["path"]) == ("demo_cpu", path)
        assert row["precision"] in ("float32", "bfloat16")
        assert row["seconds_per_scan"] == min(row["timed_seconds"]) > 0
        assert row["flop_ops_not_counted"] == 0
        assert row["achieved_gflop_per_s"] == pytest.approx(
            row["gflops_per_scan"] / row["seconds_per_scan"], rel=0.05, abs=0.05
        )
        assert row["voxel_evaluations_per_scan_voxel"] == pytest.approx(
            row["evaluated_voxels"] / scan_voxels, abs=1e-3
        )
        assert row["peak_rss_mib"] > 0 and report["matmul_gflop_per_s"][row["precision"]] > 0
    # Windows: 64^3 windows overlapping by 16 over 64 x 96 x 96 (and the all-fill probe).
    assert windows["evaluated_voxels"] == windows["backbone_calls"] * 64**3
    assert windows["gflops_per_scan"] == pytest.approx(
        windows["gflops_per_window"] * windows["backbone_calls"], rel=0.01
    )
    # Tiles: every voxel once (64 x 96 x 96 is a multiple of 16), in one tile at this size.
    assert tiles["backbone_calls"] == 1 and tiles["voxel_evaluations_per_scan_voxel"] <= 1.0
    assert report["peak_rss_mib"] > 0


def test_preprocess_bench_times_both_lung_mask_paths():
    report = json.loads(_run_bench("preprocess.py", "--repeats", "1"))
    assert report["scan_shape_zyx"] == [300, 512, 512]
    for path in ("luna16_mask", "threshold_fallback"):
        entry = report[path]
        assert entry["seconds_per_scan"] == pytest.approx(min(entry["runs"]), abs=0.01)
        stages = entry["stages"]
        assert stages["read_scan"] > 0 and stages["preprocess_scan"] > 0
        # Only the LUNA16 path reads a mask file; the fallback computes one inside preprocess.
        assert (stages["read_lung_mask"] > 0) == (path == "luna16_mask")
        # 0.7 x 0.7 x 1.25 mm -> 1 mm isotropic, cropped to the lungs: smaller than the scan.
        assert all(0 < c <= s for c, s in zip(stages["cache_shape"], (375, 359, 359), strict=True))
        assert entry["nodules_in_sidecar"] == 4


def test_input_pipeline_bench_headroom_is_supply_over_demand():
    lines = _run_bench("input_pipeline.py", "--steps", "2", "--batches", "2").strip()
    report = json.loads(lines.splitlines()[-1])
    assert report["crops_per_s"] > 0 and report["train_steps_per_s"] > 0
    consumed = report["train_steps_per_s"] * report["batch_size"]
    assert report["crops_consumed_per_s"] == pytest.approx(consumed, abs=0.01)
    assert report["pipeline_headroom"] == pytest.approx(report["crops_per_s"] / consumed, rel=0.01)


def test_serving_load_bench_counts_every_scan_and_orders_its_percentiles():
    report = json.loads(
        _run_bench("serving_load.py", "--clients", "1,2", "--scans-per-client", "2")
    )
    assert report["model"] == "standin" and report["scans_per_client"] == 2
    assert [row["clients"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["scans"] == row["clients"] * 2 == row["ok"] + row["errors"]
        assert row["errors"] == 0, row["error_messages"]
        assert row["scans_per_s"] == pytest.approx(row["ok"] / row["wall_s"], rel=0.01)
        lat = row["latency_s"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert lat["mean"] <= lat["max"]
        assert row["findings_per_scan"] == 5  # the stand-in reports its top five cells


def test_pipelines_bench_reports_both_jobs_beside_their_clis():
    pytest.importorskip("apache_beam")
    report = json.loads(
        _run_bench("pipelines.py", "--scans", "2", "--shape", "32,64,64", "--model", "tiny")
    )
    assert (report["scans"], report["workers"], report["model"]) == (2, 2, "tiny")
    pre, pred = report["preprocess"], report["predict"]
    assert pre["caches_identical"] and pred["csvs_agree"] and pred["findings"] > 0
    for job in (pre, pred):
        assert job["cli_seconds"] > 0 and job["beam_seconds"] > 0
        assert job["beam_startup_seconds"] > 0 and job["worker_s_per_scan"] > 0
        assert job["beam_scans_per_s"] == pytest.approx(2 / job["beam_seconds"], rel=0.02)
        assert job["cli_scans_per_s"] == pytest.approx(2 / job["cli_seconds"], rel=0.02)

"""`python -m tf_agg3d.pipelines.predict` (RunInference on the DirectRunner, 2 worker processes)
against `python -m tf_agg3d.predict` on the same model and scans."""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("apache_beam")
pytestmark = pytest.mark.slow


def test_model_dir_on_a_cache_writes_predicts_csv_and_a_dead_letter(
    cli_cache, model_dir, cli_predictions, beam_jobs, tmp_path
):
    from tf_agg3d.pipelines.common import read_failures

    # The CLI's cache plus one entry whose array is cut short.
    cache = tmp_path / "cache"
    shutil.copytree(cli_cache, cache)
    first = sorted(n for n in os.listdir(cache) if n.endswith(".npy"))[0][: -len(".npy")]
    shutil.copy(cache / f"{first}.json", cache / "zz.corrupt.json")
    (cache / "zz.corrupt.npy").write_bytes((cache / f"{first}.npy").read_bytes()[:500])

    out = tmp_path / "out" / "predictions.csv"
    proc = beam_jobs.run_module(
        "tf_agg3d.pipelines.predict",
        "--model-dir", model_dir, "--cache", cache, "--out", out, beam_jobs.BEAM_WORKERS,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log
    assert "exported" in proc.stdout and "failed=1" in proc.stdout, log

    want = beam_jobs.read_rows(cli_predictions)
    assert want, "the reference CSV has findings"
    beam_jobs.assert_same_predictions(beam_jobs.read_rows(out), want)
    (failure,) = read_failures(str(tmp_path / "out" / "predictions_failures.csv"))
    assert (failure.uid, failure.stage) == ("zz.corrupt", "read")
    # Only the CSV and its dead letters are left: no shard folder, no stray temporary file.
    assert sorted(os.listdir(tmp_path / "out")) == ["predictions.csv", "predictions_failures.csv"]


def test_an_export_on_a_luna16_root_matches_and_lists_missing_scans(
    luna, cli_cache, model_dir, cli_predictions, beam_jobs, tmp_path
):
    from tf_agg3d.pipelines.common import read_failures

    base = tmp_path / "export"
    exported = beam_jobs.run_module(
        "tf_agg3d.export", "--model-dir", model_dir, "--export-base", base
    )
    assert exported.returncode == 0, exported.stdout + exported.stderr
    uids = tmp_path / "uids.txt"
    wanted = [luna.good[2], "1.2.3.missing", luna.good[0], luna.broken]
    uids.write_text("\n".join(wanted) + "\n")
    out = tmp_path / "p.csv"
    proc = beam_jobs.run_module(
        "tf_agg3d.pipelines.predict",
        "--export", base / "agg3d", "--luna-root", luna.root, "--seriesuids", uids,
        "--out", out, "--failures", tmp_path / "dead.csv", beam_jobs.BEAM_WORKERS,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr

    # Scans preprocessed in memory with their lung masks = the cache entries predict read.
    reference = beam_jobs.read_rows(cli_predictions)
    want = [r for uid in (luna.good[2], luna.good[0]) for r in reference if r["seriesuid"] == uid]
    beam_jobs.assert_same_predictions(beam_jobs.read_rows(out), want)
    dead = {f.uid: f.stage for f in read_failures(str(tmp_path / "dead.csv"))}
    assert dead == {"1.2.3.missing": "list", luna.broken: "read"}

"""`python -m tf_agg3d.pipelines.preprocess` on the DirectRunner (2 worker processes) against
`python -m tf_agg3d.preprocess` on the same synthetic LUNA16 folder."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("apache_beam")
pytestmark = pytest.mark.slow


def _entries(cache_dir) -> list[str]:
    return sorted(n for n in os.listdir(cache_dir) if n.endswith((".npy", ".json")))


def test_cache_equals_the_clis_dead_letters_the_corrupt_scan_and_reruns_skip(
    luna, cli_cache, beam_jobs, tmp_path
):
    from tf_agg3d.pipelines.common import read_failures

    out = tmp_path / "cache"
    args = ("--luna-root", luna.root, "--out", out, beam_jobs.BEAM_WORKERS)
    first = beam_jobs.run_module("tf_agg3d.pipelines.preprocess", *args)
    log = first.stdout + first.stderr
    assert first.returncode == 1, log
    assert f"done={len(luna.good)} skipped=0 failed=1" in first.stdout, log
    assert "DirectRunner (multi_processing, 2 worker(s))" in first.stdout

    # Arrays bit for bit, sidecars byte for byte: the same entries as the single-machine CLI.
    assert (
        _entries(out)
        == _entries(cli_cache)
        == sorted(f"{u}.{ext}" for u in luna.good for ext in ("json", "npy"))
    )
    for name in _entries(out):
        assert (out / name).read_bytes() == (cli_cache / name).read_bytes(), name

    # The corrupt scan is a dead letter, not a failed pipeline.
    (failure,) = read_failures(str(out / "_failures.csv"))
    assert (failure.uid, failure.stage) == (luna.broken, "read")
    assert "truncated" in failure.error

    # A re-run skips the finished scans (their files untouched) and retries the broken one.
    stamps = {name: (out / name).stat().st_mtime_ns for name in _entries(out)}
    second = beam_jobs.run_module("tf_agg3d.pipelines.preprocess", *args)
    assert second.returncode == 1, second.stdout + second.stderr
    assert f"done=0 skipped={len(luna.good)} failed=1" in second.stdout
    assert {name: (out / name).stat().st_mtime_ns for name in _entries(out)} == stamps
    assert [f.uid for f in read_failures(str(out / "_failures.csv"))] == [luna.broken]

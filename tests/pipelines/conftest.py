"""Fixtures for the Beam batch jobs: a synthetic LUNA16 folder with one corrupt scan, the cache
``python -m tf_agg3d.preprocess`` makes of it, a tiny trained-looking model directory, and
``python -m tf_agg3d.predict``'s CSV on that cache. Each is made once per session.

The pipelines run as users run them: ``python -m tf_agg3d.pipelines.<job>`` in a subprocess,
on the DirectRunner in multi-processing mode with 2 workers (:data:`BEAM_WORKERS`).
Helpers reach tests through the ``beam_jobs`` fixture, never ``from conftest import``.
"""

from __future__ import annotations

import csv
import types

import pytest
from support import TINY_DETECTOR_OVERRIDES, helpers_fixture, run_module

BEAM_WORKERS = "--direct_num_workers=2"
# One extra (good) scan beside the corrupt one, so that the dead letter sits among others.
N_SCANS = 4
SHAPE = (40, 80, 80)


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_same_predictions(got: list[dict], want: list[dict], tol: float = 1e-5) -> None:
    """Same rows in the same order: seriesuids equal, every number within `tol`."""
    assert [r["seriesuid"] for r in got] == [r["seriesuid"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key != "seriesuid":
                assert float(a[key]) == pytest.approx(float(b[key]), abs=tol), (key, a, b)


beam_jobs = helpers_fixture(
    run_module, read_rows, assert_same_predictions, BEAM_WORKERS=BEAM_WORKERS
)


@pytest.fixture(scope="session")
def luna(tmp_path_factory):
    """A synthetic LUNA16 folder: N_SCANS good scans and one whose .raw is truncated."""
    from tf_agg3d.data.synthetic.luna16 import generate_dataset

    root = tmp_path_factory.mktemp("beam_luna16")
    summary = generate_dataset(str(root), N_SCANS + 1, seed=11, shape=SHAPE)
    broken = summary["uids"][-1]
    raw = root / f"subset{summary['subset'][broken]}" / f"{broken}.raw"
    raw.write_bytes(raw.read_bytes()[:1000])
    good = sorted(summary["uids"][:-1])
    return types.SimpleNamespace(root=root, good=good, broken=broken)


@pytest.fixture(scope="session")
def cli_cache(luna, tmp_path_factory):
    """``python -m tf_agg3d.preprocess --workers 2`` on :func:`luna` (the broken scan fails)."""
    out = tmp_path_factory.mktemp("beam_cli_cache") / "cache"
    proc = run_module("tf_agg3d.preprocess", "--luna-root", luna.root, "--out", out, "--workers", 2)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny detector (tests/support.py) saved as a model directory; threshold 0, 10 marks."""
    from support import write_model_dir

    from tf_agg3d.config import load_config

    config = load_config(None, [*TINY_DETECTOR_OVERRIDES, "inference.max_marks=10"])
    path = tmp_path_factory.mktemp("beam_model")
    write_model_dir(config, path, seed=3)
    return path


@pytest.fixture(scope="session")
def cli_predictions(cli_cache, model_dir, tmp_path_factory):
    """``python -m tf_agg3d.predict`` on :func:`cli_cache`: the reference CSV."""
    out = tmp_path_factory.mktemp("beam_cli_predictions") / "predictions.csv"
    proc = run_module(
        "tf_agg3d.predict", "--model-dir", model_dir, "--cache", cli_cache, "--out", out
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out

"""The Beam batch jobs beside the single-machine commands: scans/s and the fixed start-up cost.

On one synthetic LUNA16 folder (``tf_agg3d.data.synthetic``, ``--scans`` scans of ``--shape``
voxels) this times, each as the command a user runs (a fresh process, wall seconds):

- preprocessing: ``python -m tf_agg3d.preprocess --workers W`` (a process pool) and
  ``python -m tf_agg3d.pipelines.preprocess --direct_num_workers=W`` (the DirectRunner in
  multi-processing mode), into two caches that must be identical, bit for bit;
- prediction on that cache, with a model of ``--model`` (``demo_cpu``: configs/demo_cpu.yaml,
  ``tiny``: a few thousand parameters) and random weights, exported once with
  ``python -m tf_agg3d.export``, threshold 0 (the worst case: every window proposes its quota):
  ``python -m tf_agg3d.predict`` (one process) and
  ``python -m tf_agg3d.pipelines.predict --export ... --direct_num_workers=W`` (RunInference
  on W workers), whose CSVs must agree (same rows, scores within 1e-5);
- each pipeline once more on an empty seriesuid list: its fixed start-up cost (interpreter,
  Beam, worker processes, pipeline set-up and tear-down; with no scan, no model load).

``worker_s_per_scan`` is the pipeline's own measure of one scan's work on a worker (its
counters): what a scan costs in worker time on any runner, start-up aside. Prints one JSON
object.

    .venv/bin/python bench/pipelines.py [--scans 8] [--shape 96,192,192] [--workers 2]
        [--model demo_cpu|tiny]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "configs", "demo_cpu.yaml")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _timed(*args: str, ok=(0,)) -> tuple[float, str]:
    """Runs ``python -m ...``; returns (wall seconds, stdout + stderr)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=_env(), capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    if proc.returncode not in ok:
        raise SystemExit(f"{' '.join(args[:1])} failed ({proc.returncode}):\n{output[-3000:]}")
    return seconds, output


def _summary_value(output: str, key: str) -> float | None:
    found = re.findall(rf"summary: .*\b{key}=([0-9.]+)", output)
    return float(found[-1]) if found else None


def _write_model(model_dir: str, model: str) -> None:
    import tensorflow as tf

    from tf_agg3d.config import load_config, save_config
    from tf_agg3d.models.builder import build_detector
    from tf_agg3d.models.loading import build_variables

    # Threshold 0: every window proposes its quota and the FPRN scores every proposal (random
    # weights would otherwise leave nothing to write, and the worst case is the one to plan for).
    zero = ["inference.score_threshold=0.0"]
    if model == "demo_cpu":
        config = load_config(DEMO_CONFIG, zero)
    else:
        # The test suite's tiny detector (32^3 windows), from its shared helpers.
        sys.path.insert(0, os.path.join(REPO, "tests"))
        from support import TINY_DETECTOR_OVERRIDES

        config = load_config(None, [*TINY_DETECTOR_OVERRIDES, "inference.max_marks=10", *zero])
    tf.keras.utils.set_random_seed(0)
    detector = build_detector(config.model)
    build_variables(detector)
    save_config(config, os.path.join(model_dir, "config.yaml"))
    tf.train.Checkpoint(model=detector).save(os.path.join(model_dir, "ckpt"))


def _same_cache(a: str, b: str) -> bool:
    names = sorted(n for n in os.listdir(a) if n.endswith((".npy", ".json")))
    if names != sorted(n for n in os.listdir(b) if n.endswith((".npy", ".json"))):
        return False
    for name in names:
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            if fa.read() != fb.read():
                return False
    return True


def _rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _same_predictions(a: str, b: str, tol: float = 1e-5) -> bool:
    ra, rb = _rows(a), _rows(b)
    if len(ra) != len(rb):
        return False
    for x, y in zip(ra, rb, strict=True):
        if x["seriesuid"] != y["seriesuid"]:
            return False
        for key in x:
            if key != "seriesuid" and abs(float(x[key]) - float(y[key])) > tol:
                return False
    return True


def _rate(n: int, seconds: float) -> float | None:
    """n / seconds; None when the time is not positive (a run no slower than start-up alone:
    noise on a busy machine)."""
    return round(n / seconds, 3) if seconds > 0 else None


def _throughput(scans: int, cli_s: float, beam_s: float, idle_s: float, beam_out: str) -> dict:
    """The CLI's and the Beam job's seconds and scans per second; the Beam job's also after
    its start-up (`idle_s`: a run over no scans) and per scan in a worker."""
    return {
        "cli_seconds": round(cli_s, 2),
        "cli_scans_per_s": _rate(scans, cli_s),
        "beam_seconds": round(beam_s, 2),
        "beam_scans_per_s": _rate(scans, beam_s),
        "beam_startup_seconds": round(idle_s, 2),
        "beam_scans_per_s_after_startup": _rate(scans, beam_s - idle_s),
        "worker_s_per_scan": _summary_value(beam_out, "worker_s_per_scan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=8)
    parser.add_argument("--shape", default="96,192,192", help="D,H,W voxels of each scan")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", choices=("demo_cpu", "tiny"), default="demo_cpu")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    workers = f"--direct_num_workers={args.workers}"
    from tf_agg3d.data.synthetic.luna16 import generate_dataset

    result: dict = {
        "scans": args.scans,
        "shape_zyx": list(shape),
        "workers": args.workers,
        "model": args.model,
        "runner": "DirectRunner multi_processing",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "luna16")
        generate_dataset(root, args.scans, seed=3, shape=shape)
        empty = os.path.join(tmp, "no_uids.txt")
        open(empty, "w").close()
        cli_cache, beam_cache = os.path.join(tmp, "cache_cli"), os.path.join(tmp, "cache_beam")

        cli_s, _ = _timed(
            "tf_agg3d.preprocess", "--luna-root", root, "--out", cli_cache,
            "--workers", str(args.workers),
        )  # fmt: skip
        beam_s, beam_out = _timed(
            "tf_agg3d.pipelines.preprocess", "--luna-root", root, "--out", beam_cache, workers
        )
        idle_s, _ = _timed(
            "tf_agg3d.pipelines.preprocess", "--luna-root", root, "--out", beam_cache,
            "--seriesuids", empty, workers,
        )  # fmt: skip
        volumes = [
            np.load(os.path.join(cli_cache, n)).shape
            for n in sorted(os.listdir(cli_cache))
            if n.endswith(".npy")
        ]
        result["preprocess"] = {
            **_throughput(args.scans, cli_s, beam_s, idle_s, beam_out),
            "caches_identical": _same_cache(cli_cache, beam_cache),
            "cache_shapes_zyx": [list(v) for v in volumes],
        }

        model_dir, export_base = os.path.join(tmp, "model"), os.path.join(tmp, "export")
        os.makedirs(model_dir)
        _write_model(model_dir, args.model)
        export_s, _ = _timed(
            "tf_agg3d.export", "--model-dir", model_dir, "--export-base", export_base,
            "--max-volume-shape", "1024,1024,1024",
        )  # fmt: skip
        export = os.path.join(export_base, "agg3d", "1")
        cli_csv, beam_csv = os.path.join(tmp, "cli.csv"), os.path.join(tmp, "beam.csv")
        cli_s, _ = _timed(
            "tf_agg3d.predict", "--model-dir", model_dir, "--cache", cli_cache, "--out", cli_csv
        )
        beam_s, beam_out = _timed(
            "tf_agg3d.pipelines.predict", "--export", export, "--cache", cli_cache,
            "--out", beam_csv, workers,
        )  # fmt: skip
        idle_s, _ = _timed(
            "tf_agg3d.pipelines.predict", "--export", export, "--cache", cli_cache,
            "--seriesuids", empty, "--out", os.path.join(tmp, "none.csv"), workers,
        )  # fmt: skip
        result["predict"] = {
            "export_seconds": round(export_s, 2),
            **_throughput(args.scans, cli_s, beam_s, idle_s, beam_out),
            "findings": len(_rows(beam_csv)),
            "csvs_agree": _same_predictions(cli_csv, beam_csv),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Serving under load: N concurrent clients, each sending M scans through the gRPC client.

A tiny model is exported into a temporary model base, the development server is started on it
as a separate process on loopback (``python -m tf_agg3d.serving.dev_server --model_base_path
...``), and for each N of ``--clients`` N threads each run ``Agg3DClient.detect_many`` over M
scans (one scan in flight per client, so N calls at once). Per scan the latency is what
``ScanResult.seconds`` reports: read, preprocess, Predict, results to world mm. The report per
N gives p50/p95/p99/mean/max latency, scans/s (successful scans over the wall time of the N
clients together) and the errors.

Models (``--model``):

- ``standin`` (default): the stand-in servable of ``tf_agg3d.serving.standin`` (average-pool
  + top-k, stock ops, the detector's signature contract): measures the serving path itself
  (transfer, validation, preprocessing, gRPC, the dev server's admission), not the network;
- ``tiny``: the real detector at the test suite's tiny size (``tests/support.py``
  ``TINY_DETECTOR_OVERRIDES``, pure-TF RoI Align), so the graph's work counts too. Its export
  takes tens of seconds.

Scans are synthetic LUNA16 scans (``tf_agg3d.data.synthetic``) of ``--scan-shape`` voxels;
each client sends the same M scans. Before timing, each client fetches the model's metadata and
runs one scan.

    .venv/bin/python bench/serving_load.py [--clients 1,2,4,8] [--scans-per-client 8] \\
        [--model standin] [--scan-shape 48,96,96] [--out serving_load.json]

The JSON goes to stdout, and to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import tensorflow as tf

from tf_agg3d.config import load_config
from tf_agg3d.serving import contract
from tf_agg3d.serving.client import Agg3DClient
from tf_agg3d.serving.publishing import export_saved_model
from tf_agg3d.serving.signatures import Agg3DExportModule
from tf_agg3d.serving.standin import export_standin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def export_model(kind: str, base: str) -> str:
    """Exports version 1 of the `kind` model under `base`; returns its base path."""
    if kind == "standin":
        # The scans' size, not the stand-in's small test limit, bounds the volume.
        return export_standin(base, 1, max_volume_shape=contract.MAX_VOLUME_SHAPE).model_base
    from tf_agg3d.models.builder import build_detector
    from tf_agg3d.models.loading import build_variables
    from tf_agg3d.models.whole_scan import WholeScanDetector
    from tf_agg3d.ops.roi_align import roi_align_3d

    # The test suite's tiny detector, from its shared helpers.
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from support import TINY_DETECTOR_OVERRIDES

    config = load_config(None, TINY_DETECTOR_OVERRIDES)
    tf.keras.utils.set_random_seed(7)
    detector = build_detector(config.model)
    build_variables(detector)
    detector.roi_align_fn = roi_align_3d
    whole_scan = WholeScanDetector(detector, config.inference, fill_hu=config.preprocess.fill_hu)
    module = Agg3DExportModule(whole_scan, config, version=1)
    return export_saved_model(module, base).model_base


def write_scans(folder: str, n: int, shape_zyx) -> list[str]:
    """`n` synthetic LUNA16 scans of `shape_zyx` voxels under `folder`; their .mhd paths."""
    from tf_agg3d.data.synthetic.luna16 import generate_dataset

    summary = generate_dataset(folder, n, seed=0, shape=shape_zyx)
    return [
        os.path.join(folder, f"subset{summary['subset'][uid]}", f"{uid}.mhd")
        for uid in summary["uids"]
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base_path: str, port: int, log_path: str, args) -> subprocess.Popen:
    """The development server as a process; returns once its port is open."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    log = open(log_path, "w")  # noqa: SIM115 - the process writes it until stopped
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tf_agg3d.serving.dev_server",
            f"--model_base_path={base_path}",
            f"--port={port}",
            f"--max-concurrent-requests={args.max_concurrent_requests}",
            f"--max-queued-requests={args.max_queued_requests}",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    end = time.monotonic() + 300
    while time.monotonic() < end and proc.poll() is None:
        with open(log_path) as f:
            if f"on 127.0.0.1:{port}" in f.read():
                return proc
        time.sleep(0.2)
    proc.kill()
    with open(log_path) as f:
        raise RuntimeError(f"the development server did not start:\n{f.read()[-3000:]}")


def percentiles(values) -> dict[str, float]:
    if not values:
        return {k: 0.0 for k in ("p50", "p95", "p99", "mean", "max")}
    a = np.asarray(values, np.float64)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {
        "p50": round(float(p50), 4),
        "p95": round(float(p95), 4),
        "p99": round(float(p99), 4),
        "mean": round(float(a.mean()), 4),
        "max": round(float(a.max()), 4),
    }


def run_load(target: str, paths: list[str], clients: int, deadline_s: float) -> dict:
    """`clients` threads, each with its own client (channel) sending every scan once."""
    pool = [Agg3DClient(target, deadline_s=deadline_s) for _ in range(clients)]
    try:
        for client in pool:  # metadata, preprocessing config and one scan, untimed
            warm = client.detect_many(paths[:1], max_concurrency=1)[0]
            if not warm.ok:
                raise RuntimeError(f"warm-up scan failed: {warm.error}")
        results: list[list] = [[] for _ in range(clients)]
        barrier = threading.Barrier(clients + 1)

        def work(i: int) -> None:
            barrier.wait()
            results[i] = pool[i].detect_many(paths, max_concurrency=1)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        barrier.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    finally:
        for client in pool:
            client.close()
    done = [r for per_client in results for r in per_client]
    ok = [r for r in done if r.ok]
    failed = [r for r in done if not r.ok]
    return {
        "clients": clients,
        "scans": len(done),
        "ok": len(ok),
        "errors": len(failed),
        "error_messages": sorted({str(r.error) for r in failed})[:3],
        "wall_s": round(wall, 4),
        "scans_per_s": round(len(ok) / wall, 4) if wall > 0 else 0.0,
        "latency_s": percentiles([r.seconds for r in ok]),
        "findings_per_scan": round(float(np.mean([len(r.findings) for r in ok])), 2) if ok else 0,
    }


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,2,4,8", help="Client counts, comma-separated.")
    parser.add_argument("--scans-per-client", type=int, default=8)
    parser.add_argument("--model", choices=("standin", "tiny"), default="standin")
    parser.add_argument("--scan-shape", default="48,96,96", help="Scan D,H,W (z, y, x).")
    parser.add_argument("--max-concurrent-requests", type=int, default=4)
    parser.add_argument("--max-queued-requests", type=int, default=8)
    parser.add_argument("--deadline", type=float, default=300.0)
    parser.add_argument("--out", default=None, help="Also write the JSON here.")
    args = parser.parse_args()
    # The client reads no lung mask; the threshold fallback's warning would repeat per scan.
    logging.getLogger("tf_agg3d.data.preprocessing.cache_entry").setLevel(logging.ERROR)
    counts = [int(n) for n in args.clients.split(",") if n]
    shape = tuple(int(n) for n in args.scan_shape.split(","))
    if not counts or min(counts) < 1 or args.scans_per_client < 1 or len(shape) != 3:
        parser.error("--clients, --scans-per-client and --scan-shape D,H,W must be positive")
    with tempfile.TemporaryDirectory(prefix="serving_load_") as tmp:
        start = time.perf_counter()
        base_path = os.path.join(export_model(args.model, os.path.join(tmp, "models")))
        export_s = time.perf_counter() - start
        paths = write_scans(os.path.join(tmp, "luna16"), args.scans_per_client, shape)
        port = _free_port()
        server = start_server(base_path, port, os.path.join(tmp, "server.log"), args)
        try:
            rows = [run_load(f"127.0.0.1:{port}", paths, n, args.deadline) for n in counts]
        finally:
            server.terminate()
            server.wait(timeout=60)
    report = {
        "bench": "serving_load",
        "model": args.model,
        "scans_per_client": args.scans_per_client,
        "scan_shape_zyx": list(shape),
        "server": {
            "kind": "tf_agg3d.serving.dev_server (separate process, loopback)",
            "max_concurrent_requests": args.max_concurrent_requests,
            "max_queued_requests": args.max_queued_requests,
        },
        "export_s": round(export_s, 2),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "results": rows,
    }
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()

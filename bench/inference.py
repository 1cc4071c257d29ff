"""Whole-scan inference speed: seconds per preprocessed scan, windows/s, FLOPs, peak RSS.

Two configurations:

- ``paper``: the full Table I detector (``ModelConfig()`` defaults, FPRN with Local
  Magnification), 128^3 windows with 32 voxels of overlap, on a typical preprocessed LUNA16
  scan of 220 x 300 x 300 voxels (2 x 3 x 3 = 18 windows). On a small CPU the whole scan takes
  minutes, so by default only ``--paper-windows`` windows are timed (a volume that the grid
  covers with exactly that many windows) and the per-window time is extrapolated to the 18
  windows of the scan; the JSON says which (``extrapolated``). ``--paper-windows 0`` times the
  whole scan.
- ``demo``: ``configs/demo_cpu.yaml`` (the CPU demo's model and inference settings), whole scan.

Weights are random (speed does not depend on them) and the threshold is 0, so every window
proposes its full quota and the FPRN classifies every core proposal: close to the worst case
(a trained model at 0.269 leaves a few proposals per window, and the FPRN, which runs on the
valid ones only, costs correspondingly less).
The graph is traced before timing (a concrete function with dynamic [D, H, W]).

FLOPs per window are counted from the traced graph of one window's forward pass (backbone, RPN
heads, FPRN on the full ``max_proposals`` quota): 2 x MACs of every Conv3D, transposed Conv3D and MatMul whose shapes are
static; per scan = per window x windows. The achieved FLOP/s is compared with a measured
float32 matmul throughput on this machine (a practical peak) and with the nominal AVX2-FMA peak
(2 FMA units x 8 float32 lanes x 2 FLOPs per cycle per core x cores x clock).

    .venv/bin/python bench/inference.py [--paper-windows 2] [--repeats 1] [--skip-demo]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import time

import numpy as np
import tensorflow as tf

from tf_agg3d.config import ExperimentConfig, load_config
from tf_agg3d.models.builder import build_detector
from tf_agg3d.models.whole_scan import VOLUME_SPECS, WholeScanDetector
from tf_agg3d.ops import sliding_window as sw
from tf_agg3d.ops.roi_align import roi_align_3d

SCAN_SHAPE = (220, 300, 300)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "configs", "demo_cpu.yaml")


def _num_windows(shape, config) -> int:
    grid = sw.window_grid(
        tf.constant(shape), config.inference.window_size, config.inference.overlap
    )
    return int(grid["num_windows"])


def _shape_with_windows(n: int, config) -> tuple[int, int, int]:
    """A volume of one window in z and y and `n` windows along x."""
    w = config.inference.window_size
    step = w[2] - config.inference.overlap
    return (w[0], w[1], w[2] + (n - 1) * step)


def _static(shape) -> int | None:
    dims = shape.as_list() if shape.rank is not None else None
    if dims is None or any(d is None for d in dims):
        return None
    return int(np.prod(dims))


def graph_flops(concrete) -> tuple[float, int]:
    """2 x MACs of the convolutions and matmuls of a concrete function (and nested functions).

    Returns:
      (FLOPs, number of such ops whose shapes were not static and are not counted).
    """
    graphs = [concrete.graph]
    for f in concrete.graph._functions.values():  # while-loop / map_fn bodies
        graphs.append(f.graph if hasattr(f, "graph") else None)
    flops, skipped = 0.0, 0
    seen = set()
    for graph in graphs:
        if graph is None or id(graph) in seen:
            continue
        seen.add(id(graph))
        for op in graph.get_operations():
            if op.type == "Conv3D":
                out = _static(op.outputs[0].shape)
                k = op.inputs[1].shape.as_list()
                if out is None or None in k:
                    skipped += 1
                    continue
                flops += 2.0 * out * k[0] * k[1] * k[2] * k[3]
            elif op.type == "Conv3DBackpropInputV2":
                grad = _static(op.inputs[2].shape)  # the transposed conv's input
                k = op.inputs[1].shape.as_list()  # [kd, kh, kw, out, in]
                if grad is None or None in k:
                    skipped += 1
                    continue
                flops += 2.0 * grad * k[0] * k[1] * k[2] * k[3]
            elif op.type in ("MatMul", "BatchMatMulV2"):
                a, b = op.inputs[0].shape, op.inputs[1].shape
                out = _static(op.outputs[0].shape)
                if out is None or a.rank is None or a.as_list()[-1] is None:
                    skipped += 1
                    continue
                transpose_a = op.type == "MatMul" and op.get_attr("transpose_a")
                inner = a.as_list()[-2] if transpose_a else a.as_list()[-1]
                del b
                flops += 2.0 * out * inner
    return flops, skipped


def window_flops(module: WholeScanDetector, num_proposals: int) -> tuple[float, int]:
    """FLOPs of one window: backbone + RPN heads + the FPRN on `num_proposals` proposals.

    The whole-scan graph runs the FPRN only on a window's valid core proposals (a dynamic
    count); here it is counted for a static, full proposal quota (the worst case).
    """
    det = module.detector

    def forward(crops):
        features = det.features(crops[..., None], training=False)
        det.rpn(features, training=False)
        if module.use_fpr:
            boxes = tf.fill([1, num_proposals, 4], 8.0)
            levels = tf.zeros([1, num_proposals], tf.int32)
            valid = tf.ones([1, num_proposals], tf.bool)
            det.classify(features, boxes, levels, valid, training=False)
        return features

    fn = tf.function(forward)
    concrete = fn.get_concrete_function(tf.TensorSpec([1, *module.window_size], tf.float32))
    return graph_flops(concrete)


def matmul_peak(seconds: float = 3.0, n: int = 2048) -> float:
    """Measured float32 matmul FLOP/s (a practical peak for this machine and TF build)."""
    a = tf.random.normal([n, n])
    b = tf.random.normal([n, n])
    mm = tf.function(lambda x, y: tf.matmul(x, y))
    mm(a, b).numpy()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        mm(a, b).numpy()
        count += 1
    return 2.0 * n**3 * count / (time.perf_counter() - start)


def nominal_peak() -> dict:
    cores = os.cpu_count() or 1
    mhz = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    mhz = float(line.split(":")[1])
                    break
    except OSError:
        pass
    flops_per_cycle = 2 * 8 * 2  # 2 FMA units x 8 float32 lanes (AVX2) x 2 FLOPs per FMA
    return {
        "cores": cores,
        "clock_mhz": mhz,
        "assumed_flops_per_cycle_per_core": flops_per_cycle,
        "flop_per_s": None if mhz is None else cores * mhz * 1e6 * flops_per_cycle,
    }


def run_config(name: str, config: ExperimentConfig, timed_windows: int, repeats: int) -> dict:
    config.inference.score_threshold = 0.0  # worst case: every proposal slot is used
    detector = build_detector(config.model)
    # The pure-TF RoI Align is what exported models run; the custom op is optional.
    detector.roi_align_fn = roi_align_3d
    side = config.inference.window_size
    detector(tf.zeros([1, *side, 1]), training=False)
    module = WholeScanDetector(detector, config.inference, fill_hu=config.preprocess.fill_hu)
    scan_windows = _num_windows(SCAN_SHAPE, config)
    shape = SCAN_SHAPE if timed_windows <= 0 else _shape_with_windows(timed_windows, config)
    windows = _num_windows(shape, config)
    rng = np.random.default_rng(0)
    volume = tf.constant(rng.integers(-1000, 400, shape).astype(np.int16))
    start = time.perf_counter()
    detect = module.detect.get_concrete_function(VOLUME_SPECS[0])
    trace_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = detect(volume)
        int(out["num_detections"])
        times.append(time.perf_counter() - start)
    best = min(times)
    per_window = best / windows
    per_scan = per_window * scan_windows
    flops_window, skipped = window_flops(module, config.model.proposals.max_proposals)
    return {
        "config": name,
        "window_size": list(side),
        "overlap": config.inference.overlap,
        "window_batch_size": config.inference.window_batch_size,
        "fpr": module.use_fpr,
        "parameters": int(detector.count_params()),
        "scan_shape": list(SCAN_SHAPE),
        "scan_windows": scan_windows,
        "timed_shape": list(shape),
        "timed_windows": windows,
        "extrapolated": windows != scan_windows,
        "trace_seconds": round(trace_s, 2),
        "timed_seconds": [round(t, 3) for t in times],
        "seconds_per_window": round(per_window, 3),
        "seconds_per_scan": round(per_scan, 2),
        "windows_per_second": round(1.0 / per_window, 4),
        "gflops_per_window": round(flops_window / 1e9, 2),
        "gflops_per_scan": round(flops_window * scan_windows / 1e9, 1),
        "flop_ops_not_counted": skipped,
        "achieved_gflop_per_s": round(flops_window / per_window / 1e9, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paper-windows", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-paper", action="store_true")
    args = parser.parse_args()

    results = []
    if not args.skip_paper:
        paper = load_config(None, ["model.fpr.use_custom_op=false"])
        results.append(run_config("paper", paper, args.paper_windows, args.repeats))
    demo_note = None
    if not args.skip_demo:
        if os.path.exists(DEMO_CONFIG):
            demo = load_config(DEMO_CONFIG, ["model.fpr.use_custom_op=false"])
            results.append(run_config("demo_cpu", demo, 0, args.repeats))
        else:
            demo_note = f"{DEMO_CONFIG} not found: demo configuration not timed"
    peak = matmul_peak()
    nominal = nominal_peak()
    for r in results:
        r["fraction_of_matmul_peak"] = round(r["achieved_gflop_per_s"] * 1e9 / peak, 3)
        if nominal["flop_per_s"]:
            r["fraction_of_nominal_peak"] = round(
                r["achieved_gflop_per_s"] * 1e9 / nominal["flop_per_s"], 3
            )
    report = {
        "benchmark": "whole-scan inference (sliding windows + FPRN + NMS), random weights",
        "results": results,
        "matmul_peak_gflop_per_s": round(peak / 1e9, 1),
        "nominal_peak": {
            **nominal,
            "flop_per_s": None if nominal["flop_per_s"] is None else round(nominal["flop_per_s"]),
        },
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "cpu_count": os.cpu_count(),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        },
        "note": demo_note,
    }
    if not math.isfinite(report["peak_rss_mib"]):
        report["peak_rss_mib"] = None
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

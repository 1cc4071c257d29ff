"""Whole-scan inference speed: seconds per preprocessed scan, peak RSS, work done, precision.

Two configurations, each on a whole scan of ``--scan-shape`` (default 220 x 300 x 300, a
typical preprocessed LUNA16 scan):

- ``paper``: the full Table I detector (``ModelConfig()`` defaults, FPRN with Local
  Magnification) and the default inference settings;
- ``demo``: ``configs/demo_cpu.yaml`` (the CPU demo's model and inference settings).

``--path`` picks the whole-scan path (``inference.mode``): ``tiles`` (the default: one pass
over the scan, the stem in memory-budgeted tiles), ``windows`` (the paper's overlapping
windows) or ``both``, timed interleaved (tiles, windows, tiles, windows, ...) so that both see
the same machine load. ``--precision`` sets ``inference.precision`` (default ``auto``: bfloat16
on CPUs with native bfloat16, see tf_agg3d/models/precision.py); each row says which ran.

The volume (``--volume``): ``phantom`` (default) is shaped like a preprocessed cache entry:
noise HU inside two ellipsoidal "dilated lungs" that fill about half the box, the fill value
(0 HU) outside, so ``inference.skip_fill`` has what it has on real scans to skip; ``noise`` is
noise everywhere (nothing to skip). Weights are random (speed does not depend on them) and
the threshold is 0, so every window proposes its full quota and the tiles path its full
``max_proposals_per_scan``: the FPRN classifies as many proposals as it ever does (a trained
model at 0.269 leaves a few, and costs correspondingly less).

Each row reports: ``seconds_per_scan`` (best of ``--repeats``, after one warm-up call that
builds oneDNN's primitives: ``first_call_seconds``), ``new_shape_seconds`` (one call on a scan
16 voxels larger per axis, after the timed ones: what a scan of a shape not seen before costs,
primitives included), the process's CPU seconds in each timed call, ``peak_rss_mib``
(the process's peak resident memory during the call: Linux ``VmHWM``, reset before each call),
``backbone_calls`` (windows or stem tiles computed), ``voxel_evaluations_per_scan_voxel``
(input voxels the backbone evaluated / scan voxels: ~1.9 for 128^3 windows overlapping by 32;
padding to a multiple of 16 and the stem tiles' 8-voxel halos for tiles), the FLOPs of the
scan counted from traced graphs (2 x MACs of every Conv3D, transposed conv and MatMul:
windows = one window's backbone + RPN + FPRN-on-its-quota x windows; tiles = the stem per
evaluated voxel + the trunk and RPN on the padded scan + the FPRN on its quota) and the
achieved FLOP/s, as a fraction of the matmul throughput measured in the same run in the same
precision (``matmul_gflop_per_s``: float32 and bfloat16 2048^2 matmuls).

    .venv/bin/python bench/inference.py [--path both] [--repeats 3] [--skip-demo]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import time

import numpy as np
import tensorflow as tf

from tf_agg3d.config import ExperimentConfig, load_config
from tf_agg3d.models.builder import build_detector
from tf_agg3d.models.receptive_field import STEM_STRIDE
from tf_agg3d.models.whole_scan import VOLUME_SPECS, WholeScanDetector
from tf_agg3d.ops.roi_align import roi_align_3d

SCAN_SHAPE = (220, 300, 300)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "configs", "demo_cpu.yaml")


# --------------------------------------------------------------------------------------------
# Memory and CPU
# --------------------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Resets the process's peak RSS (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """The process's peak RSS since the last reset (``VmHWM``), else since it started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------


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
    for f in concrete.graph._functions.values():  # while-loop / map_fn / cond bodies
        graphs.append(f.graph if hasattr(f, "graph") else None)
    flops, skipped = 0.0, 0
    seen = set()
    for graph in graphs:
        if graph is None or id(graph) in seen:
            continue
        seen.add(id(graph))
        for op in graph.get_operations():
            if op.type in ("Conv3D", "_FusedConv3D"):
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
                a = op.inputs[0].shape
                out = _static(op.outputs[0].shape)
                if out is None or a.rank is None or a.as_list()[-1] is None:
                    skipped += 1
                    continue
                transpose_a = op.type == "MatMul" and op.get_attr("transpose_a")
                inner = a.as_list()[-2] if transpose_a else a.as_list()[-1]
                flops += 2.0 * out * inner
    return flops, skipped


def _classify_flops(det, features, num_proposals: int):
    boxes = tf.fill([1, num_proposals, 4], 8.0)
    levels = tf.zeros([1, num_proposals], tf.int32)
    valid = tf.ones([1, num_proposals], tf.bool)
    return det.classify(features, boxes, levels, valid, training=False)


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
            _classify_flops(det, features, num_proposals)
        return features

    concrete = tf.function(forward).get_concrete_function(
        tf.TensorSpec([1, *module.window_size], tf.float32)
    )
    return graph_flops(concrete)


def tiles_flops(
    module: WholeScanDetector, padded_shape, evaluated_voxels: int
) -> tuple[float, int]:
    """FLOPs of a tiled scan: stem x evaluated voxels + trunk, RPN and FPRN on the scan."""
    det, net = module.detector, module._net
    side = 32
    stem = tf.function(lambda v: net.stem(v)).get_concrete_function(
        tf.TensorSpec([1, side, side, side], tf.float32)
    )
    stem_flops, skipped = graph_flops(stem)
    cells = [n // STEM_STRIDE for n in padded_shape]

    def rest(x):
        features = net.trunk(x)
        det.rpn(features, training=False)
        if module.use_fpr:
            _classify_flops(det, features, module.max_candidates)
        return features

    trunk = tf.function(rest).get_concrete_function(
        tf.TensorSpec([1, *cells, net.stem_channels], tf.float32)
    )
    trunk_flops, skipped_trunk = graph_flops(trunk)
    return stem_flops / side**3 * evaluated_voxels + trunk_flops, skipped + skipped_trunk


def matmul_throughput(dtype, seconds: float = 2.0, n: int = 2048) -> float:
    """Measured matmul FLOP/s in `dtype` (a practical peak for this machine and TF build)."""
    a = tf.cast(tf.random.normal([n, n]), dtype)
    b = tf.cast(tf.random.normal([n, n]), dtype)
    mm = tf.function(lambda x, y: tf.matmul(x, y))
    mm(a, b).numpy()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        mm(a, b).numpy()
        count += 1
    return 2.0 * n**3 * count / (time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def make_volume(kind: str, shape, fill_hu: float, seed: int = 0) -> np.ndarray:
    """int16 HU: ``noise`` everywhere, or a ``phantom`` (noise in two ellipsoids, fill outside)."""
    rng = np.random.default_rng(seed)
    vol = rng.integers(-1000, 400, shape).astype(np.int16)
    if kind == "noise":
        return vol
    d, h, w = shape
    zz, yy, xx = np.meshgrid(
        np.linspace(-1, 1, d), np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij"
    )
    inside = np.zeros(shape, bool)
    for cx in (-0.48, 0.48):  # two "lungs", left and right
        inside |= (zz / 1.0) ** 2 + (yy / 0.95) ** 2 + ((xx - cx) / 0.5) ** 2 <= 1.0
    vol[~inside] = int(fill_hu)
    return vol


def build(config: ExperimentConfig, path: str) -> WholeScanDetector:
    config.inference.score_threshold = 0.0  # worst case: every proposal slot is used
    config.inference.mode = path
    detector = build_detector(config.model)
    # The pure-TF RoI Align is what exported models run; the custom op is optional.
    detector.roi_align_fn = roi_align_3d
    detector(tf.zeros([1, 32, 32, 32, 1]), training=False)
    return WholeScanDetector(detector, config.inference, fill_hu=config.preprocess.fill_hu)


def run_config(name, config, paths, volume, repeats, warmup) -> list[dict]:
    modules = {
        p: build(dataclasses.replace(config, inference=dataclasses.replace(config.inference)), p)
        for p in paths
    }
    tensor = tf.constant(volume)
    rows = {}
    for path, module in modules.items():
        start = time.perf_counter()
        detect = module.detect.get_concrete_function(VOLUME_SPECS[0])
        rows[path] = {
            "config": name,
            "path": module.mode,
            **{k: v for k, v in module.describe().items() if k != "mode"},
            "fpr": module.use_fpr,
            "parameters": int(module.detector.count_params()),
            "scan_shape": list(volume.shape),
            "trace_seconds": round(time.perf_counter() - start, 2),
            "_detect": detect,
            "timed_seconds": [],
            "cpu_seconds": [],
            "peak_rss_mib_runs": [],
        }
        if warmup:
            start = time.perf_counter()
            int(detect(tensor)["num_detections"])
            rows[path]["first_call_seconds"] = round(time.perf_counter() - start, 3)
    for _ in range(repeats):  # interleaved: every path once per round
        for path in paths:
            row = rows[path]
            reset_peak_rss()
            cpu0, start = cpu_seconds(), time.perf_counter()
            out = row["_detect"](tensor)
            int(out["num_detections"])
            row["timed_seconds"].append(round(time.perf_counter() - start, 3))
            row["cpu_seconds"].append(round(cpu_seconds() - cpu0, 2))
            row["peak_rss_mib_runs"].append(round(peak_rss_mib(), 1))
            row["backbone_calls"] = int(out["num_windows"])
            row["evaluated_voxels"] = int(out["evaluated_voxels"])
            row["num_detections"] = int(out["num_detections"])
    # A scan of another shape: the graph is traced already, but oneDNN builds primitives for
    # the new tensor shapes (every scan of a real workload has its own shape; windows do not).
    other = tf.constant(np.pad(volume, 8, constant_values=volume.flat[0]))
    for path in paths:
        start = time.perf_counter()
        int(rows[path]["_detect"](other)["num_detections"])
        rows[path]["new_shape_seconds"] = round(time.perf_counter() - start, 3)
    results = []
    scan_voxels = int(np.prod(volume.shape))
    for path in paths:
        row, module = rows.pop(path), modules[path]
        del row["_detect"]
        best = min(row["timed_seconds"])
        row["seconds_per_scan"] = best
        row["peak_rss_mib"] = max(row.pop("peak_rss_mib_runs"))
        row["voxel_evaluations_per_scan_voxel"] = round(row["evaluated_voxels"] / scan_voxels, 3)
        if module.mode == "tiles":
            multiple = max(module._net.strides)
            padded = [-(-n // multiple) * multiple for n in volume.shape]
            flops, skipped = tiles_flops(module, padded, row["evaluated_voxels"])
            row["seconds_per_backbone_call"] = round(best / max(row["backbone_calls"], 1), 3)
        else:
            per_window, skipped = window_flops(module, config.model.proposals.max_proposals)
            flops = per_window * row["backbone_calls"]
            row["gflops_per_window"] = round(per_window / 1e9, 2)
            row["seconds_per_window"] = round(best / max(row["backbone_calls"], 1), 3)
        row["gflops_per_scan"] = round(flops / 1e9, 1)
        row["flop_ops_not_counted"] = skipped
        row["achieved_gflop_per_s"] = round(flops / best / 1e9, 2)
        results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", choices=("tiles", "windows", "both"), default="tiles")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-warmup", action="store_true", help="time the first call too")
    parser.add_argument("--scan-shape", default=",".join(map(str, SCAN_SHAPE)))
    parser.add_argument("--volume", choices=("phantom", "noise"), default="phantom")
    parser.add_argument("--memory-budget-mb", type=int, default=None)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-paper", action="store_true")
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.scan_shape.split(","))
    paths = ["tiles", "windows"] if args.path == "both" else [args.path]
    overrides = ["model.fpr.use_custom_op=false", f"inference.precision={args.precision}"]
    if args.memory_budget_mb is not None:
        overrides.append(f"inference.memory_budget_mb={args.memory_budget_mb}")

    load_before = os.getloadavg()
    results = []
    configs = []
    if not args.skip_paper:
        configs.append(("paper", load_config(None, overrides)))
    demo_note = None
    if not args.skip_demo:
        if os.path.exists(DEMO_CONFIG):
            configs.append(("demo_cpu", load_config(DEMO_CONFIG, overrides)))
        else:
            demo_note = f"{DEMO_CONFIG} not found: demo configuration not timed"
    for name, config in configs:
        volume = make_volume(args.volume, shape, config.preprocess.fill_hu)
        results += run_config(name, config, paths, volume, args.repeats, not args.no_warmup)
    peaks = {
        "float32": matmul_throughput(tf.float32),
        "bfloat16": matmul_throughput(tf.bfloat16),
    }
    for r in results:
        r["fraction_of_matmul_throughput"] = round(
            r["achieved_gflop_per_s"] * 1e9 / peaks[r["precision"]], 3
        )
    report = {
        "benchmark": "whole-scan inference (tiles / sliding windows + FPRN + NMS), random weights",
        "volume": args.volume,
        "results": results,
        "matmul_gflop_per_s": {k: round(v / 1e9, 1) for k, v in peaks.items()},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "cpu_count": os.cpu_count(),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        },
        "note": demo_note,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

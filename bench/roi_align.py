"""Benchmark of 3D RoI Align: the C++ custom op against the pure-TF reference, side by side.

Prints one JSON object: median forward and forward+backward times (ms) of both paths for
R = 128 and 512 RoIs on the three pyramid levels of a 128^3 crop (strides 4, 8, 16: feature
maps 32^3, 16^3, 8^3, batch 2, 32 channels), output 2, sampling ratio 2, and the speed-ups.
Boxes are nodule-sized cubes (3-30 voxels) in input coordinates, pooled with
spatial_scale = 1 / stride, so small RoIs are sub-voxel on the coarse levels.

Both paths run as tf.functions (graph mode, never eager), so they pay the same per-call
dispatch. Two timings per path:

* ``*_ms``: one tf.function call per forward (or forward+backward), as a Python training loop
  calling a tiny step would. Includes the fixed cost of a tf.function call from Python
  (``tf_function_call_floor_ms``: the same signature doing nothing), which on a slow or loaded
  2-core machine is a large share of the small cases and caps their speed-up.
* ``*_in_graph_ms``: ``--loop`` (default 10) iterations inside one tf.function (a
  ``tf.while_loop`` whose boxes depend on the iteration, so nothing is hoisted), divided by the
  count: the per-use cost inside a compiled training step, without the Python dispatch.
* ``custom_op_one_roi_fwd_bwd_in_graph_ms``: the same in-graph forward+backward of the custom
  op with a single RoI on the same map: what no kernel work can remove, i.e. zeroing the dense
  [B, D, H, W, C] feature gradient (8 MiB at stride 4) and the loop body's other ops. The
  custom op's time above it is its actual RoI work.

Like ``timeit``, the garbage collector is off while timing (a collection of TensorFlow's
Python objects lands in random samples otherwise). The two paths are timed interleaved, one
sample of each in turn (alternating which goes first), so that a burst of load from elsewhere
on a shared machine lands on both sides of a speed-up rather than on one.

    .venv/bin/python bench/roi_align.py [--repeats 15] [--warmup 3] [--loop 10]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_agg3d.ops.roi_align import roi_align_3d  # noqa: E402
from tf_agg3d.ops.roi_align_op import custom_op_available, roi_align_3d_fast  # noqa: E402

CROP = 128
BATCH = 2
CHANNELS = 32
STRIDES = (4, 8, 16)
NUM_ROIS = (128, 512)
OUTPUT_SIZE = 2
SAMPLING_RATIO = 2


def _median_ms(fns, args, warmup: int, repeats: int, per_call: int = 1) -> list[float]:
    """Median wall times of each fn(*args) in ms after warm-up calls (CPU ops run synchronously),
    divided by `per_call` (iterations inside one call). The functions are sampled interleaved,
    the first one alternating; the GC is off while timing."""
    for fn in fns:
        for _ in range(warmup):
            fn(*args)
    times: list[list[float]] = [[] for _ in fns]
    gc.collect()
    gc.disable()
    try:
        for rep in range(repeats):
            order = range(len(fns)) if rep % 2 == 0 else reversed(range(len(fns)))
            for k in order:
                t0 = time.perf_counter()
                fns[k](*args)
                times[k].append((time.perf_counter() - t0) * 1e3 / per_call)
    finally:
        gc.enable()
    return [statistics.median(t) for t in times]


def _functions(impl, stride: int):
    """tf.functions of the forward and of forward+backward (the gradient w.r.t. the features of
    the output against the `upstream` gradient, as a training step's backward pass gets it)."""
    kwargs = dict(
        output_size=OUTPUT_SIZE, sampling_ratio=SAMPLING_RATIO, spatial_scale=1.0 / stride
    )

    @tf.function
    def forward(features, boxes, box_indices, upstream):
        del upstream
        return impl(features, boxes, box_indices, **kwargs)

    @tf.function
    def forward_backward(features, boxes, box_indices, upstream):
        with tf.GradientTape() as tape:
            tape.watch(features)
            out = impl(features, boxes, box_indices, **kwargs)
        return out, tape.gradient(out, features, output_gradients=upstream)

    return forward, forward_backward


def _looped(impl, stride: int, loop: int):
    """tf.functions running `loop` forwards (or forward+backwards) in one tf.while_loop.

    The boxes move by 1e-6 voxel per iteration: the body depends on the loop counter, so no
    graph optimisation can hoist the RoI Align out of the loop, and the result is kept live
    through the loop-carried sum (a sum over the whole pooled output: the backward does not
    read it, so it alone keeps the forward from being pruned).
    """
    kwargs = dict(
        output_size=OUTPUT_SIZE, sampling_ratio=SAMPLING_RATIO, spatial_scale=1.0 / stride
    )

    def run(features, boxes, box_indices, upstream, backward):
        def body(i, acc):
            b = boxes + tf.cast(i, boxes.dtype) * 1e-6
            with tf.GradientTape() as tape:
                tape.watch(features)
                out = impl(features, b, box_indices, **kwargs)
            kept = acc + tf.reduce_sum(out)
            if backward:
                grad = tape.gradient(out, features, output_gradients=upstream)
                return i + 1, kept + grad[0, 0, 0, 0, 0]
            return i + 1, kept

        _, acc = tf.while_loop(lambda i, _: i < loop, body, (tf.constant(0), tf.constant(0.0)))
        return acc

    @tf.function
    def forward(features, boxes, box_indices, upstream):
        return run(features, boxes, box_indices, upstream, backward=False)

    @tf.function
    def forward_backward(features, boxes, box_indices, upstream):
        return run(features, boxes, box_indices, upstream, backward=True)

    return forward, forward_backward


@tf.function
def _nothing(features, boxes, box_indices, upstream):
    """The floor of a tf.function call with the benchmark's signature."""
    del features, boxes, box_indices
    return tf.identity(upstream)


def _inputs(rng: np.random.Generator, stride: int, num_rois: int):
    size = CROP // stride
    features = rng.standard_normal((BATCH, size, size, size, CHANNELS)).astype(np.float32)
    centres = rng.uniform(0, CROP, (num_rois, 3))
    diameters = rng.uniform(3, 30, (num_rois, 1))
    boxes = np.concatenate([centres - diameters / 2, centres + diameters / 2], axis=1)
    box_indices = rng.integers(0, BATCH, num_rois).astype(np.int32)
    upstream = rng.standard_normal((num_rois, *(OUTPUT_SIZE,) * 3, CHANNELS)).astype(np.float32)
    return tuple(
        tf.constant(x) for x in (features, boxes.astype(np.float32), box_indices, upstream)
    )


def _loadavg() -> str | None:
    """The machine's load average (timings on a shared machine are only comparable with it)."""
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--loop", type=int, default=10, help="iterations per in-graph timing")
    args = parser.parse_args()

    have_op = custom_op_available()
    # Timings per path, in the order of the tuples in `fns`: (name, iterations per call).
    kinds = (
        ("forward", 1),
        ("fwd_bwd", 1),
        ("forward_in_graph", args.loop),
        ("fwd_bwd_in_graph", args.loop),
    )
    rng = np.random.default_rng(0)
    rows = []
    for stride in STRIDES:
        paths = {"pure_tf": roi_align_3d}
        if have_op:
            paths["custom_op"] = roi_align_3d_fast
        fns = {
            name: (*_functions(impl, stride), *_looped(impl, stride, args.loop))
            for name, impl in paths.items()
        }
        one_roi_ms = None
        if have_op:
            # Its own generator, so that the timed cases' inputs do not depend on it.
            one_roi = _inputs(np.random.default_rng(1), stride, 1)
            (one_roi_ms,) = _median_ms(  # fns[...][3]: the in-graph fwd+bwd, as in `kinds`.
                [fns["custom_op"][3]], one_roi, args.warmup, args.repeats, args.loop
            )
        for num_rois in NUM_ROIS:
            inputs = _inputs(rng, stride, num_rois)
            row = {"stride": stride, "map": CROP // stride, "rois": num_rois}
            if one_roi_ms is not None:
                row["custom_op_one_roi_fwd_bwd_in_graph_ms"] = one_roi_ms
            (row["tf_function_call_floor_ms"],) = _median_ms(
                [_nothing], inputs, args.warmup, args.repeats
            )
            for k, (key, per_call) in enumerate(kinds):
                medians = _median_ms(
                    [fn[k] for fn in fns.values()], inputs, args.warmup, args.repeats, per_call
                )
                for name, ms in zip(fns, medians, strict=True):
                    row[f"{name}_{key}_ms"] = ms
            if have_op:
                for kind, _ in kinds:
                    row[f"speedup_{kind}"] = row[f"pure_tf_{kind}_ms"] / row[f"custom_op_{kind}_ms"]
            rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})

    report = {
        "benchmark": "roi_align_3d",
        "tensorflow": tf.__version__,
        "device": "CPU",
        "cpu_cores": os.cpu_count(),
        "batch": BATCH,
        "channels": CHANNELS,
        "output_size": OUTPUT_SIZE,
        "sampling_ratio": SAMPLING_RATIO,
        "repeats": args.repeats,
        "in_graph_loop": args.loop,
        "gc_disabled_while_timing": True,
        "loadavg": _loadavg(),
        "custom_op": have_op,
        "results": rows,
    }
    if have_op:
        report["min_speedup_forward"] = min(r["speedup_forward"] for r in rows)
        report["min_speedup_fwd_bwd"] = min(r["speedup_fwd_bwd"] for r in rows)
        report["target_10x_fwd_bwd_met"] = report["min_speedup_fwd_bwd"] >= 10.0
        report["min_speedup_fwd_bwd_in_graph"] = min(r["speedup_fwd_bwd_in_graph"] for r in rows)
        report["target_10x_fwd_bwd_in_graph_met"] = report["min_speedup_fwd_bwd_in_graph"] >= 10.0
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Runs the CUDA arithmetic of roi_align_3d_math.h on a GPU without TensorFlow.

For machines with a GPU but no TensorFlow: CuPy compiles KERNEL_SOURCE (extern "C" kernels
around the header's forward_elements / backward_elements, which are also the bodies of
roi_align_3d_kernels.cu.cc's kernels) with NVRTC, and the results are compared with a NumPy
reference of the contract (tf_agg3d/ops/roi_align.py). Needs numpy and cupy only.

    python custom_ops/roi_align_3d/tests/cuda_harness.py   # exits 1 on a mismatch
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

OP_DIR = Path(__file__).resolve().parents[1]

# One thread per output element, grid-stride loops: `forward_elements` / `backward_elements` are
# the header's, the bodies of the TensorFlow op's CUDA kernels.
KERNEL_SOURCE = r"""
#include "roi_align_3d_math.h"

#define ARGS int num_rois, int D, int H, int W, int C, int o, int sr, float scale, bool aligned
#define PASS num_rois, D, H, W, C, o, sr, scale, aligned
#define KERNELS(T, SUFFIX)                                                                    \
  __global__ void forward_##SUFFIX(const T* f, const T* b, const int* i, T* out, ARGS) {     \
    roi_align_3d::forward_elements(f, b, i, out, PASS);                                       \
  }                                                                                           \
  __global__ void backward_##SUFFIX(const T* g, const T* b, const int* i, T* gf, ARGS) {     \
    roi_align_3d::backward_elements(g, b, i, gf, PASS);                                       \
  }
extern "C" {
KERNELS(float, f32)
KERNELS(double, f64)
}
"""


def _axis(coord: float, size: int) -> list[tuple[int, float]]:
    """Detectron2's bilinear_interpolate along one axis; [] when the sample is outside."""
    if not (-1.0 <= coord <= size):
        return []
    c = max(coord, 0.0)
    lo = int(np.floor(c))
    if lo >= size - 1:
        return [(size - 1, 1.0)]
    return [(lo, 1.0 - (c - lo)), (lo + 1, c - lo)]


def _samples(box, shape, o, sr, scale, aligned):
    """Yields (bin (pz, py, px), [(z, y, x, weight)]) for every sample of one box."""
    offset = 0.5 if aligned else 0.0
    scale = float(np.float32(scale))
    start = [box[a] * scale - offset for a in range(3)]
    length = [box[a + 3] * scale - offset - start[a] for a in range(3)]
    if not aligned:
        length = [max(v, 1.0) for v in length]
    bins = [v / o for v in length]
    for p in np.ndindex(o, o, o):
        for i in np.ndindex(sr, sr, sr):
            coords = [start[a] + p[a] * bins[a] + (i[a] + 0.5) * bins[a] / sr for a in range(3)]
            taps = [_axis(coords[a], shape[a]) for a in range(3)]
            yield (
                p,
                [
                    (z, y, x, wz * wy * wx)
                    for z, wz in taps[0]
                    for y, wy in taps[1]
                    for x, wx in taps[2]
                ],
            )


def reference(features, boxes, box_indices, grads, o=2, sr=2, scale=1.0, aligned=True):
    """NumPy forward output [R, o, o, o, C] and feature gradient for upstream `grads`."""
    features = np.asarray(features, np.float64)
    out = np.zeros((len(boxes), o, o, o, features.shape[-1]))
    grad_features = np.zeros_like(features)
    for r, box in enumerate(np.asarray(boxes, np.float64)):
        b = box_indices[r]
        for p, taps in _samples(box, features.shape[1:4], o, sr, scale, aligned):
            for z, y, x, w in taps:
                out[(r, *p)] += w * features[b, z, y, x] / sr**3
                grad_features[b, z, y, x] += w * grads[(r, *p)] / sr**3
    return out, grad_features


def run_cuda(features, boxes, box_indices, grads, o=2, sr=2, scale=1.0, aligned=True):
    """The header's CUDA kernels through CuPy: (output, grad_features) as NumPy arrays."""
    import cupy as cp

    dtype = np.dtype(features.dtype)
    suffix = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}[dtype]
    module = cp.RawModule(code=KERNEL_SOURCE, options=("-std=c++17", f"-I{OP_DIR}"))
    batch, depth, height, width, channels = features.shape
    f = cp.asarray(features)
    b = cp.asarray(boxes, dtype=dtype)
    idx = cp.asarray(box_indices, dtype=cp.int32)
    out = cp.zeros((len(boxes), o, o, o, channels), dtype)
    grad_features = cp.zeros_like(f)
    g = cp.asarray(grads, dtype=dtype)
    scalars = (
        np.int32(len(boxes)),
        np.int32(depth),
        np.int32(height),
        np.int32(width),
        np.int32(channels),
        np.int32(o),
        np.int32(sr),
        np.float32(scale),
        np.bool_(aligned),
    )
    total = max(out.size, 1)
    grid = ((total + 255) // 256,)
    module.get_function(f"forward_{suffix}")(grid, (256,), (f, b, idx, out, *scalars))
    module.get_function(f"backward_{suffix}")(grid, (256,), (g, b, idx, grad_features, *scalars))
    cp.cuda.runtime.deviceSynchronize()
    return cp.asnumpy(out), cp.asnumpy(grad_features)


def random_case(seed: int, dtype=np.float32, batch=2, shape=(6, 7, 8), channels=4, num_boxes=24):
    """Features, boxes (inside, borders, sub-voxel, partly/fully outside), indices, grads."""
    rng = np.random.default_rng(seed)
    dims = np.array(shape, np.float64)
    centres = rng.uniform(-2, dims + 2, (num_boxes, 3))
    sizes = rng.uniform(0.05, 6, (num_boxes, 3))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1)
    fixed = np.array([[0, 0, 0, *dims], [*(dims - 1), *dims], [-3, -3, -3, 2, 2, 2]])
    boxes = np.concatenate([boxes, fixed]).astype(dtype)
    features = rng.standard_normal((batch, *shape, channels)).astype(dtype)
    box_indices = rng.integers(0, batch, len(boxes)).astype(np.int32)
    grads = rng.standard_normal((len(boxes), 2, 2, 2, channels)).astype(dtype)
    return features, boxes, box_indices, grads


def compare(seed=0, dtype=np.float32, aligned=True) -> tuple[float, float]:
    """Max |CUDA - NumPy| of the output and of the feature gradient on one random case."""
    features, boxes, box_indices, grads = random_case(seed, dtype)
    want, want_grad = reference(features, boxes, box_indices, grads, aligned=aligned)
    got, got_grad = run_cuda(features, boxes, box_indices, grads, aligned=aligned)
    return float(np.abs(got - want).max()), float(np.abs(got_grad - want_grad).max())


def main() -> int:
    worst = 0.0
    for dtype in (np.float32, np.float64):
        for aligned in (True, False):
            fwd, bwd = compare(1, dtype, aligned)
            print(
                f"{np.dtype(dtype).name} aligned={aligned}: max |diff| fwd {fwd:.2e} bwd {bwd:.2e}"
            )
            worst = max(worst, fwd, bwd)
    ok = worst < 1e-4
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Cube anchors per pyramid level.

An anchor is a cube ``(z, y, x, d)``: its centre in input voxels and its diameter in mm (= voxels
at 1 mm). Feature cell ``j`` of a level with stride ``s`` covers input voxels
``[j*s, (j+1)*s)``, so its anchors are centred at ``j*s + (s-1)/2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

# Anchor diameters (mm) at strides 4, 8, 16: the paper's two LUNA16 sets and its DeepLesion set.
ANCHOR_PRESETS: dict[str, tuple[tuple[float, ...], ...]] = {
    "anchor1": ((4.0, 6.0), (8.0, 12.0), (16.0, 24.0)),
    "anchor2": ((5.0, 10.0), (15.0, 20.0), (25.0, 35.0)),
    "deeplesion": ((3.0, 5.0, 7.0), (10.0, 13.0, 17.0), (22.0, 30.0, 40.0)),
}


def single_scale(
    sizes: Sequence[Sequence[float]], stride: int = 4
) -> tuple[tuple[int, ...], tuple[tuple[float, ...], ...]]:
    """``(strides, sizes)`` putting every size of a multi-scale set on one level.

    Table II's single-scale rows (a, b) in our reading of Section IV.B ("{4, 6, 8, 12, 16, 24} mm
    at the feature layer of 4 mm resolution"): ``single_scale(ANCHOR_PRESETS["anchor1"])`` is
    ``((4,), ((4, 6, 8, 12, 16, 24),))``, i.e. ``model.anchors.strides: [4]`` and
    ``model.anchors.sizes: [[4, 6, 8, 12, 16, 24]]``.
    """
    flat = tuple(sorted(float(d) for group in sizes for d in group))
    return (int(stride),), (flat,)


def feature_shape(input_shape: Sequence[int], stride: int) -> tuple[int, int, int]:
    """Spatial shape of the feature map of `stride` for an input of `input_shape` (D, H, W).

    Raises:
      ValueError: an input side that the stride does not divide.
    """
    if any(int(n) % stride for n in input_shape):
        raise ValueError(f"input shape {tuple(input_shape)} must be divisible by stride {stride}")
    return tuple(int(n) // stride for n in input_shape)


def generate_anchors_np(
    input_shape: Sequence[int], stride: int, sizes: Sequence[float]
) -> np.ndarray:
    """NumPy anchors of one level.

    Args:
      input_shape: (D, H, W) of the network input.
      stride: the level's stride.
      sizes: anchor diameters of the level, A values.

    Returns:
      float32 [d, h, w, A, 4] with (z, y, x, d) per anchor.
    """
    d, h, w = feature_shape(input_shape, stride)
    offset = (stride - 1) / 2.0
    zz, yy, xx = np.meshgrid(
        np.arange(d) * stride + offset,
        np.arange(h) * stride + offset,
        np.arange(w) * stride + offset,
        indexing="ij",
    )
    centres = np.stack([zz, yy, xx], axis=-1)[:, :, :, None, :]
    centres = np.broadcast_to(centres, (d, h, w, len(sizes), 3))
    diam = np.broadcast_to(np.asarray(sizes, np.float32), (d, h, w, len(sizes)))[..., None]
    return np.concatenate([centres, diam], axis=-1).astype(np.float32)


def generate_anchors(input_shape: Sequence[int], stride: int, sizes: Sequence[float]) -> tf.Tensor:
    """Anchors of one level as a constant tensor, float32 [d, h, w, A, 4] (z, y, x, d)."""
    return tf.constant(generate_anchors_np(input_shape, stride, sizes))


def multilevel_anchors(
    input_shape: Sequence[int], strides: Sequence[int], sizes: Sequence[Sequence[float]]
) -> dict[int, tf.Tensor]:
    """Anchors of every anchor level: ``{stride: float32 [d, h, w, A_s, 4]}``.

    `strides` are the levels that carry RPN heads (``model.anchors.strides``): all pyramid
    levels (multi-scale) or a subset, e.g. ``(4,)`` for single-scale.

    Raises:
      ValueError: `strides` and `sizes` of different lengths.
    """
    if len(strides) != len(sizes):
        raise ValueError(f"{len(strides)} strides but {len(sizes)} anchor size groups")
    return {
        int(s): generate_anchors(input_shape, int(s), sz)
        for s, sz in zip(strides, sizes, strict=False)
    }

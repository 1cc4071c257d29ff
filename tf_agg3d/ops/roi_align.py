"""3D RoI Align in pure TensorFlow: the reference (the contract) and the exported path.

This is the implementation that goes into SavedModels (stock TF-Serving cannot load a custom
op); ``tf_agg3d.ops.roi_align_op.roi_align_3d_fast`` is the C++/CUDA op equal to it within
1e-5, used for training and local inference when built.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

__all__ = ["roi_align_3d", "roi_align_entry", "validate_roi_align_args"]


def _check_rank(x: tf.Tensor, name: str, rank: int, layout: str) -> None:
    """Raises ValueError naming `name` when the static rank of `x` is known and wrong."""
    if x.shape.rank is not None and x.shape.rank != rank:
        raise ValueError(f"roi_align_3d: `{name}` must have rank {rank} {layout}, got {x.shape}")


def _axis_taps(
    start: tf.Tensor, bin_size: tf.Tensor, size: tf.Tensor, output_size: int, sampling_ratio: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """Voxel indices and weights of every sample along one axis.

    Args:
        start: [R] float, first coordinate of the (shifted) box along the axis.
        bin_size: [R] float, bin length along the axis.
        size: scalar int32, the feature map's extent along the axis.
        output_size: bins per axis, o.
        sampling_ratio: samples per bin and axis, s.

    Returns:
        index: [R, o * s * 2] int32, ordered (bin, sample, low/high neighbour).
        weight: [R, o * s * 2] float, the linear weights, 0 for a sample outside [-1, size].
    """
    dtype = start.dtype
    o, s = output_size, sampling_ratio
    p = tf.constant(np.repeat(np.arange(o), s), dtype)  # Bin of each sample.
    i = tf.constant(np.tile(np.arange(s), o), dtype)  # Sample within its bin.
    # Same expression order as roi_align_3d_math.h::sample_coord: bitwise-equal in float32.
    coord = start[:, None] + p * bin_size[:, None] + (i + 0.5) * bin_size[:, None] / float(s)
    size_f = tf.cast(size, dtype)
    valid = (coord >= -1.0) & (coord <= size_f)  # NaN coordinates are invalid too.
    # Clamp into [0, size] before the int cast so that invalid (even huge) coordinates give
    # in-range indices; their weights are zeroed below anyway.
    c = tf.clip_by_value(tf.where(valid, coord, tf.zeros_like(coord)), 0.0, size_f)
    low = tf.cast(tf.floor(c), tf.int32)
    at_end = low >= size - 1  # Detectron2: low = high = size - 1 and the sample sits on it.
    low = tf.where(at_end, size - 1, low)
    high = tf.where(at_end, size - 1, low + 1)
    c = tf.where(at_end, tf.cast(low, dtype), c)
    frac = c - tf.cast(low, dtype)
    zeros = tf.zeros_like(frac)
    w_low = tf.where(valid, 1.0 - frac, zeros)
    w_high = tf.where(valid, frac, zeros)
    index = tf.reshape(tf.stack([low, high], axis=-1), [-1, o * s * 2])
    weight = tf.reshape(tf.stack([w_low, w_high], axis=-1), [-1, o * s * 2])
    return index, weight


def validate_roi_align_args(
    features, boxes, box_indices, output_size, sampling_ratio
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, int, int]:
    """Checks the arguments shared by ``roi_align_3d`` and the custom-op wrapper.

    Returns:
        (features, boxes, box_indices) as tensors, and (output_size, sampling_ratio) as ints.

    Raises:
        ValueError: naming the offending argument (static ranks, dtypes, sizes).
    """
    if isinstance(output_size, bool) or not isinstance(output_size, int | np.integer):
        raise ValueError(f"roi_align_3d: `output_size` must be an int, got {output_size!r}")
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int | np.integer):
        raise ValueError(f"roi_align_3d: `sampling_ratio` must be an int, got {sampling_ratio!r}")
    o, s = int(output_size), int(sampling_ratio)
    if o < 1:
        raise ValueError(f"roi_align_3d: `output_size` must be >= 1, got {o}")
    if s < 1:
        raise ValueError(
            f"roi_align_3d: `sampling_ratio` must be >= 1 (adaptive sampling is not supported: "
            f"shapes must be static), got {s}"
        )
    features = tf.convert_to_tensor(features)
    if not features.dtype.is_floating:
        raise ValueError(f"roi_align_3d: `features` must be float, got {features.dtype.name}")
    boxes = tf.convert_to_tensor(boxes)
    box_indices = tf.convert_to_tensor(box_indices)
    _check_rank(features, "features", 5, "[B, D, H, W, C]")
    _check_rank(boxes, "boxes", 2, "[R, 6]")
    if boxes.shape.rank == 2 and boxes.shape[1] is not None and boxes.shape[1] != 6:
        raise ValueError(f"roi_align_3d: `boxes` must be [R, 6], got {boxes.shape}")
    _check_rank(box_indices, "box_indices", 1, "[R]")
    if not box_indices.dtype.is_integer:
        raise ValueError(f"roi_align_3d: `box_indices` must be int, got {box_indices.dtype.name}")

    return features, boxes, box_indices, o, s


def roi_align_entry(compute: Callable[..., tf.Tensor]) -> Callable[..., tf.Tensor]:
    """Wraps a 3D RoI Align implementation in the public signature and dtype contract.

    The returned function takes ``(features, boxes, box_indices, output_size=2,
    sampling_ratio=2, spatial_scale=1.0, aligned=True)``, validates them
    (``validate_roi_align_args``) and calls ``compute(f, b, idx, o, s, spatial_scale, aligned)``
    with float32 or float64 ``f`` (float16 / bfloat16 features computed in float32), ``b`` of
    the same dtype under ``tf.stop_gradient`` (RoIs are proposals, not regressed through the
    pooling), int32 ``idx`` and int ``o``, ``s``; the result is cast back to the features'
    dtype. It carries the name and docstring of `compute`, which document the public function.
    """

    def entry(
        features: tf.Tensor,
        boxes: tf.Tensor,
        box_indices: tf.Tensor,
        output_size: int = 2,
        sampling_ratio: int = 2,
        spatial_scale: float = 1.0,
        aligned: bool = True,
    ) -> tf.Tensor:
        features, boxes, box_indices, o, s = validate_roi_align_args(
            features, boxes, box_indices, output_size, sampling_ratio
        )
        out_dtype = features.dtype
        dtype = tf.float64 if out_dtype == tf.float64 else tf.float32
        f = tf.cast(features, dtype)
        b = tf.stop_gradient(tf.cast(boxes, dtype))
        idx = tf.cast(box_indices, tf.int32)
        return tf.cast(compute(f, b, idx, o, s, spatial_scale, aligned), out_dtype)

    # Not functools.wraps: the __wrapped__ it sets would make inspect.signature (and so help()
    # and IDEs) show compute's positional signature instead of the public one above.
    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
        setattr(entry, attr, getattr(compute, attr))
    return entry


@roi_align_entry
def roi_align_3d(
    f: tf.Tensor, b: tf.Tensor, idx: tf.Tensor, o: int, s: int, spatial_scale: float, aligned: bool
) -> tf.Tensor:
    """3D RoI Align: Detectron2's ``ROIAlign`` extended to volumes, channels-last.

    Convention. A box is ``(z1, y1, x1, z2, y2, x2)`` in continuous coordinates of the
    *unscaled* grid in which voxel ``i`` spans ``[i, i + 1)``; it is multiplied by
    ``spatial_scale`` (e.g. 1/4 for a stride-4 feature map of the network input). Note that the
    project's voxel convention (README: voxel ``i`` centred at ``i``) is shifted by half a
    voxel: a cube centred at ``(z, y, x)`` input voxels with diameter ``d`` is the box
    ``(z + 0.5 - d/2, ..., x + 0.5 + d/2)`` here; with ``spatial_scale = 1/s`` it then covers
    exactly the feature cells whose centres ``j * s + (s - 1) / 2`` lie inside it.

    Semantics, per axis of each box (exactly Detectron2's, with a third axis):

    * ``aligned=True``: the scaled box is shifted by -0.5 so that sample coordinates are in
      pixel-centre units (a box ``[0, 1)`` samples voxel 0's centre). ``aligned=False``: no
      shift, and a box smaller than one voxel is enlarged to size 1 (legacy behaviour).
    * The box is split into ``output_size`` equal bins; each bin averages
      ``sampling_ratio`` samples per axis (``sampling_ratio**3`` in all) at sub-bin centres
      ``start + p * bin + (i + 0.5) * bin / sampling_ratio``.
    * A sample is trilinear over its 8 neighbouring voxels. Per axis, a coordinate outside
      ``[-1, size]`` (more than one voxel outside the map) makes the sample contribute 0 (it
      still counts in the average); one in ``[-1, 0]`` is clamped to 0; one beyond
      ``size - 1`` is clamped to ``size - 1`` (both neighbours are voxel ``size - 1``). NaN
      coordinates count as outside.

    ``sampling_ratio`` must be a positive integer: Detectron2's adaptive mode (``<= 0``,
    ``ceil(roi_size / output_size)`` samples) would make the number of samples data-dependent
    and the graph's shapes dynamic, so it is not offered. ``spatial_scale`` is rounded to
    float32, as the custom op's float attribute is, so both paths scale boxes identically.

    The gradient flows to ``features`` only: boxes are wrapped in ``tf.stop_gradient``
    (RoIs are proposals, not regressed through the pooling).

    Args:
        features: [B, D, H, W, C] float (float16 / bfloat16 are computed in float32 and cast
            back; float64 stays float64).
        boxes: [R, 6] float as ``(z1, y1, x1, z2, y2, x2)``, see above. R may be 0 or unknown.
        box_indices: [R] int, the batch item of each box, in ``[0, B)`` (checked at run time).
        output_size: o, bins per axis.
        sampling_ratio: s > 0, samples per bin and axis.
        spatial_scale: factor from box coordinates to feature coordinates.
        aligned: Detectron2's ``aligned`` flag (see above).

    Returns:
        [R, o, o, o, C] tensor of ``features.dtype``, bins ordered (z, y, x).

    Raises:
        ValueError: a wrong static rank (naming the argument), a non-float ``features``, or a
            non-positive ``output_size`` / ``sampling_ratio``.
    """
    with tf.name_scope("roi_align_3d"):
        dtype = f.dtype
        shape = tf.shape(f)
        batch, depth, height, width, channels = (shape[k] for k in range(5))
        num_rois = tf.shape(b)[0]
        checks = [
            tf.debugging.assert_equal(
                tf.shape(idx)[0], num_rois, message="roi_align_3d: `box_indices` must be [R]"
            ),
            tf.debugging.assert_greater_equal(
                idx, 0, message="roi_align_3d: `box_indices` out of range [0, B)"
            ),
            tf.debugging.assert_less(
                idx, batch, message="roi_align_3d: `box_indices` out of range [0, B)"
            ),
        ]
        with tf.control_dependencies(checks):
            idx = tf.identity(idx)

        scale = tf.constant(np.float32(spatial_scale), dtype)
        offset = 0.5 if aligned else 0.0
        start = b[:, :3] * scale - offset
        length = (b[:, 3:] * scale - offset) - start
        if not aligned:
            length = tf.maximum(length, 1.0)
        bin_size = length / float(o)

        zi, zw = _axis_taps(start[:, 0], bin_size[:, 0], depth, o, s)
        yi, yw = _axis_taps(start[:, 1], bin_size[:, 1], height, o, s)
        xi, xw = _axis_taps(start[:, 2], bin_size[:, 2], width, o, s)
        # Flat voxel index and trilinear weight of the 8 corners of every sample:
        # [R, N, N, N] with N = o * s * 2 (bin, sample, corner) per axis.
        base = idx * depth
        flat = (
            (base[:, None, None, None] + zi[:, :, None, None]) * height + yi[:, None, :, None]
        ) * width + xi[:, None, None, :]
        weight = zw[:, :, None, None] * yw[:, None, :, None] * xw[:, None, None, :]
        table = tf.reshape(f, [-1, channels])
        corners = tf.gather(table, flat) * weight[..., None]  # [R, N, N, N, C]
        # Sum the 2s (sample, corner) entries of each bin one axis at a time with rank-3
        # reshapes: a single rank-8 reduce_sum has no gradient (BroadcastTo stops at rank 5).
        n, big = 2 * s, o * 2 * s
        acc = tf.reduce_sum(tf.reshape(corners, [-1, n, big * big * channels]), axis=1)
        acc = tf.reduce_sum(tf.reshape(acc, [-1, n, big * channels]), axis=1)
        acc = tf.reduce_sum(tf.reshape(acc, [-1, n, channels]), axis=1)
        out = tf.reshape(acc, [num_rois, o, o, o, channels]) / float(s**3)
        return tf.ensure_shape(out, [b.shape[0], o, o, o, f.shape[-1]])

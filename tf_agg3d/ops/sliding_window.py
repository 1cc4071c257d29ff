"""Overlapping sliding windows over a whole preprocessed scan, in graph-friendly TensorFlow.

A scan of any size is covered by cubes of a fixed (static) window size, so every window feeds
the network the same shape and an exported graph has one static-shape backbone call:

- Each axis of the volume is first padded at its end up to the window size when it is shorter
  (with the fill value, soft-tissue HU), so small scans still make one full window. The window
  size itself must be a multiple of :data:`SIZE_MULTIPLE` (the backbone's coarsest stride), so
  every network input side is a multiple of 16 and every pyramid level tiles it exactly.
- Along an axis of (padded) size ``n`` windows start every ``window - overlap`` voxels; the
  last one is moved back to end flush with the volume, so every voxel is covered and no window
  reaches past the end (the last overlap may therefore be larger than `overlap`).
- Each window owns a **core**: the part of the axis it shares with no neighbour, plus half of
  each overlap (the boundary between two windows is the middle of their overlap). The cores of
  one axis partition it: the first core starts at -inf, the last ends at +inf, so a point
  (continuous voxel coordinate, voxel ``i`` spans ``[i - 0.5, i + 0.5)``) lies in exactly one
  core, the window where it is farthest from a window border.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

# The backbone's coarsest stride (Table I: pre-block pool and three transitions, 2**4).
SIZE_MULTIPLE = 16


def validate_windows(window_size: Sequence[int], overlap: int) -> tuple[int, int, int]:
    """Checks a window size and overlap; returns the window size as a tuple of 3 ints.

    Raises:
      ValueError: not three positive multiples of 16, or an overlap that is negative or not
        smaller than every window side.
    """
    window = tuple(int(w) for w in window_size)
    if len(window) != 3 or any(w <= 0 or w % SIZE_MULTIPLE for w in window):
        raise ValueError(
            f"window size {tuple(window_size)} must be three positive multiples of {SIZE_MULTIPLE}"
        )
    if overlap < 0 or overlap >= min(window):
        raise ValueError(f"overlap {overlap} must be in [0, {min(window)}) for windows {window}")
    return window  # type: ignore[return-value]


def padded_size(size: tf.Tensor, window: int) -> tf.Tensor:
    """The size of an axis after padding to at least one window: ``max(size, window)``."""
    return tf.maximum(tf.cast(size, tf.int32), window)


def axis_window_starts(size: tf.Tensor, window: int, overlap: int) -> tf.Tensor:
    """Window starts along one axis.

    Args:
      size: int scalar, the axis size before padding (any value >= 1).
      window: window side along this axis.
      overlap: voxels shared by neighbouring windows (at least; the last overlap may be larger).

    Returns:
      int32 [n] starts, increasing, ``starts[0] = 0`` and ``starts[-1] = padded - window``.
    """
    n_pad = padded_size(size, window)
    step = window - overlap
    # ceil((n_pad - window) / step) further windows after the first one.
    count = (n_pad - window + step - 1) // step + 1
    return tf.minimum(tf.range(count, dtype=tf.int32) * step, n_pad - window)


def axis_core_bounds(starts: tf.Tensor, window: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Continuous-coordinate core interval ``[lo, hi)`` of each window along one axis.

    The boundary between windows ``i - 1`` and ``i`` is the middle of their overlap, which
    covers voxels ``starts[i] .. starts[i-1] + window - 1``, i.e. the continuous interval
    ``[starts[i] - 0.5, starts[i-1] + window - 0.5)``.

    Args:
      starts: int32 [n] from :func:`axis_window_starts`.
      window: window side along this axis.

    Returns:
      (lo float32 [n], hi float32 [n]); ``lo[0] = -inf``, ``hi[-1] = +inf``, ``hi[i] = lo[i+1]``.
    """
    s = tf.cast(starts, tf.float32)
    inner = (s[1:] + s[:-1] + float(window)) / 2.0 - 0.5
    inf = tf.constant([float("inf")])
    return tf.concat([-inf, inner], 0), tf.concat([inner, inf], 0)


def window_grid(
    volume_shape: tf.Tensor, window_size: Sequence[int], overlap: int
) -> dict[str, tf.Tensor]:
    """All windows of a volume, z-major.

    Args:
      volume_shape: int [3] (D, H, W) of the unpadded volume (a tensor; may be dynamic).
      window_size: static (wd, wh, ww), multiples of 16.
      overlap: voxels shared by neighbouring windows.

    Returns:
      dict with ``starts`` int32 [N, 3] (z, y, x) in the padded volume, ``core_lo`` and
      ``core_hi`` float32 [N, 3] (continuous voxel coordinates, +-inf at the volume's ends),
      ``padded_shape`` int32 [3] and ``num_windows`` int32 scalar.
    """
    window = validate_windows(window_size, overlap)
    volume_shape = tf.cast(volume_shape, tf.int32)
    starts, los, his = [], [], []
    for axis in range(3):
        s = axis_window_starts(volume_shape[axis], window[axis], overlap)
        lo, hi = axis_core_bounds(s, window[axis])
        starts.append(s)
        los.append(lo)
        his.append(hi)

    def grid(values):
        mesh = tf.meshgrid(*values, indexing="ij")
        return tf.stack([tf.reshape(m, [-1]) for m in mesh], axis=-1)

    starts_zyx = grid(starts)
    return {
        "starts": starts_zyx,
        "core_lo": grid(los),
        "core_hi": grid(his),
        "padded_shape": tf.stack([padded_size(volume_shape[a], window[a]) for a in range(3)]),
        "num_windows": tf.shape(starts_zyx)[0],
    }


def pad_volume(volume: tf.Tensor, window_size: Sequence[int], fill_value: float) -> tf.Tensor:
    """Pads each axis of `volume` [D, H, W] at its end up to the window size, with `fill_value`.

    Returns:
      [max(D, wd), max(H, wh), max(W, ww)], same dtype; the input unchanged where it is larger.
    """
    shape = tf.shape(volume)
    pads = tf.stack(
        [tf.stack([0, tf.maximum(int(window_size[a]) - shape[a], 0)]) for a in range(3)]
    )
    return tf.pad(volume, pads, constant_values=tf.cast(fill_value, volume.dtype))


def in_core(centres: tf.Tensor, core_lo: tf.Tensor, core_hi: tf.Tensor) -> tf.Tensor:
    """Whether each centre lies in its window's core.

    Args:
      centres: float [..., P, 3] (z, y, x) in padded-volume voxels.
      core_lo: float [..., 3] bounds of the window of each row (broadcast over P).
      core_hi: float [..., 3].

    Returns:
      bool [..., P].
    """
    lo = tf.expand_dims(core_lo, -2)
    hi = tf.expand_dims(core_hi, -2)
    return tf.reduce_all(tf.logical_and(centres >= lo, centres < hi), axis=-1)


def fill_windows(
    padded: tf.Tensor, starts: tf.Tensor, window_size: Sequence[int], fill_value: float
) -> tf.Tensor:
    """Whether each window holds nothing but the fill value.

    Args:
      padded: [D, H, W] volume after :func:`pad_volume`.
      starts: int32 [N, 3] window starts (:func:`window_grid`).
      window_size: static (wd, wh, ww).
      fill_value: the cache's fill HU (every voxel farther than the lung dilation from the
        lungs holds it).

    Returns:
      bool [N].
    """
    window = [int(w) for w in window_size]
    nonfill = tf.not_equal(padded, tf.cast(fill_value, padded.dtype))

    def one(start):
        return tf.logical_not(tf.reduce_any(tf.slice(nonfill, start, window)))

    return tf.map_fn(one, starts, fn_output_signature=tf.TensorSpec([], tf.bool))

"""The sliding-window path of whole-scan detection (``inference.mode: windows``).

:func:`window_candidates` runs a detector's window forward pass over overlapping windows of a
scan and keeps each window's core proposals; :class:`~tf_agg3d.models.whole_scan.
WholeScanDetector` scores the windows and merges what this returns (the algorithm, and how it
differs from the tiles path, is described there).
"""

from __future__ import annotations

import tensorflow as tf

from tf_agg3d.ops import sliding_window as sw


def window_candidates(
    volume: tf.Tensor,
    forward,
    num_proposals: int,
    *,
    window_size: tuple[int, int, int],
    overlap: int,
    batch_size: int,
    fill_hu: float,
    skip_fill: bool,
) -> tuple[tuple[tf.Tensor, ...], tf.Tensor]:
    """The kept (core) proposals of every window of a scan, in scan coordinates.

    Args:
      volume: float32 HU [D, H, W].
      forward: ``(crops float32 [B, wd, wh, ww], mask_fn) -> dict`` of ``boxes`` [B, P, 4] (in
        crop voxels), ``rpn_scores``, ``fpr_scores``, ``scores`` [B, P] and ``valid`` bool
        [B, P] (``mask_fn`` applied), P = `num_proposals`.
      num_proposals: P, the proposal slots of a window.
      window_size, overlap: the window grid.
      batch_size: windows per backbone call.
      fill_hu: pads the volume to at least one window per axis; marks all-fill windows.
      skip_fill: reuse one all-fill window's outputs for batches of all-fill windows.

    Returns:
      ((boxes float32 [N, 4] (z, y, x, d in voxels of `volume`), rpn_scores [N], fpr_scores [N],
      scores [N]), calls int32 scalar: the backbone calls, windows and the all-fill probe).
    """
    grid = sw.window_grid(tf.shape(volume), window_size, overlap)
    padded = sw.pad_volume(volume, window_size, fill_hu)
    num_windows = grid["num_windows"]
    num_batches = (num_windows + batch_size - 1) // batch_size
    fill = sw.fill_windows(padded, grid["starts"], window_size, fill_hu)
    # All-fill windows last (with or without skipping, so candidates keep one order): they
    # then fill whole batches, which skip_fill can skip.
    order = tf.argsort(tf.cast(fill, tf.int32), stable=True)
    grid = {
        **grid,
        **{k: tf.gather(grid[k], order) for k in ("starts", "core_lo", "core_hi")},
    }
    fill = tf.gather(fill, order)
    if skip_fill:
        any_fill = tf.reduce_any(fill)
        # One all-fill window's proposals, run only when some window is all fill. Every
        # all-fill window has this very input, hence these very outputs (before its core
        # test, applied per window below).
        probe = tf.cond(
            any_fill,
            lambda: forward(tf.fill([1, *window_size], fill_hu)),
            lambda: _no_proposals(1, num_proposals),
        )
        probe_calls = tf.cast(any_fill, tf.int32)
    else:
        probe, probe_calls = None, tf.constant(0)

    def body(b, computed, ta_boxes, ta_rpn, ta_fpr, ta_score):
        index = b * batch_size + tf.range(batch_size)
        real = index < num_windows
        # The last batch is topped up with copies of the last window, masked out below,
        # so every backbone call has the same static batch size.
        index = tf.minimum(index, num_windows - 1)
        starts = tf.gather(grid["starts"], index)
        offsets = tf.cast(starts, tf.float32)[:, None, :]
        lo = tf.gather(grid["core_lo"], index)
        hi = tf.gather(grid["core_hi"], index)

        def keep(boxes):
            centres = boxes[..., :3] + offsets
            return tf.logical_and(real[:, None], sw.in_core(centres, lo, hi))

        def run():
            crops = tf.stack(
                [tf.slice(padded, starts[j], window_size) for j in range(batch_size)], axis=0
            )
            return forward(crops, mask_fn=keep)

        if probe is None:
            out, ran = run(), tf.constant(True)
        else:
            skipped = tf.reduce_all(tf.logical_or(tf.gather(fill, index), ~real))

            def reuse():
                out = {k: tf.repeat(v, batch_size, axis=0) for k, v in probe.items()}
                out["valid"] = tf.logical_and(out["valid"], keep(out["boxes"]))
                return out

            out = tf.cond(skipped, reuse, run)
            ran = tf.logical_not(skipped)
        valid = out["valid"]
        boxes = tf.concat([out["boxes"][..., :3] + offsets, out["boxes"][..., 3:]], axis=-1)
        return (
            b + 1,
            computed + tf.cast(ran, tf.int32) * tf.reduce_sum(tf.cast(real, tf.int32)),
            ta_boxes.write(b, tf.boolean_mask(boxes, valid)),
            ta_rpn.write(b, tf.boolean_mask(out["rpn_scores"], valid)),
            ta_fpr.write(b, tf.boolean_mask(out["fpr_scores"], valid)),
            ta_score.write(b, tf.boolean_mask(out["scores"], valid)),
        )

    def array(shape):
        return tf.TensorArray(tf.float32, size=num_batches, infer_shape=False, element_shape=shape)

    _, computed, ta_boxes, ta_rpn, ta_fpr, ta_score = tf.while_loop(
        lambda b, *_: b < num_batches,
        body,
        (
            tf.constant(0),
            tf.constant(0),
            array([None, 4]),
            array([None]),
            array([None]),
            array([None]),
        ),
        # One window batch in flight at a time: peak memory is one batch's activations.
        parallel_iterations=1,
    )
    candidates = (ta_boxes.concat(), ta_rpn.concat(), ta_fpr.concat(), ta_score.concat())
    return candidates, computed + probe_calls


def _no_proposals(batch: int, num: int) -> dict[str, tf.Tensor]:
    """Outputs of a window forward pass with no valid proposal (the probe when none is needed)."""
    zeros = tf.zeros([batch, num])
    return {
        "rpn_scores": zeros,
        "fpr_scores": zeros,
        "scores": zeros,
        "boxes": tf.zeros([batch, num, 4]),
        "levels": tf.zeros([batch, num], tf.int32),
        "valid": tf.zeros([batch, num], tf.bool),
    }

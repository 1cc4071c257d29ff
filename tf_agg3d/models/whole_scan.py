"""Whole-scan detection in one TensorFlow graph: sliding windows, FPRN rescoring, merge, NMS.

:class:`WholeScanDetector` wraps a trained detector for a whole preprocessed scan. Its
:meth:`~WholeScanDetector.detect` takes the scan's HU volume and returns its findings; everything
runs in-graph with stock TensorFlow ops (``tf.while_loop`` over window batches, a
``TensorArray`` for the proposals, :func:`~tf_agg3d.ops.nms.nms_3d_padded`), so the same code
serves training's whole-scan checks (:mod:`tf_agg3d.training.abs`), in-process prediction and
the exported SavedModel.

Pipeline, per scan:

1. The volume is padded to at least one window per axis and covered by overlapping windows
   (:mod:`tf_agg3d.ops.sliding_window`), processed `window_batch_size` at a time.
2. Each window batch goes through the backbone, the RPN and the detector's proposal decoding
   (decode per level, threshold, per-window NMS, top-k).
3. Only proposals whose centre lies in the window's **core** are kept: the cores partition the
   scan, so every location is proposed by exactly one window, the one where it is farthest
   from a window border (least truncated context, no double counting).
4. Those core proposals are rescored by the FPRN **on the same window's features**, right away
   (only they: the FPRN runs on the valid slots, not on the whole padded proposal quota).
5. The window's features are then dropped; only the kept proposals (a few per window) are
   carried to the next iteration in a ``TensorArray``.
6. After the last window: proposals with an RPN probability at or below the threshold are
   dropped, the final score is the mean of the RPN and FPRN probabilities, the best
   `max_proposals_per_scan` go through 3D NMS (IoU `nms_iou`) on the final score and at most
   `max_marks` remain, sorted by decreasing score.

Why the FPRN runs per window, before the cross-window NMS (and not after it, as the paper's
"merge, NMS, then rescore" reading would suggest): rescoring after the merge would need every
window's pyramid features at once (hundreds of MiB per window at 128^3; dozens of windows per
scan) or a second backbone pass per surviving proposal. Rescoring in the window where the
proposal is most central needs neither: memory is bounded by one window batch, and each
proposal is classified with the fullest context any window offers (its Diameter-Aligned crops
are never cut by the window border, which a proposal near a border of another window would
suffer). The NMS then operates on the final (RPN + FPRN) scores, so the best-rescored duplicate
survives.

With the FPRN disabled (`use_fpr=False`, or a detector built without it), ``scores`` are the
RPN probabilities and ``fpr_scores`` repeat them, so callers and the SavedModel keep one output
layout.
"""

from __future__ import annotations

import tensorflow as tf

from tf_agg3d.config import InferenceConfig
from tf_agg3d.ops import sliding_window as sw
from tf_agg3d.ops.nms import nms_3d_padded

# Inputs accepted by :meth:`WholeScanDetector.detect` (concrete functions for export).
VOLUME_SPECS = (
    tf.TensorSpec([None, None, None], tf.int16, name="volume"),
    tf.TensorSpec([None, None, None], tf.float32, name="volume"),
)


def detector_has_fpr(detector) -> bool:
    """Whether `detector` runs an FPRN branch (``fpr_enabled``, else it has an ``fpr_head``)."""
    enabled = getattr(detector, "fpr_enabled", None)
    if enabled is not None:
        return bool(enabled)
    return getattr(detector, "fpr_head", None) is not None


class WholeScanDetector(tf.Module):
    """Sliding-window detection over whole scans, exportable as a SavedModel.

    Args:
      detector: an ``Agg3DDetector`` (or any object with its ``features``, ``rpn``, ``propose``
        and ``classify`` methods), already built.
      inference_config: windows, threshold, NMS and output limits.
      fill_hu: HU used to pad volumes smaller than a window (the cache's fill value).
      use_fpr: rescore with the FPRN; None: when the detector has an enabled FPRN.
      name: module name.

    Raises:
      ValueError: an invalid window size / overlap / batch size.
    """

    def __init__(
        self,
        detector,
        inference_config: InferenceConfig,
        fill_hu: float = 0,
        use_fpr: bool | None = None,
        name: str | None = None,
    ):
        super().__init__(name=name)
        cfg = inference_config
        self.detector = detector
        self.window_size = sw.validate_windows(cfg.window_size, cfg.overlap)
        self.overlap = int(cfg.overlap)
        if cfg.window_batch_size < 1:
            raise ValueError(f"window_batch_size must be >= 1, got {cfg.window_batch_size}")
        if cfg.max_marks < 1 or cfg.max_proposals_per_scan < 1:
            raise ValueError("max_marks and max_proposals_per_scan must be >= 1")
        self.window_batch_size = int(cfg.window_batch_size)
        self.score_threshold = float(cfg.score_threshold)
        self.nms_iou = float(cfg.nms_iou)
        self.max_marks = int(cfg.max_marks)
        self.max_candidates = int(cfg.max_proposals_per_scan)
        self.fill_hu = float(fill_hu)
        self.use_fpr = detector_has_fpr(detector) if use_fpr is None else bool(use_fpr)

    # ----------------------------------------------------------------------------------------
    # One batch of windows
    # ----------------------------------------------------------------------------------------

    def _classify_kept(self, features, boxes, levels, valid) -> tf.Tensor:
        """FPRN logits [B, P] of the valid proposals only (0 elsewhere).

        The FPRN's cost (Local Magnification of every proposal on every level) grows with the
        number of boxes it sees, and after the threshold and the core test only a few of the
        P proposal slots of a window are valid. The valid ones are moved to the front, the
        FPRN runs on the first ``max_b(#valid_b)`` slots, and the logits are put back in place.
        """
        num = tf.shape(valid)[1]
        order = tf.argsort(tf.cast(valid, tf.int32), axis=1, direction="DESCENDING", stable=True)
        count = tf.reduce_max(tf.reduce_sum(tf.cast(valid, tf.int32), axis=1))

        def run():
            head = [tf.gather(t, order, batch_dims=1)[:, :count] for t in (boxes, levels, valid)]
            logits = tf.cast(self.detector.classify(features, *head, training=False), tf.float32)
            logits = tf.pad(logits, [[0, 0], [0, num - count]])
            return tf.gather(logits, tf.argsort(order, axis=1), batch_dims=1)

        logits = tf.cond(count > 0, run, lambda: tf.zeros(tf.shape(valid), tf.float32))
        return tf.where(valid, logits, tf.zeros_like(logits))

    def _forward(self, crops: tf.Tensor, mask_fn=None) -> dict[str, tf.Tensor]:
        """Proposals and scores of a batch of windows.

        Args:
          crops: float32 [B, wd, wh, ww] HU.
          mask_fn: optional ``(boxes [B, P, 4]) -> bool [B, P]``, applied to the proposals
            before the FPRN (the core test), so it only classifies proposals that are kept.

        Returns:
          dict of ``boxes`` float32 [B, P, 4] (z, y, x, d in crop voxels), ``levels`` int32
          [B, P], ``rpn_scores``, ``fpr_scores``, ``scores`` float32 [B, P] (probabilities),
          ``valid`` bool [B, P] (real proposal, RPN probability above the threshold, mask_fn).
        """
        volume = crops[..., None]
        features = self.detector.features(volume, training=False)
        logits, deltas = self.detector.rpn(features, training=False)
        # The detector's own decoding (per level, top-k, per-window NMS), gated by the
        # inference threshold rather than the training-time proposal threshold.
        proposals = self.detector.propose(
            logits, deltas, self.window_size, score_threshold=self.score_threshold
        )
        boxes = tf.cast(proposals["boxes"], tf.float32)
        rpn_scores = tf.cast(proposals["rpn_scores"], tf.float32)
        valid = tf.logical_and(proposals["valid"], rpn_scores > self.score_threshold)
        if mask_fn is not None:
            valid = tf.logical_and(valid, mask_fn(boxes))
        levels = proposals["levels"]
        if self.use_fpr:
            fpr_scores = tf.sigmoid(self._classify_kept(features, boxes, levels, valid))
            scores = (rpn_scores + fpr_scores) / 2.0
        else:
            fpr_scores = rpn_scores
            scores = rpn_scores
        zeros = tf.zeros_like(scores)
        return {
            "boxes": boxes,
            "levels": tf.cast(levels, tf.int32),
            "rpn_scores": tf.where(valid, rpn_scores, zeros),
            "fpr_scores": tf.where(valid, fpr_scores, zeros),
            "scores": tf.where(valid, scores, zeros),
            "valid": valid,
        }

    @tf.function(reduce_retracing=True)
    def detect_crops(self, crops: tf.Tensor) -> dict[str, tf.Tensor]:
        """Proposals of independent crops (the single-crop / streaming signature).

        Args:
          crops: int16 or float32 HU [B, wd, wh, ww], the configured window size.

        Returns:
          Per crop, padded to the detector's proposal count P: ``boxes`` float32 [B, P, 4]
          (z, y, x, d in crop voxels), ``levels`` int32 [B, P], ``rpn_scores``, ``fpr_scores``,
          ``scores`` float32 [B, P] (0 where invalid) and ``valid`` bool [B, P].
        """
        crops = tf.ensure_shape(tf.cast(crops, tf.float32), [None, *self.window_size])
        return self._forward(crops)

    # ----------------------------------------------------------------------------------------
    # Whole scan
    # ----------------------------------------------------------------------------------------

    @tf.function(reduce_retracing=True)
    def detect(self, volume: tf.Tensor) -> dict[str, tf.Tensor]:
        """Findings of a whole preprocessed scan.

        Args:
          volume: int16 or float32 HU [D, H, W] at the model's spacing (any size).

        Returns:
          dict of ``boxes`` float32 [N, 4] (z, y, x, d in voxels of `volume`), ``scores`` [N]
          (mean of RPN and FPRN probabilities), ``rpn_scores`` [N], ``fpr_scores`` [N],
          ``num_detections`` int32 scalar (= N <= max_marks) and ``num_windows`` int32 scalar;
          rows sorted by decreasing score.
        """
        volume = tf.ensure_shape(tf.cast(volume, tf.float32), [None, None, None])
        grid = sw.window_grid(tf.shape(volume), self.window_size, self.overlap)
        padded = sw.pad_volume(volume, self.window_size, self.fill_hu)
        num_windows = grid["num_windows"]
        batch = self.window_batch_size
        num_batches = (num_windows + batch - 1) // batch

        def body(b, ta_boxes, ta_rpn, ta_fpr, ta_score):
            index = b * batch + tf.range(batch)
            real = index < num_windows
            # The last batch is topped up with copies of the last window, masked out below,
            # so every backbone call has the same static batch size.
            index = tf.minimum(index, num_windows - 1)
            starts = tf.gather(grid["starts"], index)
            crops = tf.stack(
                [tf.slice(padded, starts[j], self.window_size) for j in range(batch)], axis=0
            )
            offsets = tf.cast(starts, tf.float32)[:, None, :]
            lo = tf.gather(grid["core_lo"], index)
            hi = tf.gather(grid["core_hi"], index)

            def keep(boxes):
                centres = boxes[..., :3] + offsets
                return tf.logical_and(real[:, None], sw.in_core(centres, lo, hi))

            out = self._forward(crops, mask_fn=keep)
            valid = out["valid"]
            boxes = tf.concat([out["boxes"][..., :3] + offsets, out["boxes"][..., 3:]], axis=-1)
            return (
                b + 1,
                ta_boxes.write(b, tf.boolean_mask(boxes, valid)),
                ta_rpn.write(b, tf.boolean_mask(out["rpn_scores"], valid)),
                ta_fpr.write(b, tf.boolean_mask(out["fpr_scores"], valid)),
                ta_score.write(b, tf.boolean_mask(out["scores"], valid)),
            )

        def array(shape):
            return tf.TensorArray(
                tf.float32, size=num_batches, infer_shape=False, element_shape=shape
            )

        _, ta_boxes, ta_rpn, ta_fpr, ta_score = tf.while_loop(
            lambda b, *_: b < num_batches,
            body,
            (tf.constant(0), array([None, 4]), array([None]), array([None]), array([None])),
            # One window batch in flight at a time: peak memory is one batch's activations.
            parallel_iterations=1,
        )
        boxes = ta_boxes.concat()
        rpn_scores = ta_rpn.concat()
        fpr_scores = ta_fpr.concat()
        scores = ta_score.concat()

        # Bound the NMS cost (its IoU matrix is quadratic) by the best candidates only.
        k = tf.minimum(tf.shape(scores)[0], self.max_candidates)
        top = tf.math.top_k(scores, k=k, sorted=True).indices
        boxes, rpn_scores, fpr_scores, scores = (
            tf.gather(t, top) for t in (boxes, rpn_scores, fpr_scores, scores)
        )
        kept, count = nms_3d_padded(boxes, scores, self.nms_iou, self.max_marks)
        kept = kept[:count]
        return {
            "boxes": tf.gather(boxes, kept),
            "scores": tf.gather(scores, kept),
            "rpn_scores": tf.gather(rpn_scores, kept),
            "fpr_scores": tf.gather(fpr_scores, kept),
            "num_detections": count,
            "num_windows": num_windows,
        }

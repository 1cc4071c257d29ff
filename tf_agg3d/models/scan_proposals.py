"""Proposals of a whole scan from its RPN maps (the tiles path of whole-scan detection)."""

from __future__ import annotations

import tensorflow as tf

from tf_agg3d.ops.box_coding import decode_boxes
from tf_agg3d.ops.nms import nms_3d_padded


def scan_proposals(
    detector,
    logits: dict[int, tf.Tensor],
    deltas: dict[int, tf.Tensor],
    input_shape: tf.Tensor,
    score_threshold: float,
    pre_nms_top_k: int,
    max_proposals: int,
) -> dict[str, tf.Tensor]:
    """Proposals of the whole scan from its RPN maps (batch 1).

    Anchors whose RPN probability exceeds `score_threshold` are decoded (only they; the anchors
    are generated for them alone), their centres clipped into the padded volume of
    `input_shape` and their diameters to [1, its largest side] as ``Agg3DDetector.propose``
    does; the best `pre_nms_top_k` go through 3D NMS (the detector's
    ``proposal_config.nms_iou``), keeping up to `max_proposals`.

    Args:
      detector: an ``Agg3DDetector`` (its ``strides``, ``anchor_config``, ``proposal_config``).
      logits, deltas: the RPN's ``{stride: [1, d, h, w, A]}`` and ``{stride: [1, d, h, w, A,
        4]}`` maps.
      input_shape: int32 [3], the padded volume's shape.

    Returns:
      dict: ``boxes`` float32 [K, 4], ``levels`` int32 [K] (anchor-level index),
      ``rpn_scores`` float32 [K], ``valid`` bool [K] (the first ``count``), ``count``; K =
      `max_proposals`.
    """
    sizes = detector.anchor_config.sizes
    flat_logits, flat_deltas, meta = [], [], []
    for index, stride in enumerate(detector.strides):
        lg = tf.cast(logits[stride][0], tf.float32)  # [d, h, w, A]
        num_anchors = len(sizes[index])
        flat_logits.append(tf.reshape(lg, [-1]))
        flat_deltas.append(tf.reshape(tf.cast(deltas[stride][0], tf.float32), [-1, 4]))
        meta.append((stride, tf.shape(lg)[:3], num_anchors))
    level_sizes = tf.stack([tf.size(t) for t in flat_logits])
    starts = tf.cumsum(level_sizes, exclusive=True)
    scores = tf.sigmoid(tf.concat(flat_logits, 0))
    # Only anchors above the threshold can be proposals: the NMS never sees the others.
    above = tf.reduce_sum(tf.cast(scores > score_threshold, tf.int32))
    k = tf.minimum(above, pre_nms_top_k)
    top_scores, top = tf.math.top_k(scores, k=k)
    level = tf.searchsorted(starts, top, side="right") - 1
    local = top - tf.gather(starts, level)
    # Anchor of each candidate: cell (z, y, x) and anchor index on its level.
    centres, diameters = [], []
    for index, (stride, dims, num_anchors) in enumerate(meta):
        cell = local // num_anchors
        anchor = local % num_anchors
        zyx = tf.stack(
            [cell // (dims[1] * dims[2]), (cell // dims[2]) % dims[1], cell % dims[2]], -1
        )
        centres.append(tf.cast(zyx, tf.float32) * stride + (stride - 1) / 2.0)
        diameters.append(tf.gather(tf.constant(sizes[index], tf.float32), anchor % num_anchors))
    on_level = [tf.equal(level, i)[:, None] for i in range(len(meta))]
    centre = centres[-1]
    diameter = diameters[-1]
    for i in range(len(meta) - 1):
        centre = tf.where(on_level[i], centres[i], centre)
        diameter = tf.where(on_level[i][:, 0], diameters[i], diameter)
    anchors = tf.concat([centre, diameter[:, None]], axis=-1)
    boxes = decode_boxes(tf.gather(tf.concat(flat_deltas, 0), top), anchors)
    upper = tf.cast(input_shape - 1, tf.float32)
    boxes = tf.concat(
        [
            tf.clip_by_value(boxes[:, :3], 0.0, upper),
            tf.clip_by_value(boxes[:, 3:], 1.0, tf.cast(tf.reduce_max(input_shape), tf.float32)),
        ],
        axis=-1,
    )
    nms_iou = float(detector.proposal_config.nms_iou)
    kept, count = nms_3d_padded(boxes, top_scores, nms_iou, max_proposals, score_threshold)
    valid = tf.range(max_proposals) < count

    def take(t):  # padding slots index 0: a zero row appended keeps that valid when K = 0
        pad = tf.zeros(tf.concat([[1], tf.shape(t)[1:]], 0), t.dtype)
        return tf.gather(tf.concat([t, pad], 0), kept)

    return {
        "boxes": tf.where(valid[:, None], take(boxes), 0.0),
        "levels": tf.where(valid, take(level), 0),
        "rpn_scores": tf.where(valid, take(top_scores), 0.0),
        "valid": valid,
        "count": count,
    }

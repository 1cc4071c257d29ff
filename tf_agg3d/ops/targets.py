"""Training targets: anchor labels and regression deltas, FPRN proposal labels.

Rows of `gt_boxes` with ``d <= 0`` are padding (so batches of scans with different nodule
counts can be stacked) and never match anything.
"""

from __future__ import annotations

import tensorflow as tf

from tf_agg3d.ops.box_coding import encode_boxes
from tf_agg3d.ops.iou import cube_iou

POSITIVE, NEGATIVE, IGNORE = 1, 0, -1


def _valid_gt_iou(anchors: tf.Tensor, gt_boxes: tf.Tensor) -> tf.Tensor:
    """IoU [N, G] with padded ground-truth columns forced to -1 (below every threshold)."""
    iou = cube_iou(anchors, gt_boxes)
    valid = gt_boxes[:, 3] > 0
    return tf.where(valid[None, :], iou, -tf.ones_like(iou))


def assign_anchor_targets(
    gt_boxes: tf.Tensor,
    anchors: dict[int, tf.Tensor],
    positive_iou: float = 0.5,
    negative_iou: float = 0.02,
) -> dict[int, tuple[tf.Tensor, tf.Tensor]]:
    """Labels and regression targets for every anchor of every level.

    An anchor is positive when its best IoU with a ground truth exceeds `positive_iou`, negative
    below `negative_iou`, ignored in between. Every ground truth also makes its single best
    anchor over *all* levels positive (when that IoU is above zero), so a nodule whose size falls
    between anchor scales still trains one anchor.

    Args:
      gt_boxes: float [G, 4] (z, y, x, d) in input voxels; rows with d <= 0 are padding.
      anchors: {stride: [d, h, w, A, 4]} from :func:`tf_agg3d.ops.anchors.multilevel_anchors`,
        for the anchor strides only (one level for single-scale anchors).
      positive_iou: IoU above which an anchor is positive (0.5 in the paper).
      negative_iou: IoU below which an anchor is negative (0.02 in the paper).

    Returns:
      {stride: (labels int32 [d, h, w, A] in {1, 0, -1}, deltas float32 [d, h, w, A, 4])};
      deltas are zero where the label is not positive.
    """
    strides = sorted(anchors)
    shapes = [tf.shape(anchors[s])[:-1] for s in strides]
    flat = tf.concat([tf.reshape(anchors[s], [-1, 4]) for s in strides], axis=0)
    gt = tf.cast(tf.reshape(gt_boxes, [-1, 4]), flat.dtype)
    num_gt = tf.shape(gt)[0]
    num_anchors = tf.shape(flat)[0]

    def with_gt():
        iou = _valid_gt_iou(flat, gt)
        best_iou = tf.reduce_max(iou, axis=1)
        matched = tf.argmax(iou, axis=1, output_type=tf.int32)
        labels = tf.where(
            best_iou > positive_iou,
            POSITIVE,
            tf.where(best_iou < negative_iou, NEGATIVE, IGNORE),
        )
        # Force each real ground truth's best anchor positive, matched to that ground truth.
        best_anchor = tf.argmax(iou, axis=0, output_type=tf.int32)
        force = tf.reduce_max(iou, axis=0) > 0.0
        idx = tf.boolean_mask(best_anchor, force)
        gt_idx = tf.boolean_mask(tf.range(num_gt), force)
        labels = tf.tensor_scatter_nd_update(labels, idx[:, None], tf.fill(tf.shape(idx), POSITIVE))
        matched = tf.tensor_scatter_nd_update(matched, idx[:, None], gt_idx)
        deltas = encode_boxes(tf.gather(gt, matched), flat)
        deltas = tf.where((labels == POSITIVE)[:, None], deltas, tf.zeros_like(deltas))
        return labels, deltas

    def without_gt():
        return tf.zeros([num_anchors], tf.int32), tf.zeros([num_anchors, 4], flat.dtype)

    labels, deltas = tf.cond(num_gt > 0, with_gt, without_gt)
    sizes = [tf.reduce_prod(s) for s in shapes]
    out = {}
    for s, shape, lab, dl in zip(
        strides, shapes, tf.split(labels, sizes), tf.split(deltas, sizes), strict=False
    ):
        out[s] = (tf.reshape(lab, shape), tf.reshape(dl, tf.concat([shape, [4]], 0)))
    return out


def assign_proposal_labels(
    proposals: tf.Tensor,
    gt_boxes: tf.Tensor,
    positive_iou: float,
    negative_iou: float,
) -> tf.Tensor:
    """FPRN labels of proposals by their best IoU with the ground truth.

    Args:
      proposals: float [P, 4] (z, y, x, d).
      gt_boxes: float [G, 4]; rows with d <= 0 are padding.
      positive_iou: IoU at or above which a proposal is positive.
      negative_iou: IoU below which a proposal is negative; in between it is ignored.

    Returns:
      int32 [P] in {1, 0, -1}.
    """
    proposals = tf.convert_to_tensor(proposals)
    gt = tf.cast(tf.reshape(gt_boxes, [-1, 4]), proposals.dtype)
    iou = _valid_gt_iou(proposals, gt)
    best = tf.reduce_max(tf.concat([iou, tf.fill([tf.shape(iou)[0], 1], -1.0)], axis=1), axis=1)
    return tf.where(best >= positive_iou, POSITIVE, tf.where(best < negative_iou, NEGATIVE, IGNORE))

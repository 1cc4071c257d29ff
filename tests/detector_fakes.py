"""A detector with forced, known outputs, for testing whole-scan inference without training.

:class:`BlobDetector` has the call contract of ``Agg3DDetector`` (features / rpn / propose /
classify) but no weights: its "RPN" fires on the stride-4 cell that a bright cube of 4^3
voxels fills exactly, with a probability set by the cube's HU, so tests know where and how
strongly each window must detect. The proposal step is a faithful, plain implementation of
decode -> top-k -> per-window NMS -> padding, using the package's ops.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tf_agg3d.ops.anchors import generate_anchors
from tf_agg3d.ops.box_coding import decode_boxes
from tf_agg3d.ops.nms import nms_3d_padded

# HU mapped to [0, 1]: the blob (>= 500 HU) -> 1, lung (-800) -> 0, soft-tissue fill (0) -> 0.29.
HU_LO, HU_HI = -200.0, 500.0
# Logit of a cell = GAIN * (mean normalised intensity - FIRE), so only (nearly) full cells fire.
GAIN, FIRE = 20.0, 0.6


def blob_hu_for_probability(p: float) -> float:
    """HU of a 4^3 blob (on a zero background cell) whose RPN probability is `p`."""
    logit = np.log(p / (1 - p))
    v = logit / GAIN + FIRE
    return float(HU_LO + v * (HU_HI - HU_LO))


def rpn_probability(blob_hu: float) -> float:
    v = np.clip((blob_hu - HU_LO) / (HU_HI - HU_LO), 0, 1)
    return float(1 / (1 + np.exp(-GAIN * (v - FIRE))))


class BlobDetector(tf.Module):
    """Weightless stand-in for Agg3DDetector with known outputs.

    Levels: stride 4 (one anchor of `anchor_size`) fires on full bright cells; stride 16 (one
    anchor of 16) never fires, so multi-level flattening is exercised.

    Args:
      anchor_size: anchor diameter at stride 4 (the proposal's d; deltas are zero).
      max_proposals: proposals per window (P).
      window_nms_iou: IoU of the per-window NMS (1.0 disables it).
      fpr_logit: None for "no FPRN", else the FPRN logit is ``fpr_logit`` plus the box's
        normalised window-relative z (so tests can see which window rescored a proposal).
    """

    def __init__(self, anchor_size=4.0, max_proposals=8, window_nms_iou=0.1, fpr_logit=None):
        super().__init__()
        self.anchor_size = float(anchor_size)
        self.max_proposals = int(max_proposals)
        self.window_nms_iou = float(window_nms_iou)
        self.fpr_logit = fpr_logit
        self.fpr_enabled = fpr_logit is not None

    def features(self, volume, training=False):
        v = tf.clip_by_value((volume - HU_LO) / (HU_HI - HU_LO), 0.0, 1.0)
        return {
            4: tf.nn.avg_pool3d(v, 4, 4, "VALID"),
            16: tf.nn.avg_pool3d(v, 16, 16, "VALID"),
        }

    def rpn(self, features, training=False):
        logits = {4: GAIN * (features[4] - FIRE), 16: tf.fill(tf.shape(features[16]), -20.0)}
        deltas = {s: tf.zeros(tf.concat([tf.shape(x), [4]], 0)) for s, x in logits.items()}
        return logits, deltas

    def propose(self, logits, deltas, input_shape, score_threshold=0.01):
        sizes = {4: (self.anchor_size,), 16: (16.0,)}
        batch = tf.shape(logits[4])[0]
        boxes, scores, levels = [], [], []
        for s in (4, 16):
            anchors = tf.reshape(generate_anchors(input_shape, s, sizes[s]), [-1, 4])
            n = tf.shape(anchors)[0]
            d = tf.reshape(deltas[s], [batch, -1, 4])
            boxes.append(decode_boxes(d, anchors[None]))
            scores.append(tf.sigmoid(tf.reshape(logits[s], [batch, -1])))
            levels.append(tf.fill([batch, n], s))
        boxes = tf.concat(boxes, 1)
        scores = tf.concat(scores, 1)
        levels = tf.concat(levels, 1)
        p = self.max_proposals

        def one(args):
            b, sc, lv = args
            k = tf.minimum(64, tf.shape(sc)[0])
            top = tf.math.top_k(sc, k).indices
            b, sc, lv = tf.gather(b, top), tf.gather(sc, top), tf.gather(lv, top)
            kept, count = nms_3d_padded(b, sc, self.window_nms_iou, p, score_threshold)
            valid = tf.range(p) < count
            return (
                tf.gather(b, kept),
                tf.where(valid, tf.gather(sc, kept), 0.0),
                tf.gather(lv, kept),
                valid,
            )

        out = tf.map_fn(
            one,
            (boxes, scores, levels),
            fn_output_signature=(
                tf.TensorSpec([p, 4], tf.float32),
                tf.TensorSpec([p], tf.float32),
                tf.TensorSpec([p], tf.int32),
                tf.TensorSpec([p], tf.bool),
            ),
        )
        return {"boxes": out[0], "rpn_scores": out[1], "levels": out[2], "valid": out[3]}

    def classify(self, features, boxes, levels, valid, training=False):
        window = tf.cast(tf.shape(features[4])[1] * 4, tf.float32)
        return self.fpr_logit + boxes[..., 0] / window

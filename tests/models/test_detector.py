"""Agg3DDetector: outputs, proposals, Diameter Alignment geometry through RoI Align, shared Local
Magnification, serialization, a user RPN head trained one step, and the full parameter count."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import SMALL_BACKBONE, keras_roundtrip

from tf_agg3d.backbones.dense_unet3d import DenseUNet3D
from tf_agg3d.config import AnchorConfig, FPRConfig, ModelConfig, ProposalConfig
from tf_agg3d.heads.fpr_head import FPRHead
from tf_agg3d.heads.rpn_head import RPNHead
from tf_agg3d.layers.local_magnification import LocalMagnification
from tf_agg3d.losses.detection_loss import RPNLoss, combine_fpr_terms, fpr_loss_terms
from tf_agg3d.models.builder import build_detector
from tf_agg3d.models.detector import Agg3DDetector
from tf_agg3d.ops.anchors import multilevel_anchors
from tf_agg3d.ops.roi_align import roi_align_3d
from tf_agg3d.ops.targets import assign_anchor_targets, assign_proposal_labels

# build_detector(ModelConfig()): backbone 552,840 + 3 RPN heads 3 x 2,762 + Local Magnification
# 149,472 + FPR head 197,121 (768 -> 256 -> 1).
FULL_DETECTOR_PARAMS = 907_719


def small_config(**fpr):
    return ModelConfig(
        backbone=SMALL_BACKBONE,
        fpr=FPRConfig(use_custom_op=False, **fpr),
        proposals=ProposalConfig(score_threshold=0.0, max_proposals=6, pre_nms_top_k=64),
    )


def volume(side=32, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1200, 600, size=(batch, side, side, side, 1)).astype("float32")


@pytest.mark.parametrize("side", [32, 64])
def test_outputs_present_and_shaped(side):
    det = build_detector(small_config())
    out = det(volume(side, batch=1))
    for s, a in ((4, 2), (8, 2), (16, 2)):
        n = side // s
        assert out["rpn_logits"][s].shape == (1, n, n, n, a)
        assert out["rpn_deltas"][s].shape == (1, n, n, n, a, 4)
    for key in ("boxes", "levels", "valid", "rpn_scores", "fpr_logits", "fpr_scores", "scores"):
        assert out[key].shape[:2] == (1, 6), key
    assert out["boxes"].shape == (1, 6, 4)
    valid = out["valid"].numpy()
    assert valid.any()
    scores = out["scores"].numpy()
    expected = 0.5 * (out["rpn_scores"].numpy() + out["fpr_scores"].numpy())
    np.testing.assert_allclose(scores[valid], expected[valid], rtol=1e-6)
    assert np.all(scores[~valid] == 0)


def test_fpr_disabled_scores_are_rpn_scores():
    det = build_detector(small_config(enabled=False))
    assert det.fpr_head is None and det.magnifier is None
    out = det(volume())
    assert "fpr_logits" not in out
    np.testing.assert_array_equal(out["scores"].numpy(), out["rpn_scores"].numpy())


def test_propose_valid_boxes_inside_input():
    det = build_detector(small_config(enabled=False))
    x = volume(32)
    feats = det.features(x)
    logits, deltas = det.rpn(feats)
    # Large random deltas push decoded centres outside: they must be clipped back in.
    deltas = {s: d + tf.random.normal(tf.shape(d), stddev=3.0, seed=1) for s, d in deltas.items()}
    props = det.propose(logits, deltas, (32, 32, 32))
    boxes, valid = props["boxes"].numpy(), props["valid"].numpy()
    assert valid.sum() > 0
    real = boxes[valid]
    assert np.all(real[:, :3] >= 0) and np.all(real[:, :3] <= 31) and np.all(real[:, 3] > 0)
    for b in range(2):
        s = props["rpn_scores"].numpy()[b][valid[b]]
        assert np.all(np.diff(s) <= 0) and np.all(s > 0.0)
        assert np.all(valid[b][: valid[b].sum()])  # real proposals first


def test_propose_returns_the_anchor_and_its_level():
    det = build_detector(small_config(enabled=False))
    anchors = multilevel_anchors((32, 32, 32), (4, 8, 16), AnchorConfig().sizes)
    logits = {s: np.full((1, 32 // s, 32 // s, 32 // s, 2), -9.0, "float32") for s in (4, 8, 16)}
    deltas = {s: np.zeros((*logits[s].shape, 4), "float32") for s in logits}
    logits[8][0, 1, 2, 3, 1] = 3.0  # anchor (1, 2, 3, a=1) of stride 8
    logits[16][0, 1, 0, 0, 0] = 2.0  # no overlap with the first: survives NMS
    props = det.propose(logits, deltas, (32, 32, 32), score_threshold=0.5)
    assert props["valid"].numpy().sum() == 2
    np.testing.assert_allclose(props["boxes"][0, 0], anchors[8][1, 2, 3, 1])
    np.testing.assert_allclose(props["boxes"][0, 1], anchors[16][1, 0, 0, 0])
    assert props["levels"].numpy()[0, :2].tolist() == [1, 2]
    np.testing.assert_allclose(props["rpn_scores"][0, 0], 1 / (1 + np.exp(-3.0)), rtol=1e-6)


class _LinearMagnifier(keras.layers.Layer):
    """Exact (extrapolating) linear upsampling by `scale`: affine fields stay affine."""

    scale = 4

    def call(self, x):
        for axis in (1, 2, 3):
            n = x.shape[axis]
            t = (np.arange(n * self.scale) + 0.5) / self.scale - 0.5
            j = np.clip(np.floor(t), 0, n - 2).astype(np.int32)
            w = (t - j).astype(np.float32)
            shape = [1, 1, 1, 1, 1]
            shape[axis] = -1
            w = tf.reshape(w, shape)
            x = tf.gather(x, j, axis=axis) * (1 - w) + tf.gather(x, j + 1, axis=axis) * w
        return x


class _CaptureHead(keras.layers.Layer):
    def call(self, x):
        self.captured = x
        return tf.reduce_sum(x, axis=-1)


@pytest.mark.parametrize("magnify", [False, True])
@pytest.mark.parametrize("aligned", [True, False])
def test_crops_through_roi_align_have_the_aligned_size_and_centre(magnify, aligned):
    """Features = input-voxel coordinates of each cell centre (an affine field). RoI Align of a
    crop then returns, per level, the crop's centre (mean of the 2^3 bins) and, from bin to bin,
    half the crop's extent in input voxels: n*s with Diameter Alignment, d without."""
    margin = 0.5
    fpr = FPRConfig(
        diameter_alignment=aligned,
        local_magnification=magnify,
        crop_margin_cells=margin,
        magnify_patch_cells=8,
        use_custom_op=False,
    )
    det = Agg3DDetector(
        DenseUNet3D.from_backbone_config(SMALL_BACKBONE),
        lambda s, a: RPNHead(a),
        _CaptureHead(),
        fpr_config=fpr,
        local_magnification=_LinearMagnifier() if magnify else None,
    )
    det.roi_align_fn = roi_align_3d
    feats = {}
    for s in (4, 8, 16):
        c = np.arange(32) * s + (s - 1) / 2.0
        z, y, x = np.meshgrid(c, c, c, indexing="ij")
        feats[s] = tf.constant(np.stack([z, y, x], -1)[None].astype("float32"))
    boxes = tf.constant([[[70.0, 81.0, 92.5, 6.0], [100.0, 90.0, 80.0, 20.0]]])
    levels = tf.constant([[0, 1]])
    det.classify(feats, boxes, levels)
    got = det.fpr_head.captured.numpy().reshape(2, 3, 2, 2, 2, 3)  # [R, level, bz, by, bx, zyx]
    for r, (ref_stride, d) in enumerate(((4, 6.0), (8, 20.0))):
        for li, s in enumerate((4, 8, 16)):
            bins = got[r, li]
            np.testing.assert_allclose(bins.mean(axis=(0, 1, 2)), boxes[0, r, :3], atol=1e-3)
            cells = (d / ref_stride if aligned else d / s) + 2 * margin
            # Centres of bins 0 and 1 are half the crop apart.
            np.testing.assert_allclose(
                bins[1, 0, 0, 0] - bins[0, 0, 0, 0], cells * s / 2, rtol=1e-4
            )


def test_local_magnification_one_weight_set_for_all_levels():
    det = build_detector(small_config())
    det(volume(32, batch=1))
    ref = LocalMagnification(
        channels=8, num_stages=2, layers_per_stage=2, growth_rate=4, bottleneck_width=2
    )
    ref.build((None, 4, 4, 4, 8))
    assert det.magnifier.count_params() == ref.count_params()
    parts = det.backbone.count_params() + sum(h.count_params() for h in det.rpn_heads)
    parts += det.magnifier.count_params() + det.fpr_head.count_params()
    assert det.count_params() == parts
    # Every level's crop goes through the magnifier: the FPR logit depends on each level.
    x = volume(32, batch=1)
    feats = det.features(x)
    props = det.propose(*det.rpn(feats), (32, 32, 32))
    for s in (4, 8, 16):
        with tf.GradientTape() as tape:
            tape.watch(feats[s])
            logits = det.classify(feats, props["boxes"], props["levels"], props["valid"])
            total = tf.reduce_sum(logits)
        grad = tape.gradient(total, feats[s])
        assert np.abs(grad.numpy()).sum() > 0, s


def test_get_config_and_keras_file_roundtrip(tmp_path):
    det = build_detector(small_config())
    x = volume(32, batch=1)
    ref, out = keras_roundtrip(det, x, str(tmp_path / "detector.keras"))
    for key in ("boxes", "rpn_scores", "fpr_logits", "scores"):
        np.testing.assert_allclose(out[key].numpy(), ref[key].numpy(), atol=1e-5)
    assert out["levels"].numpy().tolist() == ref["levels"].numpy().tolist()


def test_roi_align_fn_is_selectable():
    det = build_detector(small_config())
    assert det.roi_align_fn is roi_align_3d  # use_custom_op=False
    det.roi_align_fn = lambda *a, **k: roi_align_3d(*a, **k)
    assert det.roi_align_fn is not roi_align_3d


@keras.saving.register_keras_serializable(package="tf_agg3d_tests")
class DeeperRPNHead(RPNHead):
    """A user head: a 3x3x3 conv in front of the stock head."""

    def __init__(self, num_anchors, extra_channels=6, **kwargs):
        super().__init__(num_anchors, **kwargs)
        self.extra_channels = extra_channels

    def build(self, input_shape):
        self.extra = keras.layers.Conv3D(self.extra_channels, 3, padding="same", activation="relu")
        self.extra.build(input_shape)
        super().build((*input_shape[:-1], self.extra_channels))

    def call(self, inputs, training=None):
        return super().call(self.extra(inputs), training=training)

    def get_config(self):
        return {**super().get_config(), "extra_channels": self.extra_channels}


def test_user_rpn_head_trains_one_joint_step():
    cfg = small_config()
    det = Agg3DDetector(
        DenseUNet3D.from_backbone_config(cfg.backbone),
        lambda stride, num_anchors: DeeperRPNHead(num_anchors, name=f"deeper_{stride}"),
        FPRHead(16),
        anchor_config=cfg.anchors,
        proposal_config=cfg.proposals,
        fpr_config=cfg.fpr,
    )
    assert all(isinstance(h, DeeperRPNHead) for h in det.rpn_heads)
    x = volume(32, batch=1)
    gt = tf.constant([[12.0, 14.0, 18.0, 7.0]])
    anchors = multilevel_anchors((32, 32, 32), det.strides, cfg.anchors.sizes)
    targets = assign_anchor_targets(gt, anchors)
    targets = {s: (lab[None], dl[None]) for s, (lab, dl) in targets.items()}
    det(x)  # build
    optimizer = keras.optimizers.SGD(0.01)
    before = [w.numpy().copy() for w in det.rpn_heads[0].extra.weights]
    with tf.GradientTape() as tape:
        out = det(x, training=True)
        rpn = RPNLoss()(out["rpn_logits"], out["rpn_deltas"], targets, step=0)
        labels = assign_proposal_labels(out["boxes"][0], gt, 0.3, 0.1)[None]
        fpr = combine_fpr_terms(fpr_loss_terms(labels, out["fpr_logits"], out["valid"]))
        loss = rpn["rpn_loss"] + fpr["fpr_loss"]
    grads = tape.gradient(loss, det.trainable_variables)
    assert np.isfinite(loss.numpy()) and rpn["cls_n_pos"].numpy() >= 1
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
    optimizer.apply_gradients(zip(grads, det.trainable_variables, strict=False))
    after = det.rpn_heads[0].extra.weights
    assert any(not np.allclose(a.numpy(), b) for a, b in zip(after, before, strict=False))


def test_full_detector_parameter_count():
    det = build_detector(ModelConfig(fpr=FPRConfig(use_custom_op=False)))
    # Build every part from shapes alone (no forward pass: fast on CPU).
    det.backbone.build((None, None, None, None, 1))
    for head in det.rpn_heads:
        head.build((None, None, None, None, 32))
    det.magnifier.build((None, 4, 4, 4, 32))
    det.fpr_head.build((None, 768))
    parts = {
        "backbone": det.backbone.count_params(),
        "RPN heads": sum(h.count_params() for h in det.rpn_heads),
        "Local Magnification": det.magnifier.count_params(),
        "FPR head": det.fpr_head.count_params(),
    }
    total = sum(parts.values())
    print(f"Agg3DDetector (paper config) parameters: {total:,} {parts}")
    assert total == FULL_DETECTOR_PARAMS
    assert det.fpr_head.hidden[0].kernel.shape == (768, 256)

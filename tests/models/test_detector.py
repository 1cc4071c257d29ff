"""Agg3DDetector: outputs, proposals, Diameter Alignment geometry through RoI Align, shared Local
Magnification, serialization, a user RPN head trained one step, and the full parameter count."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import SMALL_BACKBONE, identity_like_magnifier, keras_roundtrip

from tf_agg3d.backbones.dense_unet3d import DenseUNet3D
from tf_agg3d.config import (
    AnchorConfig,
    ConfigError,
    FPRConfig,
    InferenceConfig,
    ModelConfig,
    ProposalConfig,
    load_config,
)
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


def single_scale_config(**fpr):
    cfg = small_config(**fpr)
    return dataclasses.replace(
        cfg, anchors=AnchorConfig(strides=(4,), sizes=((4.0, 6.0, 8.0, 12.0, 16.0, 24.0),))
    )


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
    """Exact (extrapolating) linear resampling with the coordinate map of a magnifier: output
    cell i (centre i + 0.5) holds the input at (i + 0.5 - offset) / scale. Affine fields stay
    affine. scale 4, offset 0: the patch variant; scale 1, offset 1: the table1 variant."""

    def __init__(self, scale=4, offset=0.0, stages=2, **kwargs):
        super().__init__(**kwargs)
        self.scale, self.offset, self.stages = scale, offset, stages

    def output_cells(self, n):
        return n * self.scale if self.scale > 1 else n + self.stages

    def call(self, x):
        for axis in (1, 2, 3):
            n = x.shape[axis]
            t = (np.arange(self.output_cells(n)) + 0.5 - self.offset) / self.scale - 0.5
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


# (magnify_mode, crop cells, magnifier): the patch variant (x4), the table1 variant's map on a
# large crop, Table I's own 3^3 -> 5^3 (aligned crops fit it), and the real table1 layer with
# identity-like weights (a 9^3 crop, so every RoI Align sample sees only cells fed by the crop).
MAGNIFIERS = {
    "none": None,
    "patch": ("patch", 8, lambda: _LinearMagnifier()),
    "table1": ("table1", 8, lambda: _LinearMagnifier(scale=1, offset=1.0)),
    "table1_3cells": ("table1", 3, lambda: _LinearMagnifier(scale=1, offset=1.0)),
    "table1_real": (
        "table1",
        9,
        lambda: identity_like_magnifier(
            LocalMagnification(layers_per_stage=1, growth_rate=2, bottleneck_width=1), 3
        ),
    ),
}


@pytest.mark.parametrize("magnify", list(MAGNIFIERS))
@pytest.mark.parametrize("aligned", [True, False])
def test_crops_through_roi_align_have_the_aligned_size_and_centre(magnify, aligned):
    """Features = input-voxel coordinates of each cell centre (an affine field). RoI Align of a
    crop then returns, per level, the crop's centre (mean of the 2^3 bins) and, from bin to bin,
    half the crop's extent in input voxels: n*s with Diameter Alignment, d without. With Local
    Magnification this holds when the detector maps the crop box into the magnifier's output by
    the magnifier's own scale and offset."""
    if magnify == "table1_3cells" and not aligned:
        pytest.skip("unaligned crops of large nodules on fine levels exceed the 3^3 crop")
    margin = 0.5
    mode, cells, make = MAGNIFIERS[magnify] or ("table1", 3, None)
    fpr = FPRConfig(
        diameter_alignment=aligned,
        local_magnification=make is not None,
        crop_margin_cells=margin,
        magnify_mode=mode,
        magnify_patch_cells=cells,
        magnify_crop_cells=cells,
        use_custom_op=False,
    )
    det = Agg3DDetector(
        DenseUNet3D.from_backbone_config(SMALL_BACKBONE),
        lambda s, a: RPNHead(a),
        _CaptureHead(),
        fpr_config=fpr,
        local_magnification=None if make is None else make(),
    )
    assert det.magnify_input_cells == cells
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


@pytest.mark.parametrize("mode, cells, out_cells", [("table1", 3, 5), ("patch", 4, 16)])
def test_magnify_modes_crop_and_output_sides(mode, cells, out_cells):
    """table1 (default): Table I's 3^3 crop -> 5^3 "Magnify Output"; patch: 4^3 -> 16^3."""
    assert FPRConfig().magnify_mode == "table1"
    det = build_detector(small_config(magnify_mode=mode))
    assert det.magnifier.deconv_stride == (1 if mode == "table1" else 2)
    assert det.magnify_input_cells == cells
    assert det.magnifier.output_cells(cells) == out_cells
    patches = tf.zeros([2, cells, cells, cells, 8])
    assert det.magnifier(patches).shape == (2, out_cells, out_cells, out_cells, 8)


@pytest.mark.parametrize("mode", ["table1", "patch"])
def test_local_magnification_one_weight_set_for_all_levels(mode):
    det = build_detector(small_config(magnify_mode=mode))
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


@pytest.mark.parametrize("variant", ["table1", "patch", "single_scale"])
def test_get_config_and_keras_file_roundtrip(variant, tmp_path):
    if variant == "single_scale":
        det = build_detector(single_scale_config())
    else:
        det = build_detector(small_config(magnify_mode=variant))
    x = volume(32, batch=1)
    ref, out = keras_roundtrip(det, x, str(tmp_path / "detector.keras"))
    for key in ("boxes", "rpn_scores", "fpr_logits", "scores"):
        np.testing.assert_allclose(out[key].numpy(), ref[key].numpy(), atol=1e-5)
    assert out["levels"].numpy().tolist() == ref["levels"].numpy().tolist()


def test_detectors_saved_before_magnify_mode_load_as_the_patch_variant():
    det = build_detector(small_config(magnify_mode="patch"))
    config = det.get_config()
    del config["fpr_config"]["magnify_mode"]
    config["local_magnification"]["config"].pop("deconv_stride")
    clone = Agg3DDetector.from_config(config)
    assert clone.fpr_config.magnify_mode == "patch" and clone.magnifier.deconv_stride == 2
    assert clone.magnify_input_cells == 4


def _anchor_targets(det, cfg, gt) -> dict:
    """RPN targets of ground-truth boxes `gt` [G, 4] in a 32^3 volume, batched: {s: (lab, dl)}."""
    anchors = multilevel_anchors((32, 32, 32), det.strides, cfg.anchors.sizes)
    targets = assign_anchor_targets(gt, anchors)
    return {s: (lab[None], dl[None]) for s, (lab, dl) in targets.items()}


def _joint_loss(det, x, gt, targets):
    """One training forward pass: the joint RPN + FPR loss and the RPN's loss terms."""
    out = det(x, training=True)
    rpn = RPNLoss()(out["rpn_logits"], out["rpn_deltas"], targets, step=0)
    labels = assign_proposal_labels(out["boxes"][0], gt, 0.3, 0.1)[None]
    fpr = combine_fpr_terms(fpr_loss_terms(labels, out["fpr_logits"], out["valid"]))
    return rpn["rpn_loss"] + fpr["fpr_loss"], rpn


def test_single_scale_end_to_end():
    """Table II rows a/b (our reading): one RPN head on stride 4 with all six anchor1 sizes;
    the backbone still gives every level and the FPRN aggregates all three."""
    cfg = single_scale_config()
    det = build_detector(cfg)
    assert det.strides == (4,) and det.pyramid_strides == (4, 8, 16)
    assert len(det.rpn_heads) == 1 and det.rpn_heads[0].num_anchors == 6
    x = volume(32, batch=1)
    out = det(x)
    assert sorted(out["rpn_logits"]) == [4]
    assert out["rpn_logits"][4].shape == (1, 8, 8, 8, 6)
    assert out["rpn_deltas"][4].shape == (1, 8, 8, 8, 6, 4)
    assert out["valid"].numpy().any() and np.all(out["levels"].numpy() == 0)
    assert det.fpr_head.hidden[0].kernel.shape[0] == 3 * 8 * 8  # 3 levels x C x 2^3
    # Targets on the one anchor level, a joint loss, and gradients reaching the backbone.
    gt = tf.constant([[12.0, 14.0, 18.0, 7.0], [20.0, 16.0, 12.0, 20.0]])
    targets = _anchor_targets(det, cfg, gt)
    assert sorted(targets) == [4]
    with tf.GradientTape() as tape:
        loss, rpn = _joint_loss(det, x, gt, targets)
    assert np.isfinite(loss.numpy()) and rpn["cls_n_pos"].numpy() >= 2
    grads = tape.gradient(loss, det.backbone.trainable_variables)
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
    assert sum(float(np.abs(g.numpy()).sum()) for g in grads) > 0
    # The FPRN sees every level, the ones without an RPN head included.
    feats = det.features(x)
    assert sorted(feats) == [4, 8, 16]
    props = det.propose(*det.rpn(feats), (32, 32, 32))
    for s in (8, 16):
        with tf.GradientTape() as tape:
            tape.watch(feats[s])
            total = tf.reduce_sum(
                det.classify(feats, props["boxes"], props["levels"], props["valid"])
            )
        assert np.abs(tape.gradient(total, feats[s]).numpy()).sum() > 0, s
    # Whole-scan inference over several windows, and in one pass (tiles).
    from tf_agg3d.models.whole_scan import WholeScanDetector

    for mode, calls in (("windows", 8), ("tiles", 1)):
        scan = WholeScanDetector(
            det,
            InferenceConfig(
                window_size=(32, 32, 32),
                overlap=8,
                score_threshold=0.0,
                max_proposals_per_scan=20,
                mode=mode,
                precision="float32",
            ),
        )
        found = scan.detect(tf.constant(volume(40, batch=1)[0, ..., 0].astype("int16")))
        assert int(found["num_windows"]) == calls and int(found["num_detections"]) >= 1
        assert np.all(np.isfinite(found["scores"].numpy()))


def test_anchor_strides_must_be_backbone_strides_with_one_size_list_each():
    with pytest.raises(ConfigError, match="one size list per anchor stride"):
        load_config(None, ["model.anchors.strides=[4]"])
    with pytest.raises(ConfigError, match="subset of the backbone's pyramid strides"):
        load_config(None, ["model.anchors.strides=[4, 32]", "model.anchors.sizes=[[4], [40]]"])
    with pytest.raises(ConfigError, match="magnify_mode"):
        load_config(None, ["model.fpr.magnify_mode=zoom"])
    single = load_config(
        None, ["model.anchors.strides=[4]", "model.anchors.sizes=[[4, 6, 8, 12, 16, 24]]"]
    )
    assert single.model.anchors.strides == (4,)
    # Build time: a config edited in place, and a detector given a foreign stride.
    cfg = single_scale_config()
    cfg.anchors.strides = (4, 8)
    with pytest.raises(ConfigError, match="one size list"):
        build_detector(cfg)
    with pytest.raises(ConfigError, match="subset"):
        Agg3DDetector(
            DenseUNet3D.from_backbone_config(SMALL_BACKBONE),
            lambda s, a: RPNHead(a),
            anchor_config={"strides": [32], "sizes": [[40.0]]},
        )


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
    targets = _anchor_targets(det, cfg, gt)
    det(x)  # build
    optimizer = keras.optimizers.SGD(0.01)
    before = [w.numpy().copy() for w in det.rpn_heads[0].extra.weights]
    with tf.GradientTape() as tape:
        loss, rpn = _joint_loss(det, x, gt, targets)
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

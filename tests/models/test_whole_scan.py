import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from detector_fakes import BlobDetector, blob_hu_for_probability, rpn_probability

from tf_agg3d.config import InferenceConfig
from tf_agg3d.models.whole_scan import VOLUME_SPECS, WholeScanDetector
from tf_agg3d.ops.iou import cube_iou_np

BACKGROUND = -800


def _config(**kw):
    base = InferenceConfig(
        window_size=(32, 32, 32),
        overlap=8,
        window_batch_size=1,
        score_threshold=0.269,
        nms_iou=0.1,
        max_marks=100,
        max_proposals_per_scan=300,
    )
    return dataclasses.replace(base, **kw)


def _volume(shape, blobs, side=4):
    """int16 volume with cubes of `side` voxels at corners (z, y, x) and HU."""
    vol = np.full(shape, BACKGROUND, np.int16)
    for (z, y, x), hu in blobs:
        vol[z : z + side, y : y + side, x : x + side] = hu
    return vol


def _run(module, vol):
    return {k: v.numpy() for k, v in module.detect(tf.constant(vol)).items()}


def test_a_detection_on_a_window_border_is_found_once_at_its_place():
    # y has windows at 0, 24, 40 (size 72, window 32, overlap 8): the blob at y 24..27 (centre
    # 25.5) is fully inside windows 0 and 1; NMS is disabled, so only the core test can stop
    # the second copy.
    vol = _volume((32, 72, 32), [((8, 24, 12), 500)])
    det = BlobDetector(window_nms_iou=1.0)
    module = WholeScanDetector(det, _config(nms_iou=1.0))
    out = _run(module, vol)
    assert out["num_windows"] == 3
    assert out["num_detections"] == 1
    np.testing.assert_allclose(out["boxes"][0], [9.5, 25.5, 13.5, 4.0])
    assert out["scores"][0] == pytest.approx(rpn_probability(500), rel=1e-5)
    # Without the core test (one window per proposal), the two windows both report it.
    both = WholeScanDetector(det, _config(nms_iou=1.0, overlap=8))
    crops = np.stack([vol[:, 0:32], vol[:, 24:56]])
    per_crop = both.detect_crops(tf.constant(crops))
    assert per_crop["valid"].numpy().sum() == 2


def test_blobs_near_every_border_and_in_the_flushed_last_window():
    # 64 x 76 x 52 -> starts z 0,24,32; y 0,24,44; x 0,20: every blob lies in >= 2 windows.
    blobs = [((20, 20, 16), 500), ((28, 44, 28), 400), ((56, 68, 44), 300), ((0, 0, 0), 450)]
    vol = _volume((64, 76, 52), blobs)
    module = WholeScanDetector(BlobDetector(window_nms_iou=1.0), _config(nms_iou=1.0))
    out = _run(module, vol)
    assert out["num_detections"] == len(blobs)
    expected = sorted(
        ((rpn_probability(hu), [z + 1.5, y + 1.5, x + 1.5, 4.0]) for (z, y, x), hu in blobs),
        key=lambda t: -t[0],
    )
    np.testing.assert_allclose(out["boxes"], [b for _, b in expected])
    np.testing.assert_allclose(out["scores"], [p for p, _ in expected], rtol=1e-5)
    assert np.all(np.diff(out["scores"]) <= 0)


def test_cross_window_nms_merges_overlapping_proposals_and_max_marks_cuts():
    # An 8^3 blob fills 8 stride-4 cells; anchors of 12 voxels overlap (IoU >= 0.17) and the
    # per-window NMS is off, so only the whole-scan NMS can reduce them to one finding.
    vol = _volume((32, 48, 32), [((8, 20, 8), 500)], side=8)
    det = BlobDetector(anchor_size=12.0, window_nms_iou=1.0, max_proposals=16)
    merged = _run(WholeScanDetector(det, _config(nms_iou=0.1)), vol)
    assert merged["num_detections"] == 1
    np.testing.assert_allclose(merged["boxes"][0, 3], 12.0)
    assert np.all(np.abs(merged["boxes"][0, :3] - [11.5, 23.5, 11.5]) <= 2.0)
    unmerged = _run(WholeScanDetector(det, _config(nms_iou=1.0)), vol)
    assert unmerged["num_detections"] == 8
    cut = _run(WholeScanDetector(det, _config(nms_iou=1.0, max_marks=3)), vol)
    assert cut["num_detections"] == 3 and cut["boxes"].shape == (3, 4)


def test_threshold_applies_to_the_rpn_probability():
    blobs = [
        ((4, 4, 4), blob_hu_for_probability(0.9)),
        ((20, 20, 20), blob_hu_for_probability(0.2)),
    ]
    vol = _volume((32, 32, 32), blobs)
    det = BlobDetector()
    assert _run(WholeScanDetector(det, _config()), vol)["num_detections"] == 1
    assert _run(WholeScanDetector(det, _config(score_threshold=0.1)), vol)["num_detections"] == 2


def test_fpr_rescoring_uses_the_window_where_the_proposal_is_central():
    # Stub FPRN logit = -1 + (z in window) / 32: tells which window classified the proposal.
    vol = _volume((56, 32, 32), [((24, 12, 12), 500)])  # z windows at 0 and 24; core split 27.5
    module = WholeScanDetector(BlobDetector(fpr_logit=-1.0), _config())
    assert module.use_fpr
    out = _run(module, vol)
    assert out["num_detections"] == 1
    z_window = 25.5  # centre 25.5 < 27.5: window 0 is its core window, local z 25.5
    fpr = 1 / (1 + np.exp(-(-1.0 + z_window / 32)))
    assert out["fpr_scores"][0] == pytest.approx(fpr, rel=1e-5)
    assert out["rpn_scores"][0] == pytest.approx(rpn_probability(500), rel=1e-5)
    assert out["scores"][0] == pytest.approx((fpr + rpn_probability(500)) / 2, rel=1e-5)


def test_without_fpr_the_fpr_and_final_scores_are_the_rpn_scores():
    vol = _volume((32, 32, 32), [((4, 4, 4), 500), ((20, 20, 20), 350)])
    out = _run(WholeScanDetector(BlobDetector(fpr_logit=3.0), _config(), use_fpr=False), vol)
    assert out["num_detections"] == 2
    np.testing.assert_array_equal(out["scores"], out["rpn_scores"])
    np.testing.assert_array_equal(out["fpr_scores"], out["rpn_scores"])


def test_volumes_smaller_than_a_window_are_padded_with_the_fill_value():
    vol = _volume((12, 20, 30), [((4, 8, 24), 500)])
    out = _run(WholeScanDetector(BlobDetector(), _config(), fill_hu=0), vol)
    assert out["num_windows"] == 1 and out["num_detections"] == 1
    np.testing.assert_allclose(out["boxes"][0], [5.5, 9.5, 25.5, 4.0])
    # A bright fill would itself look like blobs: the fill value really is what pads.
    bright = _run(WholeScanDetector(BlobDetector(), _config(), fill_hu=600), vol)
    assert bright["num_detections"] > 1


def _reference(det, config, vol, use_fpr):
    """Python loop over windows, numpy merging: the specification of detect()."""
    w, o = config.window_size[0], config.overlap

    def starts(n):
        n = max(n, w)
        out, s = [], 0
        while True:
            out.append(min(s, n - w))
            if out[-1] + w >= n:
                return out
            s += w - o

    def cores(st):
        bounds = [(st[i] + st[i - 1] + w) / 2 - 0.5 for i in range(1, len(st))]
        return [-np.inf, *bounds], [*bounds, np.inf]

    padded = np.full([max(n, w) for n in vol.shape], 0, np.float32)
    padded[: vol.shape[0], : vol.shape[1], : vol.shape[2]] = vol
    axes = [starts(n) for n in vol.shape]
    core = [cores(a) for a in axes]
    rows = []
    for iz, z in enumerate(axes[0]):
        for iy, y in enumerate(axes[1]):
            for ix, x in enumerate(axes[2]):
                crop = tf.constant(padded[None, z : z + w, y : y + w, x : x + w, None])
                feats = det.features(crop)
                props = det.propose(*det.rpn(feats), (w, w, w), config.score_threshold)
                boxes = props["boxes"].numpy()[0]
                rpn = props["rpn_scores"].numpy()[0]
                fpr = (
                    tf.sigmoid(
                        det.classify(feats, props["boxes"], props["levels"], props["valid"])
                    ).numpy()[0]
                    if use_fpr
                    else rpn
                )
                for j in np.flatnonzero(props["valid"].numpy()[0]):
                    c = boxes[j, :3] + [z, y, x]
                    lo = [core[0][0][iz], core[1][0][iy], core[2][0][ix]]
                    hi = [core[0][1][iz], core[1][1][iy], core[2][1][ix]]
                    if np.all(c >= lo) and np.all(c < hi) and rpn[j] > config.score_threshold:
                        score = (rpn[j] + fpr[j]) / 2 if use_fpr else rpn[j]
                        rows.append((score, [*c, boxes[j, 3]], rpn[j], fpr[j]))
    rows.sort(key=lambda r: -r[0])
    rows = rows[: config.max_proposals_per_scan]
    kept = []
    for r in rows:
        if all(cube_iou_np([r[1]], [k[1]])[0, 0] <= config.nms_iou for k in kept):
            kept.append(r)
    return kept[: config.max_marks]


@pytest.mark.parametrize("batch,use_fpr", [(1, False), (2, True), (4, True)])
def test_detect_in_a_graph_with_dynamic_shapes_equals_a_python_loop(batch, use_fpr):
    rng = np.random.default_rng(batch)
    config = _config(window_batch_size=batch, max_marks=12, nms_iou=0.05)
    det = BlobDetector(anchor_size=6.0, fpr_logit=0.5 if use_fpr else None)
    module = WholeScanDetector(det, config)
    detect = module.detect.get_concrete_function(VOLUME_SPECS[0])
    # Sides that are multiples of 4 keep the flushed windows on the blobs' 4-voxel grid.
    for shape in [(36, 60, 44), (52, 40, 32)]:
        corners = [tuple(rng.integers(0, n - 4) // 4 * 4 for n in shape) for _ in range(12)]
        blobs = [(c, int(rng.integers(300, 520))) for c in corners]
        vol = _volume(shape, blobs)
        vol += rng.integers(-50, 50, shape).astype(np.int16)
        out = {k: v.numpy() for k, v in detect(tf.constant(vol)).items()}
        ref = _reference(det, config, vol, use_fpr)
        assert len(ref) >= 5, "the case must have several findings"
        assert out["num_detections"] == len(ref)
        np.testing.assert_allclose(out["boxes"], [r[1] for r in ref], atol=1e-4)
        np.testing.assert_allclose(out["scores"], [r[0] for r in ref], atol=1e-6)
        np.testing.assert_allclose(out["rpn_scores"], [r[2] for r in ref], atol=1e-6)
        np.testing.assert_allclose(out["fpr_scores"], [r[3] for r in ref], atol=1e-6)
    # The window count of the last shape (one concrete function served both).
    assert out["num_windows"] == np.prod([len(range(0, max(n - 8, 1), 24)) for n in shape])


def test_detect_accepts_int16_and_float32_alike():
    vol = _volume((40, 32, 32), [((4, 4, 4), 500), ((30, 20, 20), 350)])
    module = WholeScanDetector(BlobDetector(), _config())
    a = _run(module, vol)
    b = _run(module, vol.astype(np.float32))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])

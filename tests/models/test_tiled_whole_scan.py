"""The tiles path of whole-scan detection, fill skipping, precision, and the two paths compared.

The untrained cases pin the tiles path to a plain reference (one Keras backbone pass over the
padded volume, every anchor decoded in NumPy, greedy NMS). The trained cases (a tiny detector
trained for a minute, ``conftest.trained_detector``) compare the paths on what matters, the
findings: equal where a window sees the whole scan, close (bounded) where windows cut it.
"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from detector_fakes import BlobDetector
from support import TINY_DETECTOR_OVERRIDES

from tf_agg3d.config import ConfigError, load_config
from tf_agg3d.models.builder import build_detector
from tf_agg3d.models.whole_scan import VOLUME_SPECS, WholeScanDetector
from tf_agg3d.ops.anchors import generate_anchors_np
from tf_agg3d.ops.box_coding import decode_boxes
from tf_agg3d.ops.iou import cube_iou_np
from tf_agg3d.ops.roi_align import roi_align_3d


def _run(module, vol):
    return {k: v.numpy() for k, v in module.detect(tf.constant(vol)).items()}


def _tiny(*overrides):
    return load_config(
        None,
        [*TINY_DETECTOR_OVERRIDES, "inference.precision=float32", "inference.max_marks=50"]
        + list(overrides),
    )


def _random_detector(config, seed=3):
    tf.keras.utils.set_random_seed(seed)
    det = build_detector(config.model)
    det(tf.zeros([1, 32, 32, 32, 1]), training=False)
    det.roi_align_fn = roi_align_3d
    rng = np.random.default_rng(seed)
    for v in det.backbone.variables:
        if v.path.endswith("moving_mean"):
            v.assign(rng.normal(0, 0.1, v.shape).astype("float32"))
    for head in det.rpn_heads:  # spread the RPN probabilities (untrained: all near 0.01)
        head.logit_conv.kernel.assign(head.logit_conv.kernel * 300.0)
    return det


def _greedy_nms(boxes, scores, iou, limit, threshold=-np.inf):
    kept = []
    for j in np.argsort(-scores, kind="stable"):
        if scores[j] <= threshold or len(kept) == limit:
            continue
        if all(cube_iou_np(boxes[j : j + 1], boxes[k : k + 1])[0, 0] <= iou for k in kept):
            kept.append(j)
    return np.asarray(kept, int)


def _reference_tiles(det, inference, vol, fill):
    """Specification of the tiles path: one whole-volume pass, all anchors, NumPy merging."""
    padded_shape = [-(-n // 16) * 16 for n in vol.shape]
    padded = np.full(padded_shape, fill, np.float32)
    padded[: vol.shape[0], : vol.shape[1], : vol.shape[2]] = vol
    feats = det.features(tf.constant(padded)[None, ..., None])
    logits, deltas = det.rpn(feats)
    probs, boxes, levels = [], [], []
    for i, s in enumerate(det.strides):
        anchors = generate_anchors_np(padded_shape, s, det.anchor_config.sizes[i]).reshape(-1, 4)
        probs.append(tf.sigmoid(tf.reshape(logits[s], [-1])).numpy())
        boxes.append(decode_boxes(tf.reshape(deltas[s], [-1, 4]), anchors).numpy())
        levels.append(np.full(len(anchors), i))
    probs, boxes, levels = (np.concatenate(t) for t in (probs, boxes, levels))
    boxes[:, :3] = np.clip(boxes[:, :3], 0, np.asarray(padded_shape) - 1)
    boxes[:, 3] = np.clip(boxes[:, 3], 1, max(padded_shape))
    order = np.argsort(-probs, kind="stable")[: inference.tiles_pre_nms_top_k]
    order = order[probs[order] > inference.score_threshold]
    kept = order[
        _greedy_nms(
            boxes[order],
            probs[order],
            det.proposal_config.nms_iou,
            inference.max_proposals_per_scan,
            inference.score_threshold,
        )
    ]
    fpr = tf.sigmoid(
        det.classify(feats, tf.constant(boxes[kept][None]), tf.constant(levels[kept][None]), None)
    ).numpy()[0]
    scores = (probs[kept] + fpr) / 2
    final = _greedy_nms(boxes[kept], scores, inference.nms_iou, inference.max_marks)
    return boxes[kept][final], scores[final], probs[kept][final], fpr[final]


@pytest.mark.parametrize("skip_fill", [True, False])
def test_tiles_detect_equals_one_whole_volume_pass_with_numpy_merging(skip_fill):
    config = _tiny("inference.memory_budget_mb=1", f"inference.skip_fill={str(skip_fill).lower()}")
    det = _random_detector(config)
    vol = np.random.default_rng(0).integers(-1100, 500, (40, 56, 72)).astype(np.int16)
    vol[:, :, 50:] = 0  # fill: skipped cells take the all-fill response
    # A threshold in the widest gap between the 30th and 80th best anchors: a few dozen
    # proposals, none borderline.
    feats = det.features(tf.constant(np.pad(vol, [(0, 8), (0, 8), (0, 8)]))[None, ..., None])
    logits, _ = det.rpn(feats)
    probs = np.sort(np.concatenate([tf.sigmoid(v).numpy().ravel() for v in logits.values()]))
    top = probs[::-1][30:80]
    gap = int(np.argmax(top[:-1] - top[1:]))
    assert top[gap] - top[gap + 1] > 1e-5
    threshold = float(top[gap] + top[gap + 1]) / 2
    inference = dataclasses.replace(config.inference, score_threshold=threshold)
    module = WholeScanDetector(det, inference, fill_hu=0)
    assert module.mode == "tiles"
    out = _run(module, vol)
    boxes, scores, rpn, fpr = _reference_tiles(det, inference, vol.astype(np.float32), 0.0)
    assert out["num_detections"] == len(scores) >= 5
    np.testing.assert_allclose(out["boxes"], boxes, atol=1e-3)
    np.testing.assert_allclose(out["scores"], scores, atol=1e-5)
    np.testing.assert_allclose(out["rpn_scores"], rpn, atol=1e-5)
    np.testing.assert_allclose(out["fpr_scores"], fpr, atol=1e-5)
    # Several stem tiles (a 1 MiB budget); fill cells skipped only when asked.
    plan_voxels = out["evaluated_voxels"]
    assert out["num_windows"] > 8
    if skip_fill:
        unskipped = WholeScanDetector(det, dataclasses.replace(inference, skip_fill=False))
        assert plan_voxels < _run(unskipped, vol)["evaluated_voxels"]


def test_one_concrete_function_serves_every_volume_shape():
    config = _tiny("inference.memory_budget_mb=1")
    module = WholeScanDetector(_random_detector(config), config.inference)
    detect = module.detect.get_concrete_function(VOLUME_SPECS[0])
    for shape in [(20, 30, 40), (33, 17, 50), (16, 16, 16)]:
        vol = np.random.default_rng(1).integers(-1000, 400, shape).astype(np.int16)
        out = {k: v.numpy() for k, v in detect(tf.constant(vol)).items()}
        assert out["num_detections"] == 50  # threshold 0: every mark slot is used
        assert np.all(out["boxes"][:, :3] <= np.asarray([-(-n // 16) * 16 for n in shape]) - 1)
        assert np.all(np.diff(out["scores"]) <= 0)


def test_a_scan_with_no_anchor_above_the_threshold_has_no_findings():
    config = _tiny("inference.score_threshold=0.99999")
    module = WholeScanDetector(_random_detector(config), config.inference)
    out = _run(module, np.zeros((20, 24, 28), np.int16))
    assert out["num_detections"] == 0 and out["boxes"].shape == (0, 4)
    # All fill: no stem tile runs (only the small all-fill probe).
    assert out["num_windows"] == 0 and out["evaluated_voxels"] == 0


def test_other_backbones_run_the_windows_path_in_float32():
    config = load_config(None, ["inference.window_size=[32,32,32]", "inference.overlap=8"])
    module = WholeScanDetector(BlobDetector(), config.inference)
    assert (module.mode, module.precision) == ("windows", "float32")
    assert module.describe()["mode"] == "windows"


def test_exports_keep_the_path_and_resolve_auto_precision_to_float32():
    config = _tiny("inference.precision=auto")
    det = _random_detector(config)
    module = WholeScanDetector(det, config.inference)
    exported = module.for_export()
    assert (exported.mode, exported.precision) == ("tiles", "float32")
    explicit = WholeScanDetector(
        det, dataclasses.replace(config.inference, precision="bfloat16")
    ).for_export()
    assert explicit.precision == "bfloat16"


@pytest.mark.parametrize(
    "override,message",
    [
        ("inference.mode=sliding", "inference.mode"),
        ("inference.precision=fp16", "inference.precision"),
        ("inference.memory_budget_mb=0", "inference.memory_budget_mb"),
    ],
)
def test_bad_inference_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_windows_that_are_all_fill_reuse_one_probe_exactly():
    # A bright fill makes BlobDetector fire inside all-fill windows: skipping them must still
    # report exactly what running them does.
    vol = np.full((32, 32, 80), -800, np.int16)
    vol[8:12, 8:12, 4:8] = 500
    vol[:, :, 44:] = 600  # windows at x 24 and 48 (32 wide, overlap 8): the last is all fill
    config = load_config(None, ["inference.window_size=[32,32,32]", "inference.overlap=8"])
    det = BlobDetector(window_nms_iou=1.0)
    outs = {}
    for skip in (True, False):
        inference = dataclasses.replace(config.inference, skip_fill=skip, nms_iou=1.0)
        outs[skip] = _run(WholeScanDetector(det, inference, fill_hu=600), vol)
    assert outs[True]["num_detections"] == outs[False]["num_detections"] > 8
    for key in ("boxes", "scores", "rpn_scores", "fpr_scores"):
        np.testing.assert_array_equal(outs[True][key], outs[False][key])
    # Three windows run without skipping; with it two and the probe.
    assert outs[False]["num_windows"] == 3 and outs[True]["num_windows"] == 3
    vol[:, :, 20:] = 600  # now two windows are all fill: two run, one probe
    skipped = _run(WholeScanDetector(det, config.inference, fill_hu=600), vol)
    assert skipped["num_windows"] == 2


# --------------------------------------------------------------------------------------------
# A trained detector
# --------------------------------------------------------------------------------------------


def _scan(shape, nodules, seed=0):
    """-700 HU lungs with 200 HU spheres (z, y, x, d), like the training scans."""
    rng = np.random.default_rng(seed)
    vol = (-700 + rng.integers(-30, 30, shape)).astype(np.int16)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    for z, y, x, d in nodules:
        vol[(zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= (d / 2) ** 2] = 200
    return vol


def _match(found, nodule, min_score=0.5):
    """Index of the best finding within 4 voxels of the nodule's centre (or inside it)."""
    z, y, x, d = nodule
    dist = np.linalg.norm(found["boxes"][:, :3] - [z, y, x], axis=1)
    hits = np.flatnonzero((dist < max(d / 2, 4.0)) & (found["scores"] >= min_score))
    return None if len(hits) == 0 else int(hits[0])


def _inference(trained, **kw):
    base = dataclasses.replace(
        trained.config.inference, window_size=(32, 32, 32), overlap=8, precision="float32"
    )
    return dataclasses.replace(base, **kw)


NODULES = [(14, 40, 30, 5.0), (15, 67, 12, 6.0), (40, 22, 54, 8.0), (54, 48, 28, 7.0)]


def _one_window_vs_tiles(trained, vol, **tiles_settings):
    """Findings of the windows path with one window over the whole (padded) scan, and of tiles.

    With one window the windows path sees exactly the input of one whole-volume pass, so the
    two paths must agree as closely as float32 allows; the window's proposal quotas are those
    of the scan, so that only the features could differ.
    """
    det = trained.detector
    window = tuple(-(-n // 16) * 16 for n in vol.shape)
    saved = det.proposal_config
    det.proposal_config = dataclasses.replace(saved, pre_nms_top_k=4096, max_proposals=300)
    try:
        windows = _run(
            WholeScanDetector(
                det, _inference(trained, mode="windows", window_size=window), fill_hu=0
            ),
            vol,
        )
        tiles = _run(
            WholeScanDetector(
                det,
                _inference(trained, mode="tiles", tiles_pre_nms_top_k=4096, **tiles_settings),
                fill_hu=0,
            ),
            vol,
        )
    finally:
        det.proposal_config = saved
    assert windows["num_windows"] == 1
    return windows, tiles


def _assert_same_findings(tiles, windows, at_least):
    assert tiles["num_detections"] == windows["num_detections"] >= at_least
    np.testing.assert_allclose(tiles["boxes"], windows["boxes"], atol=1e-3)
    for key in ("scores", "rpn_scores", "fpr_scores"):
        np.testing.assert_allclose(tiles[key], windows[key], atol=1e-4, err_msg=key)


@pytest.mark.slow
def test_where_one_window_sees_the_whole_scan_both_paths_find_the_same(trained_detector):
    nodules = [(12, 14, 18, 7.0), (24, 6, 8, 5.0)]
    windows, tiles = _one_window_vs_tiles(trained_detector, _scan((32, 32, 32), nodules, seed=1))
    _assert_same_findings(tiles, windows, at_least=2)
    for nodule in nodules:
        assert _match(tiles, nodule) is not None


@pytest.mark.slow
def test_several_tiles_and_an_empty_lung_region_find_what_one_window_finds(trained_detector):
    # A 1 MiB budget splits the stem into many tiles; a "lung mask" (fill 0 HU) that leaves the
    # whole upper half and a side slab empty makes some tiles skip everything, some in part.
    vol = _scan((64, 80, 72), NODULES, seed=6)
    vol[36:] = 0
    vol[:, :, 60:] = 0
    windows, tiles = _one_window_vs_tiles(trained_detector, vol, memory_budget_mb=1, skip_fill=True)
    _assert_same_findings(tiles, windows, at_least=2)
    # Several tiles ran, and cells whose receptive field is all fill were skipped.
    unskipped = WholeScanDetector(
        trained_detector.detector,
        _inference(trained_detector, mode="tiles", memory_budget_mb=1, skip_fill=False),
        fill_hu=0,
    )
    assert tiles["num_windows"] >= 4
    assert tiles["evaluated_voxels"] < _run(unskipped, vol)["evaluated_voxels"]
    for nodule in NODULES[:2]:
        assert _match(tiles, nodule) is not None


@pytest.mark.slow
@pytest.mark.parametrize("window,overlap", [(32, 8), (64, 16)])
def test_across_windows_both_paths_find_every_nodule(trained_detector, window, overlap):
    # Every nodule lies within this network's receptive field (48 voxels past its 16-voxel
    # block) of some window border, where a window sees zero padding and the whole scan does
    # not: the worst case. (54, 48, 28) sits 8 voxels from the border of its core window when
    # windows are 32^3 with an 8-voxel overlap. How far the windows' findings move there depends
    # on the trained weights, not on the paths (the tiles path is exact: the one-window tests),
    # so only what must hold for any model is asserted: both paths find every nodule. The same
    # fixture trained on two CPUs moved them by 0.01-4.0 voxels and 0.004-0.25 in score at
    # 64^3 windows (printed below).
    det = trained_detector.detector
    vol = _scan((64, 80, 72), NODULES, seed=2)
    outs = {
        mode: _run(
            WholeScanDetector(
                det,
                _inference(trained_detector, mode=mode, window_size=(window,) * 3, overlap=overlap),
            ),
            vol,
        )
        for mode in ("windows", "tiles")
    }
    assert outs["windows"]["num_windows"] > 1
    boxes, scores = [], []
    for nodule in NODULES:
        w, t = _match(outs["windows"], nodule), _match(outs["tiles"], nodule)
        assert w is not None and t is not None, nodule
        boxes.append(np.abs(outs["windows"]["boxes"][w] - outs["tiles"]["boxes"][t]).max())
        scores.append(abs(outs["windows"]["scores"][w] - outs["tiles"]["scores"][t]))
    print(
        f"windows {window}^3 / overlap {overlap} vs tiles at the nodules: box differences "
        f"{np.round(boxes, 2)} voxels, score differences {np.round(scores, 4)}"
    )


@pytest.mark.slow
def test_bfloat16_findings_stay_within_bounds_of_float32(trained_detector):
    det = trained_detector.detector
    vol = _scan((64, 80, 72), NODULES, seed=3)
    f32 = _run(WholeScanDetector(det, _inference(trained_detector)), vol)
    bf16 = _run(WholeScanDetector(det, _inference(trained_detector, precision="bfloat16")), vol)
    diffs = []
    for i in np.flatnonzero(f32["scores"] >= 0.5):
        dist = np.linalg.norm(bf16["boxes"][:, :3] - f32["boxes"][i, :3], axis=1)
        j = int(np.argmin(dist))
        assert dist[j] <= 1.0 and abs(bf16["boxes"][j, 3] - f32["boxes"][i, 3]) <= 1.0
        diffs.append(abs(bf16["scores"][j] - f32["scores"][i]))
    print("bfloat16 vs float32 score differences (findings >= 0.5):", np.round(diffs, 4))
    assert len(diffs) >= len(NODULES) and max(diffs) <= 0.05
    for nodule in NODULES:
        assert _match(bf16, nodule) is not None


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tiles", "windows"])
def test_skipping_fill_does_not_change_the_findings_of_a_trained_model(trained_detector, mode):
    det = trained_detector.detector
    vol = _scan((64, 80, 72), NODULES, seed=4)
    vol[:, :, 40:] = 0  # outside the "dilated lungs": the fill value; two nodules remain
    vol[36:, :, :] = 0
    outs = {}
    for skip in (True, False):
        inference = _inference(trained_detector, mode=mode, skip_fill=skip, memory_budget_mb=1)
        outs[skip] = _run(WholeScanDetector(det, inference, fill_hu=0), vol)
    assert outs[True]["num_detections"] == outs[False]["num_detections"]
    np.testing.assert_allclose(outs[True]["boxes"], outs[False]["boxes"], atol=1e-4)
    for key in ("scores", "rpn_scores", "fpr_scores"):
        np.testing.assert_allclose(outs[True][key], outs[False][key], atol=1e-5, err_msg=key)
    assert outs[True]["evaluated_voxels"] < outs[False]["evaluated_voxels"]
    for nodule in NODULES[:2]:
        assert _match(outs[True], nodule) is not None


@pytest.mark.slow
def test_abs_scan_search_finds_the_same_nodules_under_both_modes(trained_detector):
    # ABS and training's validation search scans with ScanScorer (training crop windows, or
    # tiles): both modes must run on a training detector and find the same nodules.
    from tf_agg3d.training.abs import ScanScorer

    vol = _scan((64, 80, 72), NODULES, seed=5)
    found = {}
    for mode in ("tiles", "windows"):
        config = dataclasses.replace(
            trained_detector.config,
            inference=_inference(trained_detector, mode=mode, memory_budget_mb=1),
        )
        scorer = ScanScorer(trained_detector.detector, config, overlap=8, proposal_threshold=0.1)
        boxes, scores = scorer.detect(vol, fill_hu=0)
        assert scorer._detectors[0.0].mode == mode
        assert len(scores) >= len(NODULES) and np.all(np.diff(scores) <= 0)
        found[mode] = {"boxes": boxes, "scores": scores}
    for nodule in NODULES:
        w, t = _match(found["windows"], nodule), _match(found["tiles"], nodule)
        assert w is not None and t is not None, nodule
        # The bounds of the 32^3-window comparison above (window borders inside the scan).
        assert np.abs(found["windows"]["boxes"][w] - found["tiles"]["boxes"][t]).max() <= 2.0
        assert abs(found["windows"]["scores"][w] - found["tiles"]["scores"][t]) <= 0.15

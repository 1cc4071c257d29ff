import csv
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from detector_fakes import BlobDetector, rpn_probability
from support import REPO, cache_meta

from tf_agg3d.config import ExperimentConfig, load_config, save_config
from tf_agg3d.data import cache
from tf_agg3d.heads.fpr_head import FPRHead
from tf_agg3d.heads.rpn_head import RPNHead
from tf_agg3d.inference.predictor import Predictor, scan_uid
from tf_agg3d.models.builder import build_detector
from tf_agg3d.models.checkpoints import CheckpointNotFoundError
from tf_agg3d.models.detector import Agg3DDetector
from tf_agg3d.models.loading import load_detector
from tf_agg3d.models.whole_scan import WholeScanDetector
from tf_agg3d.ops.roi_align import roi_align_3d

TINY = [
    "model.backbone.preblock_filters=4",
    "model.backbone.growth_rate=4",
    "model.backbone.transition_channels=[8,8,8]",
    "model.backbone.decoder_channels=8",
    "model.backbone.pyramid_channels=8",
    "model.fpr.hidden_units=8",
    "model.fpr.use_custom_op=false",
    "inference.window_size=[32,32,32]",
    "inference.overlap=8",
    "inference.window_batch_size=2",
]


def _meta(uid, affine, shape):
    return cache_meta(uid, shape, affine=affine, lung_mask="test")


def test_cache_entry_findings_map_to_world_through_a_flipped_affine(tmp_path):
    shape = (40, 48, 36)
    vol = np.full(shape, -800, np.int16)
    vol[8:12, 20:24, 28:32] = 500  # centre voxel (9.5, 21.5, 29.5)
    vol[28:32, 4:8, 4:8] = 350  # centre voxel (29.5, 5.5, 5.5)
    # Cache voxel (z, y, x, 1) -> world (x, y, z, 1): x and z flipped, 1 mm, non-zero origin.
    affine = np.array(
        [
            [0.0, 0.0, -1.0, 120.0],  # x = 120 - ix
            [0.0, 1.0, 0.0, -40.0],  # y = -40 + iy
            [-1.0, 0.0, 0.0, -300.0],  # z = -300 - iz
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    cache.write_entry(str(tmp_path), "flipped", vol, _meta("flipped", affine, shape))
    config = load_config(None, ["inference.window_size=[32,32,32]", "inference.overlap=8"])
    predictor = Predictor(detector=BlobDetector(), config=config)
    findings = predictor.predict_cache_entry(str(tmp_path), "flipped")
    assert [f.voxel_zyx for f in findings] == [(9.5, 21.5, 29.5), (29.5, 5.5, 5.5)]
    first, second = findings
    assert (first.x, first.y, first.z) == pytest.approx((120 - 29.5, -40 + 21.5, -300 - 9.5))
    assert (second.x, second.y, second.z) == pytest.approx((120 - 5.5, -40 + 5.5, -300 - 29.5))
    assert first.diameter_mm == pytest.approx(4.0)
    assert first.probability == pytest.approx(rpn_probability(500), rel=1e-5)
    assert first.fpr_score == first.rpn_score == first.probability
    assert predictor.last_stats.num_windows == 2 * 2 * 2
    row = first.as_row("flipped")
    assert list(row)[:5] == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]


def test_diameters_follow_the_affine_scale(tmp_path):
    shape = (32, 32, 32)
    vol = np.full(shape, -800, np.int16)
    vol[12:16, 12:16, 12:16] = 500
    affine = np.diag([0.0, 0.0, 0.0, 1.0])
    affine[0, 2], affine[1, 1], affine[2, 0] = 2.0, 2.0, -2.0  # 2 mm voxels
    cache.write_entry(str(tmp_path), "coarse", vol, _meta("coarse", affine, shape))
    config = load_config(None, ["inference.window_size=[32,32,32]", "inference.overlap=8"])
    (finding,) = Predictor(detector=BlobDetector(), config=config).predict_cache_entry(
        str(tmp_path), "coarse"
    )
    assert finding.diameter_mm == pytest.approx(8.0)
    assert (finding.x, finding.y, finding.z) == pytest.approx((27.0, 27.0, -27.0))


class OneAnchorRPN(RPNHead):
    """Forced RPN head: logit +8 at cell (1, 1, 1), anchor 0; -8 elsewhere; zero deltas."""

    def call(self, inputs, training=None):
        shape = tf.shape(inputs)
        grid = tf.concat([shape[:4], [self.num_anchors]], 0)
        one = tf.scatter_nd([[1, 1, 1, 0]], [16.0], grid[1:])
        logits = tf.broadcast_to(one[None] - 8.0, grid)
        return logits, tf.zeros(tf.concat([grid, [4]], 0))


class ConstantFPR(FPRHead):
    def call(self, inputs, training=None):
        return tf.zeros(tf.shape(inputs)[:1]) + 1.5


def _stub_detector(config, with_fpr):
    model = config.model
    model = dataclasses.replace(model, fpr=dataclasses.replace(model.fpr, enabled=with_fpr))
    base = build_detector(model)
    det = Agg3DDetector(
        backbone=base.backbone,
        rpn_heads=lambda stride, num_anchors: OneAnchorRPN(num_anchors, name=f"stub_{stride}"),
        fpr_head=ConstantFPR(8) if with_fpr else None,
        anchor_config=model.anchors,
        proposal_config=model.proposals,
        fpr_config=model.fpr,
        local_magnification=base.magnifier,
        hu_window=model.backbone.hu_window,
    )
    det.roi_align_fn = roi_align_3d
    return det


@pytest.mark.parametrize("overlap,with_fpr", [(8, False), (16, True)])
def test_real_detector_with_a_forced_rpn_head_is_stitched_by_window_cores(overlap, with_fpr):
    config = load_config(None, [*TINY, f"inference.overlap={overlap}", "inference.nms_iou=1.0"])
    det = _stub_detector(config, with_fpr)
    module = WholeScanDetector(det, config.inference)
    assert module.use_fpr == with_fpr
    out = {k: v.numpy() for k, v in module.detect(tf.constant(np.zeros((40, 60, 32)))).items()}
    # Every window proposes its local cell (1, 1, 1) of stride 4: centre 5.5, d = 4 mm (anchor
    # 0 of stride 4) -- and levels 8 and 16 likewise, at their own cell (1, 1, 1).
    step = 32 - overlap
    starts = [sorted({min(i * step, n - 32) for i in range(10)}) for n in (40, 60, 32)]
    expected = []

    def core(axis_starts, i):
        # Boundaries in the middle of each overlap (continuous coordinates), open at the ends.
        mid = [(a + b + 32) / 2 - 0.5 for a, b in zip(axis_starts, axis_starts[1:], strict=False)]
        return ([-np.inf, *mid][i], [*mid, np.inf][i])

    for stride, size in ((4, 4.0), (8, 8.0), (16, 16.0)):
        local = 1 * stride + (stride - 1) / 2
        for iz, z in enumerate(starts[0]):
            for iy, y in enumerate(starts[1]):
                for ix, x in enumerate(starts[2]):
                    c = np.array([z, y, x]) + local
                    bounds = [core(starts[a], i) for a, i in enumerate((iz, iy, ix))]
                    if all(lo <= v < hi for v, (lo, hi) in zip(c, bounds, strict=True)):
                        expected.append([*c, size])
    assert out["num_detections"] == len(expected) > 0
    got = sorted(map(tuple, out["boxes"].round(3)))
    assert got == sorted(map(tuple, np.round(expected, 3)))
    rpn = 1 / (1 + np.exp(-8.0))
    np.testing.assert_allclose(out["rpn_scores"], rpn, rtol=1e-5)
    fpr = 1 / (1 + np.exp(-1.5)) if with_fpr else rpn
    np.testing.assert_allclose(out["fpr_scores"], fpr, rtol=1e-5)
    np.testing.assert_allclose(out["scores"], (rpn + fpr) / 2, rtol=1e-5)


def _model_dir(tmp_path, overrides=()):
    config = load_config(None, [*TINY, *overrides])
    model_dir = tmp_path / "model"
    save_config(config, str(model_dir / "config.yaml"))
    det = build_detector(config.model)
    det(tf.zeros([1, 32, 32, 32, 1]), training=False)
    ckpt = tf.train.Checkpoint(model=det)
    manager = tf.train.CheckpointManager(ckpt, str(model_dir / "checkpoints"), max_to_keep=2)
    manager.save(checkpoint_number=7)
    return str(model_dir), det, config


def test_load_detector_restores_the_weights_and_names_a_dir_without_checkpoints(tmp_path):
    model_dir, det, config = _model_dir(tmp_path)
    loaded, loaded_config = load_detector(model_dir)
    assert loaded_config == config
    for a, b in zip(det.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    same, _ = load_detector(model_dir, checkpoint="7")
    assert len(same.weights) == len(det.weights)
    empty = tmp_path / "empty"
    save_config(config, str(empty / "config.yaml"))
    with pytest.raises(CheckpointNotFoundError, match="empty"):
        load_detector(str(empty))
    with pytest.raises(CheckpointNotFoundError, match="ckpt-99"):
        load_detector(model_dir, checkpoint="99")


def test_scan_uid_strips_image_extensions():
    assert scan_uid("/a/1.2.3.mhd") == "1.2.3"
    assert scan_uid("/a/case.nii.gz") == "case"
    assert scan_uid("/a/dicom_folder/") == "dicom_folder"


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tf_agg3d.predict", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.mark.slow
def test_cli_on_a_cache_writes_the_csv_and_goes_on_after_a_failing_scan(tmp_path):
    model_dir, _, _ = _model_dir(tmp_path)
    rng = np.random.default_rng(0)
    store = tmp_path / "cache"
    affine = np.array([[0, 0, 1, -10], [0, 1, 0, 20], [1, 0, 0, -200], [0, 0, 0, 1.0]])
    for uid, shape in (("scan.a", (36, 40, 32)), ("scan.b", (32, 32, 50))):
        vol = rng.integers(-1000, 200, shape).astype(np.int16)
        cache.write_entry(str(store), uid, vol, _meta(uid, affine, shape))
    (store / "broken.json").write_text("{not json")
    (store / "broken.npy").write_bytes(b"garbage")
    uids = tmp_path / "uids.csv"
    uids.write_text("scan.a\nbroken\nscan.b\nmissing\n")
    out = tmp_path / "pred" / "predictions.csv"
    proc = _cli(
        "--model-dir", model_dir, "--cache", str(store), "--seriesuids", str(uids),
        "--out", str(out), "--threshold", "0", "--max-marks", "5",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = _rows(out)
    assert rows[0] == [
        "seriesuid", "coordX", "coordY", "coordZ", "probability",
        "diameter_mm", "rpn_score", "fpr_score",
    ]  # fmt: skip
    per_scan = {}
    for row in rows[1:]:
        per_scan[row[0]] = per_scan.get(row[0], 0) + 1
        assert 0 <= float(row[4]) <= 1 and float(row[5]) > 0
    # Untrained weights at threshold 0 propose plenty: the cut to --max-marks is what limits.
    assert per_scan == {"scan.a": 5, "scan.b": 5}
    assert "broken" in proc.stderr and "FAILED" in proc.stderr and "missing" in proc.stderr
    # inference.mode is tiles by default: scan.a is one stem tile (it was 2 x 2 x 1 windows).
    assert "scan.a: 1 tile(s)" in proc.stderr


@pytest.mark.slow
def test_cli_on_a_scan_file_and_a_model_dir_without_checkpoint(tmp_path):
    from tf_agg3d.data.synthetic.luna16 import generate_dataset

    model_dir, _, _ = _model_dir(tmp_path, ["preprocess.crop_margin_mm=2"])
    summary = generate_dataset(str(tmp_path / "luna"), 1, seed=3, shape=(24, 96, 96))
    uid = summary["uids"][0]
    path = str(tmp_path / "luna" / "subset0" / f"{uid}.mhd")
    out = tmp_path / "scan.csv"
    proc = _cli("--model-dir", model_dir, "--scan", path, "--out", str(out), "--threshold", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out)
    assert len(rows) > 1 and {r[0] for r in rows[1:]} == {uid}
    assert len(rows) - 1 <= ExperimentConfig().inference.max_marks
    os.remove(os.path.join(model_dir, "checkpoints", "checkpoint"))
    proc = _cli("--model-dir", model_dir, "--scan", path, "--out", str(out))
    assert proc.returncode == 2
    assert "no checkpoint" in proc.stderr and model_dir in proc.stderr


def test_predict_scan_reads_preprocesses_and_maps_back_into_the_scan(tmp_path):
    from tf_agg3d.data.preprocessing.cache_entry import preprocess_scan
    from tf_agg3d.data.readers.sitk import read_scan
    from tf_agg3d.data.scan import world_to_voxel
    from tf_agg3d.data.synthetic.luna16 import generate_dataset

    summary = generate_dataset(str(tmp_path / "luna"), 2, seed=3, shape=(24, 96, 96))
    config = load_config(None, [*TINY, "inference.score_threshold=0.0", "inference.max_marks=7"])
    predictor = Predictor(detector=build_detector(config.model), config=config)
    for uid in summary["uids"]:
        subset = summary["subset"][uid]
        path = str(tmp_path / "luna" / f"subset{subset}" / f"{uid}.mhd")
        got_uid, findings = predictor.predict_scan(path)
        assert got_uid == uid
        assert 0 < len(findings) <= 7
        # World mm through the preprocessed volume's affine (flipped scans included) ...
        scan = read_scan(path)
        _, meta = preprocess_scan(scan, None, config.preprocess)
        xyz = np.array([(f.x, f.y, f.z) for f in findings])
        zyx = np.array([f.voxel_zyx for f in findings])
        np.testing.assert_allclose(xyz, cache.cache_voxel_to_world(meta, zyx), atol=1e-6)
        # ... which lands in the original scan (up to the 32-voxel padding of small volumes).
        back = world_to_voxel(scan, xyz) * np.asarray(scan.spacing)[::-1]
        extent = np.array(scan.shape) * np.asarray(scan.spacing)[::-1]
        assert np.all(back > -1.0) and np.all(back < extent + 32.0)
    assert summary["flipped_uids"], "the case must include a flipped scan"


def test_predict_scan_with_the_luna16_mask_equals_the_cache_path(tmp_path):
    from tf_agg3d.data.preprocessing.runner import ScanJob, preprocess_one
    from tf_agg3d.data.synthetic.luna16 import generate_dataset

    root = tmp_path / "luna"
    summary = generate_dataset(str(root), 2, seed=5, shape=(24, 96, 96))
    config = load_config(None, [*TINY, "inference.score_threshold=0.0", "inference.max_marks=7"])
    predictor = Predictor(detector=build_detector(config.model), config=config)
    for uid in summary["uids"]:
        path = str(root / f"subset{summary['subset'][uid]}" / f"{uid}.mhd")
        mask = str(root / "seg-lungs-LUNA16" / f"{uid}.mhd")
        # The cache entry of the same scan and mask (no annotations, as prediction has none).
        job = ScanJob(uid=uid, scan_path=path, subset=None, mask_path=mask)
        assert preprocess_one(job, str(tmp_path / "cache"), config.preprocess).ok
        _, direct = predictor.predict_scan(path, mask)
        cached = predictor.predict_cache_entry(str(tmp_path / "cache"), uid)
        assert len(direct) == len(cached) > 0
        for a, b in zip(direct, cached, strict=True):
            np.testing.assert_allclose(
                [a.x, a.y, a.z, a.probability], [b.x, b.y, b.z, b.probability], atol=1e-5
            )


@pytest.mark.slow
def test_cli_on_a_luna16_root_with_subsets_and_a_missing_seriesuid(tmp_path):
    from tf_agg3d.data.synthetic.luna16 import generate_dataset

    model_dir, _, _ = _model_dir(tmp_path, ["preprocess.crop_margin_mm=2"])
    root = tmp_path / "luna"
    summary = generate_dataset(str(root), 3, seed=3, shape=(24, 96, 96))
    first, second = summary["uids"][:2]
    subset = summary["subset"][first]
    uids = tmp_path / "uids.csv"
    uids.write_text(f"{first}\n{second}\n1.2.3.missing\n")
    out = tmp_path / "luna.csv"
    proc = _cli(
        "--model-dir", model_dir, "--luna-root", str(root), "--subsets", str(subset),
        "--seriesuids", str(uids), "--out", str(out), "--threshold", "0", "--max-marks", "3",
    )  # fmt: skip
    # The second scan is in another subset and the third nowhere: both fail, the first is kept.
    assert summary["subset"][second] != subset
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert {r[0] for r in _rows(out)[1:]} == {first}
    assert f"no subset*/{second}.mhd" in proc.stderr and "1.2.3.missing" in proc.stderr
    proc = _cli("--model-dir", model_dir, "--subsets", "0", "--scan", "x.mhd", "--out", str(out))
    assert proc.returncode != 0 and "--subsets needs --luna-root" in proc.stderr

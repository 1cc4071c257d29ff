"""Smoke subset: import, build the model, one train step, one whole-scan predict.

CI runs these (``-m smoke``) against the newest TensorFlow that ``tensorflow>=2.16,<2.22``
admits, without tensorflow-io, so the declared range stays true. They run in the main suite too.
"""

import importlib
import json
import os
import pkgutil

import numpy as np
import pytest

import tf_agg3d
from tf_agg3d.config import load_config

pytestmark = pytest.mark.smoke

# Modules that need tensorflow-serving-api, an install-time dependency the smoke env leaves out.
_NEEDS_SERVING_API = (
    "tf_agg3d.serving.client",
    "tf_agg3d.serving.dev_server",
    "tf_agg3d.serving.protos",
    "tf_agg3d.serving.servables",
    "tf_agg3d.serving.servicers",
)

TINY = [
    "data.crop_size=[32, 32, 32]",
    "data.batch_size=1",
    "data.num_parallel_calls=1",
    "model.backbone.preblock_filters=4",
    "model.backbone.growth_rate=4",
    "model.backbone.layers_per_block=1",
    "model.backbone.bottleneck_width=1",
    "model.backbone.transition_channels=[8, 8, 8]",
    "model.backbone.detector_layers=1",
    "model.backbone.decoder_channels=8",
    "model.backbone.pyramid_channels=8",
    "model.fpr.hidden_units=8",
    "model.fpr.magnify_stages=1",
    "model.fpr.magnify_layers_per_stage=1",
    "model.proposals.max_proposals=4",
    "model.proposals.pre_nms_top_k=32",
    "train.max_steps=1",
    "train.checkpoint_every_steps=1",
    "train.val_max_scans=0",
    "inference.window_size=[32, 32, 32]",
    "inference.overlap=8",
    "inference.score_threshold=0.0",
]


def _serving_api_available():
    return importlib.util.find_spec("tensorflow_serving") is not None


def _is_entry_point(module_info) -> bool:
    # absl entry points define their flags at import; two of them cannot share one process.
    path = os.path.join(module_info.module_finder.path, module_info.name.rsplit(".", 1)[-1] + ".py")
    with open(path, encoding="utf-8") as f:
        return "\nflags.DEFINE_" in f.read()


def test_every_module_imports_without_tensorflow_io():
    skip = () if _serving_api_available() else _NEEDS_SERVING_API
    names = [
        m.name
        for m in pkgutil.walk_packages(tf_agg3d.__path__, "tf_agg3d.")
        if not m.name.startswith(skip) and (m.ispkg or not _is_entry_point(m))
    ]
    assert len(names) > 40
    for name in names:
        importlib.import_module(name)


def _write_cache(cache_dir, n=2, shape=(40, 48, 48)):
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    os.makedirs(cache_dir)
    for i in range(n):
        vol = np.full(shape, -800, np.int16)
        c = rng.uniform(12, np.asarray(shape) - 12)
        vol[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 16] = 100
        uid = f"smoke{i}"
        np.save(os.path.join(cache_dir, f"{uid}.npy"), vol)
        meta = {
            "affine": np.eye(4).tolist(),
            "shape": list(shape),
            "nodules": [{"z": c[0], "y": c[1], "x": c[2], "d": 8.0}],
            "excluded": [],
            "origin": [0.0, 0.0, 0.0],
            "spacing": [1.0, 1.0, 1.0],
            "direction": np.eye(3).ravel().tolist(),
            "seriesuid": uid,
            "subset": i,
            "lung_mask": "threshold",
            "hu_window": [-1200, 600],
            "fill_hu": 0,
            "source": "smoke",
        }
        with open(os.path.join(cache_dir, f"{uid}.json"), "w") as f:
            json.dump(meta, f)


def test_build_train_one_step_and_predict(tmp_path):
    from tf_agg3d.inference.predictor import Predictor
    from tf_agg3d.models.builder import build_detector
    from tf_agg3d.training.trainer import train

    cache = str(tmp_path / "cache")
    _write_cache(cache)
    config = load_config(None, [*TINY, f"data.cache_dir={cache}"])
    detector = build_detector(config.model)
    outputs = detector(np.zeros((1, 32, 32, 32, 1), np.float32))
    assert outputs["rpn_logits"][4].shape == (1, 8, 8, 8, 2)

    model_dir = str(tmp_path / "model")
    for phase in ("rpn", "joint"):
        config.train.phase = phase
        summary = train(config, model_dir)
        assert summary["final_step"] == 1, phase
        assert np.isfinite(summary["last_losses"]["loss"]), phase

    findings = Predictor(model_dir).predict_cache_entry(cache, "smoke0")
    assert findings, "threshold 0 must give findings"
    for f in findings:
        assert 0.0 <= f.probability <= 1.0
        assert np.isfinite([f.x, f.y, f.z, f.diameter_mm]).all()

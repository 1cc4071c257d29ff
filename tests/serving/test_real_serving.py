"""The real (tiny) detector served by the development server: a whole scan, round trip.

Marked slow: it shares the session's real export (tens of seconds on a shared CPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tf_agg3d.data.preprocessing.cache_entry import preprocess_scan
from tf_agg3d.data.readers.sitk import read_scan
from tf_agg3d.inference.predictor import findings_from_detections
from tf_agg3d.serving.client import Agg3DClient

pytestmark = pytest.mark.slow


def test_a_whole_scan_round_trip_equals_in_process_inference(real_model, real_server, scan_path):
    scan = read_scan(scan_path)
    volume, meta = preprocess_scan(scan, None, real_model.config.preprocess)
    local = {k: v.numpy() for k, v in real_model.whole_scan.detect(tf.constant(volume)).items()}
    expected = findings_from_detections(local, meta["affine"])
    assert len(expected) > 0

    with Agg3DClient(real_server.target, deadline_s=300) as client:
        assert client.wait_until_ready(timeout_s=60) == 1
        info = client.model_info()
        assert info["config_yaml"].count("window_size") == 1
        assert client.preprocess_config() == real_model.config.preprocess
        findings = client.detect(scan_path)
        [result] = client.detect_many([scan_path], max_concurrency=1)

    assert len(findings) == len(expected)
    assert result.findings == findings and result.seriesuid == "phantom-1"
    for got, want in zip(findings, expected, strict=True):
        np.testing.assert_allclose(
            [got.x, got.y, got.z, got.diameter_mm],
            [want.x, want.y, want.z, want.diameter_mm],
            atol=1e-4,
        )
        np.testing.assert_allclose(
            [got.probability, got.rpn_score, got.fpr_score],
            [want.probability, want.rpn_score, want.fpr_score],
            atol=1e-5,
        )

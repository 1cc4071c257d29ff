"""The detector gives the same FPRN outputs and gradients with the custom op and pure-TF paths."""

import numpy as np
import pytest
import tensorflow as tf
from support import SMALL_BACKBONE

from tf_agg3d.config import FPRConfig, ModelConfig, ProposalConfig
from tf_agg3d.models.builder import build_detector
from tf_agg3d.ops.roi_align import roi_align_3d
from tf_agg3d.ops.roi_align_op import custom_op_available, roi_align_3d_fast

pytestmark = pytest.mark.skipif(not custom_op_available(), reason="custom op not built (make op)")


@pytest.mark.parametrize("magnify", [True, False])
def test_custom_op_and_pure_tf_paths_agree_in_outputs_and_gradients(magnify):
    cfg = ModelConfig(
        backbone=SMALL_BACKBONE,
        fpr=FPRConfig(local_magnification=magnify),
        proposals=ProposalConfig(score_threshold=0.0, max_proposals=8, pre_nms_top_k=64),
    )
    det = build_detector(cfg)
    rng = np.random.default_rng(3)
    vol = tf.constant(rng.uniform(-1000, 400, (2, 32, 32, 32, 1)).astype("float32"))
    det(vol)
    feats = det.features(vol)
    logits, deltas = det.rpn(feats)
    props = det.propose(logits, deltas, (32, 32, 32))
    assert bool(tf.reduce_any(props["valid"]))

    def run(fn):
        det.roi_align_fn = fn
        with tf.GradientTape() as tape:
            out = det.classify(det.features(vol), props["boxes"], props["levels"], props["valid"])
            loss = tf.reduce_sum(out * tf.cast(props["valid"], out.dtype))
        grads = tape.gradient(loss, det.trainable_variables)
        return out.numpy(), [None if g is None else tf.convert_to_tensor(g).numpy() for g in grads]

    fast_out, fast_grads = run(roi_align_3d_fast)
    ref_out, ref_grads = run(roi_align_3d)
    np.testing.assert_allclose(fast_out, ref_out, atol=1e-5)
    compared = 0
    for g_fast, g_ref in zip(fast_grads, ref_grads, strict=True):
        assert (g_fast is None) == (g_ref is None)
        if g_ref is not None:
            np.testing.assert_allclose(g_fast, g_ref, atol=1e-4, rtol=1e-4)
            compared += 1
    assert compared > 10, "gradients must reach the backbone through RoI Align"

"""Every detector weight reaches a tf.train.Checkpoint, and a restore reproduces the outputs.

Keras 3 layers kept in Python lists are invisible to TensorFlow's object graph unless tracked
explicitly (tf_agg3d.layers.tracking); this guards every list-holding layer of the model.
"""

import dataclasses

import numpy as np
import tensorflow as tf
from support import SMALL_BACKBONE

from tf_agg3d.config import FPRConfig, ModelConfig, ProposalConfig
from tf_agg3d.models.builder import build_detector

# Two layers a dense block and two detector layers: every list-holding layer holds several.
SMALL = dataclasses.replace(SMALL_BACKBONE, layers_per_block=2, detector_layers=2)


def _detector(seed):
    tf.keras.utils.set_random_seed(seed)
    cfg = ModelConfig(
        backbone=SMALL,
        fpr=FPRConfig(use_custom_op=False),
        proposals=ProposalConfig(score_threshold=0.0, max_proposals=4, pre_nms_top_k=32),
    )
    det = build_detector(cfg)
    det(tf.zeros([1, 32, 32, 32, 1]))
    return det


def test_checkpoint_holds_every_weight_and_restores_outputs(tmp_path):
    source = _detector(seed=1)
    path = tf.train.Checkpoint(model=source).save(str(tmp_path / "ckpt"))
    saved = [n for n, _ in tf.train.list_variables(path) if n.startswith("model/")]
    assert len(saved) == len(source.weights)

    target = _detector(seed=2)
    vol = tf.constant(np.random.default_rng(0).uniform(-1000, 300, (1, 32, 32, 32, 1)), tf.float32)
    before = target(vol)["rpn_logits"][4].numpy()
    tf.train.Checkpoint(model=target).restore(path).assert_consumed()
    for a, b in zip(source.weights, target.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    after = target(vol)
    assert not np.allclose(before, after["rpn_logits"][4].numpy())
    expected = source(vol)
    for key in ("scores", "fpr_logits", "boxes"):
        np.testing.assert_allclose(after[key].numpy(), expected[key].numpy(), atol=1e-5)

"""DenseUNet3D: pyramid shapes, Table I parameter count, serialization."""

import dataclasses

import numpy as np
import pytest
from support import SMALL_BACKBONE, keras_roundtrip

from tf_agg3d.backbones.dense_unet3d import DenseUNet3D
from tf_agg3d.config import BackboneConfig

# The full Table I configuration (BackboneConfig defaults); documented in the module docstring.
TABLE_I_BACKBONE_PARAMS = 552_840
TABLE_I_BACKBONE_TRAINABLE = 547_544


def small():
    return DenseUNet3D.from_backbone_config(dataclasses.replace(SMALL_BACKBONE, pyramid_channels=6))


@pytest.mark.parametrize("side", [32, 64])
def test_pyramid_shapes(side):
    net = small()
    out = net(np.zeros((1, side, side, side, 1), "float32"))
    assert sorted(out) == [4, 8, 16] == list(net.strides)
    for s, t in out.items():
        assert t.shape == (1, side // s, side // s, side // s, 6)
    assert net.compute_output_shape((1, side, side, side, 1))[8] == (
        1,
        side // 8,
        side // 8,
        side // 8,
        6,
    )


def test_table_i_parameter_count():
    net = DenseUNet3D.from_backbone_config(BackboneConfig())
    net.build((None, None, None, None, 1))
    trainable = sum(int(np.prod(w.shape)) for w in net.trainable_weights)
    print(f"DenseUNet3D Table I parameters: {net.count_params():,} ({trainable:,} trainable)")
    assert net.count_params() == TABLE_I_BACKBONE_PARAMS
    assert trainable == TABLE_I_BACKBONE_TRAINABLE


def test_full_config_pyramid_channels():
    net = DenseUNet3D.from_backbone_config(BackboneConfig())
    out = net(np.zeros((1, 32, 32, 32, 1), "float32"))
    assert {s: t.shape[-1] for s, t in out.items()} == {4: 32, 8: 32, 16: 32}


def test_serialization_roundtrip(tmp_path):
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 32, 1)).astype("float32")
    ref, out = keras_roundtrip(small(), x, str(tmp_path / "backbone.keras"))
    for s in ref:
        np.testing.assert_allclose(out[s].numpy(), ref[s].numpy(), atol=1e-5)

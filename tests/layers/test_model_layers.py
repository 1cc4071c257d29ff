"""Dense blocks, HU normalisation, Diameter Alignment and Local Magnification."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import identity_like_magnifier

from tf_agg3d.layers.dense_block import DenseBlock, DenseLayer, Transition
from tf_agg3d.layers.diameter_alignment import (
    DiameterAlignment,
    feature_to_voxel,
    voxel_to_feature,
)
from tf_agg3d.layers.hu_normalization import HUNormalization
from tf_agg3d.layers.local_magnification import (
    LocalMagnification,
    gather_patches,
    magnified_boxes,
)


def _roundtrip(layer, input_shape, tmp_path, seed=0):
    """get_config/from_config and .keras save/load through a functional wrapper."""
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    inp = keras.Input(input_shape)
    model = keras.Model(inp, layer(inp))
    x = np.random.default_rng(seed).normal(size=(2, *input_shape)).astype("float32")
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_dense_layer_block_transition_shapes():
    x = tf.zeros([1, 8, 8, 8, 12])
    assert DenseLayer(16, 4)(x).shape == (1, 8, 8, 8, 16)
    assert DenseBlock(2, 16, 4)(x).shape == (1, 8, 8, 8, 12 + 32)
    assert Transition(64)(x).shape == (1, 4, 4, 4, 64)
    assert Transition(32, pool=False)(x).shape == (1, 8, 8, 8, 32)
    block = DenseBlock(2, 16, 4)
    block.build((None, None, None, None, 12))
    # 2 x (BN 12|28 + conv 12|28->64 + BN 64 + conv 3^3 64->16), BN counted with moving stats.
    expected = sum(4 * c + c * 64 + 4 * 64 + 27 * 64 * 16 for c in (12, 28))
    assert block.count_params() == expected


def test_sync_batch_norm_option():
    layer = DenseLayer(4, 2, sync_batch_norm=True)
    layer.build((None, None, None, None, 3))
    assert layer.bn1.synchronized and layer.bn2.synchronized


@pytest.mark.parametrize(
    "layer, shape",
    [
        (DenseLayer(4, 2), (4, 4, 4, 3)),
        (DenseBlock(2, 4, 2), (4, 4, 4, 3)),
        (Transition(5), (4, 4, 4, 3)),
        (HUNormalization(), (4, 4, 4, 1)),
        (
            LocalMagnification(channels=6, num_stages=2, layers_per_stage=1, growth_rate=4),
            (3, 3, 3, 6),
        ),
        (
            LocalMagnification(
                channels=6, num_stages=2, layers_per_stage=1, growth_rate=4, deconv_stride=2
            ),
            (2, 2, 2, 6),
        ),
    ],
    ids=["dense_layer", "dense_block", "transition", "hu", "magnify_table1", "magnify_patch"],
)
def test_layer_serialization(layer, shape, tmp_path):
    _roundtrip(layer, shape, tmp_path)


def test_hu_normalization_window():
    hu = np.array([-3000.0, -1200.0, -300.0, 600.0, 2000.0], "float32").reshape(1, 5, 1, 1, 1)
    out = HUNormalization(-1200.0, 600.0)(hu).numpy().ravel()
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)
    with pytest.raises(ValueError):
        HUNormalization(10.0, 10.0)


@pytest.mark.parametrize("ref_index", [0, 1, 2])
@pytest.mark.parametrize("aligned", [True, False])
def test_diameter_alignment_crop_size_and_centre(ref_index, aligned):
    strides = (4, 8, 16)
    da = DiameterAlignment(strides, diameter_alignment=aligned, margin_cells=0.0)
    boxes = tf.constant([[40.3, 51.0, 62.7, 13.0], [10.0, 20.0, 30.0, 7.0]])
    levels = tf.constant([ref_index, ref_index])
    crops = da(boxes, levels)
    s_ref = strides[ref_index]
    for s in strides:
        c = crops[s].numpy()
        cells = c[:, 3:] - c[:, :3]
        expect_cells = boxes.numpy()[:, 3] / (s_ref if aligned else s)
        np.testing.assert_allclose(cells, np.repeat(expect_cells[:, None], 3, 1), rtol=1e-5)
        # The same centre in input voxels on every level.
        centre = feature_to_voxel((c[:, :3] + c[:, 3:]) / 2.0, s)
        np.testing.assert_allclose(centre, boxes.numpy()[:, :3], atol=1e-4)
        # Its span in input voxels: n * s (DA) or d (standard).
        span = cells[:, 0] * s
        d = boxes.numpy()[:, 3]
        np.testing.assert_allclose(span, d * s / s_ref if aligned else d, rtol=1e-5)


def test_diameter_alignment_margin_and_config():
    da = DiameterAlignment((4, 8), margin_cells=1.5)
    crops = da(tf.constant([[20.0, 20.0, 20.0, 8.0]]), tf.constant([1]))
    # n = 8 / 8 = 1 cell on both levels, plus 1.5 cells on each side.
    for s in (4, 8):
        np.testing.assert_allclose(crops[s][0, 3] - crops[s][0, 0], 4.0, rtol=1e-6)
    assert DiameterAlignment.from_config(da.get_config()).get_config() == da.get_config()
    # Anchor convention: the centre of cell j of stride s is input voxel j*s + (s-1)/2.
    np.testing.assert_allclose(voxel_to_feature(tf.constant(3 * 8 + 3.5), 8), 3.5)


def test_gather_patches_values_and_zero_outside():
    grid = np.arange(6)
    z, y, x = np.meshgrid(grid, grid, grid, indexing="ij")
    feats = np.stack([z * 100 + y * 10 + x, -(z * 100 + y * 10 + x)], -1).astype("float32")
    feats = np.stack([feats, feats + 1000])  # [2, 6, 6, 6, 2]
    centres = tf.constant([[3.0, 3.2, 2.9], [0.3, 5.5, 3.0]])
    patches, origin = gather_patches(tf.constant(feats), centres, tf.constant([1, 0]), 4)
    np.testing.assert_array_equal(origin.numpy(), [[1, 1, 1], [-2, 4, 1]])
    np.testing.assert_array_equal(patches[0].numpy(), feats[1, 1:5, 1:5, 1:5])
    # Second patch: z in [-2, 2), y in [4, 8): cells outside the map are zero.
    expected = np.zeros((4, 4, 4, 2), "float32")
    expected[2:, :2] = feats[0, 0:2, 4:6, 1:5]
    np.testing.assert_array_equal(patches[1].numpy(), expected)
    boxes = tf.constant([[2.0, 2.5, 1.0, 3.0, 3.5, 6.0]])
    mb = magnified_boxes(boxes, tf.constant([[1.0, 1.0, 1.0]]), 4, 4)
    np.testing.assert_allclose(mb.numpy(), [[4.0, 6.0, 0.0, 8.0, 10.0, 16.0]])


@pytest.mark.parametrize(
    "stride, cells, out_cells, scale, offset", [(1, 3, 5, 1, 1.0), (2, 4, 16, 4, 0.0)]
)
def test_local_magnification_shape_and_single_weight_set(stride, cells, out_cells, scale, offset):
    """table1 (stride 1): 3^3 -> 5^3 (Table I's Magnify Output); patch (stride 2): 4^3 -> 16^3."""
    lm = LocalMagnification(
        num_stages=2, layers_per_stage=2, growth_rate=4, bottleneck_width=2, deconv_stride=stride
    )
    level_a = tf.random.normal([3, cells, cells, cells, 8])
    level_b = tf.random.normal([5, cells, cells, cells, 8])
    out = lm(tf.concat([level_a, level_b], 0))
    assert out.shape == (8, out_cells, out_cells, out_cells, 8)
    assert lm.output_cells(cells) == out_cells and lm.scale == scale and lm.offset == offset
    assert lm.compute_output_shape((None, cells, cells, cells, 8)) == (None, *[out_cells] * 3, 8)
    n_vars = len(lm.weights)
    # Applying it again to another level's crops creates no variables: one set for all levels.
    np.testing.assert_allclose(lm(level_b).numpy(), out[3:].numpy(), atol=1e-5)
    assert len(lm.weights) == n_vars


def test_local_magnification_defaults_to_table1_and_old_configs_load_as_patch():
    assert LocalMagnification().deconv_stride == 1
    config = LocalMagnification(num_stages=2).get_config()
    assert config["deconv_stride"] == 1
    del config["deconv_stride"]  # a layer saved before the table1 variant existed
    assert LocalMagnification.from_config(config).deconv_stride == 2
    with pytest.raises(ValueError, match="deconv_stride"):
        LocalMagnification(deconv_stride=3)


def _affine_field(n, origin=(0.0, 0.0, 0.0)):
    """[1, n, n, n, 3]: per cell, its centre's continuous coordinate (j + 0.5) + 10 per axis
    plus `origin` (all positive, so the identity-like ReLUs pass them)."""
    c = np.arange(n) + 0.5
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    field = np.stack([z, y, x], -1) + np.asarray(origin, "float32") + 10.0
    return field[None].astype("float32")


@pytest.mark.parametrize("stages", [1, 2])
def test_table1_magnifier_coordinate_map_on_an_affine_field(stages):
    """Stride-1 stages: output cell i stands for input coordinate (i + 0.5 - offset) / scale with
    scale 1 and offset stages / 2; checked on every output cell whose receptive field lies inside
    the input (the others also see the zeros beyond the crop)."""
    n = 7
    lm = identity_like_magnifier(
        LocalMagnification(
            num_stages=stages, layers_per_stage=1, growth_rate=2, bottleneck_width=1
        ),
        3,
        1,
    )
    assert lm.scale == 1 and lm.offset == stages / 2
    out = lm(_affine_field(n), training=False).numpy()[0]
    q = lm.output_cells(n)
    assert out.shape == (q, q, q, 3) and q == n + stages
    inner = slice(stages, q - stages)  # cells fed by input cells only
    u = np.arange(q) + 0.5
    v = (u - lm.offset) / lm.scale + 10.0
    z, y, x = np.meshgrid(v, v, v, indexing="ij")
    expected = np.stack([z, y, x], -1)
    np.testing.assert_allclose(out[inner, inner, inner], expected[inner, inner, inner], atol=1e-4)
    # Table I: a 3^3 crop gives the 5^3 "Magnify Output"; its centre cell is the crop's centre.
    lm3 = identity_like_magnifier(
        LocalMagnification(num_stages=2, layers_per_stage=1, growth_rate=2, bottleneck_width=1),
        3,
        1,
    )
    out3 = lm3(_affine_field(3), training=False).numpy()[0]
    assert out3.shape == (5, 5, 5, 3)
    np.testing.assert_allclose(out3[2, 2, 2], [11.5, 11.5, 11.5], atol=1e-4)


def test_patch_magnifier_coordinate_map_on_an_affine_field():
    """Stride-2 stages: input cell [j, j+1) becomes output cells [4j, 4j + 4), u = 4 v."""
    lm = identity_like_magnifier(
        LocalMagnification(
            num_stages=2, layers_per_stage=1, growth_rate=2, bottleneck_width=1, deconv_stride=2
        ),
        3,
        2,
    )
    inp = _affine_field(3)
    out = lm(inp, training=False).numpy()[0]
    assert out.shape == (12, 12, 12, 3) and lm.scale == 4 and lm.offset == 0.0
    # Each input cell is replicated over its 4^3 block, whose centre is 4 * (j + 0.5).
    expected = np.repeat(np.repeat(np.repeat(inp[0], 4, 0), 4, 1), 4, 2)
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_magnified_boxes_maps_aligned_crops_into_the_5_cube():
    """table1: level coordinate b -> b - origin + 1, clipped to [0, 5]; patch: 4 (b - origin)."""
    boxes = tf.constant([[9.25, 4.5, 0.0, 12.25, 7.5, 3.5]])
    origin = tf.constant([[9.0, 5.0, 0.0]])
    table1 = magnified_boxes(boxes, origin, 3, 1, 1.0, 5)
    np.testing.assert_allclose(table1.numpy(), [[1.25, 0.5, 1.0, 4.25, 3.5, 4.5]])
    patch = magnified_boxes(boxes, origin, 4, 4)
    np.testing.assert_allclose(patch.numpy(), [[1.0, 0.0, 0.0, 13.0, 10.0, 14.0]])
    # Parts beyond the 5^3 output are clipped.
    wide = magnified_boxes(tf.constant([[7.0, 7.0, 7.0, 13.0, 13.0, 13.0]]), origin, 3, 1, 1.0, 5)
    np.testing.assert_allclose(wide.numpy(), [[0.0, 3.0, 5.0, 5.0, 5.0, 5.0]])


def test_gather_patches_table1_crop_is_the_centre_cell_and_one_cell_margin():
    feats = tf.constant(_affine_field(8))
    centres = tf.constant([[3.2, 3.9, 0.4]])
    patches, origin = gather_patches(feats, centres, tf.constant([0]), 3)
    np.testing.assert_array_equal(origin.numpy(), [[2, 2, -1]])
    np.testing.assert_array_equal(patches[0, :, :, 1:].numpy(), feats[0, 2:5, 2:5, 0:2].numpy())
    assert np.all(patches[0, :, :, 0].numpy() == 0)  # the cell left of the map reads zero

"""The tiled backbone: derived receptive field, exact tiles, exact fill skipping, the tile plan."""

import itertools

import numpy as np
import pytest
import tensorflow as tf
from detector_fakes import BlobDetector

from tf_agg3d.backbones.dense_unet3d import DenseUNet3D
from tf_agg3d.layers.hu_normalization import HUNormalization
from tf_agg3d.models.inference_backbone import InferenceBackbone, supports
from tf_agg3d.models.receptive_field import receptive_field, stem_halo, stem_radius
from tf_agg3d.models.tiled_backbone import plan_tiles, tiled_stem


def _backbone(layers_per_block=2, detector_layers=2, seed=0):
    """Few channels, the given layer counts, random BatchNorm statistics (so folding matters)."""
    tf.keras.utils.set_random_seed(seed)
    net = DenseUNet3D(
        preblock_filters=4,
        growth_rate=4,
        layers_per_block=layers_per_block,
        bottleneck_width=1,
        transition_channels=(8, 8, 8),
        detector_layers=detector_layers,
        decoder_channels=8,
        pyramid_channels=8,
    )
    net.build((None, None, None, None, 1))
    rng = np.random.default_rng(seed)
    for v in net.variables:
        if v.path.endswith(("moving_mean", "beta")):
            v.assign(rng.normal(0, 0.2, v.shape).astype("float32"))
        elif v.path.endswith(("moving_variance", "gamma")):
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
    return net


def _volume(shape, seed=0, fill_from_x=None, fill=0):
    vol = np.random.default_rng(seed).integers(-1100, 500, shape).astype(np.float32)
    if fill_from_x is not None:
        vol[..., fill_from_x:] = fill
    return vol


def test_receptive_field_of_the_papers_network_and_of_the_tiny_one():
    paper = DenseUNet3D()
    assert receptive_field(paper) == {4: 94, 8: 78, 16: 62}
    assert stem_radius(paper) == 6 and stem_halo(paper) == 8
    tiny = DenseUNet3D(layers_per_block=1, detector_layers=1)
    assert receptive_field(tiny) == {4: 48, 8: 48, 16: 32}
    assert stem_radius(tiny) == 4 and stem_halo(tiny) == 4


def _monotone(net):
    """Positive kernels, no biases, identity BatchNorm: on an all-zero input every activation
    is 0, and a positive input voxel makes every output in its receptive field positive (each
    path is a product of positive weights through active ReLUs), so the dependency seen is
    exactly the structural one, with no cancellation or dead unit hiding an edge."""
    for v in net.variables:
        name = v.path.rsplit("/", 1)[-1]
        if name == "kernel":
            v.assign(tf.abs(v) + 0.01)
        elif name in ("bias", "beta", "moving_mean"):
            v.assign(tf.zeros_like(v))
        elif name in ("gamma", "moving_variance"):
            v.assign(tf.ones_like(v))
    return net


def test_the_derived_receptive_field_is_exact_and_tight():
    # One axis of 224 voxels; the outputs of the 16-voxel block [96, 112) on every level must
    # see a voxel plane at distance r from the block, and not one at distance r + 1.
    net = _monotone(_backbone())
    inference = InferenceBackbone(net, HUNormalization(-1200.0, 600.0))
    lo, hi = 96, 111
    radii = receptive_field(net)

    def reached(x, stride):
        vol = np.full((1, 16, 16, 224), -1200.0, np.float32)  # normalised to 0
        vol[..., x] = 600.0
        out = net(inference.normalize(tf.constant(vol)))[stride].numpy()
        return bool(np.any(out[:, :, :, lo // stride : (hi + 1) // stride] > 0))

    for stride, r in radii.items():
        assert reached(lo - r, stride) and reached(hi + r, stride), (stride, r)
        assert not reached(lo - r - 1, stride) and not reached(hi + r + 1, stride), (stride, r)

    # The stem alone: a stride-4 cell [4q, 4q + 4) sees voxels [4q - 6, 4q + 9].
    r = stem_radius(net)
    q = 10
    for x, seen in [
        (4 * q - r, True),
        (4 * q - r - 1, False),
        (4 * q + 3 + r, True),
        (4 * q + 4 + r, False),
    ]:
        vol = np.full((1, 16, 16, 224), -1200.0, np.float32)
        vol[..., x] = 600.0
        out = inference.stem(tf.constant(vol)).numpy()
        assert bool(np.any(out[:, :, :, q] > 0)) == seen, x


@pytest.mark.parametrize("skip_fill", [False, True])
def test_stem_tiles_equal_one_whole_volume_pass(skip_fill):
    net = _backbone(seed=2)
    norm = HUNormalization(-1200.0, 600.0)
    inference = InferenceBackbone(net, norm)
    padded = _volume((48, 64, 80), seed=3, fill_from_x=44)  # x >= 44: the fill value
    budget = 20_000  # voxels: forces several tiles on every axis
    plan = plan_tiles(tf.constant(padded.shape), inference.stem_halo, budget)
    counts = plan["counts"].numpy()
    assert np.all(counts > 1) and int(plan["largest_region"]) <= budget
    stem, stats = tiled_stem(
        inference, tf.constant(padded), plan, 0.0, tf.float32, skip_fill=skip_fill
    )
    whole = inference.stem(tf.constant(padded)[None])
    np.testing.assert_allclose(stem.numpy(), whole.numpy(), atol=1e-5, rtol=0)
    if skip_fill:
        assert 0 < int(stats["tiles_computed"]) < int(plan["num_tiles"])
        assert int(stats["evaluated_voxels"]) < int(plan["region_voxels"])
    else:
        assert int(stats["tiles_computed"]) == int(plan["num_tiles"])
        assert int(stats["evaluated_voxels"]) == int(plan["region_voxels"])
    # The trunk on the assembled stem map equals the Keras backbone on the whole volume.
    tiled = inference.trunk(stem)
    keras_whole = net(norm(tf.constant(padded)[None, ..., None]))
    for s in net.strides:
        np.testing.assert_allclose(tiled[s].numpy(), keras_whole[s].numpy(), atol=1e-5, rtol=0)


def test_skipped_cells_near_every_scan_border_get_the_exact_fill_response():
    # A volume that is all fill except one small block: nearly every cell, next to all six
    # borders and at their edges and corners, comes from the all-fill probe.
    net = _backbone(seed=4)
    inference = InferenceBackbone(net, HUNormalization(-1200.0, 600.0))
    padded = np.full((32, 48, 64), -300.0, np.float32)
    padded[12:20, 20:28, 30:38] = _volume((8, 8, 8), seed=5)
    plan = plan_tiles(tf.constant(padded.shape), inference.stem_halo, 10**9)
    stem, stats = tiled_stem(inference, tf.constant(padded), plan, -300.0, tf.float32)
    assert int(plan["num_tiles"]) == 1
    assert int(stats["evaluated_voxels"]) < 0.6 * padded.size
    whole = inference.stem(tf.constant(padded)[None])
    np.testing.assert_allclose(stem.numpy(), whole.numpy(), atol=1e-5, rtol=0)


def _brute_force_plan(shape, halo, budget, align=4, max_tiles=32, tile_cost=32768):
    best = None
    per_axis = []
    for size in shape:
        options = []
        for n in range(1, max_tiles + 1):
            interior = -(-(size // align) // n) * align
            starts = range(0, size, interior)
            regions = [min(size, s + interior + halo) - max(0, s - halo) for s in starts]
            options.append((interior, len(regions), sum(regions), max(regions)))
        per_axis.append(options)
    for combo in itertools.product(*per_axis):
        total = int(np.prod([c[2] for c in combo]))
        largest = int(np.prod([c[3] for c in combo]))
        tiles = int(np.prod([c[1] for c in combo]))
        key = (0, total + tiles * tile_cost) if largest <= budget else (1, largest)
        if best is None or key < best[0]:
            best = (key, [c[0] for c in combo], total, largest)
    return best


@pytest.mark.parametrize(
    "shape,budget",
    [
        ((224, 304, 304), 13_000_000),
        ((224, 304, 304), 30_000_000),
        ((48, 64, 80), 20_000),
        ((64, 96, 32), 500_000),
        ((32, 32, 32), 10),
    ],
)
def test_the_plan_is_the_cheapest_grid_under_the_budget(shape, budget):
    plan = {k: v.numpy() for k, v in plan_tiles(tf.constant(shape), 8, budget).items()}
    (fits, _), interior, total, largest = _brute_force_plan(shape, 8, budget)
    assert int(plan["region_voxels"]) == total and int(plan["largest_region"]) == largest
    assert list(plan["interior"]) == interior
    assert np.all(plan["interior"] % 4 == 0)
    if fits == 0:
        assert largest <= budget
    if shape == (224, 304, 304) and budget == 30_000_000:
        assert int(plan["num_tiles"]) == 1  # the whole scan fits: one pass, no halo
    if shape == (224, 304, 304) and budget == 13_000_000:
        # Two slabs along one axis: the cheapest split (1.07 x the scan's voxels).
        assert int(plan["num_tiles"]) == 2 and total / np.prod(shape) < 1.08


def test_bfloat16_features_stay_close_to_float32():
    net = _backbone(seed=6)
    inference = InferenceBackbone(net, HUNormalization(-1200.0, 600.0))
    vol = tf.constant(_volume((1, 32, 48, 48), seed=7))
    f32 = inference.features(vol, tf.float32)
    bf16 = inference.features(vol, tf.bfloat16)
    for s in f32:
        assert bf16[s].dtype == tf.float32
        scale = float(tf.reduce_max(tf.abs(f32[s])))
        assert float(tf.reduce_max(tf.abs(f32[s] - bf16[s]))) <= 0.05 * scale


def test_only_dense_unet_backbones_are_tiled():
    assert not supports(BlobDetector())

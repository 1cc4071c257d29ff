import numpy as np
import tensorflow as tf

from tf_agg3d.ops.anchors import ANCHOR_PRESETS, multilevel_anchors
from tf_agg3d.ops.box_coding import decode_boxes
from tf_agg3d.ops.iou import cube_iou_np
from tf_agg3d.ops.targets import assign_anchor_targets, assign_proposal_labels

STRIDES = (4, 8, 16)


def _targets(gt, shape=(64, 64, 64)):
    anchors = multilevel_anchors(shape, STRIDES, ANCHOR_PRESETS["anchor1"])
    return anchors, assign_anchor_targets(tf.constant(gt, tf.float32), anchors)


def _positives(targets):
    return {s: int(np.sum(lab.numpy() == 1)) for s, (lab, _) in targets.items()}


def test_small_nodule_gets_a_stride4_positive_and_large_one_a_stride16_positive():
    # Centres on anchor centres so the positives are unambiguous.
    _, t = _targets([[21.5, 29.5, 33.5, 5.0], [39.5, 39.5, 39.5, 20.0]])
    pos = _positives(t)
    assert pos[4] >= 1 and pos[16] >= 1
    labels4 = t[4][0].numpy()
    assert labels4[5, 7, 8].max() == 1
    labels16 = t[16][0].numpy()
    assert labels16[2, 2, 2].max() == 1


def test_labels_follow_the_iou_bands_against_a_numpy_reference():
    gt = np.array([[30.0, 30.0, 30.0, 10.0]])
    anchors, t = _targets(gt)
    for s in STRIDES:
        a = anchors[s].numpy().reshape(-1, 4)
        iou = cube_iou_np(a, gt)[:, 0]
        lab = t[s][0].numpy().reshape(-1)
        assert np.all(lab[iou > 0.5] == 1)
        assert np.all(lab[iou < 0.02] == 0)
        band = (iou >= 0.02) & (iou <= 0.5)
        # In the ignore band only the forced best anchor may be positive.
        assert np.all(np.isin(lab[band], [-1, 1]))
        assert np.sum(lab[band] == 1) <= 1


def test_every_ground_truth_gets_its_best_anchor_and_deltas_decode_back():
    gt = np.array([[13.0, 17.0, 50.0, 3.2]])  # between grid points, smaller than every anchor
    anchors, t = _targets(gt)
    all_a = np.concatenate([anchors[s].numpy().reshape(-1, 4) for s in STRIDES])
    assert cube_iou_np(all_a, gt).max() <= 0.5, "the case must need the forced match"
    assert sum(_positives(t).values()) == 1
    for s in STRIDES:
        lab, deltas = t[s][0].numpy(), t[s][1].numpy()
        if (lab == 1).any():
            decoded = decode_boxes(deltas[lab == 1], anchors[s].numpy()[lab == 1]).numpy()
            np.testing.assert_allclose(decoded, gt, rtol=1e-5)
        assert np.all(deltas[lab != 1] == 0)


def test_no_ground_truth_and_padding_rows_give_only_negatives():
    for gt in (np.zeros((0, 4)), np.array([[10.0, 10, 10, 0.0]])):
        _, t = _targets(gt)
        for lab, deltas in t.values():
            assert np.all(lab.numpy() == 0)
            assert np.all(deltas.numpy() == 0)


def test_targets_inside_tf_data_map():
    anchors = multilevel_anchors((32, 32, 32), STRIDES, ANCHOR_PRESETS["anchor1"])
    ds = tf.data.Dataset.from_tensors(tf.constant([[11.5, 11.5, 11.5, 8.0]]))
    ds = ds.map(lambda g: assign_anchor_targets(g, anchors))
    out = next(iter(ds))
    assert int(tf.reduce_sum(tf.cast(out[8][0] == 1, tf.int32))) >= 1


def test_proposal_labels():
    gt = tf.constant([[10.0, 10, 10, 10], [0, 0, 0, 0]])
    props = tf.constant([[10.0, 10, 10, 10], [12.0, 10, 10, 10], [40, 40, 40, 10]])
    # IoUs: 1.0, 0.6667 (8*10*10 / (2000-800)), 0.0
    labels = assign_proposal_labels(props, gt, positive_iou=0.7, negative_iou=0.1).numpy()
    assert list(labels) == [1, -1, 0]
    none = assign_proposal_labels(props, tf.zeros([0, 4]), 0.5, 0.1).numpy()
    assert list(none) == [0, 0, 0]


def test_single_scale_targets_put_every_nodule_on_the_stride4_level():
    """Table II rows a/b in our reading: all six anchor1 sizes on the stride-4 map only."""
    from tf_agg3d.ops.anchors import single_scale

    strides, sizes = single_scale(ANCHOR_PRESETS["anchor1"])
    assert strides == (4,) and sizes == ((4.0, 6.0, 8.0, 12.0, 16.0, 24.0),)
    anchors = multilevel_anchors((64, 64, 64), strides, sizes)
    assert sorted(anchors) == [4] and anchors[4].shape == (16, 16, 16, 6, 4)
    gt = np.array([[21.5, 29.5, 33.5, 5.0], [39.5, 39.5, 39.5, 20.0]], "float32")
    t = assign_anchor_targets(tf.constant(gt), anchors)
    assert sorted(t) == [4]
    labels, deltas = t[4][0].numpy(), t[4][1].numpy()
    assert labels.shape == (16, 16, 16, 6) and deltas.shape == (16, 16, 16, 6, 4)
    # The small nodule matches the 4/6 mm anchors, the large one the 16/24 mm anchors.
    assert labels[5, 7, 8, :2].max() == 1 and labels[9, 9, 9, 4:].max() == 1
    pos = labels == 1
    decoded = decode_boxes(deltas[pos], anchors[4].numpy()[pos]).numpy()
    # Every positive decodes back to one of the nodules.
    assert np.all(np.min(np.abs(decoded[:, None, :] - gt[None]).max(-1), axis=1) < 1e-3)

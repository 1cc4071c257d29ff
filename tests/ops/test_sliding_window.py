import itertools

import numpy as np
import pytest
import tensorflow as tf

from tf_agg3d.ops import sliding_window as sw


def _axis(size, window, overlap):
    starts = sw.axis_window_starts(tf.constant(size), window, overlap).numpy()
    lo, hi = sw.axis_core_bounds(tf.constant(starts), window)
    return starts, lo.numpy(), hi.numpy()


CASES = [
    # (size, window, overlap)
    (10, 32, 8),  # smaller than one window: padded, one window
    (32, 32, 8),  # exactly one window
    (56, 32, 8),  # exact multiple of the step plus the overlap: no flush shift
    (57, 32, 8),  # one voxel more: a flushed last window
    (33, 32, 0),  # no overlap, odd size
    (301, 128, 32),  # a typical scan side
    (97, 48, 17),  # odd overlap
    (128, 16, 15),  # step 1 extreme
]


@pytest.mark.parametrize("size,window,overlap", CASES)
def test_axis_windows_cover_every_voxel_and_respect_the_overlap(size, window, overlap):
    starts, lo, hi = _axis(size, window, overlap)
    padded = max(size, window)
    assert starts[0] == 0
    assert starts[-1] == padded - window, "last window must end flush with the (padded) volume"
    assert np.all(np.diff(starts) > 0)
    covered = np.zeros(padded, bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered.all()
    # Neighbours overlap by at least `overlap`, and by exactly `overlap` except the last pair.
    gaps = starts[:-1] + window - starts[1:]
    assert np.all(gaps >= overlap)
    assert np.all(gaps[:-1] == overlap)
    # No more windows than needed: dropping the last would leave voxels uncovered.
    if len(starts) > 1:
        assert starts[-2] + window < padded
    # Cores partition the axis.
    assert lo[0] == -np.inf and hi[-1] == np.inf
    np.testing.assert_array_equal(hi[:-1], lo[1:])
    for i in range(1, len(starts)):
        # Boundary = middle of the overlap, in continuous coordinates (voxel i spans i +- 0.5).
        mid = (starts[i] - 0.5 + starts[i - 1] + window - 0.5) / 2
        assert lo[i] == pytest.approx(mid)
        # The core keeps at least half the overlap away from each shared border.
        assert lo[i] - (starts[i] - 0.5) >= overlap / 2 - 1e-6


def test_each_voxel_centre_lies_in_exactly_one_core_of_a_window_that_contains_it():
    shape = (40, 75, 33)
    window, overlap = (32, 32, 16), 8
    grid = sw.window_grid(tf.constant(shape), window, overlap)
    starts = grid["starts"].numpy()
    lo, hi = grid["core_lo"].numpy(), grid["core_hi"].numpy()
    assert grid["num_windows"].numpy() == len(starts)
    np.testing.assert_array_equal(grid["padded_shape"].numpy(), [40, 75, 33])
    rng = np.random.default_rng(0)
    points = rng.uniform(-0.5, np.array(shape) - 0.5, (500, 3))
    points = np.concatenate(
        [points, np.array(list(itertools.product(*[[0, n - 1] for n in shape])))]
    )
    inside = sw.in_core(
        tf.constant(np.broadcast_to(points, (len(starts), *points.shape)), tf.float32),
        tf.constant(lo),
        tf.constant(hi),
    ).numpy()
    assert np.all(inside.sum(0) == 1)
    owner = inside.argmax(0)
    s = starts[owner]
    assert np.all((points >= s - 0.5) & (points < s + np.array(window) - 0.5))


def test_window_grid_is_z_major_and_pads_small_volumes():
    grid = sw.window_grid(tf.constant([10, 40, 16]), (16, 32, 16), 8)
    starts = grid["starts"].numpy()
    np.testing.assert_array_equal(starts, [[0, 0, 0], [0, 8, 0]])
    np.testing.assert_array_equal(grid["padded_shape"].numpy(), [16, 40, 16])
    vol = tf.ones([10, 40, 12], tf.int16)
    padded = sw.pad_volume(vol, (16, 32, 16), -7).numpy()
    assert padded.shape == (16, 40, 16)
    assert np.all(padded[:10, :, :12] == 1)
    assert np.all(padded[10:] == -7) and np.all(padded[:, :, 12:] == -7)


def test_window_grid_runs_in_a_graph_with_dynamic_shapes():
    @tf.function(input_signature=[tf.TensorSpec([3], tf.int32)])
    def count(shape):
        return sw.window_grid(shape, (32, 32, 32), 8)["num_windows"]

    assert int(count(tf.constant([32, 32, 32]))) == 1
    assert int(count(tf.constant([57, 32, 33]))) == 3 * 1 * 2


@pytest.mark.parametrize(
    "window,overlap", [((32, 32, 30), 8), ((32, 32), 8), ((32, 32, 32), 32), ((32, 32, 32), -1)]
)
def test_invalid_windows_are_refused(window, overlap):
    with pytest.raises(ValueError):
        sw.validate_windows(window, overlap)

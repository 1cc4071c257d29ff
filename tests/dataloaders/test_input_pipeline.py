"""Training input pipeline: determinism, nodule crops and targets, augmentation geometry,
padding, 10-fold split, Anchor Based Sampling oversampling."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from support import cache_meta, write_cache

from tf_agg3d.config import AnchorConfig, DataConfig
from tf_agg3d.data import cache as cache_lib
from tf_agg3d.data.errors import DataError
from tf_agg3d.dataloaders import augment
from tf_agg3d.dataloaders import input_pipeline as pipeline

FILL = -1000
BRIGHT = 400


def _sphere(shape, centre, diameter):
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    dist2 = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2
    return dist2 <= (diameter / 2.0) ** 2


def write_scan(cache_dir, uid, subset, shape=(48, 56, 64), nodules=(), fill_hu=FILL):
    vol = np.full(shape, -700, np.int16)
    for z, y, x, d in nodules:
        vol[_sphere(shape, (z, y, x), d)] = BRIGHT
    boxes = [{"z": z, "y": y, "x": x, "d": d} for z, y, x, d in nodules]
    meta = cache_meta(uid, shape, nodules=boxes, subset=subset, fill_hu=fill_hu)
    cache_lib.write_entry(str(cache_dir), uid, vol, meta)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    write_scan(d, "a", 0, nodules=[(20.0, 25.0, 30.0, 8.0), (30.0, 40.0, 20.0, 6.0)])
    write_scan(d, "b", 1, nodules=[(24.0, 28.0, 32.0, 10.0)])
    write_scan(d, "c", 2, nodules=[])
    return str(d)


def _config(cache_dir, **kw):
    base = dict(cache_dir=cache_dir, crop_size=(32, 32, 32), batch_size=2, jitter_mm=4.0)
    base.update(kw)
    return DataConfig(**base)


def _take(ds, n):
    return [{k: v.numpy() for k, v in b.items()} for b in ds.take(n)]


def test_stream_is_deterministic_and_resumable(cache_dir):
    data = _config(cache_dir, num_parallel_calls=2)
    scans = pipeline.load_scans(cache_dir)
    first = _take(pipeline.make_dataset(pipeline.CropSampler(data, scans), AnchorConfig(), 2), 3)
    again = _take(pipeline.make_dataset(pipeline.CropSampler(data, scans), AnchorConfig(), 2), 3)
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # Resuming at element 2 (= after one step of batch 2) gives the second batch exactly.
    resumed = _take(
        pipeline.make_dataset(pipeline.CropSampler(data, scans), AnchorConfig(), 2, start=2), 1
    )[0]
    np.testing.assert_array_equal(resumed["volume"], first[1]["volume"])
    np.testing.assert_array_equal(resumed["index"], [2, 3])
    other = pipeline.CropSampler(dataclasses.replace(data, seed=1), scans)
    assert not np.array_equal(other.sample(0)[0], pipeline.CropSampler(data, scans).sample(0)[0])


def test_two_pipelines_split_the_same_stream(cache_dir):
    data = _config(cache_dir)
    sampler = pipeline.CropSampler(data, pipeline.load_scans(cache_dir))
    one = _take(pipeline.make_dataset(sampler, AnchorConfig(), 4), 1)[0]["index"]
    p0 = _take(pipeline.make_dataset(sampler, AnchorConfig(), 2, 0, 0, 2), 1)[0]["index"]
    p1 = _take(pipeline.make_dataset(sampler, AnchorConfig(), 2, 0, 1, 2), 1)[0]["index"]
    assert sorted([*p0, *p1]) == sorted(one) == [0, 1, 2, 3]


def test_nodule_crop_contains_the_nodule_and_a_positive_anchor(cache_dir):
    data = _config(
        cache_dir, positive_fraction=1.0, flip=False, rotate90=False, scale_range=(1.0, 1.0)
    )
    scans = pipeline.load_scans(cache_dir)
    ds = pipeline.make_dataset(pipeline.CropSampler(data, scans), AnchorConfig(), 1)
    for batch in _take(ds, 6):
        assert batch["kind"][0] == pipeline.KIND_NODULE
        boxes = batch["gt_boxes"][0]
        real = boxes[boxes[:, 3] > 0]
        assert len(real) >= 1
        vol = batch["volume"][0, ..., 0]
        for z, y, x, _ in real:
            assert vol[int(round(z)), int(round(y)), int(round(x))] == BRIGHT
        # The crop centre is within the jitter of a nodule centre.
        centre = batch["centre"][0]
        nodules = scans[batch["scan"][0]].nodules
        assert np.min(np.abs(nodules[:, :3] - centre).max(axis=1)) <= data.jitter_mm + 1e-4
        positives = sum(int((batch[f"labels_{s}"] == 1).sum()) for s in (4, 8, 16))
        assert positives >= len(real)
        # Every nodule has a positive anchor on it: a cell whose centre is within a stride.
        for box in real:
            near = [
                np.abs(np.argwhere(batch[f"labels_{s}"][0] == 1)[:, :3] * s + (s - 1) / 2 - box[:3])
                .max(-1)
                .min(initial=np.inf)
                <= s
                for s in (4, 8, 16)
            ]
            assert any(near), box


@pytest.mark.parametrize(
    "transform",
    [
        augment.Transform(),
        augment.Transform(flips=(True, False, False)),
        augment.Transform(flips=(False, True, True)),
        augment.Transform(rot90=1),
        augment.Transform(rot90=3, flips=(True, True, False)),
        augment.Transform(scale=1.25),
        augment.Transform(scale=0.8, flips=(False, False, True), rot90=2),
    ],
)
def test_augmentation_keeps_boxes_on_their_voxels(transform):
    shape = (40, 44, 48)
    nodule = np.array([[17.0, 26.0, 13.0, 10.0]])
    vol = np.where(_sphere(shape, nodule[0, :3], nodule[0, 3]), 1000.0, 0.0).astype(np.float32)
    crop, boxes = augment.augmented_crop(
        vol, nodule, (20.0, 22.0, 18.0), (32, 32, 32), transform, fill=0.0
    )
    z, y, x, d = boxes[0]
    assert d == pytest.approx(10.0 * transform.scale)
    mask = crop > 500
    # The bright sphere's centre of mass is the transformed box centre.
    com = np.argwhere(mask).mean(axis=0)
    np.testing.assert_allclose(com, [z, y, x], atol=0.35)
    # Its volume scales with s^3.
    expected = np.pi / 6 * d**3
    assert mask.sum() == pytest.approx(expected, rel=0.15)


def test_rotation_direction_matches_numpy():
    crop = np.zeros((4, 4, 4), np.float32)
    crop[1, 0, 3] = 1.0  # z=1, y=0, x=3
    t = augment.Transform(rot90=1)
    out = augment.apply_to_crop(crop, t)
    box = augment.transform_boxes(np.array([[1.0, 0.0, 3.0, 1.0]]), (0, 0, 0), (4, 4, 4), t)
    assert out[tuple(int(v) for v in box[0, :3])] == 1.0


def test_out_of_volume_voxels_get_the_sidecar_fill_value(tmp_path):
    write_scan(tmp_path, "edge", 0, shape=(20, 20, 20), fill_hu=-1234)
    data = _config(
        str(tmp_path), positive_fraction=0.0, flip=False, rotate90=False, scale_range=(1.0, 1.0)
    )
    scan = pipeline.load_scans(str(tmp_path))[0]
    assert scan.fill_hu == -1234
    crop, _ = augment.augmented_crop(
        np.full((20, 20, 20), -700, np.int16),
        np.zeros((0, 4)),
        (15.5, 15.5, 15.5),
        (32, 32, 32),
        augment.IDENTITY,
        scan.fill_hu,
    )
    assert crop[0, 0, 0] == -700 and crop[-1, -1, -1] == -1234
    # Through the sampler: a 32^3 crop of a 20^3 scan always contains padding.
    vol = pipeline.CropSampler(data, [scan]).sample(0)[0]
    assert (vol == -1234).any() and (vol == -700).any()


def test_a_damaged_entry_is_named_and_left_out(tmp_path, caplog):
    cache = str(tmp_path / "cache")
    write_cache(cache, n_scans=3)
    npy = cache_lib.volume_path(cache, "scan1")
    with open(npy, "r+b") as f:
        f.truncate(200)
    with caplog.at_level("WARNING"):
        scans = pipeline.load_scans(cache)
    assert [s.uid for s in scans] == ["scan0", "scan2"]
    assert "scan1" in caplog.text and npy in caplog.text
    with pytest.raises(DataError, match="scan9"):
        pipeline.load_scans(cache, ["scan0", "scan9"])


def test_ten_fold_split_holds_out_subset_k(tmp_path):
    scans = [
        pipeline.CachedScan(f"u{i}", (8, 8, 8), i % 10, 0.0, np.zeros((0, 4)), np.zeros((0, 4)))
        for i in range(23)
    ]
    for k in range(10):
        train, held = pipeline.fold_split(scans, k)
        assert {s.subset for s in held} == {k}
        assert k not in {s.subset for s in train}
        assert len(train) + len(held) == len(scans)
    train, held = pipeline.fold_split(scans, -1)
    assert len(train) == 23 and held == []


def test_select_scans_uses_the_fold_and_uid_lists(cache_dir, tmp_path):
    train, val = pipeline.select_scans(_config(cache_dir, fold=1))
    assert [s.uid for s in train] == ["a", "c"] and [s.uid for s in val] == ["b"]
    lst = tmp_path / "train.csv"
    lst.write_text("seriesuid\nc\n")
    train, _ = pipeline.select_scans(_config(cache_dir, fold=1, train_seriesuids=str(lst)))
    assert [s.uid for s in train] == ["c"]


def test_hard_negatives_are_oversampled(cache_dir, tmp_path):
    from tf_agg3d.training.abs import write_abs_file

    path = str(tmp_path / "abs.json")
    hard = [{"seriesuid": "c", "z": 10.0, "y": 12.0, "x": 14.0, "d": 6.0, "score": 0.9}]
    cfg = type("C", (), {"train": type("T", (), {"abs_score_threshold": 0.5})()})()
    write_abs_file(path, hard, "ckpt-1", 1, cfg)
    scans = pipeline.load_scans(cache_dir)
    entries = pipeline.read_hard_negatives(path, [s.uid for s in scans])
    assert len(entries) == 1
    data = _config(cache_dir, positive_fraction=0.3, abs_fraction=0.5)
    with_abs = pipeline.CropSampler(data, scans, hard_negatives=entries)
    without = pipeline.CropSampler(data, scans)
    kinds = np.array([with_abs.sample(i)[2] for i in range(200)])
    share = np.mean(kinds == pipeline.KIND_HARD_NEGATIVE)
    assert 0.4 < share < 0.6
    for i in np.flatnonzero(kinds == pipeline.KIND_HARD_NEGATIVE)[:5]:
        _, _, _, scan, centre = with_abs.sample(int(i))
        assert scans[scan].uid == "c"
        assert np.abs(centre - [10.0, 12.0, 14.0]).max() <= data.jitter_mm + 1e-6
    assert not any(without.sample(i)[2] == pipeline.KIND_HARD_NEGATIVE for i in range(50))


def test_remote_volumes_are_downloaded_once_within_the_budget_and_lru_beyond(
    cache_dir, monkeypatch
):
    import threading

    scans = pipeline.load_scans(cache_dir)
    size = 2 * 48 * 56 * 64  # one int16 volume
    reads = []
    real_read = cache_lib.read_volume

    def read_volume(directory, uid, mmap=False):
        assert not mmap  # a remote cache is read whole
        reads.append(uid)
        return real_read(directory, uid)

    monkeypatch.setattr(cache_lib, "read_volume", read_volume)
    # All three fit: parallel draws download each volume once, however often it is drawn.
    vols = pipeline._Volumes(cache_dir, scans, budget_bytes=3 * size, remote=True)
    assert vols.fits and vols.total_bytes == 3 * size
    order = [s.uid for s in scans] * 20

    def draw(part):
        for uid in order[part::4]:
            assert vols.get(uid).shape == (48, 56, 64)

    threads = [threading.Thread(target=draw, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(reads) == ["a", "b", "c"] and vols.downloads == 3

    # Room for two: the least recently drawn is dropped and downloaded again when drawn.
    reads.clear()
    vols = pipeline._Volumes(cache_dir, scans, budget_bytes=2 * size, remote=True)
    assert not vols.fits
    for uid in ("a", "b", "a", "c", "a", "b"):
        vols.get(uid)
    assert reads == ["a", "b", "c", "b"]
    assert vols._bytes <= 2 * size

    sampler = pipeline.CropSampler(
        _config(cache_dir, remote_cache_bytes=3 * size), pipeline.load_scans(cache_dir)
    )
    assert sampler.volume_cache_summary() is None  # a local cache is memory-mapped

"""Synthetic DeepLesion: the exact layout, determinism, and a conversion that finds the truth."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from tf_agg3d.config import PreprocessConfig
from tf_agg3d.data import cache
from tf_agg3d.data.deeplesion.conversion import run_conversion
from tf_agg3d.data.deeplesion.dl_info import DL_INFO_COLUMNS, read_dl_info
from tf_agg3d.data.synthetic import deeplesion as syn


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic_deeplesion"))
    return syn.generate_dataset(out, n_series=8, seed=3, size=96)


def test_layout_and_every_dl_info_column(dataset):
    out = dataset["out_dir"]
    path = os.path.join(out, "DL_info.csv")
    with open(path) as f:
        assert f.readline().strip() == ",".join(DL_INFO_COLUMNS)
    rows, errors = read_dl_info(path)
    assert not errors and len(rows) == dataset["rows"]
    with open(path) as f:
        for line in f.readlines()[1:]:
            assert ",," not in line and not line.rstrip().endswith(",")
    assert {r.series_uid for r in rows} == set(dataset["uids"])
    assert {r.split for r in rows} == {1, 2, 3}
    assert all(r.lesion_type in (1, 2, 3, 4, 5, 6, 7, 8, -1) for r in rows)
    assert len({r.lesion_type for r in rows}) >= 4
    assert all(0.6 <= r.pixel_spacing[0] == r.pixel_spacing[1] <= 0.9 for r in rows)
    assert all(r.slice_interval in syn.SLICE_INTERVALS for r in rows)
    assert all(r.image_size == (96, 96) for r in rows)
    assert dataset["large"] >= 1 and dataset["duplicated"] >= 1
    for r in rows:
        folder = os.path.join(out, "Images_png", r.series_uid)
        for n in range(r.slice_range[0], r.slice_range[1] + 1):
            assert os.path.isfile(os.path.join(folder, f"{n:03d}.png"))
        # About 60 mm of context around the key slice, as the real data gives.
        span = (r.slice_range[1] - r.slice_range[0]) * r.slice_interval
        assert 55.0 <= span <= 65.0
        x1, y1, x2, y2 = r.bbox
        m = np.asarray(r.measurement).reshape(4, 2)
        assert x1 < m[:, 0].min() and m[:, 0].max() < x2
        assert np.linalg.norm(m[1] - m[0]) == pytest.approx(r.diameters_px[0], abs=1e-3)
    key_png = os.path.join(out, "Images_png", rows[0].series_uid, f"{rows[0].key_slice:03d}.png")
    image = sitk.ReadImage(key_png)
    assert image.GetPixelID() == sitk.sitkUInt16 and image.GetNumberOfComponentsPerPixel() == 1
    hu = sitk.GetArrayFromImage(image).astype(np.int32) - 32768
    assert hu.min() <= -2000 and -1100 < np.median(hu) < 200


def test_same_seed_same_bytes(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    syn.generate_dataset(a, n_series=3, seed=7, size=64)
    syn.generate_dataset(b, n_series=3, seed=7, size=64)
    files_a = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    files_b = sorted(os.path.relpath(os.path.join(d, f), b) for d, _, fs in os.walk(b) for f in fs)
    assert files_a == files_b
    for rel in files_a:
        with open(os.path.join(a, rel), "rb") as fa, open(os.path.join(b, rel), "rb") as fb:
            assert fa.read() == fb.read(), rel
    c = str(tmp_path / "c")
    syn.generate_dataset(c, n_series=3, seed=8, size=64)
    with open(os.path.join(a, "DL_info.csv")) as fa, open(os.path.join(c, "DL_info.csv")) as fc:
        assert fa.read() != fc.read()


def test_conversion_recovers_the_drawn_lesions(dataset, tmp_path):
    out = str(tmp_path / "cache")
    summary = run_conversion(dataset["out_dir"], out, PreprocessConfig(), report=lambda s: None)
    assert not summary.failed and sorted(summary.ok) == sorted(dataset["uids"])
    for uid, truth in dataset["lesions"].items():
        meta = cache.read_meta(out, uid)
        nodules = meta["nodules"]
        # Lesions read twice are merged back into one.
        assert len(nodules) == len(truth), uid
        for les in truth:
            dist = [np.linalg.norm(np.subtract(n["xyz_mm"], les.xyz)) for n in nodules]
            n = nodules[int(np.argmin(dist))]
            if les.rows == 1:
                assert min(dist) < 1e-3
                assert n["d"] == pytest.approx(les.long_mm, abs=1e-3)
            else:  # the second reading may sit one slice away with jittered endpoints
                assert min(dist) <= 0.5 * meta["slice_interval_mm"] + 0.5
                assert n["d"] == pytest.approx(les.long_mm, rel=0.1)
            assert n["large"] == (les.long_mm >= 48.0)
            world = cache.cache_voxel_to_world(meta, [n["z"], n["y"], n["x"]])
            np.testing.assert_allclose(world, n["xyz_mm"], atol=1e-3)

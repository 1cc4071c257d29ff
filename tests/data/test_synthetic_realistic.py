"""Tests of the realistic synthetic LUNA16 profile and its benchmark split.

The profile's claims (docs/benchmark.md) checked on tiny scans: LUNA16's size distribution,
every nodule texture and site present, excluded findings written but not annotated, nodules
inside the lung masks the preprocessing computes, juxta-pleural nodules across the lung wall,
vessels dense but not filling the lungs, the split lists, and same seed -> same bytes.
"""

from __future__ import annotations

import filecmp
import os

import numpy as np
import pytest
import SimpleITK as sitk
from support import csv_rows, luna16_scan_paths, run_module, synthetic_dataset

from tf_agg3d.config import PreprocessConfig
from tf_agg3d.data.preprocessing.grid import isotropic_grid, resample
from tf_agg3d.data.preprocessing.lungs import dilate
from tf_agg3d.data.readers import sitk as sitk_reader
from tf_agg3d.data.synthetic import lesions, realistic, scanner

SEED = 3
N_SCANS = 10
SHAPE = (40, 160, 160)  # tiny: a ~110 mm chest, about a second per scan


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory, realistic.generate_dataset, N_SCANS, SEED, SHAPE)


def _rows(path):
    header, rows = csv_rows(path)
    assert header == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    return [(r[0], *(float(v) for v in r[1:])) for r in rows]


def _scans_with_nodules(root, summary):
    """(uid, nodules, scan path, mask path) of every scan with nodules."""
    for uid, nodules in summary["nodules"].items():
        if nodules:
            yield uid, nodules, *luna16_scan_paths(root, summary, uid)


def _ball_labels(image, mask, xyz, radius_mm):
    """Mask labels of the voxels whose centres lie within `radius_mm` of world point `xyz`."""
    sp = np.asarray(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    centre = np.asarray(image.TransformPhysicalPointToContinuousIndex(tuple(xyz)))  # x, y, z
    reach = np.ceil(radius_mm / sp).astype(int) + 1
    lo = np.maximum(np.floor(centre).astype(int) - reach, 0)
    hi = np.minimum(np.floor(centre).astype(int) + reach + 1, mask.shape[::-1])
    ix, iy, iz = np.meshgrid(
        *[np.arange(a, b) for a, b in zip(lo, hi, strict=False)], indexing="ij"
    )
    idx = np.stack([ix, iy, iz], -1).reshape(-1, 3)
    world = (direction @ ((idx - centre) * sp).T).T
    near = np.linalg.norm(world, axis=1) <= radius_mm
    idx = idx[near]
    return mask[idx[:, 2], idx[:, 1], idx[:, 0]]


def test_diameters_follow_luna16():
    d = lesions.sample_diameters(np.random.default_rng(0), 20000)
    assert d.min() >= 3.0 and d.max() <= 30.0
    q25, q50, q75 = np.percentile(d, [25, 50, 75])
    assert 6.5 <= q50 <= 7.5, q50  # LUNA16: median about 7 mm
    assert 4.5 <= q25 <= 5.5 and 8.5 <= q75 <= 11.0, (q25, q75)
    assert np.mean((d >= 4.0) & (d <= 10.0)) >= 0.6  # most between 4 and 10 mm
    assert np.mean(d >= 20.0) > 0.002  # and a tail of large ones


def test_layout_split_and_annotations(dataset):
    root, summary = dataset
    uids = summary["uids"]
    assert summary["profile"] == "realistic"
    for name in ("annotations.csv", "annotations_excluded.csv", "candidates.csv"):
        assert os.path.isfile(os.path.join(root, name))
    for uid in uids:
        for path in luna16_scan_paths(root, summary, uid):
            assert os.path.isfile(path)
    with open(os.path.join(root, "seriesuids.csv")) as f:
        assert f.read().split() == uids
    with open(os.path.join(root, realistic.TRAIN_LIST)) as f:
        train = f.read().split()
    with open(os.path.join(root, realistic.HELDOUT_LIST)) as f:
        heldout = f.read().split()
    assert train == [u for u in uids if summary["subset"][u] in realistic.TRAIN_SUBSETS]
    assert heldout == [u for u in uids if summary["subset"][u] in realistic.HELDOUT_SUBSETS]
    assert len(heldout) == 4 and not set(train) & set(heldout)
    ann = _rows(os.path.join(root, "annotations.csv"))
    assert len(ann) == summary["n_nodules"] == sum(len(v) for v in summary["nodules"].values())
    assert summary["split"]["heldout_nodules"] == sum(r[0] in heldout for r in ann)
    header, typed = csv_rows(os.path.join(root, realistic.NODULE_TYPES))
    assert header[-2:] == ["texture", "site"]
    assert [tuple(r[:5]) for r in typed] == [(r[0], *(f"{v:.6f}" for v in r[1:])) for r in ann]


def test_all_textures_and_sites_present(dataset):
    _, summary = dataset
    nodules = [n for v in summary["nodules"].values() for n in v]
    assert {n["kind"] for n in nodules} == set(
        lesions.TEXTURES
    ), f"seed {SEED} no longer draws every texture; pick another SEED"
    assert {n["site"] for n in nodules} == set(lesions.SITES)


def test_excluded_findings_written_not_annotated(dataset):
    root, _ = dataset
    ann = _rows(os.path.join(root, "annotations.csv"))
    exc = _rows(os.path.join(root, "annotations_excluded.csv"))
    assert any(0 < r[4] < 3.0 for r in exc), "no sub-3-mm nodule excluded"
    assert any(r[4] == -1.0 for r in exc), "no non-nodule excluded"
    assert all(r[4] == -1.0 or r[4] < 3.0 for r in exc)
    assert all(3.0 <= r[4] <= 30.0 for r in ann)
    for e in exc:
        for a in ann:
            if a[0] == e[0]:
                assert np.linalg.norm(np.subtract(a[1:4], e[1:4])) > 0.5 * a[4]


def test_nodules_inside_preprocessing_lung_masks(dataset):
    """Each nodule centre lies in a lung of the mask resampled as the preprocessing does, and
    the whole nodule inside the dilated mask the preprocessing keeps."""
    root, summary = dataset
    config = PreprocessConfig()
    checked = 0
    for uid, nodules, scan_path, mask_path in _scans_with_nodules(root, summary):
        scan = sitk_reader.read_scan(scan_path)
        mask = sitk_reader.read_lung_mask(mask_path)
        grid = isotropic_grid(scan.geometry, scan.array.shape, config.spacing_mm)
        lungs = resample(mask.to_sitk(), grid, sitk.sitkNearestNeighbor, sitk.sitkUInt8)
        keep = dilate(lungs, config.lung_dilation_mm, config.spacing_mm)
        for n in nodules:
            zyx = grid.world_to_voxel(np.array([[n["x"], n["y"], n["z"]]]))[0]
            centre = tuple(int(v) for v in np.rint(zyx))
            assert lungs[centre], (uid, n)
            r = int(np.ceil(0.5 * n["d"]))
            zz, yy, xx = np.meshgrid(*[np.arange(c - r, c + r + 1) for c in centre], indexing="ij")
            ball = (zz - zyx[0]) ** 2 + (yy - zyx[1]) ** 2 + (xx - zyx[2]) ** 2 <= (
                0.5 * n["d"]
            ) ** 2
            inside = (zz >= 0) & (yy >= 0) & (xx >= 0)
            inside &= (zz < keep.shape[0]) & (yy < keep.shape[1]) & (xx < keep.shape[2])
            assert inside[ball].all() and keep[zz[ball], yy[ball], xx[ball]].all(), (uid, n)
            checked += 1
    assert checked == summary["n_nodules"] > 0


def test_juxta_pleural_touch_wall_isolated_do_not(dataset):
    root, summary = dataset
    seen = set()
    for uid, nodules, _, mask_path in _scans_with_nodules(root, summary):
        image = sitk.ReadImage(mask_path)
        mask = sitk.GetArrayFromImage(image)
        for n in nodules:
            xyz = (n["x"], n["y"], n["z"])
            tol = 0.5 * float(np.linalg.norm(image.GetSpacing()))
            labels = _ball_labels(image, mask, xyz, 0.5 * n["d"] + tol)
            lung = np.isin(labels, (3, 4))
            if n["site"] == "juxta-pleural":
                assert not lung.all(), (uid, n)  # reaches past the lung wall
            elif n["site"] == "isolated":
                inner = _ball_labels(image, mask, xyz, 0.5 * n["d"])
                assert np.isin(inner, (3, 4)).all(), (uid, n)
            seen.add(n["site"])
    assert {"juxta-pleural", "isolated"} <= seen


def test_vessels_dense_but_not_filling():
    """On a chest of realistic size (the tiny test scans have tiny lungs but adult-sized
    vessels), vessels above -500 HU fill a few percent of the lungs, clearly more than the
    default profile's sparse trees at the same geometry."""
    from tf_agg3d.data.synthetic import default_profile

    geometry = {"shape": (48, 256, 256), "spacing": (0.8, 0.8, 2.5), "n_nodules": 0}

    def fraction(scan):
        return float(np.mean(scan.volume[np.isin(scan.lung_mask, (3, 4))] > -500))

    dense = fraction(realistic.synthesize_scan(np.random.default_rng(1), **geometry))
    sparse = fraction(default_profile.synthesize_scan(np.random.default_rng(1), **geometry))
    assert 0.04 <= dense <= 0.12, dense
    assert dense >= 1.4 * sparse, (dense, sparse)


def test_same_seed_same_bytes(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    realistic.generate_dataset(a, 2, seed=11, shape=(24, 96, 96))
    realistic.generate_dataset(b, 2, seed=11, shape=(24, 96, 96))
    realistic.generate_dataset(c, 2, seed=12, shape=(24, 96, 96))
    cmp = filecmp.dircmp(a, b)
    files = []
    for root, _, names in os.walk(a):
        files += [os.path.relpath(os.path.join(root, n), a) for n in names]
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors and len(match) == len(files) > 8, cmp.report()
    with (
        open(os.path.join(a, "annotations.csv")) as fa,
        open(os.path.join(c, "annotations.csv")) as fc,
    ):
        assert fa.read() != fc.read()


def test_scanner_partial_volume_and_noise():
    fine = np.zeros((6, 4, 4), np.float32)
    fine[::3] = 300.0
    np.testing.assert_allclose(scanner.partial_volume(fine, 3), 100.0)
    assert scanner.fine_factor(2.5, 0.7) == 4 and scanner.fine_factor(0.625, 0.7) == 1
    noise = scanner.correlated_noise(
        np.random.default_rng(0), (8, 96, 96), (0.7, 0.7, 1.0), 30.0, 0.5
    )
    assert 27.0 <= noise.std() <= 33.0
    # Correlated: neighbouring pixels agree more than white noise would (0 correlation).
    assert np.corrcoef(noise[:, :, :-1].ravel(), noise[:, :, 1:].ravel())[0, 1] > 0.2


def test_cli_profile_flag(tmp_path):
    out = str(tmp_path / "cli")
    res = run_module(
        "tf_agg3d.data.synthetic", "--profile", "realistic", "--out", out, "--n-scans", 1,
        "--seed", 4, "--shape", "24,96,96", timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "realistic; held out: 0 scans" in res.stdout
    assert os.path.isfile(os.path.join(out, realistic.TRAIN_LIST))

"""Tests of the synthetic LUNA16 generator.

The checks read the written files with SimpleITK and the csv module only: world -> voxel goes
through SimpleITK's own `TransformPhysicalPointToIndex`, never through project code, so a
coordinate mistake in the generator cannot be mirrored by the test.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import SimpleITK as sitk
from support import csv_rows, luna16_scan_paths, run_module, synthetic_dataset

from tf_agg3d.data.synthetic import default_profile, luna16
from tf_agg3d.data.synthetic.scan_frame import FLIPS
from tf_agg3d.data.synthetic.writers import write_metaimage

SEED = 7
N_SCANS = 10
SHAPE = (48, 112, 112)  # small, so the 10-scan set takes a few seconds
UID_RE = re.compile(r"^1\.3\.6\.1\.4\.1\.14519\.5\.2\.1\.6279\.6001\.[1-9][0-9]{29}$")
BRIGHT_HU = -300


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory, luna16.generate_dataset, N_SCANS, SEED, SHAPE)


def _read(path):
    image = sitk.ReadImage(path)
    return image, sitk.GetArrayFromImage(image)


def _voxel(image, xyz):
    """(z, y, x) array index of a world point, by SimpleITK alone."""
    ix, iy, iz = image.TransformPhysicalPointToIndex(tuple(float(v) for v in xyz))
    return iz, iy, ix


def _component(bright: np.ndarray, seed_zyx) -> np.ndarray:
    """6-connected component of `bright` containing `seed_zyx` (iterative dilation)."""
    comp = np.zeros_like(bright)
    comp[seed_zyx] = bright[seed_zyx]
    while True:
        grown = comp.copy()
        grown[1:] |= comp[:-1]
        grown[:-1] |= comp[1:]
        grown[:, 1:] |= comp[:, :-1]
        grown[:, :-1] |= comp[:, 1:]
        grown[:, :, 1:] |= comp[:, :, :-1]
        grown[:, :, :-1] |= comp[:, :, 1:]
        grown &= bright
        if np.array_equal(grown, comp):
            return comp
        comp = grown


def _measured_diameter(image, array, xyz, d_mm):
    """Equivalent-sphere diameter (mm) of the bright component at `xyz`, and whether it is
    isolated (does not reach the border of a box of d + 12 mm around the centre)."""
    spacing = np.asarray(image.GetSpacing())[::-1]  # (z, y, x)
    centre = np.asarray(_voxel(image, xyz))
    half = np.ceil((0.5 * d_mm + 6.0) / spacing).astype(int)
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, array.shape)
    box = array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] > BRIGHT_HU
    comp = _component(box, tuple(centre - lo))
    volume = comp.sum() * np.prod(spacing)
    isolated = not (
        comp[0].any()
        or comp[-1].any()
        or comp[:, 0].any()
        or comp[:, -1].any()
        or comp[:, :, 0].any()
        or comp[:, :, -1].any()
    )
    return (6.0 * volume / np.pi) ** (1.0 / 3.0), isolated


def test_layout_file_names_and_csv_headers(dataset):
    root, summary = dataset
    uids = summary["uids"]
    assert len(uids) == N_SCANS == len(set(uids))
    assert all(UID_RE.match(u) for u in uids)
    expected = {f"subset{k}" for k in range(10)} | {"seg-lungs-LUNA16"}
    expected |= {"annotations.csv", "annotations_excluded.csv", "candidates.csv", "seriesuids.csv"}
    assert set(os.listdir(root)) == expected  # no temporary leftovers either
    for i, uid in enumerate(uids):
        assert summary["subset"][uid] == i % 10  # round-robin: 10-fold CV works
    for k in range(10):
        want = {f"{u}.{e}" for u in uids if summary["subset"][u] == k for e in ("mhd", "raw")}
        assert set(os.listdir(os.path.join(root, f"subset{k}"))) == want
    masks = {f"{u}.{e}" for u in uids for e in ("mhd", "zraw")}
    assert set(os.listdir(os.path.join(root, "seg-lungs-LUNA16"))) == masks
    for uid in uids:
        scan, mask = luna16_scan_paths(root, summary, uid)
        with open(scan) as f:
            header = f.read()
        assert "ElementType = MET_SHORT" in header
        assert f"ElementDataFile = {uid}.raw" in header
        with open(mask) as f:
            header = f.read()
        assert "CompressedData = True" in header and "ElementType = MET_UCHAR" in header
        assert f"ElementDataFile = {uid}.zraw" in header

    with open(os.path.join(root, "seriesuids.csv")) as f:
        assert f.read().splitlines() == uids
    header, ann = csv_rows(os.path.join(root, "annotations.csv"))
    assert header == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    assert len(ann) == summary["n_nodules"] > 0
    assert {r[0] for r in ann} <= set(uids)
    diameters = np.array([float(r[4]) for r in ann])
    assert diameters.min() >= 3.0 and diameters.max() <= 30.0
    header, exc = csv_rows(os.path.join(root, "annotations_excluded.csv"))
    assert header == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    exc_d = [float(r[4]) for r in exc]
    assert -1.0 in exc_d and any(0 < d < 3 for d in exc_d)
    header, cand = csv_rows(os.path.join(root, "candidates.csv"))
    assert header == ["seriesuid", "coordX", "coordY", "coordZ", "class"]
    assert {r[4] for r in cand} == {"0", "1"}
    positives = {(r[0], r[1], r[2], r[3]) for r in cand if r[4] == "1"}
    for r in ann:  # every nodule is a class-1 candidate at its exact centre
        assert (r[0], r[1], r[2], r[3]) in positives
    assert sum(r[4] == "0" for r in cand) > 10 * N_SCANS


def test_geometry_read_back_as_intended(dataset):
    root, summary = dataset
    kinds = set()
    for uid in summary["uids"]:
        scan_path, mask_path = luna16_scan_paths(root, summary, uid)
        image, array = _read(scan_path)
        mask, labels = _read(mask_path)
        assert image.GetPixelID() == sitk.sitkInt16 and mask.GetPixelID() == sitk.sitkUInt8
        assert array.shape == tuple(SHAPE) == tuple(summary["shape"][uid])
        for img in (image, mask):
            np.testing.assert_array_equal(img.GetSpacing(), summary["spacing"][uid])
            np.testing.assert_array_equal(img.GetOrigin(), summary["origin"][uid])
            np.testing.assert_array_equal(img.GetDirection(), summary["direction"][uid])
        sx, sy, sz = image.GetSpacing()
        assert sx == sy and 0.6 <= sx <= 0.9 and 1.0 <= sz <= 2.5
        ox, oy, oz = image.GetOrigin()
        assert -200 <= ox <= -100 and -200 <= oy <= -100 and -400 <= oz <= -50
        direction = np.asarray(image.GetDirection()).reshape(3, 3)
        assert np.allclose(np.abs(direction), np.eye(3))
        kinds.add("flipped" if np.any(np.diag(direction) < 0) else "plain")
        assert uid in summary["flipped_uids"] or np.allclose(direction, np.eye(3))
        assert set(np.unique(labels)) <= {0, 3, 4, 5} and {3, 4} <= set(np.unique(labels))
        lung_hu = np.median(array[(labels == 3) | (labels == 4)])
        assert -900 <= lung_hu <= -800
        assert np.median(array[0, :4, :4]) <= -990  # air (or scanner padding) in the corner
    assert kinds == {"plain", "flipped"}


def test_explicit_geometry_round_trips(tmp_path):
    rng = np.random.default_rng(3)
    direction = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    volume, mask, origin, spacing, got_dir, nodules = default_profile.make_scan(
        rng,
        shape=(40, 96, 128),
        spacing=(0.7, 0.7, 2.0),
        origin=(-150.25, -170.5, -222.0),
        direction=direction,
        diameters=[9.0],
    )
    assert volume.dtype == np.int16 and volume.shape == (40, 96, 128)
    assert mask.dtype == np.uint8 and mask.shape == volume.shape
    assert (origin, spacing, got_dir) == ((-150.25, -170.5, -222.0), (0.7, 0.7, 2.0), direction)
    assert len(nodules) == 1 and len(nodules[0]) == 4
    path = str(tmp_path / "one.mhd")
    write_metaimage(path, volume, origin, spacing, direction)
    image, array = _read(path)
    assert image.GetOrigin() == origin and image.GetSpacing() == spacing
    assert image.GetDirection() == direction
    np.testing.assert_array_equal(array, volume)
    assert sorted(os.listdir(tmp_path)) == ["one.mhd", "one.raw"]


def _check_annotations_land_on_nodules(root, summary, uids):
    _, ann = csv_rows(os.path.join(root, "annotations.csv"))
    checked = 0
    for uid in uids:
        rows = [r for r in ann if r[0] == uid]
        if not rows:
            continue
        scan_path, mask_path = luna16_scan_paths(root, summary, uid)
        image, array = _read(scan_path)
        mask, labels = _read(mask_path)
        for r in rows:
            xyz = [float(v) for v in r[1:4]]
            zyx = _voxel(image, xyz)
            assert all(0 <= i < n for i, n in zip(zyx, array.shape, strict=True)), (uid, r)
            assert array[zyx] > BRIGHT_HU, (uid, r, array[zyx])
            assert labels[_voxel(mask, xyz)] in (3, 4), (uid, r)
            checked += 1
    return checked


def test_annotations_land_on_bright_lung_voxels_plain_scans(dataset):
    root, summary = dataset
    plain = [u for u in summary["uids"] if u not in summary["flipped_uids"]]
    assert _check_annotations_land_on_nodules(root, summary, plain) >= 3


def test_annotations_land_on_bright_lung_voxels_flipped_scans(dataset):
    root, summary = dataset
    flipped = summary["flipped_uids"]
    assert _check_annotations_land_on_nodules(root, summary, flipped) >= 1
    # The flips matter: ignoring the direction puts a centre outside the volume.
    _, ann = csv_rows(os.path.join(root, "annotations.csv"))
    for r in (r for r in ann if r[0] in flipped):
        origin = np.asarray(summary["origin"][r[0]])
        naive = (np.asarray([float(v) for v in r[1:4]]) - origin) / summary["spacing"][r[0]]
        assert naive.min() < -0.5


@pytest.mark.parametrize("flip", [(1, 1, 1), *FLIPS])
def test_every_flip_writes_correct_world_annotations(tmp_path, flip):
    direction = tuple(float(v) for v in np.diag(np.asarray(flip, float)).ravel())
    scan = default_profile.synthesize_scan(
        np.random.default_rng(11), shape=(40, 96, 96), direction=direction, diameters=[10.0, 6.0]
    )
    assert len(scan.nodules) == 2
    path = str(tmp_path / "scan.mhd")
    write_metaimage(path, scan.volume, scan.origin, scan.spacing, scan.direction)
    image, array = _read(path)
    for x, y, z, _ in scan.nodules:
        zyx = _voxel(image, (x, y, z))
        assert array[zyx] > BRIGHT_HU and scan.lung_mask[zyx] in (3, 4)


def test_solid_nodule_diameters_match_annotations(dataset):
    root, summary = dataset
    measured = []
    for uid, nodules in summary["nodules"].items():
        big_solid = [n for n in nodules if n["kind"] == "solid" and n["d"] >= 6.0]
        if not big_solid:
            continue
        image, array = _read(luna16_scan_paths(root, summary, uid)[0])
        for n in big_solid:
            d, isolated = _measured_diameter(image, array, (n["x"], n["y"], n["z"]), n["d"])
            assert isolated, (uid, n)
            measured.append((n["d"], d))
    # Full-size scan with large nodules, written and read back like the dataset.
    scan = default_profile.synthesize_scan(
        np.random.default_rng(5),
        shape=(64, 256, 256),
        diameters=[24.0, 14.0],
        part_solid_fraction=0,
    )
    image = sitk.GetImageFromArray(scan.volume)
    image.SetOrigin(scan.origin), image.SetSpacing(scan.spacing), image.SetDirection(scan.direction)
    for x, y, z, d_ann in scan.nodules:
        d, isolated = _measured_diameter(image, scan.volume, (x, y, z), d_ann)
        assert isolated
        measured.append((d_ann, d))
    assert len(measured) >= 4
    for d_ann, d in measured:
        assert abs(d / d_ann - 1.0) < 0.25, (d_ann, d)


def test_part_solid_nodules_have_a_smaller_solid_core():
    scan = default_profile.synthesize_scan(
        np.random.default_rng(2), shape=(48, 160, 160), diameters=[16.0], part_solid_fraction=1.0
    )
    assert scan.nodule_kinds == ("part-solid",)
    image = sitk.GetImageFromArray(scan.volume)
    image.SetOrigin(scan.origin), image.SetSpacing(scan.spacing), image.SetDirection(scan.direction)
    x, y, z, d_ann = scan.nodules[0]
    d, isolated = _measured_diameter(image, scan.volume, (x, y, z), d_ann)
    assert isolated and 1.5 <= d < 0.8 * d_ann


def test_negative_patients_exist(dataset):
    root, summary = dataset
    _, ann = csv_rows(os.path.join(root, "annotations.csv"))
    annotated = {r[0] for r in ann}
    negatives = set(summary["negative_uids"])
    assert 1 <= len(negatives) <= 4
    assert negatives == set(summary["uids"]) - annotated
    assert len(annotated) >= N_SCANS - 4


def test_vessels_exist_far_from_nodules(dataset):
    root, summary = dataset
    _, ann = csv_rows(os.path.join(root, "annotations.csv"))
    _, exc = csv_rows(os.path.join(root, "annotations_excluded.csv"))
    for uid in summary["uids"]:
        scan_path, mask_path = luna16_scan_paths(root, summary, uid)
        image, array = _read(scan_path)
        _, labels = _read(mask_path)
        spacing = np.asarray(image.GetSpacing())[::-1]
        far = (labels == 3) | (labels == 4)
        zz, yy, xx = np.indices(array.shape, sparse=True)
        for r in (r for r in ann + exc if r[0] == uid):
            c = _voxel(image, [float(v) for v in r[1:4]])
            radius = max(float(r[4]), 10.0) / 2 + 10.0
            dist2 = sum(
                ((g - ci) * s) ** 2 for g, ci, s in zip((zz, yy, xx), c, spacing, strict=True)
            )
            far &= dist2 > radius**2
        bright = (array > BRIGHT_HU) & far
        assert bright.sum() >= 100, (uid, int(bright.sum()))


def _tree(root):
    out = {}
    for base, _, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            out[os.path.relpath(path, root)] = path
    return out


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    shape = (32, 80, 80)
    runs = {}
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        runs[name] = str(tmp_path / name)
        luna16.generate_dataset(runs[name], 3, seed=seed, shape=shape)
    a, b, c = (_tree(runs[k]) for k in "abc")
    assert sorted(a) == sorted(b) and len(a) == 3 * 4 + 4
    for rel, path in a.items():
        with open(path, "rb") as fa, open(b[rel], "rb") as fb:
            assert fa.read() == fb.read(), rel
    assert not set(a) & set(c) - {
        "annotations.csv",
        "annotations_excluded.csv",
        "candidates.csv",
        "seriesuids.csv",
    }
    with open(a["annotations.csv"]) as fa, open(c["annotations.csv"]) as fc:
        assert fa.read() != fc.read()
    # Re-running with the same arguments leaves every file untouched.
    mtimes = {rel: os.stat(p).st_mtime_ns for rel, p in a.items()}
    luna16.generate_dataset(runs["a"], 3, seed=4, shape=shape)
    assert {rel: os.stat(p).st_mtime_ns for rel, p in _tree(runs["a"]).items()} == mtimes


def test_cli_and_refusal_to_mix_datasets(tmp_path):
    out = str(tmp_path / "cli")
    args = ("tf_agg3d.data.synthetic", "--out", out, "--n-scans", 2, "--shape", "24,64,64")
    ok = run_module(*args, "--seed", 1)
    assert ok.returncode == 0, ok.stderr
    with open(os.path.join(out, "seriesuids.csv")) as f:
        first = f.read().split()
    assert len(first) == 2 and "wrote 2 scans" in ok.stdout
    refused = run_module(*args, "--seed", 2)
    assert refused.returncode == 2 and "overwrite" in refused.stderr
    forced = run_module(*args, "--seed", 2, "--overwrite")
    assert forced.returncode == 0, forced.stderr
    with open(os.path.join(out, "seriesuids.csv")) as f:
        second = f.read().split()
    assert not set(first) & set(second)
    left = {
        n.split(".mhd")[0]
        for n in os.listdir(os.path.join(out, "seg-lungs-LUNA16"))
        if n.endswith(".mhd")
    }
    assert left == set(second)

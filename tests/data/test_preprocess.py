"""preprocess_scan: an annotated sphere must land on itself in the cache, at its true size."""

from __future__ import annotations

import numpy as np
import pytest

from tf_agg3d.config import PreprocessConfig
from tf_agg3d.data import cache
from tf_agg3d.data.errors import DataError
from tf_agg3d.data.luna16.csv_io import Annotation
from tf_agg3d.data.preprocessing.cache_entry import preprocess_scan
from tf_agg3d.data.readers.sitk import read_lung_mask, read_scan
from tf_agg3d.data.scan import voxel_to_world, world_to_voxel

SHAPE = (48, 96, 96)
SPHERE_D = 10.0
BRIGHT = -375.0  # half way between lung (-850) and the sphere (100): the half-maximum edge


def _phantom(scans, tmp_path, geometry_name, sphere_offset_mm=(0.0, 0.0, 0.0)):
    """Writes scan + mask; returns (scan, mask, sphere world centre xyz)."""
    spacing, origin, direction = scans.GEOMETRIES[geometry_name]
    sx, sy, sz = spacing
    # Centre of the right lung (label 4) in mm along the index axes (z, y, x), see chest_phantom.
    centre_mm = np.array(
        [
            (SHAPE[0] - 1) * sz / 2,
            (SHAPE[1] - 1) * sy / 2,
            (SHAPE[2] - 1) * sx / 2 + 0.2 * SHAPE[2] * sx,
        ]
    )
    centre_mm += np.asarray(sphere_offset_mm)
    image, labels = scans.chest_phantom(SHAPE, spacing, centre_mm, SPHERE_D)
    scan_path = scans.write_mhd(tmp_path / "subset0" / "u.mhd", image, spacing, origin, direction)
    mask_path = scans.write_mhd(
        tmp_path / "seg-lungs-LUNA16" / "u.mhd", labels, spacing, origin, direction, compress=True
    )
    scan = read_scan(scan_path)
    zyx_index = centre_mm / np.array([sz, sy, sx])
    world = voxel_to_world(scan, zyx_index)
    return scan, read_lung_mask(mask_path), world


def _sphere_stats(volume, near_zyx, half=9):
    """(centroid (z, y, x), equivalent diameter in voxels) of the bright blob near a point."""
    lo = np.maximum(np.round(near_zyx).astype(int) - half, 0)
    box = volume[
        lo[0] : lo[0] + 2 * half + 1, lo[1] : lo[1] + 2 * half + 1, lo[2] : lo[2] + 2 * half + 1
    ].astype(np.float64)
    # Fraction of each voxel covered by the sphere, from its linear HU (partial volume).
    frac = np.clip((box + 850.0) / 950.0, 0.0, 1.0)
    frac[box < -700] = 0.0  # noise around lung level is not sphere
    idx = np.argwhere(frac > 0)
    w = frac[frac > 0]
    centroid = (idx * w[:, None]).sum(0) / w.sum() + lo
    diameter = (6.0 * w.sum() / np.pi) ** (1.0 / 3.0)
    return centroid, diameter


@pytest.mark.parametrize("name", ["identity_aniso", "y_flip", "z_flip", "oblique"])
def test_sphere_lands_on_its_annotation(scans, tmp_path, name):
    scan, mask, world = _phantom(scans, tmp_path, name)
    config = PreprocessConfig()
    nodule = (*world, SPHERE_D)
    volume, meta = preprocess_scan(scan, mask, config, [nodule], seriesuid="u", subset=0)

    assert volume.dtype == np.int16 and list(volume.shape) == meta["shape"]
    assert meta["lung_mask"] == "luna16" and meta["seriesuid"] == "u" and meta["subset"] == 0
    box = meta["nodules"][0]
    zyx = np.array([box["z"], box["y"], box["x"]])
    assert box["d"] == SPHERE_D
    # The annotated voxel is on the sphere.
    assert volume[tuple(np.round(zyx).astype(int))] > 0
    # The sphere, measured in the cache, is where the annotation says and as large.
    centroid, diameter = _sphere_stats(volume, zyx)
    np.testing.assert_allclose(centroid, zyx, atol=0.5)
    assert abs(diameter - SPHERE_D) < 1.0
    # The sidecar affine takes the measured centre back to the annotation's world point.
    np.testing.assert_allclose(cache.cache_voxel_to_world(meta, centroid), world, atol=0.5)
    np.testing.assert_allclose(cache.cache_voxel_to_world(meta, zyx), world, atol=1e-3)
    # 1 mm isotropic, in the scan's direction.
    a = np.asarray(meta["affine"])
    np.testing.assert_allclose(np.linalg.norm(a[:3, :3], axis=0), 1.0, atol=1e-9)
    np.testing.assert_allclose(a[:3, :3][:, ::-1], scan.direction, atol=1e-9)
    # The source geometry is recorded for world <-> source voxel maps.
    np.testing.assert_allclose(world_to_voxel(meta, world), world_to_voxel(scan, world))


def test_window_fill_and_crop(scans, tmp_path):
    scan, mask, _ = _phantom(scans, tmp_path, "identity_aniso")
    config = PreprocessConfig(
        hu_window=(-1000.0, 50.0), fill_hu=-7, crop_margin_mm=5.0, lung_dilation_mm=3.0
    )
    volume, meta = preprocess_scan(scan, mask, config)
    assert volume.min() >= -1000 and volume.max() <= 50
    assert volume[0, 0, 0] == -7  # a bbox corner is far from the elliptic lungs
    assert meta["hu_window"] == [-1000.0, 50.0] and meta["fill_hu"] == -7
    # Crop: lung extent + 2 * margin along each axis (lungs' extent from the mask, in mm).
    lungs = np.argwhere(mask.array > 0)
    extent_mm = (lungs.max(0) - lungs.min(0)) * scan.spacing[::-1]
    assert np.all(np.abs(np.asarray(volume.shape) - (extent_mm + 2 * 5.0)) <= 3)


def test_threshold_fallback_without_mask(scans, tmp_path, caplog):
    scan, _, world = _phantom(scans, tmp_path, "z_flip")
    volume, meta = preprocess_scan(scan, None, PreprocessConfig(), [(*world, SPHERE_D)])
    assert meta["lung_mask"] == "threshold"
    assert "threshold" in caplog.text
    box = meta["nodules"][0]
    zyx = np.array([box["z"], box["y"], box["x"]])
    assert volume[tuple(np.round(zyx).astype(int))] > 0
    centroid, diameter = _sphere_stats(volume, zyx)
    np.testing.assert_allclose(cache.cache_voxel_to_world(meta, centroid), world, atol=0.5)
    assert abs(diameter - SPHERE_D) < 1.0
    # The lungs are kept (HU about -850) and the outside air is filled.
    assert (volume < -700).mean() > 0.2 and volume[0, 0, 0] == 0


def test_excluded_minus_one_becomes_10mm(scans, tmp_path):
    scan, mask, world = _phantom(scans, tmp_path, "identity_aniso")
    _, meta = preprocess_scan(scan, mask, PreprocessConfig(), (), [(*world, -1.0)])
    assert meta["excluded"][0]["d"] == 10.0 and meta["nodules"] == []


def test_annotation_outside_scan_names_uid_and_row(scans, tmp_path):
    scan, mask, world = _phantom(scans, tmp_path, "y_flip")
    far = Annotation(
        "1.2.3.uid", world[0], world[1] + 500.0, world[2], 6.0, line=7, path="annotations.csv"
    )
    with pytest.raises(
        DataError,
        match=r"u\.mhd: seriesuid 1\.2\.3\.uid: nodule #0 "
        r"\(annotations\.csv line 7\).*outside the scan",
    ):
        preprocess_scan(scan, mask, PreprocessConfig(), [far], seriesuid="1.2.3.uid")


def test_mask_not_overlapping_scan(scans, tmp_path):
    scan, mask, _ = _phantom(scans, tmp_path, "identity_aniso")
    mask.origin = mask.origin + 1000.0
    with pytest.raises(DataError, match=r"seg-lungs-LUNA16/u\.mhd.*does not overlap"):
        preprocess_scan(scan, mask, PreprocessConfig())

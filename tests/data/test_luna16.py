"""Scan reading, validation and world <-> voxel maps, checked against SimpleITK itself."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tf_agg3d.data.errors import DataError
from tf_agg3d.data.luna16.layout import find_luna16_scans, find_lung_mask
from tf_agg3d.data.readers.sitk import read_lung_mask, read_scan
from tf_agg3d.data.scan import Geometry, voxel_to_world, world_to_voxel


def _random_scan(shape=(7, 9, 11), seed=0):
    return np.random.default_rng(seed).integers(-1024, 2000, shape).astype(np.int16)


# --------------------------------------------------------------------------------------------
# World <-> voxel
# --------------------------------------------------------------------------------------------


def test_world_to_voxel_matches_simpleitk(scans, geometry, tmp_path):
    name, spacing, origin, direction = geometry
    path = scans.write_mhd(tmp_path / f"{name}.mhd", _random_scan(), spacing, origin, direction)
    scan = read_scan(path)
    reference = sitk.ReadImage(path)
    rng = np.random.default_rng(1)
    ijk = rng.uniform(-1, 12, size=(20, 3))
    world = np.array([reference.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in ijk])
    # The independent reference: SimpleITK's own physical point -> continuous index.
    expected = np.array(
        [reference.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in world]
    )[:, ::-1]
    got = world_to_voxel(scan, world)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(voxel_to_world(scan, got), world, atol=1e-6)


def test_voxel_to_world_matches_simpleitk(scans, geometry):
    _, spacing, origin, direction = geometry
    image = scans.make_image(_random_scan(), spacing, origin, direction)
    zyx = np.array([[0, 0, 0], [6, 8, 10], [2.5, 3.25, 7.75]], dtype=np.float64)
    expected = np.array(
        [image.TransformContinuousIndexToPhysicalPoint(p[::-1].tolist()) for p in zyx]
    )
    np.testing.assert_allclose(voxel_to_world(image, zyx), expected, atol=1e-9)
    # A single point keeps its [3] shape.
    single = voxel_to_world(image, zyx[1])
    assert single.shape == (3,)
    np.testing.assert_allclose(single, expected[1], atol=1e-9)


def test_round_trip_world_voxel_world(geometry):
    _, spacing, origin, direction = geometry
    geo = Geometry._make(origin, spacing, direction)
    xyz = np.random.default_rng(2).uniform(-300, 300, size=(50, 3))
    back = voxel_to_world(geo, world_to_voxel(geo, xyz))
    np.testing.assert_allclose(back, xyz, atol=1e-9)


def test_flip_changes_voxel_order(scans):
    # With a y flip, a point at larger world y lies at a smaller y index: direction is used.
    spacing, origin, direction = scans.GEOMETRIES["y_flip"]
    geo = {"origin": origin, "spacing": spacing, "direction": direction.ravel().tolist()}
    a = world_to_voxel(geo, [origin[0], origin[1] - 9.0, origin[2]])
    np.testing.assert_allclose(a, [0.0, 10.0, 0.0], atol=1e-9)


def test_points_shape_is_checked():
    geo = Geometry._make((0, 0, 0), (1, 1, 1), np.eye(3))
    with pytest.raises(ValueError, match="shape"):
        world_to_voxel(geo, [1.0, 2.0])


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def test_read_scan_keeps_array_and_geometry(scans, tmp_path):
    spacing, origin, direction = scans.GEOMETRIES["z_flip"]
    array = _random_scan()
    scan = read_scan(scans.write_mhd(tmp_path / "a.mhd", array, spacing, origin, direction))
    assert scan.array.dtype == np.int16 and scan.array.shape == (7, 9, 11)
    np.testing.assert_array_equal(scan.array, array)
    np.testing.assert_allclose(scan.origin, origin)
    np.testing.assert_allclose(scan.spacing, spacing)
    np.testing.assert_allclose(scan.direction, direction)
    assert scan.path.endswith("a.mhd")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_read_other_formats(scans, tmp_path, suffix):
    array = _random_scan()
    path = str(tmp_path / f"scan{suffix}")
    sitk.WriteImage(scans.make_image(array, (0.7, 0.7, 2.0), (1.0, 2.0, 3.0), np.eye(3)), path)
    scan = read_scan(path)
    np.testing.assert_array_equal(scan.array, array)
    np.testing.assert_allclose(scan.spacing, (0.7, 0.7, 2.0), atol=1e-6)


def test_read_float_scan_rounds_to_int16(scans, tmp_path):
    array = np.full((4, 5, 6), -500.4, np.float32)
    array[0, 0, 0] = 40000.0  # beyond int16: clipped
    scan = read_scan(scans.write_mhd(tmp_path / "f.mhd", array))
    assert scan.array.dtype == np.int16
    assert scan.array[1, 1, 1] == -500 and scan.array[0, 0, 0] == 32767


def test_read_dicom_series(tmp_path):
    array = _random_scan((5, 8, 9))
    folder = tmp_path / "dicom"
    folder.mkdir()
    spacing_xy, dz, origin = (0.75, 0.8), 2.5, (-100.0, -90.0, -200.0)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[0]):
        sl = sitk.GetImageFromArray(array[k])
        sl.SetSpacing(spacing_xy)
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1.2",
            "0008|0018": f"1.2.826.0.1.3680043.2.1125.1.2.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(str(v) for v in (origin[0], origin[1], origin[2] + k * dz)),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": str(dz),
            "0028|0030": f"{spacing_xy[1]}\\{spacing_xy[0]}",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)
    scan = read_scan(str(folder))
    np.testing.assert_array_equal(scan.array, array)
    np.testing.assert_allclose(scan.spacing, (0.75, 0.8, 2.5), atol=1e-4)
    np.testing.assert_allclose(scan.origin, origin, atol=1e-4)


def test_read_lung_mask_keeps_lung_labels(scans, tmp_path):
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 1, 1], labels[1, 2, 2], labels[2, 3, 3] = 3, 4, 5  # 5 is the trachea
    mask = read_lung_mask(scans.write_mhd(tmp_path / "m.mhd", labels, compress=True))
    assert mask.array.dtype == np.uint8
    assert mask.array.sum() == 2 and mask.array[2, 3, 3] == 0


def test_read_lung_mask_binary_and_empty(scans, tmp_path):
    binary = np.zeros((4, 5, 6), np.uint8)
    binary[1:3, 1:3, 1:3] = 255
    assert read_lung_mask(scans.write_mhd(tmp_path / "b.mhd", binary)).array.sum() == 8
    path = scans.write_mhd(tmp_path / "empty.mhd", np.zeros((4, 5, 6), np.uint8))
    with pytest.raises(DataError, match="empty.mhd.*empty"):
        read_lung_mask(path)


# --------------------------------------------------------------------------------------------
# Bad inputs: each a DataError that names the file
# --------------------------------------------------------------------------------------------


def _good(scans, tmp_path, name="bad.mhd", array=None, **kw):
    return scans.write_mhd(tmp_path / name, _random_scan() if array is None else array, **kw)


def _edit_header(path, key, value):
    lines = Path(path).read_text().splitlines()
    out = [f"{key} = {value}" if line.split("=")[0].strip() == key else line for line in lines]
    Path(path).write_text("\n".join(out) + "\n")


def test_missing_raw(scans, tmp_path):
    path = _good(scans, tmp_path)
    os.remove(path[:-4] + ".raw")
    with pytest.raises(DataError, match=r"bad\.mhd.*missing"):
        read_scan(path)


def test_truncated_raw(scans, tmp_path):
    path = _good(scans, tmp_path)
    raw = Path(path[:-4] + ".raw")
    raw.write_bytes(raw.read_bytes()[: raw.stat().st_size // 2])
    with pytest.raises(DataError, match=r"bad\.raw.*truncated"):
        read_scan(path)


def test_header_dims_disagree_with_data(scans, tmp_path):
    path = _good(scans, tmp_path)
    _edit_header(path, "DimSize", "11 9 5")  # the .raw holds 7 slices
    with pytest.raises(DataError, match=r"bad\.mhd.*disagrees"):
        read_scan(path)


def test_2d_image(tmp_path):
    path = str(tmp_path / "flat.mhd")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((9, 11), np.int16)), path)
    with pytest.raises(DataError, match=r"flat\.mhd.*3D"):
        read_scan(path)


def test_2d_nifti(tmp_path):
    path = str(tmp_path / "flat.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((9, 11), np.int16)), path)
    with pytest.raises(DataError, match=r"flat\.nii\.gz.*3D"):
        read_scan(path)


def test_4d_image(tmp_path):
    path = str(tmp_path / "four.mhd")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16), isVector=False), path)
    with pytest.raises(DataError, match=r"four\.mhd.*3D"):
        read_scan(path)


def test_4d_nrrd(tmp_path):
    path = str(tmp_path / "four.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16), isVector=False), path)
    with pytest.raises(DataError, match=r"four\.nrrd.*3D"):
        read_scan(path)


@pytest.mark.parametrize("spacing", ["0.7 0 1.25", "0.7 -0.7 1.25"])
def test_bad_spacing(scans, tmp_path, spacing):
    path = _good(scans, tmp_path)
    _edit_header(path, "ElementSpacing", spacing)
    with pytest.raises(DataError, match=r"bad\.mhd.*spacing"):
        read_scan(path)


def test_nan_filled_image(scans, tmp_path):
    path = _good(scans, tmp_path, array=np.full((4, 5, 6), np.nan, np.float32))
    with pytest.raises(DataError, match=r"bad\.mhd.*NaN"):
        read_scan(path)


def test_not_an_image(tmp_path):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"junk\.nii\.gz"):
        read_scan(str(path))


def test_missing_file_and_empty_dicom_folder(tmp_path):
    with pytest.raises(DataError, match=r"nope\.mhd.*no such file"):
        read_scan(str(tmp_path / "nope.mhd"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*no DICOM series"):
        read_scan(str(tmp_path / "empty"))


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


def test_find_luna16_scans_and_masks(scans, tmp_path):
    small = np.zeros((2, 2, 2), np.int16)
    scans.write_mhd(tmp_path / "subset0" / "1.2.3.mhd", small)
    scans.write_mhd(
        tmp_path / "subset1" / "subset1" / "1.2.4.mhd", small
    )  # zip unpacked one deeper
    scans.write_mhd(tmp_path / "subset2" / "1.2.5.mhd", small)
    scans.write_mhd(
        tmp_path / "seg-lungs-LUNA16" / "1.2.3.mhd", small.astype(np.uint8), compress=True
    )
    found = find_luna16_scans(str(tmp_path))
    assert {u: s for u, (_, s) in found.items()} == {"1.2.3": 0, "1.2.4": 1, "1.2.5": 2}
    assert list(find_luna16_scans(str(tmp_path), subsets=[0, 2])) == ["1.2.3", "1.2.5"]
    assert find_lung_mask(str(tmp_path), "1.2.3").endswith("seg-lungs-LUNA16/1.2.3.mhd")
    assert find_lung_mask(str(tmp_path), "1.2.4") is None


def test_duplicate_uid_across_subsets(scans, tmp_path):
    small = np.zeros((2, 2, 2), np.int16)
    scans.write_mhd(tmp_path / "subset0" / "1.2.3.mhd", small)
    scans.write_mhd(tmp_path / "subset1" / "1.2.3.mhd", small)
    with pytest.raises(DataError, match="1.2.3"):
        find_luna16_scans(str(tmp_path))

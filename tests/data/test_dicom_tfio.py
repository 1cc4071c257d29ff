"""DICOM series through tensorflow-io's decoder in tf.data, checked against SimpleITK's reader."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tf_agg3d.config import PreprocessConfig
from tf_agg3d.data.errors import DataError
from tf_agg3d.data.preprocessing.cache_entry import preprocess_scan
from tf_agg3d.data.readers import dicom_tfio
from tf_agg3d.data.readers.sitk import read_scan
from tf_agg3d.utils.filesystems import ensure_filesystem

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dicom_series_writer import oblique_direction, write_ct_series  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE = (9, 20, 24)


def _hu(seed=0, shape=SHAPE):
    return np.random.default_rng(seed).integers(-1100, 1600, size=shape)


def _shuffled_names(n, seed=3):
    names = [f"slice_{k:03d}.dcm" for k in range(n)]
    random.Random(seed).shuffle(names)
    return names


def _assert_same_scan(a, b):
    assert a.array.shape == b.array.shape
    assert a.array.dtype == b.array.dtype == np.int16
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.spacing, b.spacing, atol=1e-4, rtol=0)
    np.testing.assert_allclose(a.origin, b.origin, atol=1e-4, rtol=0)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-6, rtol=0)


SERIES = {
    # name: writer keyword arguments
    "axial_shuffled": dict(names=_shuffled_names(SHAPE[0])),
    "oblique_slope2": dict(
        direction=oblique_direction(0.3, 0.2),
        slope=2.0,
        intercept=-1024.0,
        names=_shuffled_names(SHAPE[0], seed=5),
    ),
    "flipped_unit_intercept0": dict(
        direction=np.diag([-1.0, 1.0, -1.0]), intercept=0.0, origin=(50.0, -20.0, 12.5)
    ),
    "jpeg2000": dict(compress="JPEG2000", spacing=(0.6, 0.6, 1.25)),
}


@pytest.mark.needs_tfio
@pytest.mark.skipif(not dicom_tfio.tfio_dicom_available(), reason="needs tensorflow-io")
class TestTfioReader:
    @pytest.mark.parametrize("name", sorted(SERIES))
    def test_matches_simpleitk_voxel_for_voxel(self, tmp_path, name):
        folder = str(tmp_path / name)
        write_ct_series(folder, _hu(), **SERIES[name])
        ref = read_scan(folder, dicom_backend="sitk")
        got = read_scan(folder, dicom_backend="tfio")
        _assert_same_scan(got, ref)
        assert got.path == folder
        if name == "oblique_slope2":
            # Not axis-aligned, and the slope really is applied (odd HU cannot come from slope 2).
            assert np.abs(got.direction - np.eye(3)).max() > 0.1
            assert np.all(got.array % 2 == 0)

    def test_slice_dataset_yields_hu_in_file_order(self, tmp_path):
        hu = _hu(1)
        paths = write_ct_series(tmp_path / "s", hu, slope=2.0, intercept=-1000.0)
        ref = read_scan(str(tmp_path / "s"), dicom_backend="sitk").array
        elements = list(dicom_tfio.slice_dataset(paths[::-1]).as_numpy_iterator())
        assert [e["path"].decode() for e in elements] == paths[::-1]
        assert all(e["ok"] for e in elements)
        np.testing.assert_array_equal(np.stack([e["hu"] for e in elements[::-1]]), ref)

    def test_missing_slice_names_the_gap(self, tmp_path):
        folder = tmp_path / "gap"
        paths = write_ct_series(folder, _hu(), spacing=(0.7, 0.8, 2.0), origin=(0, 0, -100.0))
        os.unlink(paths[4])
        with pytest.raises(DataError) as err:
            read_scan(str(folder), dicom_backend="tfio")
        message = str(err.value)
        assert "1 slice(s) missing" in message and "4.000 mm" in message, message
        assert os.path.basename(paths[3]) in message and os.path.basename(paths[5]) in message

    def test_duplicate_position_is_an_error(self, tmp_path):
        folder = tmp_path / "dup"
        paths = write_ct_series(folder, _hu())
        shutil.copy(paths[3], folder / "copy_of_slice_3.dcm")
        with pytest.raises(DataError, match="same position"):
            read_scan(str(folder), dicom_backend="tfio")

    def test_file_without_pixel_data_is_named(self, tmp_path):
        folder = tmp_path / "nopixels"
        paths = write_ct_series(folder, _hu())
        with open(paths[2], "rb") as f:
            raw = f.read()
        # Cut the file at the Pixel Data element (7FE0,0010): a DICOM object with no image,
        # as a structured report or a presentation state is.
        cut = raw.rfind(b"\xe0\x7f\x10\x00")
        assert cut > 0
        with open(paths[2], "wb") as f:
            f.write(raw[:cut])
        with pytest.raises(DataError) as err:
            read_scan(str(folder), dicom_backend="tfio")
        assert paths[2] in str(err.value) and "cannot decode" in str(err.value)

    def test_non_dicom_file_is_named(self, tmp_path):
        folder = tmp_path / "junk"
        write_ct_series(folder, _hu())
        (folder / "notes.dcm").write_bytes(b"not a DICOM file\n" * 40)
        with pytest.raises(DataError) as err:
            read_scan(str(folder), dicom_backend="tfio")
        assert str(folder / "notes.dcm") in str(err.value)

    def test_hidden_files_and_dicomdir_are_ignored(self, tmp_path):
        folder = tmp_path / "extras"
        write_ct_series(folder, _hu())
        (folder / ".DS_Store").write_bytes(b"\0" * 64)
        (folder / "DICOMDIR").write_bytes(b"\0" * 64)
        got = read_scan(str(folder), dicom_backend="tfio")
        assert got.shape == SHAPE

    def test_largest_series_is_read_like_simpleitk(self, tmp_path):
        folder = tmp_path / "two"
        write_ct_series(folder, _hu(), seed=1)
        # A 3-slice scout of another series beside the CT, with other names and geometry.
        write_ct_series(
            folder, _hu(4)[:3], seed=2, names=[f"scout{k}.dcm" for k in range(3)], origin=(0, 0, 0)
        )
        _assert_same_scan(
            read_scan(str(folder), dicom_backend="tfio"),
            read_scan(str(folder), dicom_backend="sitk"),
        )

    def test_single_slice_is_not_a_volume(self, tmp_path):
        write_ct_series(tmp_path / "one", _hu()[:1])
        with pytest.raises(DataError, match="need a 3D volume"):
            read_scan(str(tmp_path / "one"), dicom_backend="tfio")

    def test_both_backends_give_the_same_preprocessed_volume_and_affine(self, tmp_path, scans):
        spacing = (0.75, 0.7, 2.0)
        image, _ = scans.chest_phantom((24, 64, 72), spacing, (23.0, 22.0, 30.0), 8.0)
        folder = str(tmp_path / "chest")
        write_ct_series(
            folder,
            image,
            spacing=spacing,
            origin=(-25.0, -20.0, -300.0),
            direction=oblique_direction(0.1, 0.05),
            names=_shuffled_names(image.shape[0]),
        )
        config = PreprocessConfig()
        results = {}
        for backend in ("sitk", "tfio"):
            scan = read_scan(folder, dicom_backend=backend)
            results[backend] = preprocess_scan(scan, None, config, seriesuid="chest")
        (v_sitk, m_sitk), (v_tfio, m_tfio) = results["sitk"], results["tfio"]
        np.testing.assert_array_equal(v_tfio, v_sitk)
        np.testing.assert_allclose(m_tfio["affine"], m_sitk["affine"], atol=1e-6)
        assert m_tfio["shape"] == m_sitk["shape"]

    def test_auto_uses_tfio_when_it_loads(self, tmp_path, monkeypatch):
        folder = str(tmp_path / "auto")
        write_ct_series(folder, _hu())
        calls = []
        real = dicom_tfio.read_dicom_series
        monkeypatch.setattr(dicom_tfio, "read_dicom_series", lambda p: calls.append(p) or real(p))
        read_scan(folder)
        assert calls == [folder]


def test_auto_falls_back_to_simpleitk_without_tfio(tmp_path, monkeypatch):
    folder = str(tmp_path / "fallback")
    write_ct_series(folder, _hu())
    monkeypatch.setattr(dicom_tfio, "tfio_dicom_available", lambda: False)
    monkeypatch.setattr(
        dicom_tfio, "read_dicom_series", lambda p: pytest.fail("tensorflow-io path taken")
    )
    scan = read_scan(folder)
    assert scan.shape == SHAPE


def test_tfio_backend_without_tfio_names_the_extra(tmp_path, monkeypatch):
    folder = str(tmp_path / "noextra")
    write_ct_series(folder, _hu())
    # A None entry in sys.modules makes `import tensorflow_io` raise ImportError.
    monkeypatch.setitem(sys.modules, "tensorflow_io", None)
    with pytest.raises(ImportError, match=r"pip install tf_agg3d\[io\]"):
        read_scan(folder, dicom_backend="tfio")
    with pytest.raises(ImportError, match=r"pip install tf_agg3d\[io\]"):
        ensure_filesystem("s3://bucket/x")


def test_unknown_backend_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="dicom_backend"):
        read_scan(str(tmp_path), dicom_backend="gdcm")


def test_package_imports_without_loading_tensorflow_io():
    code = (
        "import sys\n"
        "import tf_agg3d.data.readers.sitk, tf_agg3d.data.readers.dicom_tfio, tf_agg3d.data.cache\n"
        "import tf_agg3d.data.preprocessing.runner, tf_agg3d.utils.files, tf_agg3d.utils.process\n"
        "assert 'tensorflow_io' not in sys.modules, 'tensorflow_io imported eagerly'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]

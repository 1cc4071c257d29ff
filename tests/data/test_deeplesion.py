"""DeepLesion reader and converter: hand-made DL_info rows with known answers, and bad input."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tf_agg3d.config import PreprocessConfig
from tf_agg3d.data import cache
from tf_agg3d.data.deeplesion.conversion import run_conversion
from tf_agg3d.data.deeplesion.dl_info import DL_INFO_COLUMNS, read_dl_info
from tf_agg3d.data.deeplesion.lesions import DeepLesionOptions, row_lesion, series_lesions
from tf_agg3d.data.errors import DataError
from tf_agg3d.evaluation.io import read_annotations

PX, DZ = 0.8, 2.5
SIZE = 96
SLICES = tuple(range(10, 21))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _row(uid="000001_01_01", key=15, bbox=(40, 50, 60, 66), long_px=20.0, **kw) -> dict:
    """A DL_info row; measurement endpoints span the box's width (long) and height (short)."""
    x1, y1, x2, y2 = bbox
    cx, cy = 0.5 * (x1 + x2), 0.5 * (y1 + y2)
    row = {
        "File_name": f"{uid}_{key:03d}.png",
        "Patient_index": int(uid[:6]),
        "Study_index": int(uid[7:9]),
        "Series_ID": int(uid[10:12]),
        "Key_slice_index": key,
        "Measurement_coordinates": f"{cx - long_px / 2}, {cy}, {cx + long_px / 2}, {cy}, "
        f"{cx}, {cy - 3}, {cx}, {cy + 3}",
        "Bounding_boxes": ", ".join(str(v) for v in bbox),
        "Lesion_diameters_Pixel_": f"{long_px}, 6",
        "Normalized_lesion_location": "0.5, 0.5, 0.5",
        "Coarse_lesion_type": 4,
        "Possibly_noisy": 0,
        "Slice_range": "12, 20",
        "Spacing_mm_px_": f"{PX}, {PX}, {DZ}",
        "Image_size": f"{SIZE}, {SIZE}",
        "DICOM_windows": "-175, 275",
        "Patient_gender": "F",
        "Patient_age": 60,
        "Train_Val_Test": 1,
    }
    row.update(kw)
    return row


def _write_info(root, rows) -> str:
    path = os.path.join(str(root), "DL_info.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(DL_INFO_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_png(path, plane_hu: np.ndarray, mode: str = "u16") -> None:
    if mode == "u16":
        image = Image.fromarray((plane_hu.astype(np.int32) + 32768).astype(np.uint16))
    elif mode == "u8":
        image = Image.fromarray(np.clip(plane_hu + 128, 0, 255).astype(np.uint8))
    else:  # rgb
        grey = np.clip(plane_hu + 128, 0, 255).astype(np.uint8)
        image = Image.fromarray(np.stack([grey] * 3, axis=-1))
    image.save(str(path))


def _write_series(root, uid="000001_01_01", numbers=SLICES, blobs=()) -> str:
    """Slices `numbers` of a body (40 HU square in -1000 HU air, -2048 outside a margin).

    Args:
      blobs: (slice number, column, row, radius px) of 300 HU discs to find again.
    """
    folder = os.path.join(str(root), "Images_png", uid)
    os.makedirs(folder, exist_ok=True)
    rows_, cols = np.mgrid[0:SIZE, 0:SIZE]
    for n in numbers:
        plane = np.full((SIZE, SIZE), -2048.0)
        plane[4:-4, 4:-4] = -1000.0
        plane[20:80, 16:86] = 40.0
        for number, col, row, r in blobs:
            if number == n:
                plane[(cols - col) ** 2 + (rows_ - row) ** 2 <= r * r] = 300.0
        _write_png(os.path.join(folder, f"{n:03d}.png"), plane)
    return folder


def _convert(root, tmp_path, **kw):
    out = os.path.join(str(tmp_path), "cache")
    lines = []
    summary = run_conversion(str(root), out, PreprocessConfig(), report=lines.append, **kw)
    return out, summary, lines


# --------------------------------------------------------------------------------------------
# Known answers
# --------------------------------------------------------------------------------------------


def test_centre_z_and_frame_from_lowest_present_slice(tmp_path):
    root = tmp_path / "dl"
    # Folder holds 10..20 while the row's Slice_range is 12..20: the frame starts at slice 10.
    _write_series(root, blobs=[(15, 50, 58, 4)])
    _write_info(root, [_row()])
    out, summary, _ = _convert(root, tmp_path)
    assert summary.ok == ["000001_01_01"] and not summary.failed
    meta = cache.read_meta(out, "000001_01_01")
    (n,) = meta["nodules"]
    # Box (40, 50, 60, 66): centre column 50, row 58; key 15, first slice 10.
    np.testing.assert_allclose(n["xyz_mm"], [50 * PX, 58 * PX, (15 - 10) * DZ], atol=1e-4)
    assert n["d"] == pytest.approx(20 * PX)
    assert n["large"] is False and n["lesion_type"] == 4
    assert meta["first_slice"] == 10 and meta["split"] == 1 and meta["subset"] is None
    # The affine maps the cache voxel of the nodule back to the same frame point.
    world = cache.cache_voxel_to_world(meta, [n["z"], n["y"], n["x"]])
    np.testing.assert_allclose(world, n["xyz_mm"], atol=1e-3)
    # ... and the drawn disc is at that voxel of the cache volume.
    volume = cache.read_volume(out, "000001_01_01")
    z, y, x = (int(round(v)) for v in (n["z"], n["y"], n["x"]))
    assert volume[z, y, x] > 200
    assert volume[z, y, x + 6] < 100  # the disc's radius is 4 px = 3.2 mm
    ann = read_annotations(os.path.join(out, "annotations.csv"))
    np.testing.assert_allclose(ann.xyz[0], n["xyz_mm"], atol=1e-4)
    assert ann.lesion_type.tolist() == [4] and ann.large.tolist() == [False]
    with open(os.path.join(out, "train_seriesuids.csv")) as f:
        assert f.read() == "000001_01_01\n"
    with open(os.path.join(out, "annotations_excluded.csv")) as f:
        assert f.read() == "seriesuid,coordX,coordY,coordZ,diameter_mm\n"


def test_black_borders_are_clipped_but_lesions_kept(tmp_path):
    root = tmp_path / "dl"
    _write_series(root)
    _write_info(root, [_row()])
    out, _, _ = _convert(root, tmp_path)
    meta = cache.read_meta(out, "000001_01_01")
    grid = meta["border_clip"]["grid_shape_zyx"]
    start, stop = meta["border_clip"]["start_zyx"], meta["border_clip"]["stop_zyx"]
    # Body rows 20..79 and columns 16..85 at 0.8 mm, plus the 10 mm margin, inside the grid.
    assert start[0] == 0 and stop[0] == grid[0]
    assert start[1] == pytest.approx(20 * PX - 10, abs=1.5)
    assert stop[2] == pytest.approx(85 * PX + 10, abs=1.5)
    assert stop[1] - start[1] < grid[1] and stop[2] - start[2] < grid[2]
    assert meta["shape"] == [b - a for a, b in zip(start, stop, strict=True)]


def test_small_lesion_rule_and_large_flag():
    opts = DeepLesionOptions()
    # Small (8 mm long diameter), box long side 8 px = 6.4 mm: the box wins.
    small_tight = row_lesion(_parsed(_row(bbox=(40, 50, 48, 55), long_px=10.0)), 10, opts)
    assert small_tight.diameter_mm == pytest.approx(6.4)
    # Small with a padded box (longer than the diameter): the diameter wins.
    small_padded = row_lesion(_parsed(_row(bbox=(40, 50, 60, 60), long_px=10.0)), 10, opts)
    assert small_padded.diameter_mm == pytest.approx(8.0)
    # Not small (16 mm): the long diameter even when the box is shorter.
    big = row_lesion(_parsed(_row(bbox=(40, 50, 52, 56), long_px=20.0)), 10, opts)
    assert big.diameter_mm == pytest.approx(16.0)
    large = row_lesion(_parsed(_row(bbox=(10, 10, 80, 80), long_px=61.0)), 10, opts)
    assert large.diameter_mm == pytest.approx(48.8) and large.large
    assert not row_lesion(_parsed(_row(long_px=59.9)), 10, opts).large


def _parsed(row: dict):
    from tf_agg3d.data.deeplesion.dl_info import parse_row

    return parse_row("DL_info.csv", 2, {k: str(v) for k, v in row.items()})


def test_duplicates_are_merged_others_kept():
    opts = DeepLesionOptions()
    rows = [
        _parsed(_row(key=15, long_px=20.0, Coarse_lesion_type=4)),
        # The same lesion read again on the next slice, slightly longer.
        _parsed(_row(key=16, long_px=22.0, Coarse_lesion_type=-1)),
        _parsed(_row(key=15, long_px=24.0, Coarse_lesion_type=4)),
        # A lesion elsewhere, and a tiny one next to the first (size ratio < 0.5): kept apart.
        _parsed(_row(key=15, bbox=(0, 0, 10, 10), long_px=8.0)),
        _parsed(_row(key=15, bbox=(44, 52, 52, 60), long_px=6.0)),
    ]
    lesions = series_lesions(rows, 10, opts)
    assert len(lesions) == 3
    merged = lesions[0]
    assert merged.lines == (2, 2, 2) and merged.key_slices == (15, 16, 15)
    np.testing.assert_allclose(merged.xyz, [50 * PX, 58 * PX, (15 + 16 + 15) / 3 * DZ - 10 * DZ])
    assert merged.diameter_mm == pytest.approx((20 + 22 + 24) / 3 * PX)
    assert merged.lesion_type == 4  # the most frequent type of its rows
    assert len(series_lesions(rows, 10, DeepLesionOptions(merge=False))) == 5


def test_noisy_rows_dropped_unless_kept(tmp_path):
    root = tmp_path / "dl"
    _write_series(root)
    _write_series(root, uid="000002_01_01")
    _write_info(
        root,
        [
            _row(),
            _row(key=17, bbox=(60, 30, 70, 40), long_px=10.0, Possibly_noisy=1),
            _row(uid="000002_01_01", Possibly_noisy=1, Train_Val_Test=3),
        ],
    )
    out, summary, lines = _convert(root, tmp_path)
    assert summary.ok == ["000001_01_01"] and not summary.failed
    assert len(cache.read_meta(out, "000001_01_01")["nodules"]) == 1
    assert any("000002_01_01" in line and "Possibly_noisy" in line for line in lines)
    out2, summary2, _ = _convert(
        root, tmp_path / "keep", options=DeepLesionOptions(keep_noisy=True)
    )
    assert sorted(summary2.ok) == ["000001_01_01", "000002_01_01"]
    assert len(cache.read_meta(out2, "000001_01_01")["nodules"]) == 2


def test_gap_between_slice_ranges_is_filled(tmp_path):
    root = tmp_path / "dl"
    _write_series(root, numbers=[*range(10, 21), *range(31, 41)])
    _write_info(
        root,
        [_row(Slice_range="10, 20"), _row(key=35, bbox=(20, 30, 30, 40), Slice_range="31, 40")],
    )
    out, summary, _ = _convert(root, tmp_path)
    assert not summary.failed
    meta = cache.read_meta(out, "000001_01_01")
    assert meta["filled_slices"] == list(range(21, 31))
    assert meta["nodules"][1]["xyz_mm"][2] == pytest.approx((35 - 10) * DZ)


def test_splits_selection_and_rerun_keeps_all_in_csv(tmp_path):
    root = tmp_path / "dl"
    _write_series(root)
    _write_series(root, uid="000002_01_01")
    _write_info(root, [_row(), _row(uid="000002_01_01", Train_Val_Test=3)])
    out, summary, _ = _convert(root, tmp_path, splits=[3])
    assert summary.ok == ["000002_01_01"]
    _, summary, _ = _convert(root, tmp_path, splits=[1])
    assert summary.ok == ["000001_01_01"]
    ann = read_annotations(os.path.join(out, "annotations.csv"))
    assert sorted(ann.seriesuid.tolist()) == ["000001_01_01", "000002_01_01"]
    with open(os.path.join(out, "test_seriesuids.csv")) as f:
        assert f.read() == "000002_01_01\n"
    _, summary, _ = _convert(root, tmp_path)
    assert sorted(summary.skipped) == ["000001_01_01", "000002_01_01"]


# --------------------------------------------------------------------------------------------
# Bad input: a clear DataError naming file / line / field; the other series go on
# --------------------------------------------------------------------------------------------


def _bad_case(root, case: str) -> tuple[str, list[str]]:
    """Writes a good series 000001 and a bad series 000002; returns (bad uid, message parts)."""
    _write_series(root)
    bad = "000002_01_01"
    folder = _write_series(root, uid=bad)
    rows = [_row()]
    expect: list[str]
    if case == "missing_slice":
        os.unlink(os.path.join(folder, "017.png"))
        rows.append(_row(uid=bad))
        expect = [folder, "missing slice PNG(s) 17", "line 3"]
    elif case in ("u8", "rgb"):
        plane = np.full((SIZE, SIZE), 40.0)
        _write_png(os.path.join(folder, "016.png"), plane, mode=case)
        rows.append(_row(uid=bad))
        expect = [os.path.join(folder, "016.png"), "16-bit"]
    elif case == "key_outside_range":
        rows.append(_row(uid=bad, key=25, Slice_range="12, 20"))
        expect = ["DL_info.csv", "line 3", "field 'Key_slice_index'", "outside Slice_range"]
    elif case == "spacing":
        rows.append(_row(uid=bad, Spacing_mm_px_="0.8, 0.8"))
        expect = ["DL_info.csv", "line 3", "field 'Spacing_mm_px_'", "expected 3"]
    elif case == "spacing_text":
        rows.append(_row(uid=bad, Spacing_mm_px_="0.8, 0.8, five"))
        expect = ["line 3", "field 'Spacing_mm_px_'", "'five'"]
    elif case == "seven_coordinates":
        rows.append(_row(uid=bad, Measurement_coordinates="1, 2, 3, 4, 5, 6, 7"))
        expect = ["line 3", "field 'Measurement_coordinates'", "expected 8", "got 7"]
    elif case == "missing_folder":
        rows.append(_row(uid="000003_01_01"))
        bad = "000003_01_01"
        expect = [os.path.join("Images_png", bad), "series folder is missing"]
    else:
        raise AssertionError(case)
    _write_info(root, rows)
    return bad, expect


BAD_CASES = [
    "missing_slice",
    "u8",
    "rgb",
    "key_outside_range",
    "spacing",
    "spacing_text",
    "seven_coordinates",
    "missing_folder",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_fails_only_its_series(tmp_path, case):
    root = tmp_path / "dl"
    bad, expect = _bad_case(root, case)
    out, summary, lines = _convert(root, tmp_path)
    assert summary.ok == ["000001_01_01"]
    assert list(summary.failed) == [bad]
    message = summary.failed[bad]
    for part in expect:
        assert part in message, (part, message)
    assert any(line.startswith("FAILED") or "FAILED" in line for line in lines)
    assert cache.list_uids(out) == ["000001_01_01"]
    ann = read_annotations(os.path.join(out, "annotations.csv"))
    assert ann.seriesuid.tolist() == ["000001_01_01"]


def test_row_error_is_a_data_error_with_line_and_field(tmp_path):
    path = _write_info(tmp_path, [_row(), _row(Measurement_coordinates="1, 2, 3, 4, 5, 6, 7")])
    rows, errors = read_dl_info(path)
    assert len(rows) == 1 and len(errors) == 1
    err = errors[0]
    assert isinstance(err, DataError)
    assert (err.path, err.line, err.field, err.series_uid) == (
        path,
        3,
        "Measurement_coordinates",
        "000001_01_01",
    )


def test_header_without_official_columns_is_refused(tmp_path):
    path = os.path.join(str(tmp_path), "DL_info.csv")
    with open(path, "w") as f:
        f.write("File_name,Key_slice_index\n000001_01_01_015.png,15\n")
    with pytest.raises(DataError, match="lacks column"):
        read_dl_info(path)


def test_cli_exit_status_and_outputs(tmp_path):
    root = tmp_path / "dl"
    _bad_case(root, "seven_coordinates")
    out = tmp_path / "cache"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tf_agg3d.preprocess_deeplesion",
            "--root",
            str(root),
            "--out",
            str(out),
            "--splits",
            "1,2,3",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "field 'Measurement_coordinates'" in proc.stdout
    assert cache.list_uids(str(out)) == ["000001_01_01"]
    assert (out / "annotations.csv").exists() and (out / "val_seriesuids.csv").exists()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tf_agg3d.preprocess_deeplesion",
            "--root",
            str(tmp_path / "no"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 2 and "DL_info.csv" in proc.stderr

"""Reader of DeepLesion's ``DL_info.csv``: every field parsed and validated, row by row.

The file has one row per annotated lesion (a RECIST measurement on a key slice) and the
official header::

    File_name,Patient_index,Study_index,Series_ID,Key_slice_index,Measurement_coordinates,
    Bounding_boxes,Lesion_diameters_Pixel_,Normalized_lesion_location,Coarse_lesion_type,
    Possibly_noisy,Slice_range,Spacing_mm_px_,Image_size,DICOM_windows,Patient_gender,
    Patient_age,Train_Val_Test

Multi-value fields are quoted, comma-separated numbers (``"0.488281, 0.488281, 5"``). Pixel
coordinates (measurements and boxes) are (x = column, y = row) of the key slice's PNG, 0-based
with the centre of a pixel at its integer index, as DeepLesion's own code indexes the images.

Validation is per row: a row that breaks a rule becomes a :class:`RowError` (a
:class:`~tf_agg3d.data.errors.DataError` naming the file, the line and the field, plus the
series it belongs to when its ``File_name`` can be read), and the other rows are still returned,
so a converter can skip only the series that row belongs to. A file without the official header
(or a row whose field count differs from the header's: the quoting is broken and no later row
can be trusted) raises DataError for the whole file.
"""

from __future__ import annotations

import dataclasses
import math
import re

from tf_agg3d.data.errors import DataError
from tf_agg3d.data.luna16 import csv_io

DL_INFO = "DL_info.csv"  # its name under the download's root
DL_INFO_COLUMNS = (
    "File_name",
    "Patient_index",
    "Study_index",
    "Series_ID",
    "Key_slice_index",
    "Measurement_coordinates",
    "Bounding_boxes",
    "Lesion_diameters_Pixel_",
    "Normalized_lesion_location",
    "Coarse_lesion_type",
    "Possibly_noisy",
    "Slice_range",
    "Spacing_mm_px_",
    "Image_size",
    "DICOM_windows",
    "Patient_gender",
    "Patient_age",
    "Train_Val_Test",
)
# <patient>_<study>_<series>_<key slice>.png, e.g. 000001_01_01_109.png.
# ASCII digits only (``\d`` would also take other scripts' digits).
FILE_NAME_RE = re.compile(r"^([0-9]+)_([0-9]+)_([0-9]+)_([0-9]+)\.png$")
# More digits than any index has: int() of a longer run is refused or slow, and cannot agree.
_MAX_INDEX_DIGITS = 15
LESION_TYPES = (1, 2, 3, 4, 5, 6, 7, 8, -1)
SPLITS = {1: "train", 2: "val", 3: "test"}
GENDERS = ("M", "F")


@dataclasses.dataclass(frozen=True)
class DLRow:
    """One validated row of DL_info.csv.

    Attributes:
      file_name: ``<patient>_<study>_<series>_<key slice>.png``.
      series_uid: the series folder name ``<patient>_<study>_<series>`` (the seriesuid used
        everywhere downstream), taken from ``File_name`` as written.
      patient, study, series: the index columns.
      key_slice: slice number of the key slice (``<NNN>.png`` in the folder).
      measurement: 8 pixel coordinates: long axis (x1, y1, x2, y2), then short axis.
      bbox: (x1, y1, x2, y2) pixels, x2 > x1 and y2 > y1.
      diameters_px: (long, short) RECIST diameters in pixels.
      normalized_location: 3 numbers, the lesion's relative body position.
      lesion_type: 1..8 or -1 (unknown).
      noisy: Possibly_noisy == 1.
      slice_range: (first, last) slice numbers provided around the key slice, inclusive.
      pixel_spacing: (x, y) mm per pixel.
      slice_interval: mm between consecutive slice numbers (third value of Spacing_mm_px_).
      image_size: the two numbers of Image_size.
      dicom_window: (low, high) HU of the display window.
      gender: "M" or "F".
      age: years, None where the file leaves it empty or NaN.
      split: 1 train, 2 validation, 3 test.
      line: 1-based line in `path`.
      path: the CSV file.
    """

    file_name: str
    series_uid: str
    patient: int
    study: int
    series: int
    key_slice: int
    measurement: tuple[float, ...]
    bbox: tuple[float, float, float, float]
    diameters_px: tuple[float, float]
    normalized_location: tuple[float, float, float]
    lesion_type: int
    noisy: bool
    slice_range: tuple[int, int]
    pixel_spacing: tuple[float, float]
    slice_interval: float
    image_size: tuple[int, int]
    dicom_window: tuple[float, float]
    gender: str
    age: float | None
    split: int
    line: int = 0
    path: str = ""


class RowError(DataError):
    """A row of DL_info.csv that breaks a rule; `series_uid` is "" when File_name is unreadable."""

    def __init__(self, path: str, problem: str, line: int, field: str, series_uid: str = ""):
        super().__init__(path, problem, line=line, field=field)
        self.series_uid = series_uid


def _numbers(path: str, line: int, row: dict, field: str, count: int, what: str) -> list[float]:
    text = row[field]
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != count or any(not p for p in parts):
        raise DataError(
            path,
            f"expected {count} comma-separated numbers ({what}), got {len([p for p in parts if p])}"
            f" in '{csv_io.show(text)}'",
            line=line,
            field=field,
        )
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise DataError(
                path,
                f"'{csv_io.show(part)}' in '{csv_io.show(text)}' is not a number",
                line=line,
                field=field,
            ) from None
        if not math.isfinite(value):
            raise DataError(
                path,
                f"'{csv_io.show(part)}' in '{csv_io.show(text)}' is not finite",
                line=line,
                field=field,
            )
        values.append(value)
    return values


def _integer(path: str, line: int, field: str, value: float) -> int:
    if value != int(value):
        raise DataError(path, f"{value:g} is not an integer", line=line, field=field)
    return int(value)


def _int(path: str, line: int, row: dict, field: str) -> int:
    return _integer(path, line, field, csv_io._float(path, line, row, field))


def _ints(path: str, line: int, row: dict, field: str, count: int, what: str) -> list[int]:
    return [_integer(path, line, field, v) for v in _numbers(path, line, row, field, count, what)]


def _positive(path: str, line: int, field: str, values, what: str, strict: bool = True) -> None:
    for v in values:
        if v < 0 or (strict and v == 0):
            bound = "> 0" if strict else ">= 0"
            raise DataError(path, f"{what} must be {bound}, got {v:g}", line=line, field=field)


def parse_row(path: str, line: int, row: dict) -> DLRow:
    """Parses and validates one row (a dict column -> text) of DL_info.csv.

    Raises:
      DataError: the first field that breaks a rule, with the file, line and field.
    """
    name = row["File_name"]
    match = FILE_NAME_RE.match(name)
    if not match:
        raise DataError(
            path,
            f"'{csv_io.show(name)}' is not <patient>_<study>_<series>_<key slice>.png",
            line=line,
            field="File_name",
        )
    series_uid = name.rsplit("_", 1)[0]
    ids = {}
    for field, text in zip(
        ("Patient_index", "Study_index", "Series_ID", "Key_slice_index"),
        match.groups(),
        strict=True,
    ):
        ids[field] = _int(path, line, row, field)
        if len(text) > _MAX_INDEX_DIGITS or ids[field] != int(text):
            raise DataError(
                path,
                f"{ids[field]} disagrees with File_name '{csv_io.show(name)}'",
                line=line,
                field=field,
            )
    key = ids["Key_slice_index"]
    what = "long axis x1, y1, x2, y2, then short axis x1, y1, x2, y2"
    measurement = _numbers(path, line, row, "Measurement_coordinates", 8, what)
    bbox = _numbers(path, line, row, "Bounding_boxes", 4, "x1, y1, x2, y2")
    if not (bbox[2] > bbox[0] and bbox[3] > bbox[1]):
        raise DataError(
            path, f"box {bbox} must have x2 > x1 and y2 > y1", line=line, field="Bounding_boxes"
        )
    # Pixel coordinates may lie outside the image: boxes are the RECIST extent padded by a few
    # pixels, which can cross the edge; the converter checks that the box centre is inside.
    diameters = _numbers(path, line, row, "Lesion_diameters_Pixel_", 2, "long, short")
    _positive(path, line, "Lesion_diameters_Pixel_", diameters[:1], "the long diameter")
    _positive(path, line, "Lesion_diameters_Pixel_", diameters[1:], "the short diameter", False)
    location = _numbers(path, line, row, "Normalized_lesion_location", 3, "x, y, z")
    lesion_type = _int(path, line, row, "Coarse_lesion_type")
    if lesion_type not in LESION_TYPES:
        raise DataError(
            path, f"lesion type must be 1..8 or -1, got {lesion_type}", line, "Coarse_lesion_type"
        )
    noisy = _int(path, line, row, "Possibly_noisy")
    if noisy not in (0, 1):
        raise DataError(path, f"must be 0 or 1, got {noisy}", line=line, field="Possibly_noisy")
    first, last = _ints(path, line, row, "Slice_range", 2, "first, last slice number")
    if first > last:
        raise DataError(path, f"first slice {first} > last {last}", line=line, field="Slice_range")
    if not first <= key <= last:
        raise DataError(
            path,
            f"key slice {key} lies outside Slice_range {first}..{last}",
            line=line,
            field="Key_slice_index",
        )
    spacing = _numbers(path, line, row, "Spacing_mm_px_", 3, "pixel x, pixel y, slice interval mm")
    _positive(path, line, "Spacing_mm_px_", spacing, "spacings")
    size = _ints(path, line, row, "Image_size", 2, "two image dimensions in pixels")
    _positive(path, line, "Image_size", size, "image dimensions")
    window = _numbers(path, line, row, "DICOM_windows", 2, "low, high HU")
    if window[0] >= window[1]:
        raise DataError(path, f"window {window} must have low < high", line, "DICOM_windows")
    gender = row["Patient_gender"]
    if gender not in GENDERS:
        raise DataError(
            path, f"'{csv_io.show(gender)}' is not M or F", line=line, field="Patient_gender"
        )
    age_text = row["Patient_age"]
    age = None
    if age_text and age_text.lower() != "nan":
        age = csv_io._float(path, line, row, "Patient_age")
        if not 0 <= age <= 150:
            raise DataError(path, f"age {age:g} out of 0..150", line=line, field="Patient_age")
    split = _int(path, line, row, "Train_Val_Test")
    if split not in SPLITS:
        raise DataError(path, f"must be 1, 2 or 3, got {split}", line=line, field="Train_Val_Test")
    return DLRow(
        file_name=name,
        series_uid=series_uid,
        patient=ids["Patient_index"],
        study=ids["Study_index"],
        series=ids["Series_ID"],
        key_slice=key,
        measurement=tuple(measurement),
        bbox=tuple(bbox),
        diameters_px=tuple(diameters),
        normalized_location=tuple(location),
        lesion_type=lesion_type,
        noisy=bool(noisy),
        slice_range=(first, last),
        pixel_spacing=(spacing[0], spacing[1]),
        slice_interval=spacing[2],
        image_size=tuple(size),
        dicom_window=tuple(window),
        gender=gender,
        age=age,
        split=split,
        line=line,
        path=str(path),
    )


def read_dl_info(path: str) -> tuple[list[DLRow], list[RowError]]:
    """Reads DL_info.csv.

    Args:
      path: the file (local path or `tf.io.gfile` URL).

    Returns:
      (rows, errors): the valid rows in file order and one :class:`RowError` per invalid row
      (its ``series_uid`` names the series folder the row belongs to when File_name is
      readable, so that only that series is given up).

    Raises:
      DataError: unreadable file, header without the official columns, a row with a different
        number of fields than the header.
    """
    path = str(path)
    rows: list[DLRow] = []
    errors: list[RowError] = []
    for line, row in csv_io._rows(path, DL_INFO_COLUMNS):
        try:
            rows.append(parse_row(path, line, row))
        except DataError as err:
            match = FILE_NAME_RE.match(row["File_name"])
            uid = row["File_name"].rsplit("_", 1)[0] if match else ""
            errors.append(RowError(path, err.problem, err.line, err.field, uid))
    return rows, errors


def format_numbers(values) -> str:
    """Writes numbers as DL_info.csv does: comma + space separated, shortest round-trip form."""
    return ", ".join(
        f"{v:g}" if float(v).is_integer() else repr(round(float(v), 6)) for v in values
    )

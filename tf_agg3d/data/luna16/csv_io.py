"""Readers and a writer for the LUNA16 CSV files (annotations, candidates, seriesuids, submissions).

All world coordinates are (x, y, z) in mm, as in the files. Readers return plain dataclasses
grouped by seriesuid: ``dict[seriesuid, list[row]]`` in file order, seriesuids in first-seen
order. Every row keeps its 1-based line number (``line``) so later errors can point back at it.

Validation: a header with the required columns must be present (extra columns are allowed and
returned in ``extra``); every row must have as many fields as the header; seriesuids must be
non-empty; numeric fields must parse and be finite. A violation raises
:class:`~tf_agg3d.data.errors.DataError` with the file, line and field.

Files are UTF-8 (a leading byte-order mark is dropped, as spreadsheet programs write one);
Windows, Unix and old Mac line ends are all line ends. Whatever else a file holds (another
encoding such as latin-1 or UTF-16, a NUL byte, broken quoting, a field over the csv module's
size limit, a file cut short) ends in a DataError naming the file and, where there is one, the
line; never another exception. Values shown in messages are cut to a readable length.

A seriesuid list is no table: one seriesuid per line, header optional.
:func:`read_seriesuids` is the package's one reader of such lists (its docstring gives the
header rule); preprocessing, prediction, training and evaluation all read through it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Iterable, Mapping

from tf_agg3d.data.errors import DataError
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.atomic_write import atomic_write_text

ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "class")
PREDICTION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
# Optional prediction columns that, when present, must hold finite numbers.
PREDICTION_NUMERIC_COLUMNS = ("diameter_mm", "rpn_score", "fpr_score")
# annotations_excluded.csv marks findings of unknown size with -1; the evaluation uses 10 mm.
EXCLUDED_UNKNOWN_DIAMETER = -1.0
EXCLUDED_DEFAULT_DIAMETER_MM = 10.0


@dataclasses.dataclass(frozen=True)
class _SeriesPoint:
    """What every row of these files starts with.

    Attributes:
      seriesuid: the scan.
      x, y, z: world centre (mm).
    """

    seriesuid: str
    x: float
    y: float
    z: float

    @property
    def xyz(self) -> tuple[float, float, float]:
        return (self.x, self.y, self.z)


@dataclasses.dataclass(frozen=True)
class Annotation(_SeriesPoint):
    """One row of annotations.csv / annotations_excluded.csv.

    Attributes:
      diameter_mm: > 0; in annotations_excluded.csv also -1 ("unknown", see
        :func:`excluded_diameter`).
      line: 1-based line in `path`.
      path: the CSV file.
      extra: columns beyond the required ones (e.g. DeepLesion's lesion_type, split), as text.
    """

    diameter_mm: float
    line: int = 0
    path: str = ""
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Candidate(_SeriesPoint):
    """One row of candidates.csv / candidates_V2.csv: world centre (mm) and label 0/1."""

    label: int
    line: int = 0
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Prediction(_SeriesPoint):
    """One mark of a submission: world centre (mm) and score.

    Attributes:
      probability: any finite score; the FROC ranks by it.
      extra: optional columns. Those in PREDICTION_NUMERIC_COLUMNS (diameter_mm, rpn_score,
        fpr_score) are floats; any other column is kept as text.
    """

    probability: float
    line: int = 0
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def diameter_mm(self) -> float | None:
        return self.extra.get("diameter_mm")


def excluded_diameter(d: float) -> float:
    """Diameter (mm) to use for an annotations_excluded.csv finding: 10 mm where it says -1."""
    return EXCLUDED_DEFAULT_DIAMETER_MM if d == EXCLUDED_UNKNOWN_DIAMETER else float(d)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


_BOMS = (
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\xfe\xff", "UTF-16"),
    (b"\xff\xfe", "UTF-16"),
)


def show(text: str, limit: int = 60) -> str:
    """`text` for a message: cut to `limit` characters, control characters escaped."""
    text = str(text)
    cut = text if len(text) <= limit else text[: limit - 3] + "..."
    return cut if cut.isprintable() else repr(cut)[1:-1]


def _read_text(path: str) -> str:
    """The file's text (UTF-8, an optional byte-order mark dropped).

    Raises:
      DataError: unreadable, another encoding (UTF-16/32 named by their byte-order marks; the
        line of the first byte that is not UTF-8 otherwise), or a NUL byte (a binary file).
    """
    try:
        data = uio.read_bytes(str(path))
    except Exception as err:  # noqa: BLE001 - OSError locally; tf.io.gfile's types for URLs
        raise DataError(path, f"cannot read file ({show(err, 200)})") from None
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise DataError(path, f"{name} text (byte-order mark); save the file as UTF-8")
    try:
        # utf-8-sig drops the byte-order mark spreadsheet programs put in front of the header.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            path,
            f"not UTF-8 text ({err.reason} at byte {err.start}); save the file as UTF-8",
            line=line,
        ) from None
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise DataError(path, "a NUL byte: a binary file, not CSV text", line=line)
    return text


def _rows(path: str, required: tuple[str, ...]):
    """Yields (line, {column: text}) for the data rows; checks header and field counts."""
    # newline="": "\r\n", "\n" and a lone "\r" all end a line, and csv sees them as such.
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    header = None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:  # broken quoting, a field over the size limit
            raise DataError(
                path, f"not valid CSV ({show(err, 120)})", line=reader.line_num
            ) from None
        if not row or all(not cell.strip() for cell in row):
            continue
        cells = [cell.strip() for cell in row]
        if header is None:
            missing = [c for c in required if c not in cells]
            if missing:
                raise DataError(
                    path,
                    f"header {show(cells, 200)} lacks column(s) {missing}; expected "
                    f"{', '.join(required)}",
                    line=reader.line_num,
                )
            if len(set(cells)) != len(cells):
                raise DataError(
                    path, f"header {show(cells, 200)} repeats a column", line=reader.line_num
                )
            header = cells
            continue
        if len(cells) != len(header):
            raise DataError(
                path,
                f"{len(cells)} fields, the header has {len(header)} ({show(', '.join(header), 200)})",
                line=reader.line_num,
            )
        yield reader.line_num, dict(zip(header, cells, strict=True))
    if header is None:
        raise DataError(path, f"empty file; expected a header {', '.join(required)}")


def _float(path: str, line: int, row: dict, field: str) -> float:
    text = row[field]
    try:
        value = float(text)
    except ValueError:
        raise DataError(path, f"'{show(text)}' is not a number", line=line, field=field) from None
    if not math.isfinite(value):
        raise DataError(path, f"'{show(text)}' is not a finite number", line=line, field=field)
    return value


def _uid(path: str, line: int, row: dict) -> str:
    uid = row["seriesuid"]
    if not uid:
        raise DataError(path, "empty seriesuid", line=line, field="seriesuid")
    if not uid.isprintable():
        raise DataError(
            path, f"'{show(uid)}' holds control characters", line=line, field="seriesuid"
        )
    return uid


def _xyz(path: str, line: int, row: dict) -> tuple[float, float, float]:
    return tuple(_float(path, line, row, c) for c in ("coordX", "coordY", "coordZ"))


def _extra(row: dict, required: tuple[str, ...]) -> dict:
    return {k: v for k, v in row.items() if k not in required}


def _by_series(path: str, required: tuple[str, ...], make) -> dict[str, list]:
    """The rows of a CSV with a seriesuid and world coordinates, grouped by seriesuid.

    Args:
      path: the CSV file.
      required: its required columns (seriesuid, coordX, coordY, coordZ and the kind's own).
      make: ``(line, row, uid, x, y, z) -> item``: checks the row's other columns and builds
        the item.

    Returns:
      seriesuid -> list of items in file order.
    """
    out: dict[str, list] = {}
    for line, row in _rows(path, required):
        uid = _uid(path, line, row)
        x, y, z = _xyz(path, line, row)
        out.setdefault(uid, []).append(make(line, row, uid, x, y, z))
    return out


def _read_annotation_file(path: str, allow_unknown: bool) -> dict[str, list[Annotation]]:
    path = str(path)

    def annotation(line, row, uid, x, y, z) -> Annotation:
        d = _float(path, line, row, "diameter_mm")
        if not (d > 0 or (allow_unknown and d == EXCLUDED_UNKNOWN_DIAMETER)):
            allowed = "> 0 or -1 (unknown)" if allow_unknown else "> 0"
            raise DataError(
                path, f"diameter {d:g} must be {allowed}", line=line, field="diameter_mm"
            )
        return Annotation(uid, x, y, z, d, line, path, _extra(row, ANNOTATION_COLUMNS))

    return _by_series(path, ANNOTATION_COLUMNS, annotation)


def read_annotations(path: str) -> dict[str, list[Annotation]]:
    """Reads annotations.csv (seriesuid,coordX,coordY,coordZ,diameter_mm; diameter > 0).

    Returns:
      seriesuid -> list of :class:`Annotation` in file order.
    """
    return _read_annotation_file(path, allow_unknown=False)


def read_excluded(path: str) -> dict[str, list[Annotation]]:
    """Reads annotations_excluded.csv (same columns as annotations.csv).

    A diameter of -1 ("unknown") is kept as -1 here; consumers apply the evaluation's 10 mm rule
    through :func:`excluded_diameter`.

    Returns:
      seriesuid -> list of :class:`Annotation` in file order.
    """
    return _read_annotation_file(path, allow_unknown=True)


def read_candidates(path: str) -> dict[str, list[Candidate]]:
    """Reads candidates.csv / candidates_V2.csv (seriesuid,coordX,coordY,coordZ,class 0/1).

    Returns:
      seriesuid -> list of :class:`Candidate` in file order.
    """
    path = str(path)

    def candidate(line, row, uid, x, y, z) -> Candidate:
        if row["class"] not in ("0", "1"):
            raise DataError(
                path, f"class '{show(row['class'])}' must be 0 or 1", line=line, field="class"
            )
        return Candidate(uid, x, y, z, int(row["class"]), line, _extra(row, CANDIDATE_COLUMNS))

    return _by_series(path, CANDIDATE_COLUMNS, candidate)


def read_predictions(path: str) -> dict[str, list[Prediction]]:
    """Reads a submission CSV (seriesuid,coordX,coordY,coordZ,probability [,extra columns]).

    Returns:
      seriesuid -> list of :class:`Prediction` in file order.
    """
    path = str(path)

    def prediction(line, row, uid, x, y, z) -> Prediction:
        p = _float(path, line, row, "probability")
        extra: dict = _extra(row, PREDICTION_COLUMNS)
        for name in PREDICTION_NUMERIC_COLUMNS:
            # Empty = not given for this mark (write_predictions leaves missing extras empty).
            if name in extra and extra[name] == "":
                del extra[name]
            elif name in extra:
                extra[name] = _float(path, line, row, name)
        return Prediction(uid, x, y, z, p, line, extra)

    return _by_series(path, PREDICTION_COLUMNS, prediction)


SERIESUID_HEADER = "seriesuid"


def is_seriesuid_header(line: str) -> bool:
    """True for the header row of a seriesuid list: ``seriesuid``, any case, spaces stripped."""
    return line.strip().lower() == SERIESUID_HEADER


def read_seriesuids(path: str, keep_header: bool = False) -> list[str]:
    """Reads a seriesuid list: one seriesuid per line, blank lines ignored.

    The header rule: the official LUNA16 list has no header; a first non-blank line that reads
    ``seriesuid`` (:func:`is_seriesuid_header`) is a header and is dropped, unless
    `keep_header`, which returns it as the first entry. (The official evaluation script counts
    such a line as one more scan; :func:`tf_agg3d.evaluation.io.read_seriesuids` reproduces that
    quirk for FROC numbers through `keep_header`.) Duplicates and lines with commas or spaces
    raise DataError.

    Returns:
      The seriesuids in file order.
    """
    path = str(path)
    uids: list[str] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(_read_text(path).splitlines(), start=1):
        uid = raw.strip()
        if not uid:
            continue
        if not uids and not seen and is_seriesuid_header(uid):
            seen[uid] = number
            if keep_header:
                uids.append(uid)
            continue
        if "," in uid or any(ch.isspace() for ch in uid) or not uid.isprintable():
            raise DataError(path, f"'{show(uid)}' is not a single seriesuid", line=number)
        if uid in seen:
            raise DataError(path, f"seriesuid {uid} repeats line {seen[uid]}", line=number)
        seen[uid] = number
        uids.append(uid)
    return uids


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _prediction_fields(row) -> dict:
    if isinstance(row, Prediction):
        fields = {
            "seriesuid": row.seriesuid,
            "coordX": row.x,
            "coordY": row.y,
            "coordZ": row.z,
            "probability": row.probability,
        }
        fields.update(row.extra)
        return fields
    if isinstance(row, Mapping):
        return dict(row)
    raise TypeError(f"a prediction row must be a Prediction or a mapping, got {type(row)}")


def _cell(path: str, line: int, name: str, value) -> str:
    if isinstance(value, str):
        if name in PREDICTION_COLUMNS[1:] or name in PREDICTION_NUMERIC_COLUMNS:
            value = _float(path, line, {name: value}, name)
        else:
            return value
    number = float(value)
    if not math.isfinite(number):
        raise DataError(path, f"refusing to write {number}", line=line, field=name)
    # repr keeps every digit: scores that differ in the 9th digit still rank the same way.
    return repr(number)


def write_predictions(path: str, rows: Iterable) -> int:
    """Writes a submission CSV atomically, header first.

    Args:
      path: output file (local or `tf.io.gfile` URL).
      rows: :class:`Prediction` objects or mappings with the columns seriesuid, coordX, coordY,
        coordZ, probability and optional extra columns (e.g. diameter_mm, rpn_score, fpr_score).
        Extra columns follow the required ones in first-seen order; a row lacking one leaves
        it empty.

    Returns:
      The number of rows written.

    Raises:
      DataError: a row lacks a required column or holds a non-finite number (line = CSV line).
    """
    path = str(path)
    records = [_prediction_fields(r) for r in rows]
    columns = list(PREDICTION_COLUMNS)
    for record in records:
        columns.extend(k for k in record if k not in columns)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for index, record in enumerate(records):
        line = index + 2
        missing = [c for c in PREDICTION_COLUMNS if c not in record]
        if missing:
            raise DataError(path, f"row lacks column(s) {missing}", line=line)
        if not str(record["seriesuid"]):
            raise DataError(path, "empty seriesuid", line=line, field="seriesuid")
        cells = [str(record["seriesuid"])]
        for name in columns[1:]:
            value = record.get(name)
            cells.append("" if value is None else _cell(path, line, name, value))
        writer.writerow(cells)
    atomic_write_text(path, buf.getvalue())
    return len(records)

"""Property-based tests of every reader of user files: bad bytes end in a DataError, nothing else.

Each test starts from a valid file (random rows), damages it the ways files get damaged (cut
short, bytes flipped or inserted, saved as latin-1 / UTF-16 / UTF-32, a BOM, CRLF or CR line ends,
a column added to some rows or removed, a field of hundreds of thousands of characters, broken
quoting, NUL bytes) or replaces it with arbitrary bytes, and reads it. The reader must either
return a result or raise :class:`~tf_agg3d.data.errors.DataError` whose message starts with the
file's path and that names the line wherever the problem has one; any other exception, or a read
that takes longer than the guard (a hang), fails the test. Variants that keep the content (a
UTF-8 BOM, CRLF or CR line ends, an extra column on every row) must read as the original does.

Readers covered: LUNA16 annotations / excluded / candidates / predictions CSVs
(:mod:`tf_agg3d.data.luna16.csv_io` and :mod:`tf_agg3d.evaluation.io`), seriesuid lists (both),
DeepLesion's DL_info.csv, the cache sidecar JSON and the cache ``.npy`` (:mod:`tf_agg3d.data.cache`).
The models.config of serving is written, never read, by the package.

Profiles (tests/properties/conftest.py): 50 examples a test by default, ``thorough`` for more.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import cache_meta

from tf_agg3d.data import cache
from tf_agg3d.data.deeplesion.dl_info import DL_INFO_COLUMNS, read_dl_info
from tf_agg3d.data.errors import DataError
from tf_agg3d.data.luna16 import csv_io
from tf_agg3d.evaluation import io as eval_io

GUARD_SECONDS = 20  # one read of a small file takes milliseconds; this long means a hang
HUGE = 300_000  # characters of a "huge field": over the csv module's 131072 limit


@contextlib.contextmanager
def hang_guard(seconds: int = GUARD_SECONDS):
    """Fails the example when the body runs longer than `seconds` (SIGALRM, main thread)."""

    def _alarm(signum, frame):
        raise TimeoutError(f"reader still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("files"))


# --------------------------------------------------------------------------------------------
# Valid files
# --------------------------------------------------------------------------------------------

UIDS = st.text(alphabet="0123456789.", min_size=1, max_size=24).filter(lambda u: u != ".")
COORD = st.floats(-500, 500, allow_nan=False, allow_infinity=False)
DIAMETER = st.floats(0.5, 60, allow_nan=False)
SCORE = st.floats(-10, 10, allow_nan=False)


def _csv_bytes(header, rows) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _rows(*columns, max_rows=4):
    return st.lists(st.tuples(UIDS, *columns), min_size=0, max_size=max_rows)


ANNOTATIONS = _rows(COORD, COORD, COORD, DIAMETER).map(
    lambda rows: _csv_bytes(csv_io.ANNOTATION_COLUMNS, rows)
)
EXCLUDED = _rows(COORD, COORD, COORD, st.one_of(DIAMETER, st.just(-1.0))).map(
    lambda rows: _csv_bytes(csv_io.ANNOTATION_COLUMNS, rows)
)
CANDIDATES = _rows(COORD, COORD, COORD, st.sampled_from([0, 1])).map(
    lambda rows: _csv_bytes(csv_io.CANDIDATE_COLUMNS, rows)
)
PREDICTIONS = _rows(COORD, COORD, COORD, SCORE, DIAMETER, SCORE, SCORE).map(
    lambda rows: _csv_bytes(
        [*csv_io.PREDICTION_COLUMNS, "diameter_mm", "rpn_score", "fpr_score"], rows
    )
)
SERIESUIDS = st.tuples(st.booleans(), st.lists(UIDS, min_size=1, max_size=5, unique=True)).map(
    lambda t: (("seriesuid\n" if t[0] else "") + "".join(u + "\n" for u in t[1])).encode()
)


def _dl_row(patient: int, key: int, spacing: float, split: int) -> list:
    return [
        f"{patient:06d}_01_01_{key:03d}.png",
        patient,
        1,
        1,
        key,
        "40.0, 58.0, 60.0, 58.0, 50.0, 55.0, 50.0, 61.0",
        "40, 50, 60, 66",
        "20.0, 6",
        "0.5, 0.5, 0.5",
        4,
        0,
        f"{key - 3}, {key + 5}",
        f"{spacing}, {spacing}, 2.5",
        "512, 512",
        "-175, 275",
        "F",
        60,
        split,
    ]


DL_INFO = st.lists(
    st.builds(
        _dl_row,
        st.integers(1, 999999),
        st.integers(3, 400),
        st.floats(0.3, 1.5, allow_nan=False),
        st.sampled_from([1, 2, 3]),
    ),
    min_size=1,
    max_size=3,
).map(lambda rows: _csv_bytes(DL_INFO_COLUMNS, rows))


# --------------------------------------------------------------------------------------------
# Damage
# --------------------------------------------------------------------------------------------

# Variants that keep the content: the file must read exactly as the original.
SAME_CONTENT = ("bom", "crlf", "cr", "extra_column_everywhere")


def _lines(text: str) -> list[str]:
    return text.split("\n")


@st.composite
def damaged(draw, valid):
    """(kind, original bytes, damaged bytes)."""
    data = draw(valid)
    kind = draw(
        st.sampled_from(
            [
                "none",
                "truncate",
                "flip",
                "insert_bytes",
                "latin1",
                "utf16",
                "utf32",
                *SAME_CONTENT,
                "extra_column_some_rows",
                "missing_column",
                "huge_field",
                "quote",
                "nul",
                "random_bytes",
                "random_text",
            ]
        )
    )
    text = data.decode("utf-8")
    if kind == "none":
        out = data
    elif kind == "truncate":
        out = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 6))):
            if out:
                out[draw(st.integers(0, len(out) - 1))] ^= draw(st.integers(1, 255))
        out = bytes(out)
    elif kind == "insert_bytes":
        at = draw(st.integers(0, len(data)))
        out = data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    elif kind == "latin1":
        at = draw(st.integers(0, len(text)))
        out = (text[:at] + draw(st.sampled_from(["é", "ü", "µ", "ñ", "°"])) + text[at:]).encode(
            "latin-1"
        )
    elif kind == "utf16":
        out = text.encode(draw(st.sampled_from(["utf-16", "utf-16-le", "utf-16-be"])))
    elif kind == "utf32":
        out = text.encode(draw(st.sampled_from(["utf-32", "utf-32-le"])))
    elif kind == "bom":
        out = b"\xef\xbb\xbf" + data
    elif kind == "crlf":
        out = data.replace(b"\n", b"\r\n")
    elif kind == "cr":
        out = data.replace(b"\n", b"\r")
    elif kind in ("extra_column_everywhere", "extra_column_some_rows"):
        lines = _lines(text)
        every = kind == "extra_column_everywhere"
        for i, line in enumerate(lines):
            if not line:
                continue
            if i == 0:
                lines[i] = line + ",added_column"
            elif every or draw(st.booleans()):
                lines[i] = line + ",x"
        out = "\n".join(lines).encode("utf-8")
    elif kind == "missing_column":
        rows = list(csv.reader(io.StringIO(text)))
        width = len(rows[0]) if rows and rows[0] else 1
        drop = draw(st.integers(0, max(0, width - 1)))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([r[:drop] + r[drop + 1 :] for r in rows])
        out = buf.getvalue().encode("utf-8")
    elif kind == "huge_field":
        at = draw(st.integers(0, len(text)))
        filler = draw(st.sampled_from(["9", "x", ",", '"', " "])) * draw(
            st.integers(HUGE // 2, HUGE)
        )
        out = (text[:at] + filler + text[at:]).encode("utf-8")
    elif kind == "quote":
        at = draw(st.integers(0, len(text)))
        out = (text[:at] + '"' + text[at:]).encode("utf-8")
    elif kind == "nul":
        at = draw(st.integers(0, len(data)))
        out = data[:at] + b"\x00" + data[at:]
    elif kind == "random_bytes":
        out = draw(st.binary(max_size=200))
    else:
        out = draw(st.text(max_size=200)).encode("utf-8")
    return kind, data, out


def _max_line(data: bytes) -> int:
    return data.count(b"\n") + data.count(b"\r") + 1


def _read(reader, path: str, data: bytes, lines: bool = True):
    """Writes `data` to `path` and reads it: the result, or None after a proper DataError.

    Args:
      lines: the file has lines (CSV, lists): the error must name one where it can.
    """
    with open(path, "wb") as f:
        f.write(data)
    with hang_guard():
        try:
            return reader(path)
        except DataError as err:
            _check_error(err, path, data, lines)
            return None


def _check_error(err: DataError, path: str, data: bytes, lines: bool = True) -> None:
    assert err.path == path and str(err).startswith(path), str(err)[:300]
    whole_file = ("empty", "byte-order mark")
    if not lines:
        pass
    elif err.line is None:
        assert any(w in err.problem for w in whole_file), str(err)[:300]
    else:
        assert 1 <= err.line <= _max_line(data), (err.line, str(err)[:300])
    assert len(str(err)) < 2000, "a message that repeats a huge field"


def _count(result) -> int:
    """Rows of a reader's result, whatever its type."""
    if isinstance(result, dict):
        return sum(len(v) for v in result.values())
    if isinstance(result, tuple):  # read_dl_info: (rows, errors)
        return len(result[0]) + len(result[1])
    return len(result)


def _property(reader, folder, name, case, same=SAME_CONTENT) -> None:
    kind, original, data = case
    path = os.path.join(folder, name)
    result = _read(reader, path, data)
    if kind in same or kind == "none":
        expected = _read(reader, path, original)
        if expected is not None:
            assert result is not None, kind
            assert _count(result) == _count(expected), kind


# --------------------------------------------------------------------------------------------
# The properties
# --------------------------------------------------------------------------------------------


@given(case=damaged(ANNOTATIONS))
def test_annotations_csv(folder, case):
    _property(csv_io.read_annotations, folder, "annotations.csv", case)
    _property(eval_io.read_annotations, folder, "annotations.csv", case)


@given(case=damaged(EXCLUDED))
def test_excluded_csv(folder, case):
    _property(csv_io.read_excluded, folder, "annotations_excluded.csv", case)
    _property(
        lambda p: eval_io.read_annotations(p, excluded=True),
        folder,
        "annotations_excluded.csv",
        case,
    )


@given(case=damaged(CANDIDATES))
def test_candidates_csv(folder, case):
    _property(csv_io.read_candidates, folder, "candidates.csv", case)


@given(case=damaged(PREDICTIONS))
def test_predictions_csv(folder, case):
    _property(csv_io.read_predictions, folder, "predictions.csv", case)
    _property(eval_io.read_predictions, folder, "predictions.csv", case)


@given(case=damaged(SERIESUIDS))
def test_seriesuid_list(folder, case):
    # A list, not a table: a second column is an error there, not an extra column.
    same = ("bom", "crlf", "cr")
    _property(csv_io.read_seriesuids, folder, "seriesuids.csv", case, same)
    _property(
        lambda p: eval_io.read_seriesuids(p, skip_header=True),
        folder,
        "seriesuids.csv",
        case,
        same,
    )


@given(case=damaged(DL_INFO))
def test_dl_info_csv(folder, case):
    kind, _, data = case
    path = os.path.join(folder, "DL_info.csv")
    result = _read(read_dl_info, path, data)
    if result is not None:
        rows, errors = result
        for err in errors:  # a row that breaks a rule: named, the other rows still returned
            _check_error(err, path, data)
        if kind in SAME_CONTENT or kind == "none":
            assert not errors and rows, [str(e) for e in errors]


# The cache sidecar: bytes damaged like the CSVs, or JSON that parses but holds the wrong things.

META = cache_meta(
    "1.2.3",
    (4, 5, 6),
    nodules=[{"z": 1.0, "y": 2.0, "x": 3.0, "d": 4.0}],
    lung_mask="threshold",
    fill_hu=170,
    source="scan.mhd",
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=20,
)


@st.composite
def sidecars(draw):
    """(kind, damaged sidecar bytes)."""
    meta = json.loads(json.dumps(META))
    kind = draw(st.sampled_from(["bytes", "value", "drop_key", "nested", "huge_number", "other"]))
    if kind == "bytes":
        valid = st.just((json.dumps(meta, indent=1) + "\n").encode())
        return kind, draw(damaged(valid))[2]
    if kind == "value":
        key = draw(st.sampled_from(sorted(meta)))
        meta[key] = draw(JSON_VALUES)
        if key in ("nodules", "excluded") and draw(st.booleans()):
            meta[key] = [draw(JSON_VALUES)]
    elif kind == "drop_key":
        del meta[draw(st.sampled_from(sorted(meta)))]
    elif kind == "nested":
        depth = draw(st.integers(1000, 200_000))
        return kind, ("[" * depth + "]" * depth).encode()
    elif kind == "huge_number":
        return kind, json.dumps(meta).replace("170", "9" * draw(st.integers(400, 20000))).encode()
    else:
        return kind, json.dumps(draw(JSON_VALUES)).encode()
    return kind, json.dumps(meta).encode()


def _write_volume(folder, uid, shape=(4, 5, 6)) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.arange(np.prod(shape), dtype=np.int16).reshape(shape), allow_pickle=False)
    with open(cache.volume_path(folder, uid), "wb") as f:
        f.write(buf.getvalue())
    return buf.getvalue()


@given(case=sidecars())
def test_cache_sidecar(folder, case):
    _, data = case
    uid = "sidecar"
    _write_volume(folder, uid)
    path = cache.meta_path(folder, uid)
    _read(lambda p: cache.read_meta(folder, uid), path, data, lines=False)
    with hang_guard():
        problem = cache.check_entry(folder, uid)  # never raises
        try:
            meta, volume = cache.read_entry(folder, uid)
        except DataError as err:
            assert problem is not None
            assert err.path == path and str(err).startswith(path), str(err)[:300]
        else:
            assert problem is None
            assert list(volume.shape) == meta["shape"]


@st.composite
def volumes(draw):
    """(kind, damaged .npy bytes) of a valid int16 [4, 5, 6] volume."""
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 5, 6), np.int16), allow_pickle=False)
    data = buf.getvalue()
    kind = draw(st.sampled_from(["truncate", "flip_header", "flip", "append", "random"]))
    if kind == "truncate":
        return kind, data[: draw(st.integers(0, len(data) - 1))]
    if kind in ("flip_header", "flip"):
        out = bytearray(data)
        end = 128 if kind == "flip_header" else len(data)
        for _ in range(draw(st.integers(1, 4))):
            out[draw(st.integers(0, end - 1))] = draw(st.integers(0, 255))
        return kind, bytes(out)
    if kind == "append":
        return kind, data + draw(st.binary(min_size=1, max_size=64))
    return kind, draw(st.binary(max_size=300))


@given(case=volumes(), mmap=st.booleans())
def test_cache_volume(folder, case, mmap):
    _, data = case
    uid = "volume"
    with open(cache.meta_path(folder, uid), "w") as f:
        json.dump(META, f)
    path = cache.volume_path(folder, uid)
    volume = _read(lambda p: cache.read_volume(folder, uid, mmap=mmap), path, data, lines=False)
    if volume is not None:
        assert volume.dtype == np.int16 and volume.ndim == 3
    with hang_guard():
        problem = cache.check_entry(folder, uid)
        try:
            meta, volume = cache.read_entry(folder, uid, mmap=mmap)
        except DataError as err:
            assert problem is not None, str(err)
            assert err.path in (path, cache.meta_path(folder, uid)), str(err)[:300]
        else:
            assert problem is None and list(volume.shape) == meta["shape"]

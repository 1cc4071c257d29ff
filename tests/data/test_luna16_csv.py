"""LUNA16 CSV readers and the submission writer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tf_agg3d.data.errors import DataError
from tf_agg3d.data.luna16 import csv_io as lc

ANNOTATIONS = """seriesuid,coordX,coordY,coordZ,diameter_mm
1.3.6.1.a,-128.6994211,-175.3192718,-298.3875064,5.651470635
1.3.6.1.a,103.7836509,-211.9251487,-227.12125,4.224708481
1.3.6.1.b,69.63901724,-140.9445859,876.3744957,5.786347814
"""


def _write(tmp_path, text, name="f.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_read_annotations_grouped_in_file_order(tmp_path):
    rows = lc.read_annotations(_write(tmp_path, ANNOTATIONS))
    assert list(rows) == ["1.3.6.1.a", "1.3.6.1.b"]
    first = rows["1.3.6.1.a"][0]
    assert first.xyz == (-128.6994211, -175.3192718, -298.3875064)
    assert first.diameter_mm == pytest.approx(5.651470635)
    assert first.line == 2 and rows["1.3.6.1.b"][0].line == 4
    assert first.extra == {}


def test_excluded_keeps_minus_one_and_helper_gives_10mm(tmp_path):
    text = "seriesuid,coordX,coordY,coordZ,diameter_mm\nu,1,2,3,-1\nu,4,5,6,3.5\n"
    rows = lc.read_excluded(_write(tmp_path, text))["u"]
    assert [r.diameter_mm for r in rows] == [-1.0, 3.5]
    assert [lc.excluded_diameter(r.diameter_mm) for r in rows] == [10.0, 3.5]
    # In annotations.csv -1 is not allowed.
    with pytest.raises(DataError, match=r"f\.csv, line 2, field 'diameter_mm'"):
        lc.read_annotations(_write(tmp_path, text))


def test_extra_columns_are_returned(tmp_path):
    text = "seriesuid,coordX,coordY,coordZ,diameter_mm,lesion_type,split,large\nu,1,2,3,4,5,1,0\n"
    row = lc.read_annotations(_write(tmp_path, text))["u"][0]
    assert row.extra == {"lesion_type": "5", "split": "1", "large": "0"}


def test_bom_and_blank_lines_are_tolerated(tmp_path):
    text = "\ufeff" + ANNOTATIONS.replace("\n1.3.6.1.b", "\n\n1.3.6.1.b")
    rows = lc.read_annotations(_write(tmp_path, text))
    assert sum(len(v) for v in rows.values()) == 3


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("1.3.6,1,2,3,4\n", r"line 1: header .* lacks column"),
        ("seriesuid,coordX,coordY,diameter_mm\nu,1,2,3\n", r"line 1: header .*coordZ"),
        ("", "empty file"),
        ("seriesuid,coordX,coordY,coordZ,diameter_mm\nu,1,abc,3,4\n", r"line 2, field 'coordY'"),
        ("seriesuid,coordX,coordY,coordZ,diameter_mm\nu,1,2,nan,4\n", r"line 2, field 'coordZ'"),
        ("seriesuid,coordX,coordY,coordZ,diameter_mm\nu,1,2,3\n", r"line 2: 4 fields"),
        ("seriesuid,coordX,coordY,coordZ,diameter_mm\n,1,2,3,4\n", r"line 2, field 'seriesuid'"),
        ("seriesuid,coordX,coordY,coordZ,diameter_mm\nu,1,2,3,0\n", r"field 'diameter_mm'"),
    ],
)
def test_malformed_annotations(tmp_path, text, pattern):
    path = _write(tmp_path, text, "annotations.csv")
    with pytest.raises(DataError, match=r"annotations\.csv.*" + pattern) as info:
        lc.read_annotations(path)
    assert info.value.path == path


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.csv"):
        lc.read_annotations(str(tmp_path / "nope.csv"))


def test_read_candidates(tmp_path):
    text = "seriesuid,coordX,coordY,coordZ,class\nu,1,2,3,0\nu,4,5,6,1\nv,7,8,9,0\n"
    rows = lc.read_candidates(_write(tmp_path, text))
    assert [c.label for c in rows["u"]] == [0, 1] and len(rows["v"]) == 1
    with pytest.raises(DataError, match=r"line 2, field 'class'"):
        lc.read_candidates(_write(tmp_path, text.replace("u,1,2,3,0", "u,1,2,3,2")))


def test_read_seriesuids_with_and_without_header(tmp_path):
    assert lc.read_seriesuids(_write(tmp_path, "seriesuid\n1.2\n\n1.3\n")) == ["1.2", "1.3"]
    assert lc.read_seriesuids(_write(tmp_path, "1.2\n1.3\n")) == ["1.2", "1.3"]
    with pytest.raises(DataError, match=r"line 3: seriesuid 1.2 repeats line 1"):
        lc.read_seriesuids(_write(tmp_path, "1.2\n1.3\n1.2\n"))
    with pytest.raises(DataError, match=r"line 1"):
        lc.read_seriesuids(_write(tmp_path, "1.2,0.5\n"))


def test_seriesuid_header_rule_is_the_first_line_only(tmp_path):
    # The one rule every caller shares: a first non-blank line "seriesuid" (any case) is a header.
    path = _write(tmp_path, "\n SeriesUID \n1.2\n")
    assert lc.read_seriesuids(path) == ["1.2"]
    assert lc.read_seriesuids(path, keep_header=True) == ["SeriesUID", "1.2"]
    assert lc.read_seriesuids(_write(tmp_path, "1.2\n"), keep_header=True) == ["1.2"]
    with pytest.raises(DataError, match=r"line 2: seriesuid seriesuid repeats line 1"):
        lc.read_seriesuids(_write(tmp_path, "seriesuid\nseriesuid\n"))


def test_predictions_round_trip_with_extra_columns(tmp_path):
    path = str(tmp_path / "out" / "submission.csv")
    rows = [
        lc.Prediction("u", 1.5, -2.25, 3.125, 0.9, extra={"diameter_mm": 6.0, "rpn_score": 0.8}),
        {"seriesuid": "v", "coordX": 1, "coordY": 2, "coordZ": 3, "probability": 1e-9},
    ]
    assert lc.write_predictions(path, rows) == 2
    header = Path(path).read_text().splitlines()[0]
    assert header == "seriesuid,coordX,coordY,coordZ,probability,diameter_mm,rpn_score"
    got = lc.read_predictions(path)
    assert got["u"][0].probability == 0.9 and got["u"][0].diameter_mm == 6.0
    assert got["u"][0].extra["rpn_score"] == 0.8
    assert got["v"][0].probability == 1e-9 and got["v"][0].diameter_mm is None
    assert [n for n in os.listdir(tmp_path / "out")] == ["submission.csv"]  # no temp left


def test_write_predictions_rejects_bad_rows(tmp_path):
    path = str(tmp_path / "s.csv")
    with pytest.raises(DataError, match=r"s\.csv, line 2, field 'probability'"):
        lc.write_predictions(
            path,
            [
                {
                    "seriesuid": "u",
                    "coordX": 1,
                    "coordY": 2,
                    "coordZ": 3,
                    "probability": float("nan"),
                }
            ],
        )
    with pytest.raises(DataError, match=r"lacks column"):
        lc.write_predictions(path, [{"seriesuid": "u", "coordX": 1}])
    assert not os.path.exists(path)


def test_read_predictions_rejects_non_numeric_score(tmp_path):
    text = "seriesuid,coordX,coordY,coordZ,probability,fpr_score\nu,1,2,3,0.5,high\n"
    with pytest.raises(DataError, match=r"line 2, field 'fpr_score'"):
        lc.read_predictions(_write(tmp_path, text))

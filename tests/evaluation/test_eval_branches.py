"""Per-branch FROCs (paper Table III): scoring by rpn_score / fpr_score, `--score-column`.

The hand-made case (two scans A and B, both in the seriesuid list, so FPs per scan = FPs / 2):

- nodules: n1 in A at (0, 0, 0), n2 in B at (50, 50, 50), both 10 mm; an excluded finding
  (diameter -1, i.e. 10 mm) in B at (-50, -50, -50).
- marks (rpn_score, fpr_score, probability = their mean):

  ====  ====  ======================  =====  =====  ===========
  scan  mark  what it hits            rpn    fpr    probability
  ====  ====  ======================  =====  =====  ===========
  A     h1    n1                      0.9    0.2    0.55
  A     f1    nothing (FP)            0.3    0.9    0.6
  A     f2    nothing (FP)            0.2    0.8    0.5
  B     h2    n2                      0.8    0.1    0.45
  B     f3    nothing (FP)            0.1    0.7    0.4
  B     e     the excluded finding    0.05   0.05   0.05
  ====  ====  ======================  =====  =====  ===========

  e is ignored under every score. 2 nodules, 3 FPs, so the curve's FP axis steps by 0.5.

- RPN ranks both hits above every FP: the curve reaches sensitivity 1 at 0 FPs/scan, so the
  sensitivity is 1 at every rate and the FROC is 1.
- FPRN ranks every FP above both hits: the curve runs (0,0) (0.5,0) (1,0) (1.5,0) (1.5,0.5)
  (1.5,1); rates 1/8..1 give 0, rates 2, 4, 8 lie past the end and take the last value 1:
  sensitivities [0,0,0,0,1,1,1], FROC 3/7.
- Combined: f1 .6 > h1 .55 > f2 .5 > h2 .45 > f3 .4: (0,0) (0.5,0) (0.5,0.5) (1,0.5) (1,1)
  (1.5,1); 1/8 and 1/4 give 0, 1/2 takes the top of its vertical step (0.5), 1 gives 1, and
  2, 4, 8 give 1: sensitivities [0,0,.5,1,1,1,1], FROC 4.5/7.

With a cap of 2 marks per scan (``max_marks=2``: only marks strictly above the 3rd best score
stay), the cap ranks by the scored column: by rpn_score, A keeps h1, f1 and B keeps h2, f3 (only
e dropped, which was ignored anyway): FROC still 1. By fpr_score, A keeps f1, f2 and drops h1,
so n1 is missed; B keeps f3, h2. FPs f1 .9, f2 .8, f3 .7, then h2 .1: (0,0) (.5,0) (1,0) (1.5,0)
(1.5,.5): sensitivities [0,0,0,0,.5,.5,.5], FROC 1.5/7.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from _evaluation_testlib import write_csv
from support import REPO

from tf_agg3d.config import EvalConfig
from tf_agg3d.data.errors import DataError
from tf_agg3d.evaluation.io import read_predictions, write_predictions
from tf_agg3d.evaluation.report import EvalInputs, branch_frocs, evaluate, format_branch_table

ANN_HEADER = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
PRED_HEADER = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
BRANCH_HEADER = [*PRED_HEADER, "diameter_mm", "rpn_score", "fpr_score"]

MARKS = [  # seriesuid, x, y, z, probability, diameter_mm, rpn_score, fpr_score
    ("A", 1, 0, 0, 0.55, 8.0, 0.9, 0.2),  # h1
    ("A", 30, 30, 30, 0.6, 6.0, 0.3, 0.9),  # f1
    ("A", -30, 0, 0, 0.5, 6.0, 0.2, 0.8),  # f2
    ("B", 50, 51, 50, 0.45, 9.0, 0.8, 0.1),  # h2
    ("B", 0, 0, 0, 0.4, 5.0, 0.1, 0.7),  # f3
    ("B", -50, -50, -51, 0.05, 5.0, 0.05, 0.05),  # e (excluded)
]
EXPECTED = {
    "probability": [0, 0, 0.5, 1, 1, 1, 1],
    "rpn_score": [1, 1, 1, 1, 1, 1, 1],
    "fpr_score": [0, 0, 0, 0, 1, 1, 1],
}


@pytest.fixture
def files(tmp_path):
    return {
        "annotations": write_csv(
            tmp_path / "annotations.csv", ANN_HEADER, [("A", 0, 0, 0, 10), ("B", 50, 50, 50, 10)]
        ),
        "excluded": write_csv(tmp_path / "excluded.csv", ANN_HEADER, [("B", -50, -50, -50, -1)]),
        "predictions": write_csv(tmp_path / "preds.csv", BRANCH_HEADER, MARKS),
        "seriesuids": write_csv(tmp_path / "uids.csv", None, [("A",), ("B",)]),
    }


def _inputs(files, **over) -> EvalInputs:
    return EvalInputs(
        annotations=files["annotations"],
        predictions=over.pop("predictions", files["predictions"]),
        excluded=files["excluded"],
        seriesuids=files["seriesuids"],
        **over,
    )


def test_reader_keeps_branch_scores_and_scored_by(files, tmp_path):
    p = read_predictions(files["predictions"])
    assert sorted(p.branch_scores) == ["fpr_score", "rpn_score"]
    np.testing.assert_array_equal(p.branch_scores["rpn_score"], [m[6] for m in MARKS])
    rpn = p.scored_by("rpn_score")
    np.testing.assert_array_equal(rpn.probability, [m[6] for m in MARKS])
    np.testing.assert_array_equal(rpn.xyz, p.xyz)
    assert p.scored_by("probability") is p
    np.testing.assert_array_equal(p.subset([0, 3]).branch_scores["fpr_score"], [0.2, 0.1])
    # A written file reads back with its branch columns.
    write_predictions(str(tmp_path / "again.csv"), p)
    back = read_predictions(str(tmp_path / "again.csv"))
    np.testing.assert_array_equal(back.branch_scores["fpr_score"], p.branch_scores["fpr_score"])
    # A plain LUNA16 submission has no branch column: scoring by one names file and column.
    plain = read_predictions(write_csv(tmp_path / "plain.csv", PRED_HEADER, [m[:5] for m in MARKS]))
    assert plain.branch_scores == {}
    with pytest.raises(DataError, match=r"plain\.csv, field 'rpn_score': no 'rpn_score' column"):
        plain.scored_by("rpn_score")
    # A row that leaves the column empty is named by its line.
    rows = [(*m[:7], "") if i == 2 else m for i, m in enumerate(MARKS)]
    gap = read_predictions(write_csv(tmp_path / "gap.csv", BRANCH_HEADER, rows))
    with pytest.raises(DataError, match=r"gap\.csv, line 4, field 'fpr_score'"):
        gap.scored_by("fpr_score")
    gap.scored_by("rpn_score")  # the other column is whole


def test_branch_frocs_hand_computed(files):
    got = branch_frocs(_inputs(files), EvalConfig(bootstrap=0))
    assert list(got) == ["probability", "rpn_score", "fpr_score"]
    for column, sens in EXPECTED.items():
        assert got[column]["sensitivities"] == pytest.approx(sens), column
        assert got[column]["froc_score"] == pytest.approx(np.mean(sens)), column
        assert got[column]["ci_lower"] is None and got[column]["froc_ci"] is None
        assert got[column]["true_positives"] == 2
    assert got["fpr_score"]["froc_score"] == pytest.approx(3 / 7)
    assert got["probability"]["froc_score"] == pytest.approx(4.5 / 7)
    table = format_branch_table(got).splitlines()
    assert [line.split()[:3] for line in table[1:]] == [
        ["combined", "probability", "0.643"],
        ["RPN", "rpn_score", "1.000"],
        ["FPRN", "fpr_score", "0.429"],
    ]


def test_branch_frocs_cap_ranks_by_the_scored_column(files):
    got = branch_frocs(
        _inputs(files), EvalConfig(bootstrap=0, max_marks=2), ["rpn_score", "fpr_score"]
    )
    assert list(got) == ["rpn_score", "fpr_score"]
    assert got["rpn_score"]["sensitivities"] == pytest.approx([1] * 7)
    assert got["fpr_score"]["sensitivities"] == pytest.approx([0, 0, 0, 0, 0.5, 0.5, 0.5])
    assert got["fpr_score"]["true_positives"] == 1


def test_evaluate_by_one_branch_column(files, tmp_path):
    out = tmp_path / "rpn"
    summary = evaluate(_inputs(files, score_column="fpr_score"), str(out), EvalConfig(bootstrap=0))
    assert summary["score_column"] == "fpr_score"
    assert "branches" not in summary
    assert summary["sensitivities"] == pytest.approx(EXPECTED["fpr_score"])
    assert (summary["false_positives"], summary["marks_ignored_excluded"]) == (3, 1)
    # nodules.csv holds the scored column's value of each nodule's best hit.
    rows = (out / "nodules.csv").read_text().splitlines()[1:]
    assert [r.split(",")[-1] for r in rows] == ["0.2", "0.1"]
    with pytest.raises(ValueError, match="score column"):
        evaluate(_inputs(files, score_column="bogus"), str(tmp_path / "x"))


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "tf_agg3d.evaluate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )


def _args(files, **over):
    return [f"--{k}={v}" for k, v in {**files, **over}.items()]


def test_cli_all_writes_three_frocs(files, tmp_path):
    out = tmp_path / "all"
    proc = _cli(*_args(files, out=out, bootstrap=50, seed=1), "--score-column=all")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(proc.stdout) == summary
    branches = summary["branches"]
    assert list(branches) == ["probability", "rpn_score", "fpr_score"]
    for column, sens in EXPECTED.items():
        assert branches[column]["sensitivities"] == pytest.approx(sens), column
        assert len(branches[column]["ci_lower"]) == 7 and len(branches[column]["ci_upper"]) == 7
    # The main outputs are those of probability.
    assert "score_column" not in summary
    assert summary["froc_score"] == branches["probability"]["froc_score"]
    assert summary["ci_lower"] == branches["probability"]["ci_lower"]
    table = [line.split()[:3] for line in proc.stderr.splitlines() if line.split()[:1]]
    assert ["combined", "probability", "0.643"] in table
    assert ["RPN", "rpn_score", "1.000"] in table
    assert ["FPRN", "fpr_score", "0.429"] in table


@pytest.mark.parametrize("column", ["fpr_score", "all"])
def test_cli_missing_column_is_a_data_error(files, tmp_path, column):
    plain = write_csv(tmp_path / "plain.csv", PRED_HEADER, [m[:5] for m in MARKS])
    out = tmp_path / "e"
    proc = _cli(*_args(files, predictions=plain, out=out, bootstrap=0), f"--score-column={column}")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    # 'all' checks every column before computing anything; rpn_score is the first one missing.
    missing = "rpn_score" if column == "all" else column
    assert re.search(
        rf"plain\.csv, field '{missing}': no '{missing}' column", proc.stderr
    ), proc.stderr
    assert not (out / "summary.json").exists()


def test_cli_score_column_probability_is_the_default(files, tmp_path):
    outputs = []
    for name, extra in (("default", []), ("explicit", ["--score-column=probability"])):
        out = tmp_path / name
        proc = _cli(*_args(files, out=out, bootstrap=50), *extra)
        assert proc.returncode == 0, proc.stderr
        outputs.append((proc.stdout, {f: (out / f).read_bytes() for f in sorted(os.listdir(out))}))
    assert outputs[0] == outputs[1]
    assert sorted(outputs[0][1]) == ["froc.png", "froc_curve.csv", "nodules.csv", "summary.json"]
    summary = json.loads(outputs[0][0])
    assert "branches" not in summary and "score_column" not in summary
    assert summary["sensitivities"] == pytest.approx(EXPECTED["probability"])

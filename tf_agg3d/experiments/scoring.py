"""Scoring an experiment's predictions: the FROC of some scans, and of each detector branch.

The detector writes three scores per finding (``predict``'s CSV): ``rpn_score``, ``fpr_score``
and their mean ``probability``. Paper Table III reports the FROC of each; :data:`BRANCHES`
names them (combined, rpn, fprn) and :func:`branch_scores` computes them with the evaluation
library's :func:`tf_agg3d.evaluation.report.branch_frocs`.
"""

from __future__ import annotations

from collections.abc import Sequence

from tf_agg3d.config import EvalConfig
from tf_agg3d.data.errors import DataError

# Table III's rows: the score column of predict's CSV behind each FROC.
BRANCHES = (("combined", "probability"), ("rpn", "rpn_score"), ("fprn", "fpr_score"))


def branch_scores(inputs, config: EvalConfig) -> tuple[dict | None, str]:
    """Table III's rows (combined, RPN, FPRN) of one predictions file.

    Args:
      inputs: a :class:`tf_agg3d.evaluation.report.EvalInputs`.
      config: FP rates, bootstrap, mark cap.

    Returns:
      ``({branch: block | {"column": column}}, "")``, or ``(None, why)`` when they cannot be
      computed (a file without the branch columns).
    """
    from tf_agg3d.evaluation import report

    try:
        by_column = report.branch_frocs(inputs, config, columns=[c for _, c in BRANCHES])
    except DataError as err:
        return None, f"per-branch FROC not computed: {err}"
    return {name: by_column[column] | {"column": column} for name, column in BRANCHES}, ""


def scan_match(annotations, excluded, predictions, uids: Sequence[str], config: EvalConfig):
    """The official match of the `predictions` of the scans `uids` (marks of other scans left
    out), as :func:`tf_agg3d.evaluation.froc.match` computes it: scan index i is ``uids[i]``.

    Args:
      annotations, excluded: :class:`tf_agg3d.evaluation.io.Annotations` (excluded: or None).
      predictions: :class:`tf_agg3d.evaluation.io.Predictions`, scored by the column wanted.
      uids: the scans (the FP-per-scan divisor).
      config: the mark cap.
    """
    import numpy as np

    from tf_agg3d.evaluation import froc as froc_lib

    marks = predictions.subset(np.isin(predictions.seriesuid, list(uids)))
    return froc_lib.match(
        annotations, excluded, marks, list(uids), max_marks=config.max_marks, unknown="error"
    )

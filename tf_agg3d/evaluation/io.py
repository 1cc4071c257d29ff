"""The evaluation's view of the LUNA16 CSV files: column arrays for vectorised FROC.

Parsing and validation are :mod:`tf_agg3d.data.luna16.csv_io`'s (header required, finite numbers,
:class:`~tf_agg3d.data.errors.DataError` naming file, line and field, empty files refused);
this module turns its per-row records into numpy columns, reads the DeepLesion columns and
applies the evaluation's rules:

- annotations: ``seriesuid,coordX,coordY,coordZ,diameter_mm`` (world mm, x/y/z order).
  DeepLesion-style files may add ``lesion_type`` (1..8, -1 unknown) and ``large`` (0/1).
- excluded findings (``annotations_excluded.csv``): the same columns; a diameter of -1 means
  10 mm (a 5 mm radius), as in the official script (which maps every diameter < 0 to 10 mm).
- predictions: ``seriesuid,coordX,coordY,coordZ,probability`` plus an optional ``diameter_mm``
  (used by ensembles and the gallery) and the optional per-branch scores ``rpn_score`` and
  ``fpr_score`` that ``predict`` writes (``probability`` is their mean); any of the score
  columns can be the one the FROC ranks by (:meth:`Predictions.scored_by`).
- seriesuid list: one seriesuid per line, no header in the official file; a header row is
  counted as a scan like the official script does, unless asked not to
  (:func:`read_seriesuids`).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from tf_agg3d.data.errors import DataError
from tf_agg3d.data.luna16 import csv_io as luna16_csv

log = logging.getLogger(__name__)

# Columns a predictions file may score its marks by: the combined score (the LUNA16 submission
# column) and, in files written by ``predict``, the RPN and FPRN branch scores.
SCORE_COLUMNS = ("probability", "rpn_score", "fpr_score")
BRANCH_SCORE_COLUMNS = SCORE_COLUMNS[1:]

LESION_TYPES = {
    1: "bone",
    2: "abdomen",
    3: "mediastinum",
    4: "liver",
    5: "lung",
    6: "kidney",
    7: "soft tissue",
    8: "pelvis",
    -1: "unknown",
}


@dataclasses.dataclass
class Annotations:
    """Rows of an annotations (or excluded findings) CSV as column arrays.

    Attributes:
      seriesuid: [N] str array.
      xyz: [N, 3] float64 world centre in mm (x, y, z).
      diameter_mm: [N] float64 effective diameter (10 mm where an excluded finding says < 0).
      lesion_type: [N] int array (DeepLesion coarse type) or None when the column is absent.
      large: [N] bool array from the ``large`` column, or None when absent.
      path: the file read (for messages).
      lines: [N] 1-based line numbers in the file.
    """

    seriesuid: np.ndarray
    xyz: np.ndarray
    diameter_mm: np.ndarray
    lesion_type: np.ndarray | None = None
    large: np.ndarray | None = None
    path: str = "<memory>"
    lines: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.seriesuid.shape[0])


@dataclasses.dataclass
class Predictions:
    """Rows of a predictions (submission) CSV as column arrays.

    Attributes:
      seriesuid: [N] str array.
      xyz: [N, 3] float64 world centre in mm (x, y, z).
      probability: [N] float64 score (any finite number; only its order matters for FROC).
      diameter_mm: [N] float64 or None when the file has no ``diameter_mm`` column.
      path: the file read (for messages).
      lines: [N] 1-based line numbers in the file.
      branch_scores: per-branch score columns of the file (``rpn_score``, ``fpr_score``) as
        [N] float64 arrays; a column the file lacks is absent, and a row that leaves it empty
        holds NaN there (:meth:`scored_by` refuses such a column).
    """

    seriesuid: np.ndarray
    xyz: np.ndarray
    probability: np.ndarray
    diameter_mm: np.ndarray | None = None
    path: str = "<memory>"
    lines: np.ndarray | None = None
    branch_scores: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.seriesuid.shape[0])

    def subset(self, mask: np.ndarray) -> Predictions:
        """The rows where `mask` is true (or at the given indices)."""
        return Predictions(
            seriesuid=self.seriesuid[mask],
            xyz=self.xyz[mask],
            probability=self.probability[mask],
            diameter_mm=None if self.diameter_mm is None else self.diameter_mm[mask],
            path=self.path,
            lines=None if self.lines is None else self.lines[mask],
            branch_scores={k: v[mask] for k, v in self.branch_scores.items()},
        )

    def scored_by(self, column: str) -> Predictions:
        """The same marks with `column` as their ``probability`` (the score the FROC ranks by).

        Args:
          column: one of :data:`SCORE_COLUMNS`; ``"probability"`` returns `self`.

        Raises:
          DataError: the file has no such column (a plain LUNA16 submission has only
            ``probability``), or a row leaves it empty (names the line).
          ValueError: `column` is not a score column.
        """
        if column not in SCORE_COLUMNS:
            raise ValueError(
                f"score column must be one of {', '.join(SCORE_COLUMNS)}, got {column!r}"
            )
        if column == "probability":
            return self
        scores = self.branch_scores.get(column)
        if scores is None:
            have = ["probability", *(c for c in BRANCH_SCORE_COLUMNS if c in self.branch_scores)]
            raise DataError(
                self.path,
                f"no '{column}' column to score by; the file's score column(s): "
                f"{', '.join(have)} (rpn_score and fpr_score come from predict's output)",
                field=column,
            )
        empty = np.flatnonzero(np.isnan(scores))
        if empty.size:
            line = int(self.lines[empty[0]]) if self.lines is not None else None
            raise DataError(
                self.path,
                f"{empty.size} mark(s) without a '{column}' value; cannot score by it",
                line=line,
                field=column,
            )
        return dataclasses.replace(self, probability=np.asarray(scores, dtype=np.float64))


def _as_int(path: str, line: int, field: str, text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise DataError(
            path, f"not a number: '{luna16_csv.show(text)}'", line=line, field=field
        ) from None
    if not math.isfinite(value) or value != int(value):
        raise DataError(path, f"not an integer: '{luna16_csv.show(text)}'", line=line, field=field)
    return int(value)


def _annotations(groups: dict, path: str, excluded: bool) -> Annotations:
    rows = sorted((a for items in groups.values() for a in items), key=lambda a: a.line)
    has_type = any("lesion_type" in a.extra for a in rows)
    has_large = any("large" in a.extra for a in rows)
    types, large = [], []
    for a in rows:
        if has_type:
            t = _as_int(path, a.line, "lesion_type", a.extra.get("lesion_type", ""))
            if t not in LESION_TYPES:
                raise DataError(
                    path, f"lesion type must be 1..8 or -1, got {t}", a.line, "lesion_type"
                )
            types.append(t)
        if has_large:
            v = _as_int(path, a.line, "large", a.extra.get("large", ""))
            if v not in (0, 1):
                raise DataError(path, f"must be 0 or 1, got {v}", a.line, "large")
            large.append(v == 1)
    diam = [a.diameter_mm for a in rows]
    if excluded:
        diam = [luna16_csv.excluded_diameter(d) for d in diam]
    return Annotations(
        seriesuid=np.asarray([a.seriesuid for a in rows], dtype=str),
        xyz=np.asarray([a.xyz for a in rows], dtype=np.float64).reshape(-1, 3),
        diameter_mm=np.asarray(diam, dtype=np.float64),
        lesion_type=np.asarray(types, dtype=np.int64) if has_type else None,
        large=np.asarray(large, dtype=bool) if has_large else None,
        path=str(path),
        lines=np.asarray([a.line for a in rows], dtype=np.int64),
    )


def read_annotations(path: str, excluded: bool = False) -> Annotations:
    """Reads ``annotations.csv`` or, with `excluded`, ``annotations_excluded.csv``.

    Parsing and validation are :mod:`tf_agg3d.data.luna16.csv_io`'s; this adds the column layout
    and the DeepLesion columns.

    Args:
      path: local path or `tf.io.gfile` URL.
      excluded: the file lists excluded findings: a diameter of -1 means 10 mm. In an
        annotations file every diameter must be positive.

    Returns:
      The rows as :class:`Annotations`, in file order.

    Raises:
      DataError: unreadable or empty file, missing header/column, non-numeric or non-finite
        value, a diameter out of range, a lesion type outside 1..8/-1 or ``large`` not 0/1.
    """
    path = str(path)
    if excluded:
        return _annotations(luna16_csv.read_excluded(path), path, True)
    return _annotations(luna16_csv.read_annotations(path), path, False)


def read_predictions(path: str) -> Predictions:
    """Reads a predictions CSV (``seriesuid,coordX,coordY,coordZ,probability[,diameter_mm]``).

    A file holding only the header is valid (a system that marked nothing). ``diameter_mm`` is
    returned only when every row has one. ``rpn_score`` / ``fpr_score`` go to
    :attr:`Predictions.branch_scores` when any row has them (NaN where a row leaves one empty);
    a file without rows has every branch column, empty.

    Raises:
      DataError: unreadable or empty file, missing header/column, non-numeric or non-finite
        value, a non-positive ``diameter_mm``.
    """
    path = str(path)
    groups = luna16_csv.read_predictions(path)
    rows = sorted((p for items in groups.values() for p in items), key=lambda p: p.line)
    diam = [p.diameter_mm for p in rows]
    has_diam = bool(rows) and all(d is not None for d in diam)
    if has_diam:
        for p, d in zip(rows, diam, strict=False):
            if d <= 0:
                raise DataError(path, f"diameter must be > 0, got {d}", p.line, "diameter_mm")
    branch_scores = {
        name: np.asarray([p.extra.get(name, np.nan) for p in rows], dtype=np.float64)
        for name in BRANCH_SCORE_COLUMNS
        if not rows or any(name in p.extra for p in rows)
    }
    return Predictions(
        seriesuid=np.asarray([p.seriesuid for p in rows], dtype=str),
        xyz=np.asarray([(p.x, p.y, p.z) for p in rows], dtype=np.float64).reshape(-1, 3),
        probability=np.asarray([p.probability for p in rows], dtype=np.float64),
        diameter_mm=np.asarray(diam, dtype=np.float64) if has_diam else None,
        path=path,
        lines=np.asarray([p.line for p in rows], dtype=np.int64),
        branch_scores=branch_scores,
    )


def read_seriesuids(path: str, skip_header: bool = False) -> list[str]:
    """Reads the list of evaluated scans (one seriesuid per line).

    The file is read by :func:`tf_agg3d.data.luna16.csv_io.read_seriesuids`, the package's one
    reader of these lists, with its header rule. The official script reads every row of this
    file as a scan, so a header row (a first line reading ``seriesuid``) becomes one more scan,
    without marks or nodules, that enlarges the FP-per-scan divisor by one. By default that is
    reproduced, with a warning, so the numbers match the official ones; `skip_header` drops such
    a row instead.

    Raises:
      DataError: unreadable or empty file, a line that is not one seriesuid, a duplicated
        seriesuid (the official script would evaluate that scan twice, never intended).
    """
    path = str(path)
    uids = luna16_csv.read_seriesuids(path, keep_header=True)
    if uids and luna16_csv.is_seriesuid_header(uids[0]):
        if skip_header:
            uids = uids[1:]
        else:
            log.warning(
                "%s: the first line %r is a header; like the official script it is counted as "
                "a scan (FPs are divided by %d, not %d); pass skip_seriesuid_header to drop it",
                path,
                uids[0],
                len(uids),
                len(uids) - 1,
            )
    if not uids:
        raise DataError(path, "seriesuid list is empty")
    return uids


def write_predictions(path: str, predictions: Predictions) -> None:
    """Writes predictions as CSV (with ``diameter_mm`` and the branch scores when known),
    atomically; a NaN branch score is left empty."""
    rows = []
    for i in range(len(predictions)):
        row = {
            "seriesuid": str(predictions.seriesuid[i]),
            "coordX": float(predictions.xyz[i, 0]),
            "coordY": float(predictions.xyz[i, 1]),
            "coordZ": float(predictions.xyz[i, 2]),
            "probability": float(predictions.probability[i]),
        }
        if predictions.diameter_mm is not None:
            row["diameter_mm"] = float(predictions.diameter_mm[i])
        for name, scores in predictions.branch_scores.items():
            if not np.isnan(scores[i]):
                row[name] = float(scores[i])
        rows.append(row)
    luna16_csv.write_predictions(path, rows)

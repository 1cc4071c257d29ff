"""The per-fold table of a cross-validation: ``DIR/folds.csv`` and the printed table.

One row per pooled fold (its scans, nodules, FROC alone, findings, seconds) and, in the printed
table, a last ``pooled`` row with the pooled FROC (:meth:`tf_agg3d.experiments.crossval.
CrossValidation.evaluate` writes both).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

FOLD_COLUMNS = ("fold", "scans", "nodules", "froc", "findings", "train_seconds", "predict_seconds")


def folds_csv(rows: Sequence[Mapping]) -> str:
    """The per-fold table as CSV text (empty cells for None)."""
    lines = [",".join(FOLD_COLUMNS)]
    for row in rows:
        lines.append(",".join("" if row.get(c) is None else str(row.get(c)) for c in FOLD_COLUMNS))
    return "\n".join(lines) + "\n"


def format_table(summary: Mapping) -> str:
    """The per-fold table and the pooled line, aligned for a terminal."""

    def cell(v, digits=3):
        if v is None:
            return "-"
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    header = ("fold", "scans", "nodules", "FROC", "findings", "train s", "predict s")
    body = [
        (
            str(r["fold"]),
            str(r["scans"]),
            str(r["nodules"]),
            cell(r["froc"]),
            str(r["findings"]),
            cell(r["train_seconds"], 1),
            cell(r["predict_seconds"], 1),
        )
        for r in summary["folds"]
    ]
    body.append(
        (
            "pooled",
            str(summary["scans"]),
            str(summary["nodules"]),
            cell(summary["froc_score"]),
            str(summary["findings"]),
            cell(sum(r["train_seconds"] or 0.0 for r in summary["folds"]), 1),
            cell(sum(r["predict_seconds"] or 0.0 for r in summary["folds"]), 1),
        )
    )
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in [header]]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)

"""One evaluation run: read the files, compute FROC, CI, TNP and breakdowns, write the outputs.

Outputs in the output folder:

- ``summary.json``: ``froc_score``, ``fp_rates``, ``sensitivities``, ``ci_lower``/``ci_upper``
  (bootstrap, None without bootstrap), ``froc_ci``, the counts (``scans``, ``nodules``,
  ``true_positives``, ``false_positives``, ``marks_ignored_excluded`` and more), ``tnp``,
  ``breakdown`` and the inputs.
- ``froc.png``: the curve on a log2 axis with the CI band.
- ``froc_curve.csv``: every curve point (fps_per_scan, sensitivity, threshold).
- ``nodules.csv``: every evaluated nodule with its best hit's score (empty when missed).
- ``gallery/``: hard cases, only when a cache folder is given.

The score the FROC ranks by is the ``probability`` column unless :attr:`EvalInputs.score_column`
names a branch column of ``predict``'s output (``rpn_score``, ``fpr_score``): every output is then
computed with that column as the marks' score (cap, ties and curve included), and the summary
says which (``score_column``). With ``score_column="all"`` the outputs are those of
``probability`` and the summary adds ``branches``: the FROC of each of the three columns, the
paper's Table III rows (combined, RPN, FPRN). :func:`branch_frocs` gives the same three without
writing anything, for a cross-validation runner.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os

from tf_agg3d.config import EvalConfig
from tf_agg3d.evaluation import froc as froc_lib
from tf_agg3d.evaluation.breakdown import BreakdownConfig, breakdown
from tf_agg3d.evaluation.gallery import GalleryConfig, write_gallery
from tf_agg3d.evaluation.io import (
    SCORE_COLUMNS,
    Predictions,
    read_annotations,
    read_predictions,
    read_seriesuids,
)
from tf_agg3d.evaluation.plots import plot_froc
from tf_agg3d.evaluation.tnp import tnp_score
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.atomic_write import atomic_write_json, atomic_write_text

# What EvalInputs.score_column takes: one score column, or "all" for the per-branch FROCs.
SCORE_CHOICES = (*SCORE_COLUMNS, "all")
# Table III's names of the score columns.
BRANCH_LABELS = {"probability": "combined", "rpn_score": "RPN", "fpr_score": "FPRN"}


@dataclasses.dataclass
class EvalInputs:
    """Files of one evaluation.

    Attributes:
      annotations: annotations.csv.
      predictions: the predictions CSV.
      excluded: annotations_excluded.csv, or "" for none.
      seriesuids: the list of evaluated scans, or "" to take the scans of the predictions.
      skip_seriesuid_header: drop a ``seriesuid`` header row instead of counting it as a scan
        like the official script.
      unknown_seriesuids: ``"error"`` or ``"ignore"`` (official) for marks of unlisted scans.
      label: name on the plot (default: the predictions file name, plus the score column when
        it is not ``probability``).
      score_column: the column the marks are scored by: ``"probability"`` (the combined score),
        ``"rpn_score"`` or ``"fpr_score"``; ``"all"`` scores by ``probability`` and adds the
        FROC of every column (``branches``).
    """

    annotations: str
    predictions: str
    excluded: str = ""
    seriesuids: str = ""
    skip_seriesuid_header: bool = False
    unknown_seriesuids: str = "error"
    label: str = ""
    score_column: str = "probability"


def _scans_from_predictions(predictions: Predictions) -> list[str]:
    return list(dict.fromkeys(predictions.seriesuid.tolist()))


def _check_score_column(column: str) -> None:
    if column not in SCORE_CHOICES:
        raise ValueError(f"score column must be one of {', '.join(SCORE_CHOICES)}, got {column!r}")


def _read_inputs(inputs: EvalInputs, warn):
    """annotations, excluded (or None), predictions and the evaluated scans."""
    annotations = read_annotations(inputs.annotations)
    excluded = read_annotations(inputs.excluded, excluded=True) if inputs.excluded else None
    predictions = read_predictions(inputs.predictions)
    if inputs.seriesuids:
        uids = read_seriesuids(inputs.seriesuids, skip_header=inputs.skip_seriesuid_header)
    else:
        uids = _scans_from_predictions(predictions)
        warn(
            "no seriesuid list: evaluating the scans present in the predictions; scans "
            "without marks are not counted (pass the list for the official FP divisor)"
        )
        if not uids:
            raise ValueError(
                f"{inputs.predictions}: no marks and no seriesuid list, nothing to evaluate"
            )
    return annotations, excluded, predictions, uids


def _froc_and_ci(m: froc_lib.MatchResult, config: EvalConfig):
    result = froc_lib.froc(m, config.fp_rates)
    ci = None
    if config.bootstrap > 0 and m.n_nodules > 0:
        ci = froc_lib.bootstrap(m, config.fp_rates, n=config.bootstrap, seed=config.seed)
    return result, ci


def _branch_block(result: froc_lib.FrocResult, ci: froc_lib.BootstrapResult | None) -> dict:
    num = froc_lib._num
    return {
        "froc_score": num(result.froc_score),
        "sensitivities": [num(s) for s in result.sensitivities],
        "ci_lower": None if ci is None else [num(v) for v in ci.lower],
        "ci_upper": None if ci is None else [num(v) for v in ci.upper],
        "froc_ci": None if ci is None else [num(ci.froc_lower), num(ci.froc_upper)],
        "true_positives": result.n_detected,
    }


def _branches(
    annotations, excluded, predictions: dict, uids, config: EvalConfig, unknown: str, done=None
) -> dict:
    """{column: block} for the scored predictions; `done` = (column, result, ci) already had."""
    out = {}
    for column, scored in predictions.items():
        if done is not None and done[0] == column:
            result, ci = done[1], done[2]
        else:
            m = froc_lib.match(
                annotations, excluded, scored, uids, max_marks=config.max_marks, unknown=unknown
            )
            result, ci = _froc_and_ci(m, config)
        out[column] = _branch_block(result, ci)
    return out


def branch_frocs(
    inputs: EvalInputs,
    config: EvalConfig | None = None,
    columns=SCORE_COLUMNS,
    warn=None,
) -> dict:
    """The FROC of each score column of a predictions file (paper Table III), nothing written.

    Every column is scored by the official rules as if it were the ``probability`` column (the
    per-scan cap by that score, ties, excluded findings, the hit rule).

    Args:
      inputs: the files (`inputs.score_column` is not used).
      config: FP rates, bootstrap count and seed (0: no CI), mark cap.
      columns: the score columns, default ``probability``, ``rpn_score`` and ``fpr_score``.
      warn: callable taking a message (default: ignored).

    Returns:
      ``{column: {"froc_score", "sensitivities", "ci_lower", "ci_upper", "froc_ci",
      "true_positives"}}`` in `columns` order; CI entries are None without bootstrap.

    Raises:
      DataError: a bad input file, or a column the predictions lack (names file and column).
      ValueError: an unknown column or an inconsistent configuration.
    """
    config = config or EvalConfig()
    warn = warn or (lambda msg: None)
    bad = [c for c in columns if c not in SCORE_COLUMNS]
    if bad:
        raise ValueError(f"score columns must be among {', '.join(SCORE_COLUMNS)}, got {bad}")
    annotations, excluded, predictions, uids = _read_inputs(inputs, warn)
    scored = {column: predictions.scored_by(column) for column in columns}
    return _branches(annotations, excluded, scored, uids, config, inputs.unknown_seriesuids)


def format_branch_table(branches: dict, fp_rates=froc_lib.FP_RATES) -> str:
    """A plain-text table of :func:`branch_frocs`' result: one row per column (Table III)."""

    def cell(v) -> str:
        return "  -  " if v is None else f"{v:.3f}"

    head = ["branch  ", "column     ", "FROC ", *(f"{r:g}".ljust(5) for r in fp_rates), "FROC CI"]
    lines = ["  ".join(head).rstrip()]
    for column, block in branches.items():
        ci = block.get("froc_ci")
        row = [
            BRANCH_LABELS.get(column, column).ljust(8),
            column.ljust(11),
            cell(block["froc_score"]),
            *(cell(s) for s in block["sensitivities"]),
            "-" if ci is None else f"[{cell(ci[0])}, {cell(ci[1])}]",
        ]
        lines.append("  ".join(row))
    return "\n".join(lines)


def evaluate(
    inputs: EvalInputs,
    out_dir: str,
    config: EvalConfig | None = None,
    breakdown_config: BreakdownConfig | None = None,
    cache_dir: str = "",
    gallery_config: GalleryConfig | None = None,
    warn=None,
) -> dict:
    """Runs the whole evaluation and writes its outputs into `out_dir`.

    Args:
      inputs: the files.
      out_dir: output folder (local or URL), created.
      config: FP rates, bootstrap count and seed, mark cap, TNP target. ``bootstrap`` 0 skips
        the CI.
      breakdown_config: size buckets and the large-lesion size.
      cache_dir: preprocessed cache for the hard-case gallery; "" skips the gallery.
      gallery_config: what the gallery draws.
      warn: callable taking a message, for notes the caller should show (default: ignored).

    Returns:
      The summary (also written to ``out_dir/summary.json``).

    Raises:
      DataError: a bad input file.
      ValueError: an inconsistent configuration.
    """
    config = config or EvalConfig()
    warn = warn or (lambda msg: None)
    column = inputs.score_column
    _check_score_column(column)
    annotations, excluded, predictions, uids = _read_inputs(inputs, warn)
    # Every column asked for is checked before anything is computed or written.
    scored = {c: predictions.scored_by(c) for c in (SCORE_COLUMNS if column == "all" else [column])}
    main_column = "probability" if column == "all" else column
    predictions = scored[main_column]
    m = froc_lib.match(
        annotations,
        excluded,
        predictions,
        uids,
        max_marks=config.max_marks,
        unknown=inputs.unknown_seriesuids,
    )
    if m.marks_unknown_scan:
        warn(f"{m.marks_unknown_scan} mark(s) on scans not in the seriesuid list were ignored")
    if m.n_nodules == 0:
        warn("no annotated nodule on the evaluated scans: sensitivities are undefined (null)")
    result, ci = _froc_and_ci(m, config)
    tnp = tnp_score(m, config.tnp_sensitivity)
    groups = breakdown(m, annotations, breakdown_config, config.fp_rates)

    uio.makedirs(out_dir)
    label = inputs.label or os.path.splitext(os.path.basename(inputs.predictions))[0]
    if not inputs.label and main_column != "probability":
        label = f"{label} ({main_column})"
    files = {"summary": "summary.json", "curve_csv": "froc_curve.csv", "nodules_csv": "nodules.csv"}
    if m.n_nodules > 0:
        plot_froc(uio.join(out_dir, "froc.png"), result, ci, label=label)
        files["froc_png"] = "froc.png"
    _write_curve(uio.join(out_dir, "froc_curve.csv"), result.curve)
    _write_nodules(uio.join(out_dir, "nodules.csv"), m, annotations)
    gallery = None
    if cache_dir:
        index = write_gallery(
            uio.join(out_dir, "gallery"), cache_dir, m, annotations, predictions, gallery_config
        )
        gallery = {
            "dir": "gallery",
            "drawn": sum("file" in e for e in index),
            "skipped": sum("skipped" in e for e in index),
        }

    summary = {
        "froc_score": froc_lib._num(result.froc_score),
        "fp_rates": [float(r) for r in result.fp_rates],
        "sensitivities": [froc_lib._num(s) for s in result.sensitivities],
        "ci_lower": None if ci is None else [froc_lib._num(v) for v in ci.lower],
        "ci_upper": None if ci is None else [froc_lib._num(v) for v in ci.upper],
        "bootstrap_mean": None if ci is None else [froc_lib._num(v) for v in ci.mean],
        "froc_ci": None
        if ci is None
        else [froc_lib._num(ci.froc_lower), froc_lib._num(ci.froc_upper)],
        "bootstrap": {
            "samples": ci.n if ci else 0,
            "seed": config.seed,
            "confidence": ci.confidence if ci else None,
        },
        **m.counts(),
        "max_marks_per_scan": config.max_marks,
        "final_sensitivity": froc_lib._num(m.detected.sum() / m.n_nodules) if m.n_nodules else None,
        "tnp": tnp.to_dict(),
        "breakdown": groups,
        "gallery": gallery,
        "inputs": {
            "annotations": inputs.annotations,
            "excluded": inputs.excluded or None,
            "predictions": inputs.predictions,
            "seriesuids": inputs.seriesuids or None,
        },
        "files": files,
    }
    # Keys only when asked for, so that the default summary stays what it always was.
    if main_column != "probability":
        summary["score_column"] = main_column
    if column == "all":
        summary["branches"] = _branches(
            annotations,
            excluded,
            scored,
            uids,
            config,
            inputs.unknown_seriesuids,
            done=(main_column, result, ci),
        )
    atomic_write_json(uio.join(out_dir, "summary.json"), summary)
    return summary


def _csv_text(header, rows) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _write_curve(path: str, curve: froc_lib.FrocCurve) -> None:
    rows = [
        (repr(float(f)), repr(float(s)), repr(float(t)))
        for f, s, t in zip(curve.fps, curve.sensitivity, curve.thresholds, strict=True)
    ]
    atomic_write_text(path, _csv_text(["fps_per_scan", "sensitivity", "threshold"], rows))


def _write_nodules(path: str, m: froc_lib.MatchResult, annotations) -> None:
    rows = []
    for k in range(m.n_nodules):
        r = m.nodule_row[k]
        detected = m.nodule_mark[k] >= 0
        rows.append(
            (
                m.seriesuids[m.nodule_scan[k]],
                *(repr(float(v)) for v in annotations.xyz[r]),
                repr(float(annotations.diameter_mm[r])),
                int(annotations.lines[r]) if annotations.lines is not None else "",
                int(detected),
                repr(float(m.nodule_prob[k])) if detected else "",
            )
        )
    header = [
        "seriesuid",
        "coordX",
        "coordY",
        "coordZ",
        "diameter_mm",
        "line",
        "detected",
        "probability",
    ]
    atomic_write_text(path, _csv_text(header, rows))

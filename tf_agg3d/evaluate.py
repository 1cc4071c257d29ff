r"""LUNA16 FROC evaluation and ensemble merging (absl entry point).

Evaluate a predictions CSV (official LUNA16 FROC, bootstrap CI, TNP, breakdowns, plot)::

  python -m tf_agg3d.evaluate --annotations annotations.csv \
      --excluded annotations_excluded.csv --predictions preds.csv \
      --seriesuids seriesuids.csv --out eval_dir [--bootstrap 1000] [--seed 0] \
      [--cache CACHE] [--tnp-sensitivity 0.95] \
      [--score-column probability|rpn_score|fpr_score|all]

``--score-column`` picks the score the FROC ranks the marks by: ``probability`` (default, the
combined score of a LUNA16 submission), or the RPN / FPRN branch score ``predict`` writes
(``rpn_score``, ``fpr_score``). ``all`` evaluates ``probability`` and adds the FROC of all three
columns to the summary (``branches``, paper Table III), with a table of them on stderr.

Merge two predictions CSVs (paper Table III, "Merged (Union/Intersection)")::

  python -m tf_agg3d.evaluate ensemble --a preds1.csv --b preds2.csv --mode union \
      --out merged.csv [--distance-mm 5]

Settings come from the ``evaluation`` section of ``--config`` (YAML) and ``--set
evaluation.key=value`` when given, and flags given on the command line override them. Every
flag also takes its underscore spelling (``--max_marks``, ``--tnp_sensitivity``). The summary
is printed as JSON; bad inputs end with a one-line ``kind: message`` error naming the file and
exit status 2 (a usage error too).
"""

from __future__ import annotations

import json

from absl import flags, logging

from tf_agg3d.cli import exit as cli_exit
from tf_agg3d.cli import flags as cli_flags
from tf_agg3d.cli import output as cli_output
from tf_agg3d.config import EvalConfig

FLAGS = flags.FLAGS

flags.DEFINE_string(
    "annotations", None, "annotations.csv (seriesuid,coordX,coordY,coordZ,diameter_mm)."
)
flags.DEFINE_string("excluded", None, "annotations_excluded.csv (findings ignored by the FROC).")
flags.DEFINE_string(
    "predictions", None, "Predictions CSV (seriesuid,coordX,coordY,coordZ,probability)."
)
flags.DEFINE_string("seriesuids", None, "List of evaluated scans (the FP-per-scan divisor).")
flags.DEFINE_string("out", None, "Evaluation: output folder. ensemble: the merged predictions CSV.")
cli_flags.define_config_flags(
    "Experiment YAML; its 'evaluation' section sets defaults.",
    "Config override key=value, e.g. evaluation.bootstrap=200.",
)
flags.DEFINE_integer("bootstrap", None, "Bootstrap replicates for the CI (0: none). Default 1000.")
flags.DEFINE_integer("seed", None, "Bootstrap seed. Default 0.")
flags.DEFINE_integer("max-marks", None, "Marks per scan the FROC counts (official 100).")
flags.DEFINE_float("tnp-sensitivity", None, "Target sensitivity of the TNP score. Default 0.95.")
flags.DEFINE_list("size-edges-mm", ["5", "10", "20"], "Size bucket edges of the breakdown (mm).")
flags.DEFINE_float("large-mm", 48.0, "Large-lesion diameter (DeepLesion breakdown, mm).")
flags.DEFINE_string("cache", None, "Preprocessed cache folder: draws the hard-case gallery.")
flags.DEFINE_integer("gallery-fp", 10, "Gallery: top false positives drawn.")
flags.DEFINE_integer("gallery-missed", 20, "Gallery: missed nodules drawn.")
flags.DEFINE_string("label", None, "Name on the FROC plot (default: predictions file name).")
flags.DEFINE_bool(
    "skip-seriesuid-header",
    False,
    "Drop a 'seriesuid' header row of the list instead of counting it as a scan (official).",
)
flags.DEFINE_bool(
    "ignore-unknown-seriesuids",
    False,
    "Ignore marks of scans not in the list (official) instead of stopping with an error.",
)
flags.DEFINE_enum(
    "score-column",
    "probability",
    ["probability", "rpn_score", "fpr_score", "all"],
    "Score the FROC ranks by: the combined probability, the RPN or FPRN branch score, or "
    "'all' (probability, plus the three FROCs in summary 'branches').",
)
flags.DEFINE_string("a", None, "ensemble: first predictions CSV.")
flags.DEFINE_string("b", None, "ensemble: second predictions CSV.")
flags.DEFINE_enum("mode", "union", ["union", "intersection"], "ensemble: keep or drop unpaired.")
flags.DEFINE_float(
    "distance-mm", None, "ensemble: fixed overlap distance (default: half the larger diameter)."
)


def _eval_config(opts) -> EvalConfig:
    if opts.config or opts.set:
        config = cli_flags.load_config_from_flags().evaluation
    else:
        config = EvalConfig()
    for name in ("bootstrap", "seed", "max_marks", "tnp_sensitivity"):
        value = getattr(opts, name)
        if value is not None:
            setattr(config, name, value)
    if config.bootstrap < 0:
        raise cli_exit.UsageError("--bootstrap must be >= 0")
    return config


def _run_evaluate(opts) -> None:
    from tf_agg3d.evaluation.breakdown import BreakdownConfig
    from tf_agg3d.evaluation.gallery import GalleryConfig
    from tf_agg3d.evaluation.report import EvalInputs, evaluate, format_branch_table

    cli_flags.require("annotations", "predictions", "out")
    try:
        edges = tuple(float(e) for e in opts.size_edges_mm)
    except ValueError:
        raise cli_exit.UsageError(f"--size-edges-mm: not numbers: {opts.size_edges_mm}") from None
    inputs = EvalInputs(
        annotations=opts.annotations,
        predictions=opts.predictions,
        excluded=opts.excluded or "",
        seriesuids=opts.seriesuids or "",
        skip_seriesuid_header=opts.skip_seriesuid_header,
        unknown_seriesuids="ignore" if opts.ignore_unknown_seriesuids else "error",
        label=opts.label or "",
        score_column=opts.score_column,
    )
    summary = evaluate(
        inputs,
        opts.out,
        config=_eval_config(opts),
        breakdown_config=BreakdownConfig(size_edges_mm=edges, large_mm=opts.large_mm),
        cache_dir=opts.cache or "",
        gallery_config=GalleryConfig(
            top_false_positives=opts.gallery_fp, max_missed=opts.gallery_missed
        ),
        warn=logging.warning,
    )
    print(json.dumps(summary, indent=1))
    if "branches" in summary:
        for line in format_branch_table(summary["branches"], summary["fp_rates"]).splitlines():
            cli_output.note(line)


def _run_ensemble(opts) -> None:
    from tf_agg3d.evaluation.ensemble import merge
    from tf_agg3d.evaluation.io import read_predictions, write_predictions

    cli_flags.require("a", "b", "out")
    merged = merge(
        read_predictions(opts.a),
        read_predictions(opts.b),
        mode=opts.mode,
        distance_mm=opts.distance_mm,
    )
    write_predictions(opts.out, merged)
    print(json.dumps({"out": opts.out, "mode": opts.mode, "marks": len(merged)}))


def main(argv: list[str]) -> int:
    """The command's body (flags already parsed): returns the exit status."""
    command = argv[1:]
    if command not in ([], ["ensemble"]):
        raise cli_exit.UsageError(f"unknown command {' '.join(command)!r} (only 'ensemble')")
    opts = cli_flags.values()
    try:
        if command == ["ensemble"]:
            _run_ensemble(opts)
        else:
            _run_evaluate(opts)
    except OSError as err:
        # An unreadable input or unwritable output is the caller's to fix, like the input
        # errors (ConfigError, DataError, ValueError) cli_exit.call ends with status 2.
        cli_exit.report(err)
        return cli_exit.USAGE
    return cli_exit.OK


def run() -> None:
    """``agg3d-evaluate`` / ``python -m tf_agg3d.evaluate``."""
    cli_exit.run(main, doc=__doc__)


if __name__ == "__main__":
    run()
